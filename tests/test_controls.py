"""Cost controls: --dry-run, --max-cost-usd, and the output folder's owner (--force)."""

from __future__ import annotations

import asyncio

import pytest
from conftest import TEST_KEY_ENV, assert_balanced, read_output, write_corpus
from test_embed import assert_vectors_match, run_embed

from tasks.client import ProviderSettings
from tasks.embed import EmbedJob
from tasks.errors import ConfigError
from tasks.limits import Limits
from tasks.plan import plan_job
from tasks.run import RunOptions

MODEL = "gemini-embedding-001"


def test_dry_run_counts_what_would_be_sent_and_estimates_without_a_request(emulator, tmp_path, monkeypatch):
    ids = list(range(300))
    texts = [f"dry run sentence number {i:04d}" for i in ids]  # 28 chars: 7 tokens each
    texts[299] = texts[0]  # a duplicate
    texts[298] = ""  # invalid
    src = write_corpus(tmp_path / "in.parquet", ids, texts)
    write_corpus(tmp_path / "first.parquet", ids[:100], texts[:100])
    run_embed(emulator, tmp_path / "first.parquet", tmp_path / "out")
    emulator.reset_stats()
    monkeypatch.delenv(TEST_KEY_ENV)  # a dry run needs no key

    options = RunOptions(
        input=str(src),
        output=str(tmp_path / "out"),
        provider=ProviderSettings(provider="gemini"),
        limits=Limits(rpm=60, tpm=600),
        chunk_size=64,
        dry_run=True,
    )
    plan = asyncio.run(plan_job(EmbedJob(model=MODEL, batch_size=50), options))

    assert emulator.stats["requests"] == 0
    assert plan["counts"] == {
        "input_rows": 300, "skipped_done": 100, "deduplicated": 1, "invalid": 1, "failed_before": 0, "would_send": 198,
    }  # fmt: skip
    estimate = plan["estimate"]
    assert estimate["input_tokens"] == 198 * 7
    # Requests are counted per chunk of 64, as a run sends them (≤ 50 a request): 0 + 1 + 2 + 2 + 1.
    assert estimate["requests"] == 6
    assert estimate["input_cost_usd"] == pytest.approx(198 * 7 * 0.15 / 1e6, abs=1e-6)
    assert estimate["minutes_at_limits"] == pytest.approx(max(6 / 60, 198 * 7 / 600), abs=0.01)
    assert len(list((tmp_path / "out" / "_runs").glob("*.json"))) == 1  # only the real run: a dry run writes nothing


def test_max_cost_stops_before_the_budget_and_a_rerun_goes_on(emulator, tmp_path):
    ids = list(range(1000))
    texts = [f"{i:05d} " + "budget " * 56 for i in ids]  # 398 chars: 100 tokens
    src = write_corpus(tmp_path / "in.parquet", ids, texts)

    doc = run_embed(emulator, src, tmp_path / "out", batch_size=10, chunk_size=100, max_cost_usd=0.005)

    assert doc["status"] == "stopped: budget" and "--max-cost-usd 0.005" in doc["message"]
    assert doc["cost"]["estimated_usd"] <= 0.005
    assert 0 < doc["counts"]["succeeded"] < 1000 and doc["counts"]["not_attempted"] > 0
    assert_balanced(doc)
    assert read_output(tmp_path / "out").height == doc["counts"]["succeeded"]

    emulator.reset_stats()
    doc2 = run_embed(emulator, src, tmp_path / "out", batch_size=10, chunk_size=100, max_cost_usd=1.0)
    assert doc2["status"] == "completed"
    assert emulator.stats["embedding_inputs"] == 1000 - doc["counts"]["succeeded"]
    assert_vectors_match(read_output(tmp_path / "out"), dict(zip(ids, texts, strict=True)))


def test_a_budget_needs_a_priced_model(emulator, tmp_path):
    src = write_corpus(tmp_path / "in.parquet", [1], ["a"])
    with pytest.raises(ConfigError, match="needs a price for model 'gpt-image-1'.*tasks/prices.py"):
        run_embed(emulator, src, tmp_path / "out", model="gpt-image-1", max_cost_usd=1.0)
    assert emulator.stats["by_route"]["embeddings"] == 0


def test_an_output_folder_belongs_to_one_job_and_model_unless_forced(emulator, tmp_path):
    src = write_corpus(tmp_path / "in.parquet", [1, 2, 3], ["one", "two", "three"])
    run_embed(emulator, src, tmp_path / "out")
    with pytest.raises(ConfigError, match="holds embed results of model 'gemini-embedding-001'.*--force"):
        run_embed(emulator, src, tmp_path / "out", model="text-embedding-3-small")
    doc = run_embed(emulator, src, tmp_path / "out", model="text-embedding-3-small", force=True)
    assert doc["status"] == "completed" and doc["counts"]["succeeded"] == 3
    out = read_output(tmp_path / "out")
    assert out.height == 3 and set(out["model"]) == {"text-embedding-3-small"}  # the newer rows superseded
