"""Bad input: each case gives a clear message naming the file, row or column and saying what to do,
and nothing that already succeeded is lost.

Jobs run in-process against the emulator (``run_job`` called directly), as in test_embed.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from conftest import REPO, TEST_KEY, TEST_KEY_ENV, assert_balanced, read_errors, read_output, write_corpus
from fsspec.implementations.local import LocalFileSystem

from flows import commands
from flows.options import command_job
from tasks.engine.plan.input import CSV_BLOCK_BYTES
from tasks.engine.run import RunOptions, run_job
from tasks.errors import ConfigError, InputError
from tasks.jobs.caption import CaptionJob
from tasks.jobs.embed import EmbedJob
from tasks.jobs.media import base_dir_of
from tasks.jobs.transcribe import TranscribeJob
from tasks.provider.client import ProviderSettings

MODEL = "gemini-embedding-001"
CHAT_MODEL = "gemini-3.8-flash"


# -- helpers ----------------------------------------------------------------------------------------
def settings(base_url: str) -> ProviderSettings:
    return ProviderSettings(provider="local", base_url=base_url, api_key_env=TEST_KEY_ENV, timeout_s=5)


def run(job, input: Path | str, output: Path, base_url: str, *, chunk_size: int = 50, **kw) -> dict:
    options = RunOptions(input=str(input), output=str(output), provider=settings(base_url), chunk_size=chunk_size, **kw)
    return asyncio.run(run_job(job, options))


def run_embed(emu, input: Path | str, output: Path, *, model: str = MODEL, dimensions=None, **kw) -> dict:
    return run(EmbedJob(model=model, dimensions=dimensions), input, output, emu.base_url, **kw)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def long_text(i: int) -> str:
    """~7000 characters (~1750 tokens, under gemini-embedding-001's 2048), unique per row."""
    return f"row {i} " + ("lorem ipsum dolor sit amet " * 300)[:7000]


def csv_lines(n: int, text=lambda i: f"good text number {i}") -> list[str]:
    return ["id,text"] + [f"{i},{text(i)}" for i in range(n)]


# Two sizes of a CSV with one bad row: inside the reader's first block (the whole file is parsed in one
# go, before any chunk is sent), or past it (earlier blocks are chunked and sent before the bad one).
SMALL = {"rows": 300, "bad": 200, "text": lambda i: f"good text number {i}"}
LARGE = {"rows": 700, "bad": 650, "text": long_text}  # ~4.9 MB: row 650 lies past the first 4 MiB block
SIZES = {"one_read_block": SMALL, "past_first_read_block": LARGE}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_bytes(("\n".join(lines) + "\n").encode())
    return path


# -- input path missing or unreadable ------------------------------------------------------------------
@pytest.mark.parametrize("where", ["local", "fsspec_url"])
def test_missing_input_path_names_it_and_says_check_the_path(emulator, tmp_path, where):
    path = str(tmp_path / "no" / "such.parquet") if where == "local" else "memory://nothing-here/such.parquet"
    with pytest.raises(InputError) as error:
        run_embed(emulator, path, tmp_path / "out")
    message = str(error.value)
    assert path in message and "does not exist" in message and "check the path" in message
    assert not (tmp_path / "out").exists(), "nothing is created before the input opens"
    assert emulator.stats["requests"] == 0


class _RefusingFileSystem(LocalFileSystem):
    """A local filesystem whose files stat fine but can't be opened: EACCES, as for chmod 000."""

    protocol = ("gembatch-eacces",)

    def _open(self, path, mode="rb", **kwargs):
        raise PermissionError(13, "Permission denied", path)


@pytest.mark.parametrize(
    "kind",
    [
        "a_folder",
        "unknown_url_protocol",
        pytest.param(
            "permission_denied",
        ),
    ],
)
def test_unreadable_input_names_it_and_says_why(emulator, tmp_path, kind):
    """chmod 000 stops nobody when the tests run as root, so an unreadable input is: a folder, a URL
    of a protocol fsspec doesn't know, and (simulated) a filesystem that refuses to open the file."""
    good = write_corpus(tmp_path / "good.parquet", [1, 2], ["a", "b"])
    if kind == "a_folder":
        path, says = str(tmp_path), ["is a folder", "give one Parquet or CSV file"]
    elif kind == "unknown_url_protocol":
        path, says = "nosuchproto://bucket/in.parquet", ["can't be opened", "Protocol not known: nosuchproto"]
    else:
        fsspec.register_implementation("gembatch-eacces", _RefusingFileSystem, clobber=True)
        path, says = f"gembatch-eacces://{good}", ["can't be read", "ermission denied"]
    with pytest.raises(InputError) as error:
        run_embed(emulator, path, tmp_path / "out")
    message = str(error.value)
    assert path in message or str(good) in message
    for fragment in says:
        assert fragment in message, message
    assert not (tmp_path / "out").exists()
    assert emulator.stats["requests"] == 0


# -- not Parquet / CSV ------------------------------------------------------------------------------
def _json(tmp: Path) -> Path:
    path = tmp / "rows.json"
    path.write_text('[{"id": 1, "text": "a"}]\n')
    return path


def _csv_named_parquet(tmp: Path) -> Path:
    path = tmp / "rows.parquet"
    path.write_text("id,text\n1,a\n2,b\n")
    return path


def _parquet_named_csv(tmp: Path) -> Path:
    path = tmp / "rows.csv"
    pq.write_table(pa.table({"id": [1, 2], "text": ["a", "b"]}), path)
    return path


def _empty_csv(tmp: Path) -> Path:
    path = tmp / "rows.csv"
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_json, id="json_file"),
        pytest.param(
            _csv_named_parquet,
            id="csv_text_named_parquet",
        ),
        pytest.param(
            _parquet_named_csv,
            id="parquet_bytes_named_csv",
        ),
        pytest.param(
            _empty_csv,
            id="empty_csv",
        ),
    ],
)
def test_input_that_is_not_parquet_or_csv_names_the_file_and_the_formats(emulator, tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(InputError) as error:
        run_embed(emulator, path, tmp_path / "out")
    message = str(error.value)
    assert str(path) in message, message
    assert "Parquet" in message and "CSV" in message, "say what it should be"
    assert not (tmp_path / "out").exists()
    assert emulator.stats["requests"] == 0


# -- CSV with a malformed line --------------------------------------------------------------------
@pytest.mark.parametrize(
    "size",
    [
        pytest.param(
            "one_read_block",
        ),
        pytest.param(
            "past_first_read_block",
        ),
    ],
)
def test_malformed_csv_line_message_names_file_and_line(emulator, tmp_path, size):
    spec = SIZES[size]
    lines = csv_lines(spec["rows"], spec["text"])
    lines[spec["bad"] + 1] = f"{spec['bad']},bad,extra,fields"
    path = write_lines(tmp_path / "in.csv", lines)
    with pytest.raises(InputError) as error:
        run_embed(emulator, path, tmp_path / "out")
    message = str(error.value)
    data_row = spec["bad"] + 1  # 1-based, header not counted: the convention of the id-column messages
    assert str(path) in message
    assert re.search(rf"\b(data row {data_row}|line {data_row + 1})\b", message), message
    assert "Expected 2 columns, got 4" in message and "quote" in message
    assert emulator.stats["embedding_inputs"] == 0


def test_malformed_csv_line_loses_nothing_and_the_fixed_rerun_sends_each_row_once(emulator, tmp_path):
    """A malformed line is found by the id check, which reads the whole file before any request:
    the failing run sends nothing, an earlier run's rows stay, and the fixed rerun sends only the rest."""
    n, bad = LARGE["rows"], LARGE["bad"]
    good = csv_lines(n, long_text)
    path = write_lines(tmp_path / "in.csv", good[: 300 + 1])  # an earlier input: the first 300 rows
    out = tmp_path / "out"
    run_embed(emulator, path, out, dimensions=16)
    assert read_output(out).height == 300

    broken = list(good)
    broken[bad + 1] = f"{bad},bad,extra,fields"
    write_lines(path, broken)
    assert path.stat().st_size > CSV_BLOCK_BYTES
    emulator.reset_stats()
    with pytest.raises(InputError) as error:
        run_embed(emulator, path, out, dimensions=16)
    assert str(path) in str(error.value) and "fix the line" in str(error.value)
    sent_by_failed_run = emulator.stats["embedding_inputs"]
    kept = read_output(out)
    assert kept.height == 300 + sent_by_failed_run, "every row paid for is in the output"
    assert set(range(300)) <= set(kept["id"].to_list())

    write_lines(path, good)
    emulator.reset_stats()
    doc = run_embed(emulator, path, out, dimensions=16)
    assert doc["status"] == "completed"
    assert emulator.stats["embedding_inputs"] == n - 300 - sent_by_failed_run
    final = read_output(out)
    assert final.height == n and final["id"].n_unique() == n


# -- non-UTF-8 text -------------------------------------------------------------------------------
def _latin1_csv(path: Path, spec: dict) -> Path:
    lines = csv_lines(spec["rows"], spec["text"])
    bad = spec["bad"]
    lines[bad + 1] = f"{bad},café crème {bad}"
    data = "\n".join(lines).encode("utf-8").replace("café crème".encode(), "café crème".encode("latin-1"))
    path.write_bytes(data + b"\n")
    return path


@pytest.mark.parametrize(
    "size",
    [
        pytest.param(
            "one_read_block",
        ),
        pytest.param(
            "past_first_read_block",
        ),
    ],
)
def test_non_utf8_csv_message_names_file_row_column_and_encoding(emulator, tmp_path, size):
    spec = SIZES[size]
    path = _latin1_csv(tmp_path / "in.csv", spec)
    bad, data_row = spec["bad"], spec["bad"] + 1
    try:
        doc = run_embed(emulator, path, tmp_path / "out", dimensions=16)
    except InputError as exc:
        message = str(exc)
        assert str(path) in message
        assert re.search(rf"\b(data row {data_row}|line {data_row + 1}|id {bad})\b", message), message
        assert "'text'" in message and re.search(r"UTF-?8", message, re.I)
        assert re.search(r"save|encod|convert", message, re.I), "say how to fix it"
    else:
        errors = read_errors(tmp_path / "out")
        assert errors["id"].to_list() == [bad] and re.search(r"UTF-?8", errors["error_message"][0], re.I)
        assert doc["counts"]["succeeded"] == spec["rows"] - 1


def test_non_utf8_csv_row_fails_alone_and_the_fixed_rerun_sends_only_it(emulator, tmp_path):
    """Text columns are read as bytes and decoded per row: the one row that is not UTF-8 becomes an error
    row naming the column and the fix; every other row completes, and the fixed rerun sends only it."""
    n, bad = LARGE["rows"], LARGE["bad"]
    path = _latin1_csv(tmp_path / "in.csv", LARGE)
    assert path.stat().st_size > CSV_BLOCK_BYTES
    out = tmp_path / "out"
    doc = run_embed(emulator, path, out, dimensions=16, chunk_size=50)

    assert doc["status"] == "completed with errors" and doc["counts"]["failed"] == 1
    assert_balanced(doc)
    (error,) = read_errors(out).iter_rows(named=True)
    assert error["id"] == bad and error["input_row"] == bad
    assert (
        "column 'text' is not valid UTF-8" in error["error_message"]
        and "save the input as UTF-8" in error["error_message"]
    )
    assert read_output(out).height == n - 1 and emulator.stats["embedding_inputs"] == n - 1

    write_lines(path, csv_lines(n, long_text))
    emulator.reset_stats()
    doc = run_embed(emulator, path, out, dimensions=16, chunk_size=50, retry_errors=True)
    assert doc["status"] == "completed" and doc["counts"]["skipped_done"] == n - 1
    assert emulator.stats["embedding_inputs"] == 1, "no row is sent twice"
    final = read_output(out)
    assert final.height == n and final["id"].n_unique() == n
    assert read_errors(out).height == 0


def test_non_utf8_text_in_a_parquet_binary_column_is_named_before_sending(emulator, tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": pa.array([b"caf\xe9", b"fine"], pa.binary())}), path)
    try:
        run_embed(emulator, path, tmp_path / "out")
    except InputError as exc:
        message = str(exc)
        assert str(path) in message and "'text'" in message and re.search(r"UTF-?8|binary", message, re.I)
    else:
        assert emulator.stats["by_status"].get(400, 0) == 0, "nothing the server must refuse is sent"
        errors = read_errors(tmp_path / "out")
        assert errors["id"].to_list() == [1] and re.search(r"UTF-?8", errors["error_message"][0], re.I)
        assert read_output(tmp_path / "out")["id"].to_list() == [2]


# -- named column missing ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make_job", "kw", "missing", "option"),
    [
        pytest.param(lambda: EmbedJob(model=MODEL, text_col="body"), {}, "body", "--text-col", id="embed_text_col"),
        pytest.param(lambda: EmbedJob(model=MODEL), {"id_col": "key"}, "key", "--id-col", id="embed_id_col"),
        pytest.param(
            lambda: CaptionJob(model=CHAT_MODEL), {}, "image", "--image-col", id="caption_image_col",
            
        ),
        pytest.param(
            lambda: TranscribeJob(model=CHAT_MODEL), {}, "audio", "--audio-col", id="transcribe_audio_col",
            
        ),
    ],
)  # fmt: skip
def test_missing_column_lists_the_columns_there_are(emulator, tmp_path, make_job, kw, missing, option):
    path = write_corpus(tmp_path / "in.parquet", [1, 2], ["a", "b"])
    with pytest.raises(InputError) as error:
        run(make_job(), path, tmp_path / "out", emulator.base_url, **kw)
    message = str(error.value)
    assert f"input {path} has no column {missing!r}; its columns are: id, text" in message
    assert option in message, message
    assert not (tmp_path / "out").exists()
    assert emulator.stats["requests"] == 0


# -- id column with nulls or duplicates -------------------------------------------------------------
def _ids_parquet(tmp: Path, ids: list, id_type=pa.int64()) -> Path:
    path = tmp / "in.parquet"
    pq.write_table(pa.table({"id": pa.array(ids, id_type), "text": [f"t{i}" for i in range(len(ids))]}), path)
    return path


def _ids_csv(tmp: Path, ids: list) -> Path:
    path = tmp / "in.csv"
    lines = ["id,text"] + [f"{'' if v is None else v},t{i}" for i, v in enumerate(ids)]
    return write_lines(path, lines)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(
            lambda t: _ids_parquet(t, [1, None, 3, None]),
            "column 'id' is null in 2 row(s) (data rows 2, 4): every row needs an id. Fill them or pick another "
            "--id-col.",
            id="nulls_parquet",
        ),
        pytest.param(
            lambda t: _ids_csv(t, [1, 2, None, 4]),
            "column 'id' is null in 1 row(s) (data rows 3): every row needs an id",
            id="null_csv",
        ),
        pytest.param(
            lambda t: _ids_parquet(t, ["a", "b", "a", "c", "b"], pa.string()),
            "column 'id' has 2 duplicated id(s), e.g. 'a' at data rows 1, 3; 'b' at data rows 2, 5. Ids must be "
            "unique: dedupe the input or pick another --id-col.",
            id="duplicates_parquet",
        ),
        pytest.param(
            lambda t: _ids_csv(t, [7, 8, 9, 8]),
            "column 'id' has 1 duplicated id(s), e.g. 8 at data rows 2, 4",
            id="duplicates_csv",
        ),
    ],
)
def test_null_or_duplicate_ids_say_which_rows(emulator, tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(InputError) as error:
        run_embed(emulator, path, tmp_path / "out")
    assert str(error.value).startswith(f"input {path}: {expected}"), str(error.value)
    assert emulator.stats["by_route"].get("embeddings", 0) == 0
    assert not list((tmp_path / "out").glob("part-*"))


# -- empty cells ------------------------------------------------------------------------------------
def test_null_or_empty_text_cells_become_error_rows_naming_the_column(emulator, tmp_path):
    texts = ["fine one", None, "", "   ", "fine two"]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": pa.array([10, 11, 12, 13, 14], pa.int64()), "text": texts}), path)
    out = tmp_path / "out"
    doc = run_embed(emulator, path, out)

    assert doc["status"] == "completed with errors" and doc["counts"]["succeeded"] == 2 and doc["counts"]["failed"] == 3
    assert_balanced(doc)
    assert sorted(read_output(out)["id"].to_list()) == [10, 14]
    errors = {r["id"]: r for r in read_errors(out).iter_rows(named=True)}
    assert sorted(errors) == [11, 12, 13]
    assert errors[11]["error_message"] == "column 'text' is null: nothing to embed; fill it or drop the row"
    assert (
        errors[12]["error_message"]
        == errors[13]["error_message"]
        == "column 'text' is empty: nothing to embed; fill it or drop the row"
    )
    assert {r["error_type"] for r in errors.values()} == {"invalid_input"}
    assert {r["attempts"] for r in errors.values()} == {0}, "nothing was sent for them"
    assert [errors[i]["input_row"] for i in (11, 12, 13)] == [1, 2, 3]
    assert emulator.stats["embedding_inputs"] == 2


@pytest.fixture
def media(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "media"
    folder.mkdir()
    shutil.copy(REPO / "data" / "images" / "sunset.png", folder / "sunset.png")
    shutil.copy(REPO / "data" / "audio" / "tone.wav", folder / "tone.wav")
    monkeypatch.chdir(tmp_path)
    return folder


@pytest.mark.parametrize(
    ("job_cls", "col", "good", "says"),
    [
        (CaptionJob, "image", "sunset.png", "column 'image' is empty: give an image path or URL"),
        (TranscribeJob, "audio", "tone.wav", "column 'audio' is empty: give an audio file path or URL"),
    ],
)
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_null_or_empty_media_cells_become_error_rows_naming_the_column(
    emulator, media, tmp_path, job_cls, col, good, says, fmt
):
    table = pa.table({"id": pa.array([1, 2, 3, 4], pa.int64()), col: [good, None, "", "  "]})
    path = media / f"list.{fmt}"
    if fmt == "csv":
        pcsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    out = tmp_path / "out"
    doc = run(job_cls(model=CHAT_MODEL, base_dir=base_dir_of(str(path))), path, out, emulator.base_url)

    assert doc["status"] == "completed with errors" and doc["counts"]["succeeded"] == 1 and doc["counts"]["failed"] == 3
    assert_balanced(doc)
    assert read_output(out)["id"].to_list() == [1]
    errors = read_errors(out).sort("id")
    assert errors["id"].to_list() == [2, 3, 4] and errors["input_row"].to_list() == [1, 2, 3]
    assert set(errors["error_message"]) == {says} and set(errors["error_type"]) == {"invalid_input"}
    assert set(errors["attempts"]) == {0}
    assert emulator.stats["by_route"].get("chat/completions", 0) == 1


# -- text over the model's input limit ---------------------------------------------------------------
def test_text_over_the_input_limit_is_an_error_row_saying_split_it(emulator, tmp_path):
    texts = ["short and fine", "word " * 3000, "also fine"]  # 15000 characters: ~3750 tokens > 2048
    path = write_corpus(tmp_path / "in.parquet", [1, 2, 3], texts)
    doc = run_embed(emulator, path, tmp_path / "out")

    assert doc["status"] == "completed with errors" and doc["counts"]["succeeded"] == 2
    assert sorted(read_output(tmp_path / "out")["id"].to_list()) == [1, 3]
    (error,) = read_errors(tmp_path / "out").iter_rows(named=True)
    assert error["id"] == 2 and error["input_row"] == 1 and error["attempts"] == 0
    assert error["error_message"] == (
        "text is about 3750 tokens (15000 characters), over gemini-embedding-001's 2048-token input limit: "
        "split it into smaller passages"
    )
    assert emulator.stats["embedding_inputs"] == 2, "the long text is never sent"


# -- an output folder that holds another job's or model's results ------------------------------------
@pytest.mark.parametrize(
    ("other", "starts", "this", "hint"),
    [
        (lambda: EmbedJob(model="text-embedding-3-small"), "was made with model '{model}' (run ",
         "this run asks for 'text-embedding-3-small'", "--change-model --dry-run, then run with --change-model"),
        (lambda: CaptionJob(model=CHAT_MODEL, image_col="text"), "holds embed results of model '{model}' (first "
         "written by run ", f"this run is caption with '{CHAT_MODEL}'", "Pick another --output, or pass --force"),
    ],
    ids=["other_model", "other_job"],
)  # fmt: skip
def test_output_of_another_job_or_model_is_refused_unless_forced(emulator, tmp_path, other, starts, this, hint):
    path = write_corpus(tmp_path / "in.parquet", [1, 2, 3], ["one", "two", "three"])
    out = tmp_path / "out"
    first = run_embed(emulator, path, out)
    before = snapshot(out)
    emulator.reset_stats()

    with pytest.raises(ConfigError) as error:
        run(other(), path, out, emulator.base_url)
    message = str(error.value)
    assert message.startswith(f"output {out} " + starts.format(model=MODEL)), message
    assert first["run_id"] in message and this in message
    assert hint in message
    assert snapshot(out) == before, "a refused run changes nothing in the folder"
    assert emulator.stats["by_route"].get("embeddings", 0) == emulator.stats["by_route"].get("chat/completions", 0) == 0

    doc = run(EmbedJob(model="text-embedding-3-small"), path, out, emulator.base_url, force=True)
    assert doc["status"] == "completed" and doc["counts"]["succeeded"] == 3
    result = read_output(out)
    assert sorted(result["id"].to_list()) == [1, 2, 3] and set(result["model"]) == {"text-embedding-3-small"}
    with pytest.raises(ConfigError, match="was made with model 'text-embedding-3-small'"):
        run_embed(emulator, path, out)  # the folder now belongs to the forced run's model


# -- --schema that can't be imported -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "spec", "says"),
    [
        (None, "no_such_schema_module:Thing", "module 'no_such_schema_module' can't be imported (No module named "
         "'no_such_schema_module'); check the spelling and run from the folder that holds it, or install"),
        ("from pydantic import BaseModel\nclass Thing(BaseModel)\n    a: int\n", "broken_schema_mod:Thing",
         "importing module 'broken_schema_mod' failed: SyntaxError: expected ':' (broken_schema_mod.py, line 2)"),
        ("import not_installed_dep_xyz\n", "needs_dep_schema_mod:Thing",
         "(No module named 'not_installed_dep_xyz'); check the spelling and run from the folder that holds it, or "
         "install the package that provides it"),
        (None, "schemas.examples:Reciept", "has no attribute 'Reciept' (models there: CalendarEvent, Contract"),
        (None, "schemas.examples:Currency", "Currency is a EnumType, not a pydantic model; point --schema at"),
        (None, "schemas/examples.py", "expected MODULE:Model, e.g. --schema schemas.examples:Invoice"),
    ],
    ids=["no_module", "syntax_error", "missing_dependency", "no_such_class", "not_a_model", "a_file_path"],
)  # fmt: skip
def test_schema_that_cannot_be_imported_fails_before_any_work(tmp_path, monkeypatch, source, spec, says):
    if source is not None:
        (tmp_path / f"{spec.split(':')[0]}.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
    parameters = {"input": "", "output": "", "schema_ref": spec, "provider": "local", "text_col": "text"}
    with pytest.raises(ConfigError) as error:
        command_job(commands.extract, **parameters)
    message = str(error.value)
    assert message.startswith(f"--schema {spec!r}: "), message
    assert says in message, message


# -- provider side: unknown model, wrong key, unreachable server --------------------------------------
def test_model_the_provider_does_not_have_fails_before_any_work(emulator, tmp_path):
    path = write_corpus(tmp_path / "in.parquet", [1, 2], ["a", "b"])
    with pytest.raises(ConfigError) as error:
        run_embed(emulator, path, tmp_path / "out", model="gemini-embedding-999")
    message = str(error.value)
    assert message.startswith(f"model 'gemini-embedding-999' was not found at 127.0.0.1:{emulator.port}")
    assert "HTTP 404" in message
    assert "List the available models with `gembatch models`, then pass one with --model." in message
    assert not (tmp_path / "out").exists()
    assert emulator.stats["by_route"].get("embeddings", 0) == 0


def test_model_that_cannot_do_the_job_stops_the_run_with_the_providers_reason(emulator, tmp_path):
    """A chat model asked for embeddings exists (the model check passes); the first request says why."""
    path = write_corpus(tmp_path / "in.parquet", [1, 2], ["a", "b"])
    doc = run_embed(emulator, path, tmp_path / "out", model=CHAT_MODEL)
    assert doc["status"] == "failed: not_found"
    assert "is not supported for embedContent" in doc["message"]
    assert doc["message"].endswith("The model or route was not found; check --model and --base-url.")
    assert doc["counts"]["not_attempted"] == 2 and doc["counts"]["failed"] == 0
    assert_balanced(doc)
    assert not list((tmp_path / "out").glob("part-*")) and not read_errors(tmp_path / "out").height


def test_wrong_key_gemini_style_400_fails_before_any_work_and_never_shows_the_key(emulator, tmp_path, monkeypatch):
    wrong = "AIza-wrong-key-0123456789"
    monkeypatch.setenv(TEST_KEY_ENV, wrong)
    path = write_corpus(tmp_path / "in.parquet", [1, 2], ["a", "b"])
    with pytest.raises(ConfigError) as error:
        run_embed(emulator, path, tmp_path / "out")
    message = str(error.value)
    assert emulator.stats["by_status"] == {400: 1}, "Gemini answers a bad key with 400 API_KEY_INVALID, not 401"
    assert message.startswith(f"the API key in {TEST_KEY_ENV} was rejected by 127.0.0.1:{emulator.port}")
    assert "HTTP 400: API key not valid." in message
    assert "Check the key, or set the right variable with --api-key-env." in message
    assert wrong not in message and TEST_KEY not in message
    assert not (tmp_path / "out").exists()


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_base_url_fails_fast_before_any_work(tmp_path):
    port = _closed_port()
    base_url = f"http://127.0.0.1:{port}/v1/"
    path = write_corpus(tmp_path / "in.parquet", [1, 2], ["a", "b"])
    started = time.monotonic()
    with pytest.raises(ConfigError) as error:
        run(EmbedJob(model=MODEL), path, tmp_path / "out", base_url)
    assert time.monotonic() - started < 30, "a refused connection is not retried for minutes"
    message = str(error.value)
    assert message.startswith(f"cannot reach 127.0.0.1:{port} ({base_url}): connection failed")
    assert message.endswith("Check --base-url and your network.")
    assert not (tmp_path / "out").exists()


# -- the command line: the same messages without a traceback ------------------------------------------
def test_cli_prints_an_error_found_inside_the_flow_without_a_traceback(prefect_server, tmp_path):
    from prefect.settings import PREFECT_API_URL

    port = _closed_port()
    path = write_corpus(tmp_path / "in.parquet", [1, 2], ["a", "b"])
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), TEST_KEY_ENV: TEST_KEY}
    cmd = [sys.executable, "-m", "flows.cli", "embed", str(path), "--output", str(tmp_path / "out"),
           "--base-url", f"http://127.0.0.1:{port}/v1/", "--api-key-env", TEST_KEY_ENV, "--no-progress"]  # fmt: skip
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: cannot reach 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
