"""`gembatch embed` end to end against the emulator over real HTTP, reading the Parquet back."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CORPUS, TEST_KEY, TEST_KEY_ENV, assert_balanced, read_errors, read_output, write_corpus

from emulator.fakes import fake_embedding
from tasks.engine.run import RunOptions, run_job
from tasks.engine.send.limits import Limits
from tasks.errors import ConfigError, InputError
from tasks.jobs.embed import EmbedJob
from tasks.provider.client import ProviderSettings

MODEL = "gemini-embedding-001"  # still served (until 2028-05-14); explicit in these tests
DEFAULT = "gemini-embedding-2"  # what a run without --model uses


def run_embed(emu, input: Path | str, output: Path, *, dimensions=None, chunk_size=50, limits=None, **kw) -> dict:
    job = EmbedJob(model=kw.pop("model", MODEL), dimensions=dimensions, batch_size=kw.pop("batch_size", 100))
    options = RunOptions(
        input=str(input),
        output=str(output),
        provider=ProviderSettings(provider="local", base_url=emu.base_url, api_key_env=TEST_KEY_ENV, timeout_s=5),
        limits=limits or Limits(),
        chunk_size=chunk_size,
        **kw,
    )
    return asyncio.run(run_job(job, options))


def expected_vector(text: str, dimensions: int | None = None, model: str = MODEL) -> np.ndarray:
    vector = fake_embedding(text, model, dimensions)
    if dimensions is not None and dimensions < 3072:
        vector = vector / np.linalg.norm(vector)
    return vector.astype(np.float32)


def assert_vectors_match(
    out: pl.DataFrame, texts_by_id: dict, dimensions: int | None = None, model: str = MODEL
) -> None:
    assert sorted(out["id"].to_list()) == sorted(texts_by_id), "every id exactly once"
    for row_id, vector in zip(out["id"].to_list(), out["embedding"].to_list(), strict=True):
        want = expected_vector(texts_by_id[row_id], dimensions, model)
        np.testing.assert_allclose(np.asarray(vector, np.float32), want, rtol=1e-6, atol=1e-7, err_msg=f"id {row_id}")


def test_every_row_gets_its_own_vector_with_typed_columns(emulator, tmp_path):
    corpus = pl.read_parquet(CORPUS)
    doc = run_embed(emulator, CORPUS, tmp_path / "out", chunk_size=64)

    out = read_output(tmp_path / "out")
    assert out.height == corpus.height == 323
    assert_vectors_match(out, dict(zip(corpus["id"], corpus["text"], strict=True)))
    schema = pq.read_schema(next((tmp_path / "out").glob("part-*.parquet")))
    assert schema.field("id").type == pa.int64()
    assert schema.field("embedding").type == pa.list_(pa.float32(), 3072)
    assert schema.field("content_hash").type == pa.string()
    assert schema.field("model").type == pa.string()
    assert set(out["model"]) == {MODEL}
    # pyarrow's dataset discovery reads the folder as the clean result table (skips _errors, _runs)
    import pyarrow.dataset as pds

    assert pds.dataset(tmp_path / "out", format="parquet").count_rows() == 323

    assert doc["status"] == "completed"
    assert_balanced(doc)
    # The corpus repeats 3 texts under other ids: those are embedded once.
    assert doc["counts"] == {
        "input_rows": 323,
        "skipped_done": 0,
        "deduplicated": 3,
        "succeeded": 320,
        "failed": 0,
        "not_attempted": 0,
    }
    assert emulator.stats["embedding_inputs"] == 320
    assert doc["requests"]["sent"] == emulator.stats["by_route"]["embeddings"]
    run_file = json.loads((tmp_path / "out" / "_runs" / f"{doc['run_id']}.json").read_text())
    assert run_file["counts"] == doc["counts"]
    assert run_file["input"]["rows"] == 323 and run_file["input"]["fingerprint"].startswith("sha256:")
    assert run_file["tokens"]["prompt"] == emulator.stats["prompt_tokens"] > 0
    assert run_file["cost"]["estimated_usd"] == pytest.approx(run_file["tokens"]["prompt"] * 0.15 / 1e6, abs=1e-6)
    assert sorted(run_file["output"]["parts_written"]) == sorted(p.name for p in (tmp_path / "out").glob("part-*"))


def test_csv_through_an_fsspec_url_with_shorter_normalised_vectors(emulator, tmp_path):
    import fsspec

    texts = [f"sentence number {i} about the sea" for i in range(120)]
    local = write_corpus(tmp_path / "c.csv", list(range(120)), texts)
    with fsspec.open("memory://inputs/c.csv", "wb") as f:
        f.write(local.read_bytes())

    doc = run_embed(emulator, "memory://inputs/c.csv", tmp_path / "out", dimensions=256, chunk_size=40, batch_size=25)

    out = read_output(tmp_path / "out")
    assert out.schema["embedding"] == pl.Array(pl.Float32, 256)
    assert_vectors_match(out, dict(enumerate(texts)), dimensions=256)
    norms = np.linalg.norm(np.asarray(out["embedding"].to_list(), np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    assert doc["requests"]["sent"] == 6  # 3 chunks of 40 rows, each sent as 25 + 15


def test_rerun_is_free_new_rows_only_and_changed_rows_superseded(emulator, tmp_path):
    ids = list(range(200))
    texts = [f"row {i}: the quick brown fox number {i}" for i in ids]
    src = write_corpus(tmp_path / "in.parquet", ids, texts)
    out_dir = tmp_path / "out"
    run_embed(emulator, src, out_dir)
    assert emulator.stats["embedding_inputs"] == 200

    emulator.reset_stats()
    doc = run_embed(emulator, src, out_dir)
    assert emulator.stats["by_route"]["embeddings"] == 0 and doc["requests"]["sent"] == 0
    assert doc["counts"]["skipped_done"] == 200
    assert_balanced(doc)

    ids2 = ids + list(range(200, 210))
    texts2 = texts + [f"a brand new row {i}" for i in range(200, 210)]
    write_corpus(src, ids2, texts2)
    emulator.reset_stats()
    doc = run_embed(emulator, src, out_dir)
    assert emulator.stats["embedding_inputs"] == 10
    assert doc["counts"]["succeeded"] == 10 and doc["counts"]["skipped_done"] == 200

    texts2[17] = "row 17 now says something else entirely"
    write_corpus(src, ids2, texts2)
    emulator.reset_stats()
    doc = run_embed(emulator, src, out_dir)
    assert emulator.stats["embedding_inputs"] == 1
    assert doc["output"]["superseded_rows_removed"] == 1
    out = read_output(out_dir)
    assert out.height == 210 and out["id"].n_unique() == 210
    assert_vectors_match(out, dict(zip(ids2, texts2, strict=True)))

    # A new id whose text is already embedded under another id: its vector is copied, not bought.
    write_corpus(src, [*ids2, 210], [*texts2, texts2[5]])
    emulator.reset_stats()
    doc = run_embed(emulator, src, out_dir)
    assert emulator.stats["by_route"]["embeddings"] == 0
    assert doc["counts"]["deduplicated"] == 1 and doc["counts"]["skipped_done"] == 210
    assert_vectors_match(read_output(out_dir), dict(zip([*ids2, 210], [*texts2, texts2[5]], strict=True)))


def test_gemini_shaped_429s_are_absorbed_and_the_limiter_slows_down(emulator, tmp_path):
    emulator.configure(rpm=4, window_seconds=1.0)
    texts = [f"text {i}" for i in range(150)]
    src = write_corpus(tmp_path / "in.parquet", list(range(150)), texts)

    doc = run_embed(emulator, src, tmp_path / "out", batch_size=10, chunk_size=100, limits=Limits(max_concurrency=8))

    assert doc["status"] == "completed"
    assert emulator.stats["by_status"].get(429, 0) > 0
    assert doc["requests"]["rate_limited_429"] == emulator.stats["by_status"][429]
    assert doc["limits"]["rate_cuts_after_429"] >= 1
    assert_vectors_match(read_output(tmp_path / "out"), dict(enumerate(texts)))
    assert_balanced(doc)


def test_client_rpm_paces_requests_evenly(emulator, tmp_path):
    emulator.configure(rpm=600, window_seconds=60.0)
    src = write_corpus(tmp_path / "in.parquet", list(range(60)), [f"t{i}" for i in range(60)])
    doc = run_embed(emulator, src, tmp_path / "out", batch_size=5, limits=Limits(rpm=600))
    # 12 requests spaced 0.1 s apart take at least 1.1 s, and none is refused.
    assert doc["requests"]["sent"] == 12
    assert doc["duration_s"] >= 1.1
    assert emulator.stats["by_status"].get(429, 0) == 0


def test_bad_rows_become_error_rows_and_the_rest_completes(emulator, tmp_path):
    texts = [f"good text {i}" for i in range(50)]
    texts[7] = "this one the server refuses [[emulator:400]]"
    texts[20] = "   "
    texts[30] = None
    texts[40] = "word " * 3000  # ~3750 tokens: over gemini-embedding-001's 2048
    src = write_corpus(tmp_path / "in.parquet", list(range(50)), texts)

    doc = run_embed(emulator, src, tmp_path / "out", chunk_size=50)

    out, errors = read_output(tmp_path / "out"), read_errors(tmp_path / "out")
    bad = {7, 20, 30, 40}
    assert_vectors_match(out, {i: t for i, t in enumerate(texts) if i not in bad})
    assert sorted(errors["id"].to_list()) == sorted(bad)
    by_id = {r["id"]: r for r in errors.iter_rows(named=True)}
    assert by_id[7]["error_type"] == "invalid_request" and "HTTP 400" in by_id[7]["error_message"]
    assert "empty" in by_id[20]["error_message"] and "null" in by_id[30]["error_message"]
    assert "2048-token input limit" in by_id[40]["error_message"]
    assert set(errors.columns) >= {"id", "content_hash", "error_type", "error_message", "attempts"}
    assert doc["counts"]["failed"] == 4 and doc["counts"]["succeeded"] == 46
    assert_balanced(doc)

    # A rerun does not pay again for rows that failed for good...
    emulator.reset_stats()
    doc = run_embed(emulator, src, tmp_path / "out", chunk_size=50)
    assert emulator.stats["requests"] == 1  # only the model check
    assert doc["counts"]["failed"] == 4 and doc["counts"]["skipped_done"] == 46
    # ...unless asked to, and a row that then succeeds leaves _errors.
    texts[7] = "fixed now"
    write_corpus(src, list(range(50)), texts)
    doc = run_embed(emulator, src, tmp_path / "out", chunk_size=50, retry_errors=True)
    assert sorted(read_errors(tmp_path / "out")["id"].to_list()) == [20, 30, 40]
    assert 7 in read_output(tmp_path / "out")["id"].to_list()


def test_daily_quota_stops_cleanly_and_the_next_run_resumes(emulator, tmp_path):
    emulator.configure(rpd=3)  # three embedding requests pass, then a PerDay 429
    texts = [f"daily {i}" for i in range(100)]
    src = write_corpus(tmp_path / "in.parquet", list(range(100)), texts)

    doc = run_embed(emulator, src, tmp_path / "out", batch_size=10, chunk_size=10, limits=Limits(max_concurrency=1))

    assert doc["status"] == "stopped: daily quota"
    assert "per-day quota" in doc["message"]
    assert_balanced(doc)
    assert doc["counts"]["succeeded"] == read_output(tmp_path / "out").height == 30
    assert doc["counts"]["not_attempted"] == 70

    emulator.configure(rpd=None)
    doc = run_embed(emulator, src, tmp_path / "out", batch_size=10, chunk_size=10)
    assert doc["status"] == "completed" and doc["counts"]["skipped_done"] == 30
    assert_vectors_match(read_output(tmp_path / "out"), dict(enumerate(texts)))


def test_wrong_key_unknown_model_and_missing_key_fail_before_any_work(emulator, tmp_path, monkeypatch):
    monkeypatch.setenv(TEST_KEY_ENV, "not-the-key")
    with pytest.raises(ConfigError, match=f"key in {TEST_KEY_ENV} was rejected.*API key not valid"):
        run_embed(emulator, CORPUS, tmp_path / "out")
    monkeypatch.setenv(TEST_KEY_ENV, TEST_KEY)
    with pytest.raises(ConfigError, match="model 'no-such-model' was not found.*gembatch models"):
        run_embed(emulator, CORPUS, tmp_path / "out", model="no-such-model")
    monkeypatch.delenv(TEST_KEY_ENV)
    with pytest.raises(ConfigError, match=f"{TEST_KEY_ENV} is not set"):
        run_embed(emulator, CORPUS, tmp_path / "out")
    assert emulator.stats["by_route"]["embeddings"] == 0
    assert not list((tmp_path / "out").glob("part-*"))


def test_input_problems_name_the_file_and_the_columns(emulator, tmp_path):
    with pytest.raises(InputError, match="has no column 'body'; its columns are: id, text"):
        job_input = tmp_path / "x.parquet"
        write_corpus(job_input, [1, 2], ["a", "b"])
        asyncio.run(
            run_job(
                EmbedJob(model=MODEL, text_col="body"),
                RunOptions(
                    input=str(job_input), output=str(tmp_path / "o"), provider=ProviderSettings(provider="local")
                ),
            )
        )
    with pytest.raises(InputError, match="does not exist"):
        run_embed(emulator, tmp_path / "missing.parquet", tmp_path / "out")
    dup = write_corpus(tmp_path / "dup.parquet", [1, 2, 2, 3], ["a", "b", "c", "d"])
    with pytest.raises(InputError, match=r"duplicated id\(s\), e.g. 2 at data rows 2, 3"):
        run_embed(emulator, dup, tmp_path / "out")


def test_the_key_appears_in_no_output_file(emulator, tmp_path):
    texts = ["fine", "refused [[emulator:400]]", "also fine"]
    src = write_corpus(tmp_path / "in.parquet", [1, 2, 3], texts)
    run_embed(emulator, src, tmp_path / "out")
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) >= 3
    for path in files:
        assert TEST_KEY.encode() not in path.read_bytes(), path
