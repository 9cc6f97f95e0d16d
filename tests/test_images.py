"""`gembatch images` end to end against the emulator over real HTTP: rows, PNG files, reruns."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
from conftest import REPO, TEST_KEY_ENV, assert_balanced, read_errors, read_output
from openai import AsyncOpenAI

from emulator.fakes import fake_png
from flows.images import images_job
from tasks.client import Connection, ProviderSettings
from tasks.engine import BadReply, Item, Prepared
from tasks.images import IMAGES_DIR, ImagesJob
from tasks.run import RunOptions, run_job

MODEL = "gemini-2.5-flash-image"
SIZE = "64x48"
W, H = 64, 48
PROMPTS = REPO / "data" / "prompts.csv"
ROUTE = "images/generations"


def run_images(emu, input: Path, output: Path, *, n: int = 1, size: str = SIZE, chunk_size: int = 5) -> dict:
    job = ImagesJob(model=MODEL, output=str(output), size=size, n=n)
    options = RunOptions(
        input=str(input),
        output=str(output),
        provider=ProviderSettings(provider="local", base_url=emu.base_url, api_key_env=TEST_KEY_ENV, timeout_s=5),
        chunk_size=chunk_size,
    )
    return asyncio.run(run_job(job, options))


def write_prompts(path: Path, ids: list[int], prompts: list[str | None]) -> Path:
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "prompt": pa.array(prompts, pa.string())}), path)
    return path


def sample_prompts() -> dict[int, str]:
    table = pcsv.read_csv(PROMPTS)
    return dict(zip(table.column("id").to_pylist(), table.column("prompt").to_pylist(), strict=True))


def assert_images_match(out_dir: Path, prompts: dict[int, str], n: int) -> None:
    """Every row's PNG holds exactly the emulator's bytes for that prompt and image index."""
    out = read_output(out_dir)
    assert out.height == len(prompts) * n
    assert sorted(zip(out["id"], out["image_index"])) == sorted((i, k) for i in prompts for k in range(n))
    for row in out.iter_rows(named=True):
        prompt, k = prompts[row["id"]], row["image_index"]
        want = fake_png(prompt if k == 0 else f"{prompt}#{k}", W, H)
        suffix = ".png" if n == 1 else f"-{k}.png"
        assert row["image_path"] == f"{IMAGES_DIR}/{row['content_hash']}{suffix}"
        assert (out_dir / row["image_path"]).read_bytes() == want, f"id {row['id']} image {k}"
        assert row["image_bytes"] == len(want)
        assert row["revised_prompt"] == f"[emulator] {prompt}"
        assert row["model"] == MODEL


def read_table_of(out_dir: Path) -> pa.Table:
    """The result table through Arrow's dataset discovery: the part files, not the PNGs beside them."""
    return pds.dataset(out_dir, format="parquet", ignore_prefixes=[".", "_", IMAGES_DIR]).to_table()


def assert_no_temporary_files(out_dir: Path) -> None:
    assert not [p.name for p in (out_dir / IMAGES_DIR).iterdir() if p.name.startswith(".tmp-")]


def test_every_prompt_gets_the_emulators_png_with_typed_columns(emulator, tmp_path):
    prompts = sample_prompts()
    out_dir = tmp_path / "out"
    doc = run_images(emulator, PROMPTS, out_dir)

    assert_images_match(out_dir, prompts, n=1)
    assert len(list((out_dir / IMAGES_DIR).glob("*.png"))) == len(prompts)
    assert_no_temporary_files(out_dir)
    schema = pq.read_schema(next(out_dir.glob("part-*.parquet")))
    assert schema.remove_metadata() == ImagesJob(model=MODEL, output=str(out_dir)).output_schema("id", pa.int64())
    assert read_table_of(out_dir).num_rows == len(prompts)

    assert doc["status"] == "completed"
    assert_balanced(doc)
    assert doc["counts"]["succeeded"] == len(prompts) and doc["counts"]["failed"] == 0
    assert emulator.stats["by_route"][ROUTE] == doc["requests"]["sent"] == len(prompts)
    run_file = json.loads((out_dir / "_runs" / f"{doc['run_id']}.json").read_text())
    assert run_file["job_parameters"] == {"prompt_col": "prompt", "size": SIZE, "n": 1, "images_dir": IMAGES_DIR}


def test_n_images_per_prompt_give_n_rows_and_n_files(emulator, tmp_path):
    prompts = dict(list(sample_prompts().items())[:4])
    src = write_prompts(tmp_path / "in.parquet", list(prompts), list(prompts.values()))
    out_dir = tmp_path / "out"
    doc = run_images(emulator, src, out_dir, n=2)

    assert_images_match(out_dir, prompts, n=2)
    assert len(list((out_dir / IMAGES_DIR).glob("*.png"))) == 8
    assert_no_temporary_files(out_dir)
    assert doc["counts"]["succeeded"] == 4 and emulator.stats["by_route"][ROUTE] == 4
    assert read_table_of(out_dir).num_rows == 8

    # The run compacts superseded records: both images of a row are one record and survive together.
    emulator.reset_stats()
    doc = run_images(emulator, src, out_dir, n=2)
    assert emulator.stats["by_route"][ROUTE] == 0 and doc["counts"]["skipped_done"] == 4
    assert_images_match(out_dir, prompts, n=2)


def test_a_null_or_empty_prompt_is_an_error_row_and_the_rest_completes(emulator, tmp_path):
    src = write_prompts(tmp_path / "in.parquet", [1, 2, 3, 4], ["a blue door", None, "  ", "a green hill"])
    out_dir = tmp_path / "out"
    doc = run_images(emulator, src, out_dir)

    assert_images_match(out_dir, {1: "a blue door", 4: "a green hill"}, n=1)
    errors = read_errors(out_dir)
    by_id = {r["id"]: r for r in errors.iter_rows(named=True)}
    assert sorted(by_id) == [2, 3]
    assert by_id[2]["error_type"] == by_id[3]["error_type"] == "invalid_input"
    assert "'prompt' is null" in by_id[2]["error_message"]
    assert "'prompt' is empty" in by_id[3]["error_message"]
    assert doc["counts"]["succeeded"] == 2 and doc["counts"]["failed"] == 2
    assert_balanced(doc)
    assert emulator.stats["by_route"][ROUTE] == 2


def test_a_rerun_sends_no_image_request(emulator, tmp_path):
    prompts = sample_prompts()
    out_dir = tmp_path / "out"
    run_images(emulator, PROMPTS, out_dir)
    before = {p.name: p.stat().st_mtime_ns for p in (out_dir / IMAGES_DIR).iterdir()}

    emulator.reset_stats()
    doc = run_images(emulator, PROMPTS, out_dir)

    assert emulator.stats["by_route"][ROUTE] == 0 and doc["requests"]["sent"] == 0
    assert doc["counts"]["skipped_done"] == len(prompts)
    assert_balanced(doc)
    assert {p.name: p.stat().st_mtime_ns for p in (out_dir / IMAGES_DIR).iterdir()} == before
    assert_images_match(out_dir, prompts, n=1)


def test_images_written_before_a_crash_are_not_paid_for_again(emulator, tmp_path):
    prompts = dict(list(sample_prompts().items())[:5])
    src = write_prompts(tmp_path / "in.parquet", list(prompts), list(prompts.values()))
    out_dir = tmp_path / "out"
    run_images(emulator, src, out_dir, n=2)
    # The crash window: images renamed into place, the part file never written.
    for part in out_dir.glob("part-*.parquet"):
        part.unlink()

    emulator.reset_stats()
    doc = run_images(emulator, src, out_dir, n=2)

    assert emulator.stats["by_route"][ROUTE] == 0
    assert doc["counts"]["succeeded"] == 5
    out = read_output(out_dir)
    assert out.height == 10 and out["revised_prompt"].null_count() == 10
    for row in out.iter_rows(named=True):
        k = row["image_index"]
        assert row["image_path"] == f"{IMAGES_DIR}/{row['content_hash']}-{k}.png"
        want = fake_png(prompts[row["id"]] + (f"#{k}" if k else ""), W, H)
        assert (out_dir / row["image_path"]).read_bytes() == want
        assert row["image_bytes"] == len(want)


def test_a_prompt_already_drawn_for_another_id_shares_all_its_images(emulator, tmp_path):
    src = write_prompts(tmp_path / "in.parquet", [1, 2], ["a quiet harbour", "a windy moor"])
    out_dir = tmp_path / "out"
    run_images(emulator, src, out_dir, n=3)

    write_prompts(src, [1, 2, 3], ["a quiet harbour", "a windy moor", "a quiet harbour"])
    emulator.reset_stats()
    doc = run_images(emulator, src, out_dir, n=3)

    assert emulator.stats["by_route"][ROUTE] == 0
    assert doc["counts"]["deduplicated"] == 1 and doc["counts"]["skipped_done"] == 2
    out = read_output(out_dir).filter(id=3).sort("image_index")
    assert out["image_index"].to_list() == [0, 1, 2]
    same = read_output(out_dir).filter(id=1).sort("image_index")
    assert out["image_path"].to_list() == same["image_path"].to_list()
    assert out["image_bytes"].to_list() == same["image_bytes"].to_list()


def test_the_result_table_reads_as_documented_beside_the_images_folder(emulator, tmp_path):
    # images/ is part of the output contract; Arrow's discovery skips only "." and "_" names, so
    # readers name it (README: "Output layout"), or read the part files by their glob.
    run_images(emulator, PROMPTS, tmp_path / "out")
    dataset = pds.dataset(tmp_path / "out", format="parquet", ignore_prefixes=[".", "_", "images"])
    assert dataset.count_rows() == len(sample_prompts())
    assert pds.dataset(sorted(map(str, (tmp_path / "out").glob("part-*.parquet")))).count_rows() == len(
        sample_prompts()
    )


@pytest.mark.parametrize("size", ["1024", "64x", "x64", "0x64", "64*64", "big"])
def test_size_must_be_width_x_height(size):
    with pytest.raises(ValueError, match="--size must look like WIDTHxHEIGHT"):
        images_job({"provider": "local", "output": "out", "prompt_col": "prompt", "size": size, "n": 1})


def test_the_builder_fills_the_provider_default_model():
    params = {"provider": "openai", "output": "out", "prompt_col": "prompt", "size": "64x64", "n": 2}
    assert images_job(params).model == "gpt-image-1" == params["model"]
    with pytest.raises(ValueError, match="--n must be between 1 and 10"):
        images_job({**params, "n": 0})


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"revised_prompt": "x"}, "had no b64_json data"),
        ({"b64_json": base64.b64encode(b"GIF89a not a png").decode()}, "is not a PNG"),
        ({"b64_json": "not base64!"}, "not valid base64"),
    ],
)
def test_a_reply_without_png_data_is_a_bad_reply(tmp_path, entry, message):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"created": 0, "data": [entry]})

    client = AsyncOpenAI(
        api_key="k", base_url="http://test/v1", http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler))
    )
    conn = Connection(client=client, base_url="http://test/v1", provider="test", api_key="k")
    job = ImagesJob(model=MODEL, output=str(tmp_path), size="8x8")
    item = Item(0, 1, "h" * 64, Prepared(fields={}, tokens=1, data="a prompt"))
    with pytest.raises(BadReply, match=message):
        asyncio.run(job.send(conn, [item]))
    assert not (tmp_path / IMAGES_DIR).exists()
