"""Cost controls: --dry-run, --max-cost-usd, and the output folder's owner (--force)."""

from __future__ import annotations

import asyncio

import pytest
from conftest import REPO, TEST_KEY_ENV, assert_balanced, read_output, write_corpus
from test_embed import assert_vectors_match, run_embed

from tasks.engine.dry_run import plan_job
from tasks.engine.run import RunOptions
from tasks.engine.send.limits import Limits
from tasks.errors import ConfigError
from tasks.jobs.embed import EmbedJob
from tasks.provider.client import ProviderSettings

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
    with pytest.raises(ConfigError, match="needs a price for model 'whisper-1'.*--prices FILE or GEMBATCH_PRICES"):
        run_embed(emulator, src, tmp_path / "out", model="whisper-1", max_cost_usd=1.0)
    assert emulator.stats["by_route"]["embeddings"] == 0


def test_an_output_folder_belongs_to_one_job_and_model_unless_forced(emulator, tmp_path):
    src = write_corpus(tmp_path / "in.parquet", [1, 2, 3], ["one", "two", "three"])
    run_embed(emulator, src, tmp_path / "out")
    with pytest.raises(ConfigError, match="was made with model 'gemini-embedding-001'.*--change-model"):
        run_embed(emulator, src, tmp_path / "out", model="text-embedding-3-small")
    doc = run_embed(emulator, src, tmp_path / "out", model="text-embedding-3-small", force=True)
    assert doc["status"] == "completed" and doc["counts"]["succeeded"] == 3
    out = read_output(tmp_path / "out")
    assert out.height == 3 and set(out["model"]) == {"text-embedding-3-small"}  # the newer rows superseded


def test_dry_run_prices_images_by_tile_and_audio_by_the_second(tmp_path):
    """Gemini's rules, written out here: 258 tokens for an image up to 384 px both sides, else 258 per
    768×768 tile of what is sent (after --max-side); 32 tokens per second of audio; prompt at 4 chars."""
    import math
    import wave

    from PIL import Image

    from tasks.jobs.caption import DEFAULT_CAPTION_PROMPT, CaptionJob
    from tasks.jobs.media import base_dir_of
    from tasks.jobs.transcribe import TranscribeJob

    data = REPO / "data"

    def tiles(width: int, height: int, max_side: int = 1536) -> int:
        scale = min(1.0, max_side / max(width, height))
        w, h = round(width * scale), round(height * scale)
        return 1 if w <= 384 and h <= 384 else math.ceil(w / 768) * math.ceil(h / 768)

    def plan(job, csv):
        options = RunOptions(input=str(csv), output=str(tmp_path / job.name), dry_run=True)
        return asyncio.run(plan_job(job, options))

    images = [line.split(",")[1] for line in (data / "images.csv").read_text().splitlines()[1:]]
    sizes = [Image.open(data / path).size for path in images]
    prompt_tokens = (len(DEFAULT_CAPTION_PROMPT) + 3) // 4
    caption = plan(CaptionJob(model="gemini-3.8-flash", base_dir=base_dir_of(str(data / "images.csv"))),
                   data / "images.csv")  # fmt: skip
    assert caption["estimate"]["input_tokens"] == sum(258 * tiles(w, h) + prompt_tokens for w, h in sizes)
    assert (2000, 400) in sizes  # the banner is sent at 1536x307: two tiles, not three

    clips = [line.split(",")[1] for line in (data / "audio.csv").read_text().splitlines()[1:]]
    wavs = [c for c in clips if c.endswith(".wav")]
    transcribe = TranscribeJob(model="gemini-3.8-flash", base_dir=base_dir_of(str(data / "audio.csv")))
    wav_csv = tmp_path / "wavs.csv"
    wav_csv.write_text("id,audio\n" + "".join(f"{i},{(data / c).as_posix()}\n" for i, c in enumerate(wavs)))
    seconds = []
    for clip in wavs:
        with wave.open(str(data / clip)) as w:
            seconds.append(w.getnframes() / w.getframerate())
    prompt_tokens = (len(transcribe.effective_prompt) + 3) // 4
    expected = sum(math.ceil(s * 32) + prompt_tokens for s in seconds)
    assert plan(transcribe, wav_csv)["estimate"]["input_tokens"] == expected
