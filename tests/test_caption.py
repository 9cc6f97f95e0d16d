"""`gembatch caption` end to end against the emulator over real HTTP, reading the Parquet back."""

from __future__ import annotations

import asyncio
import io
import shutil
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from conftest import REPO, TEST_KEY_ENV, assert_balanced, read_errors, read_output
from PIL import Image

from emulator.fakes import fake_caption
from flows import commands
from flows.options import command_job
from tasks.engine.run import RunOptions, run_job
from tasks.jobs.caption import DEFAULT_CAPTION_PROMPT, CaptionJob, image_tokens
from tasks.jobs.images_io import image_for_model
from tasks.jobs.media import base_dir_of, sniff_image_mime
from tasks.provider.client import ProviderSettings

MODEL = "gemini-3.8-flash"
IMAGES = REPO / "data" / "images"
SAMPLES = ("sunset.png", "house.jpg", "chart.png", "checkerboard.png", "banner.png")
MIMES = {"png": "image/png", "jpg": "image/jpeg"}


def run_caption(emu, input: Path | str, output: Path, *, chunk_size: int = 50, **job_kw) -> dict:
    job = CaptionJob(model=job_kw.pop("model", MODEL), base_dir=base_dir_of(str(input)), **job_kw)
    options = RunOptions(
        input=str(input),
        output=str(output),
        provider=ProviderSettings(provider="local", base_url=emu.base_url, api_key_env=TEST_KEY_ENV, timeout_s=5),
        chunk_size=chunk_size,
    )
    return asyncio.run(run_job(job, options))


def write_list(path: Path, rows: list[tuple[int, str]]) -> Path:
    table = pa.table({"id": pa.array([r[0] for r in rows], pa.int64()), "image": [r[1] for r in rows]})
    pcsv.write_csv(table, path)
    return path


def expected_caption(path: Path, *, max_side: int = 1536, prompt: str = DEFAULT_CAPTION_PROMPT) -> str:
    sent = image_for_model(path.read_bytes(), max_side, name=str(path))
    return fake_caption(sent.data, sent.mime, MODEL, prompt)


@pytest.fixture
def album(tmp_path, monkeypatch) -> Path:
    """A folder with the sample images, a few broken files and a list that names them relatively."""
    folder = tmp_path / "album"
    (folder / "pics").mkdir(parents=True)
    for name in SAMPLES:
        shutil.copy(IMAGES / name, folder / "pics" / name)
    shutil.copy(IMAGES / "sunset.png", folder / "pics" / "mislabelled.jpg")  # a PNG whatever its name
    (folder / "pics" / "garbage.png").write_bytes(b"this is not an image at all\n" * 20)
    chart = (IMAGES / "chart.png").read_bytes()
    (folder / "pics" / "truncated.png").write_bytes(chart[: len(chart) // 2])
    rows = [(i, f"pics/{name}") for i, name in enumerate(SAMPLES, start=1)]
    rows += [(6, "pics/mislabelled.jpg"), (7, "pics/missing.png"), (8, "pics/garbage.png"), (9, "pics/truncated.png")]
    write_list(folder / "list.csv", rows)
    monkeypatch.chdir(tmp_path)  # relative paths must resolve against the list's folder, not here
    return folder


def test_every_image_gets_its_own_caption_and_bad_files_become_error_rows(emulator, album, tmp_path):
    doc = run_caption(emulator, album / "list.csv", tmp_path / "out", chunk_size=4)

    out = read_output(tmp_path / "out")
    files = {i: album / "pics" / name for i, name in enumerate(SAMPLES, start=1)}
    files[6] = album / "pics" / "mislabelled.jpg"
    assert sorted(out["id"].to_list()) == sorted(files)
    for row in out.iter_rows(named=True):
        assert row["caption"] == expected_caption(files[row["id"]]), f"id {row['id']}"
        with Image.open(files[row["id"]]) as img:
            assert (row["image_width"], row["image_height"]) == img.size
    by_id = {row["id"]: row["caption"] for row in out.iter_rows(named=True)}
    assert "a image/png image (320x200, " in by_id[6], "the type is sniffed from the bytes, not the name"
    assert "a image/jpeg image (400x300, " in by_id[2]
    assert set(out["model"]) == {MODEL}

    schema = pq.read_schema(next((tmp_path / "out").glob("part-*.parquet")))
    assert schema.field("id").type == pa.int64()
    assert schema.field("caption").type == pa.string()
    assert schema.field("image_width").type == pa.int32()
    assert schema.field("image_height").type == pa.int32()
    assert schema.field("content_hash").type == pa.string()
    assert schema.field("model").type == pa.string()

    errors = {row["id"]: row for row in read_errors(tmp_path / "out").iter_rows(named=True)}
    assert sorted(errors) == [7, 8, 9]
    assert {e["error_type"] for e in errors.values()} == {"invalid_input"}
    missing = errors[7]["error_message"]
    assert "not found" in missing and str(album / "pics" / "missing.png") in missing
    assert str(album / "pics" / "garbage.png") in errors[8]["error_message"]
    assert "is not a PNG, JPEG" in errors[8]["error_message"]
    assert str(album / "pics" / "truncated.png") in errors[9]["error_message"]
    assert "corrupt" in errors[9]["error_message"]

    assert doc["status"] == "completed with errors"  # the bad files' rows are in _errors/
    assert_balanced(doc)
    assert doc["counts"]["succeeded"] == 5 and doc["counts"]["deduplicated"] == 1 and doc["counts"]["failed"] == 3
    assert emulator.stats["by_route"]["chat/completions"] == 5  # sunset and mislabelled share one content


def test_rerun_sends_nothing_and_a_new_prompt_sends_everything_again(emulator, album, tmp_path):
    run_caption(emulator, album / "list.csv", tmp_path / "out")
    emulator.reset_stats()

    doc = run_caption(emulator, album / "list.csv", tmp_path / "out")
    assert emulator.stats["by_route"]["chat/completions"] == 0 and doc["requests"]["sent"] == 0
    assert doc["counts"]["skipped_done"] == 6 and doc["counts"]["failed"] == 3
    assert_balanced(doc)

    emulator.reset_stats()
    prompt = "Name the main colours."
    doc = run_caption(emulator, album / "list.csv", tmp_path / "out", prompt=prompt)
    assert emulator.stats["by_route"]["chat/completions"] == 5
    out = read_output(tmp_path / "out")
    assert out.height == 6, "the new prompt's captions replace the old ones"
    row = out.filter(out["id"] == 3).row(0, named=True)
    assert row["caption"] == expected_caption(album / "pics" / "chart.png", prompt=prompt)


def test_a_wide_image_is_downscaled_before_sending(emulator, tmp_path):
    shutil.copy(IMAGES / "banner.png", tmp_path / "banner.png")  # media paths stay under the list's folder
    src = write_list(tmp_path / "one.csv", [(1, str(tmp_path / "banner.png"))])

    run_caption(emulator, src, tmp_path / "out")
    row = read_output(tmp_path / "out").row(0, named=True)
    # What the emulator saw: 1536 px wide (2000 × 400 scaled by 0.768), still a PNG.
    assert "a image/png image (1536x307, " in row["caption"]
    assert row["caption"] == expected_caption(IMAGES / "banner.png")
    assert (row["image_width"], row["image_height"]) == (2000, 400), "the original's size is recorded"

    run_caption(emulator, src, tmp_path / "big", max_side=4000)
    assert "a image/png image (2000x400, " in read_output(tmp_path / "big")["caption"][0]


def test_downscale_keeps_the_format_and_the_token_estimate_follows_gemini_tiles():
    jpeg = (IMAGES / "house.jpg").read_bytes()
    small = image_for_model(jpeg, 200, name="house.jpg")
    assert sniff_image_mime(small.data) == small.mime == "image/jpeg" and small.changed
    with Image.open(io.BytesIO(small.data)) as img:
        assert img.size == (small.width, small.height) == (200, 150)
    same = image_for_model(jpeg, 400, name="house.jpg")
    assert same.data is jpeg and not same.changed, "an image that fits is sent byte for byte"
    assert image_tokens(384, 200) == 258
    assert image_tokens(1536, 307) == 258 * 2 * 1
    assert image_tokens(800, 800) == 258 * 4


def test_relative_paths_resolve_against_an_fsspec_input_folder(emulator, tmp_path):
    fs = fsspec.filesystem("memory")
    for name in ("house.jpg", "checkerboard.png"):
        fs.pipe(f"/shoot/pics/{name}", (IMAGES / name).read_bytes())
    local = write_list(tmp_path / "list.csv", [(1, "pics/house.jpg"), (2, "memory://shoot/pics/checkerboard.png")])
    fs.pipe("/shoot/list.csv", local.read_bytes())

    doc = run_caption(emulator, "memory://shoot/list.csv", tmp_path / "out")
    assert doc["counts"]["succeeded"] == 2
    out = read_output(tmp_path / "out").sort("id")
    assert out["caption"].to_list() == [
        expected_caption(IMAGES / "house.jpg"),
        expected_caption(IMAGES / "checkerboard.png"),
    ]


def test_the_sample_list_and_the_flow_builder(emulator, tmp_path):
    params = {"input": str(REPO / "data" / "images.csv"), "output": "", "provider": "gemini", "model": None}
    params |= {"image_col": "image", "prompt": DEFAULT_CAPTION_PROMPT, "max_side": 1536}
    built = command_job(commands.caption, **params)
    job = built.job
    assert job.model == built.arguments["model"] == "gemini-3.8-flash" and built.model_from == "default"
    assert job.base_dir == str(REPO / "data")

    doc = run_caption(emulator, REPO / "data" / "images.csv", tmp_path / "out")
    assert doc["counts"]["succeeded"] == 5 and doc["counts"]["failed"] == 0
    out = read_output(tmp_path / "out")
    for row in out.iter_rows(named=True):
        name = SAMPLES[row["id"] - 1]
        assert row["caption"] == expected_caption(IMAGES / name)
        assert MIMES[name.rsplit(".", 1)[1]] in row["caption"]
