"""`gembatch images` end to end against the emulator over real HTTP: rows, image files, reruns, formats."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
from conftest import REPO, TEST_KEY, TEST_KEY_ENV, assert_balanced, read_errors, read_output
from openai import AsyncOpenAI
from PIL import Image

from emulator.fakes import fake_image, fake_png
from flows import commands
from flows.options import command_job
from tasks.engine.job import BadReply, Item, Prepared
from tasks.engine.run import RunOptions, run_job
from tasks.errors import ConfigError
from tasks.jobs.images import IMAGES_DIR, LEGACY_IMAGES_DIR, ImagesJob
from tasks.provider.client import Connection, ProviderSettings

MODEL = "gemini-nano-banana-2.1"  # the default for --provider gemini and local (pinned below)
SIZE = "64x48"
W, H = 64, 48
PROMPTS = REPO / "data" / "prompts.csv"
ROUTE = "images/generations"


def run_images(
    emu,
    input: Path,
    output: Path,
    *,
    n: int = 1,
    size: str = SIZE,
    chunk_size: int = 5,
    model: str = MODEL,
    quality: str | None = None,
    base_url: str | None = None,
    **kw,
) -> dict:
    job = ImagesJob(model=model, output=str(output), size=size, n=n, quality=quality)
    options = RunOptions(
        input=str(input),
        output=str(output),
        provider=ProviderSettings(
            provider="local", base_url=base_url or emu.base_url, api_key_env=TEST_KEY_ENV, timeout_s=5
        ),
        chunk_size=chunk_size,
        **kw,
    )
    return asyncio.run(run_job(job, options))


def write_prompts(path: Path, ids: list[int], prompts: list[str | None]) -> Path:
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "prompt": pa.array(prompts, pa.string())}), path)
    return path


def sample_prompts() -> dict[int, str]:
    table = pcsv.read_csv(PROMPTS)
    return dict(zip(table.column("id").to_pylist(), table.column("prompt").to_pylist(), strict=True))


EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def assert_images_match(out_dir: Path, prompts: dict[int, str], n: int, fmt: str = "png") -> None:
    """Every row's image holds exactly the emulator's bytes for that prompt and image index."""
    out = read_output(out_dir)
    assert out.height == len(prompts) * n
    assert sorted(zip(out["id"], out["image_index"])) == sorted((i, k) for i in prompts for k in range(n))
    for row in out.iter_rows(named=True):
        prompt, k = prompts[row["id"]], row["image_index"]
        want = fake_image(prompt if k == 0 else f"{prompt}#{k}", W, H, fmt)
        suffix = f".{EXTENSIONS[fmt]}" if n == 1 else f"-{k}.{EXTENSIONS[fmt]}"
        assert row["image_path"] == f"{IMAGES_DIR}/{row['content_hash']}{suffix}"
        assert (out_dir / row["image_path"]).read_bytes() == want, f"id {row['id']} image {k}"
        assert row["image_format"] == fmt
        assert row["image_bytes"] == len(want)
        assert row["revised_prompt"] == f"[emulator] {prompt}"
        assert row["model"] == MODEL


def read_table_of(out_dir: Path) -> pa.Table:
    """The result table as Arrow's dataset discovery reads the folder: _images/ is skipped by its name."""
    return pds.dataset(out_dir, format="parquet").to_table()


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


def test_pq_read_table_reads_an_images_output_as_one_clean_table(emulator, tmp_path):
    # The images sit in _images/: Arrow's discovery skips "_" names, so the folder is just the table.
    out_dir = tmp_path / "out"
    prompts = sample_prompts()
    run_images(emulator, PROMPTS, out_dir)
    assert IMAGES_DIR == "_images" and not (out_dir / LEGACY_IMAGES_DIR).exists()

    table = pq.read_table(out_dir)
    assert table.num_rows == len(prompts)
    assert table.schema.remove_metadata() == ImagesJob(model=MODEL, output=str(out_dir)).output_schema("id", pa.int64())
    assert sorted(table.to_pylist(), key=lambda r: r["id"]) == sorted(
        read_output(out_dir).to_dicts(), key=lambda r: r["id"]
    )
    assert pds.dataset(out_dir).count_rows() == len(prompts)


@pytest.mark.parametrize("size", ["1024", "64x", "x64", "0x64", "64*64", "big"])
def test_size_must_be_width_x_height_for_a_model_of_another_server(size):
    params = {"provider": "local", "base_url": "http://127.0.0.1:1/v1/", "model": "my-diffusion-model"}
    with pytest.raises(ConfigError, match="--size must look like WIDTHxHEIGHT"):
        command_job(commands.images, **{**params, "input": "", "output": "out", "size": size, "n": 1})


def test_the_builder_fills_the_provider_default_model():
    params = {"provider": "openai", "input": "", "output": "out", "prompt_col": "prompt", "size": "1024x1024", "n": 2}
    built = command_job(commands.images, **params)
    assert built.job.model == "gpt-image-1" == built.arguments["model"] and built.model_from == "default"
    with pytest.raises(ConfigError, match="--n must be between 1 and 10 for gpt-image-1, got 0"):
        command_job(commands.images, **{**params, "n": 0})


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, format="GIF")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"revised_prompt": "x"}, "had no b64_json data"),
        ({"b64_json": _b64(b"GIF89a not a png")}, "is not a PNG, JPEG or WebP image Pillow can read"),
        ({"b64_json": _b64(fake_png("p", 8, 8)[:40])}, "is not a PNG, JPEG or WebP image Pillow can read"),
        ({"b64_json": _b64(fake_image("p", 8, 8, "svg"))}, "it starts with b'<svg xmlns="),
        ({"b64_json": _b64(_gif())}, "image 0 of the reply is GIF, not PNG, JPEG or WebP"),
        ({"b64_json": _b64(os.urandom(3_000_000))}, "is not a PNG, JPEG or WebP image Pillow can read"),
        ({"b64_json": "not base64!"}, "not valid base64"),
    ],
    ids=["no-data", "garbage", "truncated-png", "svg", "gif", "3-MB-of-noise", "not-base64"],
)
def test_a_reply_without_a_usable_image_is_a_bad_reply_keeping_a_short_raw_reply(tmp_path, entry, message):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"created": 0, "data": [entry]})

    client = AsyncOpenAI(
        api_key="k", base_url="http://test/v1", http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler))
    )
    conn = Connection(client=client, base_url="http://test/v1", provider="test", api_key="k")
    job = ImagesJob(model=MODEL, output=str(tmp_path), size="8x8")
    item = Item(0, 1, "h" * 64, Prepared(fields={}, tokens=1, data="a prompt"))
    with pytest.raises(BadReply, match=message) as error:
        asyncio.run(job.send(conn, [item]))
    assert not (tmp_path / IMAGES_DIR).exists()
    # It arrived (a 200 of the right shape): asked once more by the engine, not retried as a transport fault.
    assert not error.value.transport
    raw = json.loads(error.value.raw_reply)
    assert raw["data"][0].get("revised_prompt") == entry.get("revised_prompt")
    b64 = entry.get("b64_json")
    if b64 is not None and len(b64) > 120:
        assert raw["data"][0]["b64_json"] == f"{b64[:120]}… [{len(b64)} base64 characters in all]"
    elif b64 is not None:
        assert raw["data"][0]["b64_json"] == b64
    assert len(error.value.raw_reply) < 400


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_jpeg_and_webp_replies_are_kept_as_sent_under_their_own_extension(emulator, tmp_path, fmt):
    prompts = dict(list(sample_prompts().items())[:4])
    src = write_prompts(tmp_path / "in.parquet", list(prompts), list(prompts.values()))
    out_dir = tmp_path / "out"
    emulator.configure(image_format=fmt)

    doc = run_images(emulator, src, out_dir, n=2)

    assert doc["status"] == "completed" and doc["counts"]["succeeded"] == 4 and doc["counts"]["failed"] == 0
    assert_images_match(out_dir, prompts, n=2, fmt=fmt)
    ext = EXTENSIONS[fmt]
    assert sorted(p.suffix for p in (out_dir / IMAGES_DIR).iterdir()) == [f".{ext}"] * 8
    assert emulator.stats["by_route"][ROUTE] == 4
    assert pq.read_table(out_dir).column("image_format").to_pylist() == [fmt] * 8

    # A crash after the files were renamed into place, before the part: found again in their format.
    for part in out_dir.glob("part-*.parquet"):
        part.unlink()
    emulator.reset_stats()
    emulator.configure(image_format="png")
    doc = run_images(emulator, src, out_dir, n=2)
    assert emulator.stats["by_route"][ROUTE] == 0 and doc["counts"]["succeeded"] == 4
    out = read_output(out_dir)
    assert set(out["image_format"]) == {fmt} and all(p.endswith(f".{ext}") for p in out["image_path"])
    assert out["revised_prompt"].null_count() == 8


def test_svg_replies_are_asked_once_more_then_kept_in_errors_with_what_came_back(emulator, tmp_path):
    prompts = dict(list(sample_prompts().items())[:5])
    src = write_prompts(tmp_path / "in.parquet", list(prompts), list(prompts.values()))
    out_dir = tmp_path / "out"
    emulator.configure(image_format="svg")

    doc = run_images(emulator, src, out_dir)

    # Each prompt cost two generations at most, not eight.
    assert emulator.stats["by_route"][ROUTE] == doc["requests"]["sent"] == 2 * len(prompts)
    assert emulator.stats["images"] == 2 * len(prompts)
    assert doc["status"] == "completed with errors"  # every row tried, some failed
    assert doc["counts"]["failed"] == len(prompts) and doc["counts"]["succeeded"] == 0
    assert doc["requests"]["transient_errors"] == 0 and doc["requests"]["retries"] == len(prompts)
    assert_balanced(doc)
    assert read_output(out_dir).height == 0
    assert not list((out_dir / IMAGES_DIR).glob("*")), "nothing is written of an unusable reply"

    errors = {r["id"]: r for r in read_errors(out_dir).iter_rows(named=True)}
    assert sorted(errors) == sorted(prompts)
    for i, row in errors.items():
        svg_b64 = _b64(fake_image(prompts[i], W, H, "svg"))
        assert row["error_type"] == "bad_reply" and row["attempts"] == 2
        assert row["error_message"].startswith("bad reply: image 0 of the reply is not a PNG, JPEG or WebP image")
        assert "it starts with b'<svg xmlns=" in row["error_message"]
        raw = json.loads(row["raw_reply"])
        assert raw["data"][0]["revised_prompt"] == f"[emulator] {prompts[i]}"
        assert raw["data"][0]["b64_json"] == f"{svg_b64[:120]}… [{len(svg_b64)} base64 characters in all]"
        assert TEST_KEY not in row["raw_reply"] and TEST_KEY not in row["error_message"]

    # The provider fixed: --retry-errors draws them.
    emulator.configure(image_format="png")
    emulator.reset_stats()
    doc = run_images(emulator, src, out_dir, retry_errors=True)
    assert doc["counts"]["succeeded"] == len(prompts) and emulator.stats["by_route"][ROUTE] == len(prompts)
    assert_images_match(out_dir, prompts, n=1)
    assert read_errors(out_dir).height == 0


def test_an_output_of_an_older_version_keeps_its_images_folder_and_pays_nothing_again(emulator, tmp_path):
    # Before _images/, images went to images/ and rows carried no image_format. Simulate a crash of
    # such a version after its files were renamed into place, before its part was written.
    prompts = dict(list(sample_prompts().items())[:3])
    src = write_prompts(tmp_path / "in.parquet", list(prompts), list(prompts.values()))
    out_dir = tmp_path / "out"
    run_images(emulator, src, out_dir)
    for part in out_dir.glob("part-*.parquet"):
        part.unlink()
    shutil.move(out_dir / IMAGES_DIR, out_dir / LEGACY_IMAGES_DIR)
    emulator.reset_stats()

    doc = run_images(emulator, src, out_dir)

    assert emulator.stats["by_route"][ROUTE] == 0 and doc["counts"]["succeeded"] == 3
    for row in read_output(out_dir).iter_rows(named=True):
        assert row["image_path"] == f"{LEGACY_IMAGES_DIR}/{row['content_hash']}.png"
        assert row["image_format"] == "png"
        assert (out_dir / row["image_path"]).read_bytes() == fake_png(prompts[row["id"]], W, H)

    # A new prompt in the same folder goes to _images/.
    more = {**prompts, 99: "a red kite over a moor"}
    write_prompts(src, list(more), list(more.values()))
    doc = run_images(emulator, src, out_dir)
    assert doc["counts"]["succeeded"] == 1 and doc["counts"]["skipped_done"] == 3
    new = read_output(out_dir).filter(id=99).row(0, named=True)
    assert new["image_path"] == f"{IMAGES_DIR}/{new['content_hash']}.png"
