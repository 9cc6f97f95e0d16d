"""`gembatch embed --output lancedb://PATH/TABLE`: the table in step with a changing corpus.

Real `gembatch embed` processes (untracked) against the emulator on loopback; the table is read back
with LanceDB's own API and checked value by value against the emulator's vectors.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from conftest import EMBED_MODEL, REPO, TEST_KEY_ENV, CliResult, cli_env, embed_command, run_gembatch, write_corpus
from test_embed import expected_vector

from tasks.engine.plan.input import InputSource
from tasks.engine.store.output import OutputStore
from tasks.errors import ConfigError
from tasks.sinks.lance import TableSink
from tasks.sinks.lance_sync import sync_after_shards
from tasks.sinks.location import TableLocation, staging_folder

DIMS = 16
BATCH = 50
CHUNK = 200


def texts_for(n: int, start: int = 0, edited: set[int] = frozenset()) -> dict[int, str]:
    return {
        i: f"lance test row {i}: terns on the pier, {i * 37 % 991} of them" + (" (edited)" if i in edited else "")
        for i in range(start, n)
    }


def embed(
    capsys: pytest.CaptureFixture[str], src: Path, db: Path, base_url: str, *extra: str, exit_code: int = 0
) -> CliResult:
    """`gembatch embed SRC --output lancedb://DB/docs` in this process (a crash test runs its own process)."""
    cmd = embed_command(
        src, f"lancedb://{db}/docs", base_url, "--dimensions", str(DIMS), *extra, batch_size=BATCH, chunk_size=CHUNK
    )
    result = run_gembatch(cmd[3:], capsys)
    assert result.returncode == exit_code, result.stdout + result.stderr
    return result


def last_run(db: Path) -> dict:
    """The newest run's metadata (by its start: run ids of runs started within a second don't sort by time)."""
    docs = [json.loads(p.read_text()) for p in (db / "docs.gembatch" / "_runs").glob("*.json")]
    return max(docs, key=lambda d: d["started_at"])


def assert_table(db: Path, texts: dict[int, str]) -> dict[int, dict]:
    """The table as LanceDB reads it: one row per id of ``texts``, each with its text's vector."""
    table = lancedb.connect(str(db)).open_table("docs").to_arrow()
    rows = {r["id"]: r for r in table.to_pylist()}
    assert table.num_rows == len(rows) == len(texts), "one row per id"
    assert set(rows) == set(texts)
    assert table.schema.field("embedding").type.list_size == DIMS
    for row_id, row in rows.items():
        np.testing.assert_allclose(
            np.asarray(row["embedding"], np.float32), expected_vector(texts[row_id], DIMS), rtol=1e-6, atol=1e-7
        )
        assert row["model"] == EMBED_MODEL
        assert len(row["content_hash"]) == 64 and row["run_id"]
    return rows


def test_a_backfill_then_reruns_keep_the_table_in_step_with_the_corpus(emulator, tmp_path, capsys):
    n = 1000
    texts = texts_for(n)
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    db = tmp_path / "vectors"

    result = embed(capsys, src, db, emulator.base_url)
    first = assert_table(db, texts)
    doc = last_run(db)
    assert doc["output"]["table"] | {"version": None} == doc["output"]["table"] | {
        "sync": "done",
        "inserted": n,
        "updated": 0,
        "deleted": 0,
        "unchanged": 0,
        "rows": n,
        "version": None,
    }
    assert {r["run_id"] for r in first.values()} == {doc["run_id"]}
    # The content hashes are the staging parts' own.
    staged = pq.read_table(db / "docs.gembatch", columns=["id", "content_hash"]).to_pylist()
    assert {r["id"]: r["content_hash"] for r in staged} == {i: r["content_hash"] for i, r in first.items()}
    assert f"LanceDB table docs: {n} inserted, 0 updated, 0 deleted, 0 unchanged" in result.stdout

    # 1% of the texts change: exactly those are sent, and updated in place.
    edited = set(range(0, n, 100))
    texts = texts_for(n, edited=edited)
    write_corpus(src, list(texts), list(texts.values()))
    emulator.reset_stats()
    embed(capsys, src, db, emulator.base_url)
    assert emulator.stats["embedding_inputs"] == len(edited)
    second = assert_table(db, texts)
    table = last_run(db)["output"]["table"]
    assert (table["inserted"], table["updated"], table["deleted"], table["unchanged"]) == (0, 10, 0, n - 10)
    assert {i for i in second if second[i]["content_hash"] != first[i]["content_hash"]} == edited

    # Ids leave the corpus and new ones come: without --delete-missing the table keeps the old ids...
    gone = {3, 4, 5, 500, 999}
    kept = {i: t for i, t in texts.items() if i not in gone} | texts_for(1003, start=1000)
    write_corpus(src, list(kept), list(kept.values()))
    emulator.reset_stats()
    embed(capsys, src, db, emulator.base_url)
    assert emulator.stats["embedding_inputs"] == 3
    assert_table(db, texts | kept)
    # ...and with it they are deleted; nothing is sent.
    emulator.reset_stats()
    result = embed(capsys, src, db, emulator.base_url, "--delete-missing", "--index")
    assert emulator.stats["embedding_inputs"] == 0
    assert_table(db, kept)
    table = last_run(db)["output"]["table"]
    # Under 100,000 rows LanceDB's exact search is fast: no index (tests/test_lance_index.py builds one).
    assert table["index"] == {"status": "not needed: 998 rows (< 100000: exact search is fast)", "column": "embedding"}
    assert "index: not needed" in result.stdout
    assert (table["inserted"], table["updated"], table["deleted"], table["unchanged"]) == (0, 0, 5, n - 5 + 3)

    # A deleted id that comes back is sent again (its staging row went with it) and inserted.
    back = kept | {500: texts[500]}
    write_corpus(src, list(back), list(back.values()))
    emulator.reset_stats()
    embed(capsys, src, db, emulator.base_url, "--delete-missing")
    assert emulator.stats["embedding_inputs"] == 1
    assert_table(db, back)
    assert last_run(db)["output"]["table"]["inserted"] == 1


@pytest.mark.slow
def test_a_run_killed_mid_way_then_rerun_gives_the_table_of_a_clean_run(emulator, tmp_path, capsys):
    emulator.configure(latency_seconds=0.2)
    n = 3000
    texts = texts_for(n)
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    db = tmp_path / "vectors"
    staging = db / "docs.gembatch"
    cmd = embed_command(
        src, f"lancedb://{db}/docs", emulator.base_url, "--dimensions", str(DIMS), batch_size=BATCH, chunk_size=CHUNK
    )
    proc = subprocess.Popen(cmd, env=cli_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not list(staging.glob("part-*.parquet")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = pq.read_table(staging, columns=["id"]).num_rows
    assert 0 < written < n, "killed mid-way"
    assert not (db / "docs.lance").exists(), "killed before the table was made"

    emulator.reset_stats()
    embed(capsys, src, db, emulator.base_url)
    assert emulator.stats["embedding_inputs"] == n - written, "the rows written before the kill are not paid again"
    killed = assert_table(db, texts)

    clean_db = tmp_path / "clean"
    embed(capsys, src, clean_db, emulator.base_url)
    clean = assert_table(clean_db, texts)
    assert {i: (r["content_hash"], r["embedding"]) for i, r in killed.items()} == {
        i: (r["content_hash"], r["embedding"]) for i, r in clean.items()
    }


def test_parts_written_but_not_applied_are_applied_by_the_next_run(emulator, tmp_path, capsys):
    """A crash between "parts written" and "table updated": the next run applies them, sending nothing."""
    texts = texts_for(400)
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    db = tmp_path / "vectors"
    embed(capsys, src, db, emulator.base_url)
    first_parts = last_run(db)["output"]["parts_written"]
    more = texts_for(600)
    write_corpus(src, list(more), list(more.values()))
    embed(capsys, src, db, emulator.base_url)
    # As if the second run had died before its sync: the table one version back, its parts not recorded.
    table = lancedb.connect(str(db)).open_table("docs")
    table.restore(1)
    applied = db / "docs.gembatch" / "_lance" / "applied.json"
    applied.write_text(json.dumps({"table": "docs", "parts": first_parts}))
    assert table.count_rows() == 400

    emulator.reset_stats()
    embed(capsys, src, db, emulator.base_url)
    assert emulator.stats["embedding_inputs"] == 0
    assert_table(db, more)
    synced = last_run(db)["output"]["table"]
    assert (synced["inserted"], synced["updated"], synced["unchanged"]) == (200, 0, 400)

    # A table deleted by hand is made again from the staging folder, with no request.
    shutil.rmtree(db / "docs.lance")
    emulator.reset_stats()
    embed(capsys, src, db, emulator.base_url)
    assert emulator.stats["embedding_inputs"] == 0
    assert_table(db, more)
    assert last_run(db)["output"]["table"]["inserted"] == 600


def test_where_the_table_and_its_staging_folder_are():
    assert TableLocation.parse("lancedb://data/out/vectors/docs") == TableLocation("data/out/vectors", "docs")
    assert staging_folder("lancedb:///srv/db/docs") == "/srv/db/docs.gembatch"
    assert staging_folder("lancedb://s3://bucket/db/docs") == "s3://bucket/db/docs.gembatch"
    assert staging_folder("data/out/emb") == "data/out/emb"
    with pytest.raises(ConfigError, match="lancedb://PATH/TABLE"):
        TableLocation.parse("lancedb://docs")


@pytest.mark.parametrize(
    ("output", "parameters", "message"),
    [
        ("data/out/emb", {"delete_missing": True}, "^--delete-missing: only for a LanceDB table output"),
        ("data/out/emb", {"vector_index": True}, "^--index: only for a LanceDB table output"),
        ("data/out/emb", {"keep_text": True, "text_col": "text"}, "^--keep-text: only for a LanceDB table"),
        ("lancedb://db/docs", {"keep_text": True}, "reads no text column: drop --keep-text"),
        ("lancedb://db/docs", {"delete_missing": True, "limit": 10}, "drop one of the two"),
    ],
)
def test_options_that_cannot_work_are_refused_before_any_request(output, parameters, message):
    with pytest.raises(ConfigError, match=message):
        TableSink.for_run("embed", output, "id", parameters)


@pytest.mark.parametrize("flag", ["--keep-text", "--index", "--delete-missing"])
def test_a_dry_run_refuses_a_table_option_for_a_parquet_output_as_the_run_does(flag, tmp_path, capsys):
    src = write_corpus(tmp_path / "in.parquet", [1, 2], ["one", "two"])
    out = tmp_path / "emb"
    for extra in (["--dry-run"], []):
        argv = ["embed", str(src), "-o", str(out), "--provider", "local", "--no-progress", flag, *extra]
        result = run_gembatch(argv, capsys)
        assert result.returncode == 2, (extra, result.stderr)
        said = " ".join(result.stderr.split())
        assert f"{flag}: only for a LanceDB table output" in said and "lancedb://PATH/TABLE" in said, said
        assert "Traceback" not in result.stderr
    assert not out.exists() or not list(out.glob("part-*.parquet"))


def test_images_cannot_go_to_a_table():
    with pytest.raises(ConfigError, match="can't be a LanceDB table"):
        TableSink.for_run("images", "lancedb://db/pics", "id", {})


def test_two_runs_at_once_pay_each_row_once_and_the_last_updates_the_table(emulator, tmp_path):
    emulator.configure(latency_seconds=0.3)
    texts = texts_for(1500)
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    db = tmp_path / "vectors"
    cmd = embed_command(
        src, f"lancedb://{db}/docs", emulator.base_url, "--dimensions", str(DIMS), batch_size=BATCH, chunk_size=CHUNK
    )
    procs = [
        subprocess.Popen(cmd, env=cli_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    for proc in procs:
        printed, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, printed
    assert emulator.stats["embedding_inputs"] == len(texts), "each row paid once"
    assert_table(db, texts)
    runs = [json.loads(p.read_text()) for p in sorted((db / "docs.gembatch" / "_runs").glob("*.json"))]
    synced = [r["output"]["table"] for r in runs]
    assert synced[-1]["sync"] == "done" or synced[0]["sync"] == "done", synced
    assert sum(s.get("inserted", 0) for s in synced) == len(texts), "every row inserted once, by one sync or two"


def test_a_missing_lancedb_package_is_one_line_saying_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lancedb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"needs the lancedb package.*pip install 'gembatch\[lancedb\]'"):
        TableSink.for_run("embed", "lancedb://db/docs", "id", {})


def test_extract_writes_its_typed_columns_into_a_table(emulator, tmp_path):
    db = tmp_path / "db"
    cmd = [
        sys.executable, "-m", "flows.cli", "extract", str(REPO / "data" / "extract" / "invoices.csv"),
        "--output", f"lancedb://{db}/invoices", "--schema", "schemas.examples:Invoice",
        "--base-url", emulator.base_url, "--api-key-env", TEST_KEY_ENV, "--no-progress", "--keep-text",
    ]  # fmt: skip
    result = subprocess.run(cmd, env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    table = lancedb.connect(str(db)).open_table("invoices").to_arrow().sort_by("id")
    staged = pq.read_table(db / "invoices.gembatch").sort_by("id")
    assert table.num_rows == staged.num_rows == 10
    assert pa.types.is_struct(table.schema.field("line_items").type.value_type)
    own = table.drop_columns(["run_id", "text"])
    assert own.to_pylist() == staged.select(own.column_names).to_pylist()
    # --keep-text with a CSV input: each invoice's text as the file holds it.
    csv = pcsv.read_csv(REPO / "data" / "extract" / "invoices.csv").sort_by("id")
    assert table.column("text").to_pylist() == csv.column("text").to_pylist()


def test_keep_text_puts_the_input_text_beside_each_vector(emulator, tmp_path, capsys):
    texts = texts_for(300)
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    db = tmp_path / "vectors"
    embed(capsys, src, db, emulator.base_url, "--keep-text")
    rows = assert_table(db, texts)
    assert {i: r["text"] for i, r in rows.items()} == texts
    assert last_run(db)["output"]["table"]["text_column"] == "text"

    # Edited texts: the rows sent again carry their new text; the others keep theirs.
    edited = {0, 7, 299}
    texts = texts_for(300, edited=edited)
    write_corpus(src, list(texts), list(texts.values()))
    emulator.reset_stats()
    embed(capsys, src, db, emulator.base_url, "--keep-text")
    assert emulator.stats["embedding_inputs"] == len(edited)
    rows = assert_table(db, texts)
    assert {i: r["text"] for i, r in rows.items()} == texts
    assert last_run(db)["output"]["table"]["updated"] == len(edited)

    # Without --keep-text the table is made again from the staging folder, without the text: no request.
    emulator.reset_stats()
    embed(capsys, src, db, emulator.base_url)
    assert emulator.stats["embedding_inputs"] == 0
    rows = assert_table(db, texts)
    assert "text" not in lancedb.connect(str(db)).open_table("docs").schema.names
    assert last_run(db)["output"]["table"]["remade"] == "made again from the staging folder: without --keep-text"
    # And back: the text column is filled for every row, still with no request.
    embed(capsys, src, db, emulator.base_url, "--keep-text")
    assert emulator.stats["embedding_inputs"] == 0
    assert {i: r["text"] for i, r in assert_table(db, texts).items()} == texts


def test_keep_text_with_a_parquet_output_is_refused_naming_the_option(emulator, tmp_path, capsys):
    texts = texts_for(5)
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    cmd = embed_command(src, tmp_path / "out", emulator.base_url, "--keep-text", batch_size=BATCH, chunk_size=CHUNK)
    result = run_gembatch(cmd[3:], capsys)
    assert result.returncode == 2
    assert "--keep-text" in result.stderr and "lancedb://PATH/TABLE" in result.stderr
    assert emulator.stats["embedding_inputs"] == 0


def test_a_failed_table_update_keeps_the_rows_done_and_the_next_run_applies_them(emulator, tmp_path, capsys):
    texts = texts_for(250)
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    db = tmp_path / "vectors"
    db.mkdir()
    (db / "docs.lance").write_text("not a table")  # LanceDB can neither open nor make the table here

    result = embed(capsys, src, db, emulator.base_url, exit_code=5)
    doc = last_run(db)
    assert doc["status"] == "completed" and doc["counts"]["succeeded"] == len(texts), "the rows' status is theirs"
    synced = doc["output"]["table"]
    assert synced["sync"] == "failed" and synced["table"] == "docs"
    assert synced["message"].startswith(f"the LanceDB table docs ({db}/docs) was not updated: RuntimeError: ")
    assert "rerun the same command" in synced["message"]
    assert "table not updated" in result.stderr and "rerun the same command" in result.stderr
    assert pq.read_table(db / "docs.gembatch", columns=["id"]).num_rows == len(texts), "the rows stay done"

    (db / "docs.lance").unlink()
    emulator.reset_stats()
    embed(capsys, src, db, emulator.base_url)
    assert emulator.stats["embedding_inputs"] == 0, "nothing sent again"
    assert_table(db, texts)
    assert last_run(db)["output"]["table"]["inserted"] == len(texts)


def test_the_parent_of_shards_syncs_the_table_the_shards_wrote_once(emulator, tmp_path, capsys):
    """What `--shards 2` does with a table: each shard writes the staging folder and leaves the table to
    the parent, which syncs it once when both are over (the shards run here untracked, one after the
    other; tests/test_shards.py runs real flow runs)."""
    texts = texts_for(400)
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    db = tmp_path / "vectors"
    for shard in ("1/2", "2/2"):
        embed(capsys, src, db, emulator.base_url, "--keep-text", "--shard", shard)
        assert "table" not in last_run(db)["output"], "a shard leaves the table to the parent"
    assert not (db / "docs.lance").exists()
    assert emulator.stats["embedding_inputs"] == len(texts)

    output = f"lancedb://{db}/docs"
    sink = TableSink.for_run("embed", output, "id", {"keep_text": True, "text_col": "text"})
    synced = asyncio.run(sync_after_shards(sink, OutputStore(output), InputSource.open(str(src)), run_id="parent"))
    assert (synced["sync"], synced["inserted"], synced["rows"]) == ("done", len(texts), len(texts))
    assert {i: r["text"] for i, r in assert_table(db, texts).items()} == texts


def test_the_demo_embeds_the_samples_into_a_table_and_queries_it(tmp_path):
    """`gembatch demo`'s LanceDB scene (README.md shows its output): the committed corpus, every text
    beside its vector, and row 7 nearest to itself."""
    from io import StringIO

    from rich.console import Console

    from flows.demo import DATA_DIR, _table_query

    console = Console(file=StringIO(), width=300)
    _table_query(tmp_path, console)
    corpus = {r["id"]: r["text"] for r in pq.read_table(DATA_DIR / "corpus.parquet").to_pylist()}
    rows = {r["id"]: r for r in lancedb.connect(str(tmp_path / "lancedb")).open_table("corpus").to_arrow().to_pylist()}
    assert {i: r["text"] for i, r in rows.items()} == corpus
    for row in rows.values():
        np.testing.assert_allclose(
            np.asarray(row["embedding"], np.float32), expected_vector(row["text"], model=row["model"]), atol=1e-6
        )
    printed = console.file.getvalue()
    assert f"{len(corpus)} rows with their text (--keep-text), 4 requests this run" in printed
    assert f"    7  0.0000  {corpus[7][:20]}" in printed
