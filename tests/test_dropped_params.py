"""A server or gateway that drops `--dimensions` without a word (a LiteLLM proxy with
`drop_params: true`) answers full-size vectors: the first such answer stops the run, live or batch,
with nothing written for it and no error row; and one output never holds vectors of two sizes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import TEST_KEY, TEST_KEY_ENV, CliResult, read_errors, read_output, run_gembatch, write_corpus

from emulator import Emulator, EmulatorConfig
from tasks.engine.run import RunOptions, run_job
from tasks.engine.send.batch.policy import BatchPolicy
from tasks.jobs.embed import DIMENSIONS_DROPPED, EmbedJob
from tasks.provider.client import ProviderSettings

MODEL = "gemini-embedding-001"  # 3072 values at full size
TEXTS = [f"passage number {i}" for i in range(1, 7)]


@pytest.fixture
def dropping():
    """The emulator as a gateway that drops `dimensions` from every embeddings body it passes on."""
    with Emulator(EmulatorConfig(api_key=TEST_KEY, ignore_params=("dimensions",))) as emu:
        yield emu


def embed(capsys: pytest.CaptureFixture[str], base_url: str, src: Path, out: Path, *extra: str) -> CliResult:
    argv = ["embed", str(src), "-o", str(out), "--base-url", base_url, "--api-key-env", TEST_KEY_ENV,
            "--model", MODEL, "--batch-size", "2", "--max-concurrency", "1", "--no-progress", *extra]  # fmt: skip
    return run_gembatch(argv, capsys)


def run_document(out: Path) -> dict:
    (path,) = sorted((out / "_runs").glob("*.json"))[-1:]
    return json.loads(path.read_text())


def test_a_dropped_dimensions_parameter_stops_the_run_before_anything_is_written(dropping, tmp_path, capsys):
    src = write_corpus(tmp_path / "in.parquet", list(range(1, 7)), TEXTS)
    out = tmp_path / "out"
    result = embed(capsys, dropping.base_url, src, out, "--dimensions", "256")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    said = " ".join(result.stderr.split())
    assert "--dimensions 256" in said and "vectors of 3072 values" in said
    assert "rerun without --dimensions into another --output" in said and "allowed_openai_params" in said
    assert list(out.glob("part-*.parquet")) == []
    assert read_errors(out).height == 0
    doc = run_document(out)
    assert doc["status"] == DIMENSIONS_DROPPED
    assert doc["counts"]["succeeded"] == 0 and doc["counts"]["failed"] == 0
    assert dropping.stats["embedding_inputs"] >= 1


def test_the_same_server_honouring_dimensions_gives_vectors_of_the_size_asked(emulator, tmp_path, capsys):
    src = write_corpus(tmp_path / "in.parquet", list(range(1, 7)), TEXTS)
    result = embed(capsys, emulator.base_url, src, tmp_path / "out", "--dimensions", "256")
    assert result.returncode == 0, result.stderr
    vectors = read_output(tmp_path / "out").sort("id")["embedding"].to_list()
    assert [len(v) for v in vectors] == [256] * 6


def test_a_batch_result_with_vectors_of_another_size_stops_the_run_unwritten(dropping, tmp_path):
    src = write_corpus(tmp_path / "in.parquet", list(range(1, 7)), TEXTS)
    out = tmp_path / "out"
    options = RunOptions(
        input=str(src),
        output=str(out),
        provider=ProviderSettings(provider="local", base_url=dropping.base_url, api_key_env=TEST_KEY_ENV),
        batch=BatchPolicy(mode="batch", poll_s=0.05),
    )
    doc = asyncio.run(run_job(EmbedJob(model=MODEL, dimensions=256, batch_size=2), options))
    assert doc["status"] == DIMENSIONS_DROPPED
    assert "--dimensions 256" in doc["message"] and "3072" in doc["message"]
    assert doc["batches"]["batches_created"] == 1
    assert list(out.glob("part-*.parquet")) == []
    assert read_errors(out).height == 0
    assert doc["counts"]["succeeded"] == 0 and doc["counts"]["failed"] == 0


def test_an_output_of_full_size_vectors_takes_no_shortened_ones(emulator, tmp_path, capsys):
    src = write_corpus(tmp_path / "in.parquet", list(range(1, 7)), TEXTS)
    out = tmp_path / "out"
    first = embed(capsys, emulator.base_url, src, out)
    assert first.returncode == 0, first.stderr
    parts = sorted(out.glob("part-*.parquet"))
    again = embed(capsys, emulator.base_url, src, out, "--dimensions", "256")
    assert again.returncode == 2, again.stderr
    said = " ".join(again.stderr.split())
    assert "Traceback" not in again.stderr
    assert "3072" in said and "--dimensions 256" in said
    assert sorted(out.glob("part-*.parquet")) == parts
    assert "rerun without --dimensions to add to this one" in said and "--force" in said
    vectors = read_output(out)["embedding"].to_list()
    assert {len(v) for v in vectors} == {3072}
    # Told to: every row is sent again at the new size, and the old vectors are superseded.
    forced = embed(capsys, emulator.base_url, src, out, "--dimensions", "256", "--force")
    assert forced.returncode == 0, forced.stderr
    vectors = read_output(out).sort("id")["embedding"].to_list()
    assert [len(v) for v in vectors] == [256] * 6
