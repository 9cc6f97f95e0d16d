"""`--stream`: chat replies as server-sent events from the emulator, over real HTTP.

A streamed reply is put back together into the same answer a plain request gets; a stream that
breaks off, ends without a finish reason, stalls past --idle-timeout or carries a malformed chunk is a
failed attempt (retried), never a result; time to first token goes into _runs/.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, TEST_KEY_ENV, assert_balanced, read_errors, read_output
from openai import OpenAI

from emulator.fakes import fake_chat_text
from emulator.streaming import STREAM_FAULTS
from schemas.examples import Invoice
from tasks.engine.run import RunOptions, run_job
from tasks.engine.send.context import RetryPolicy
from tasks.errors import ConfigError
from tasks.jobs.caption import CaptionJob
from tasks.jobs.embed import EmbedJob
from tasks.jobs.extract import ExtractJob
from tasks.jobs.generate import GenerateJob
from tasks.jobs.media import base_dir_of
from tasks.jobs.transcribe import TranscribeJob
from tasks.provider.client import ProviderSettings

MODEL = "gemini-3.8-flash"
DATA = REPO / "data"


def run(emu, job, input: Path, output: Path, *, stream: bool = True, **kw: Any) -> dict[str, Any]:
    provider = ProviderSettings(
        provider="local",
        base_url=emu.base_url,
        api_key_env=TEST_KEY_ENV,
        timeout_s=kw.pop("timeout_s", 5),
        stream=stream,
        idle_timeout_s=kw.pop("idle_timeout_s", 2.0),
    )
    retry = kw.pop("retry", RetryPolicy(base_delay_s=0.01, max_delay_s=0.05))
    options = RunOptions(input=str(input), output=str(output), provider=provider, retry=retry, **kw)
    return asyncio.run(run_job(job, options))


def rows_of(out: Path) -> list[dict[str, Any]]:
    order = [c for c in ("id", "choice") if c in read_output(out).columns]
    return read_output(out).sort(order).to_dicts()


def write_texts(path: Path, texts: dict[int, str]) -> Path:
    pq.write_table(pa.table({"id": pa.array(list(texts), pa.int64()), "text": list(texts.values())}), path)
    return path


JOBS = {
    "generate": (
        lambda: GenerateJob(model=MODEL, prompt="{product}: {review}", n=2),
        DATA / "generate" / "reviews.csv",
    ),
    "extract": (lambda: ExtractJob(model=MODEL, schema=Invoice), DATA / "extract" / "invoices.csv"),
    "caption": (lambda: CaptionJob(model=MODEL, base_dir=base_dir_of(str(DATA / "images.csv"))), DATA / "images.csv"),
    "transcribe": (
        lambda: TranscribeJob(model=MODEL, base_dir=base_dir_of(str(DATA / "audio.csv"))),
        DATA / "audio.csv",
    ),
}


@pytest.mark.parametrize("name", list(JOBS))
def test_a_streamed_run_stores_what_a_plain_run_stores_and_times_the_first_token(emulator, tmp_path, name):
    make_job, source = JOBS[name]
    emulator.configure(latency_seconds=0.05, stream_chunk_delay_seconds=0.002)
    plain = run(emulator, make_job(), source, tmp_path / "plain", stream=False)
    streamed = run(emulator, make_job(), source, tmp_path / "streamed")

    assert plain["status"] == streamed["status"] == "completed", streamed["message"]
    assert_balanced(streamed)
    assert streamed["counts"] == plain["counts"] and streamed["tokens"] == plain["tokens"]
    # Value by value the same rows, the same content hashes: streaming doesn't change what was asked.
    assert rows_of(tmp_path / "streamed") == rows_of(tmp_path / "plain")
    assert "streaming" not in plain
    first = streamed["streaming"]["first_token"]
    assert first["count"] == streamed["requests"]["sent"] == streamed["counts"]["succeeded"]
    # The model's latency comes before the first chunk.
    assert 0.05 <= first["p50_s"] <= first["p95_s"] <= first["max_s"]
    assert first["mean_s"] >= 0.05
    saved = json.loads((tmp_path / "streamed" / "_runs" / f"{streamed['run_id']}.json").read_text())
    assert saved["streaming"] == {"idle_timeout_s": 2.0, "first_token": first}


def test_generate_streamed_text_is_the_emulators_answer(emulator, tmp_path):
    texts = {i: f"a long sentence number {i} " * (i + 1) for i in range(5)}
    src = write_texts(tmp_path / "in.parquet", texts)
    doc = run(emulator, GenerateJob(model=MODEL, prompt="{text}"), src, tmp_path / "out")
    assert doc["status"] == "completed"
    got = rows_of(tmp_path / "out")
    assert [(r["id"], r["text"], r["finish_reason"]) for r in got] == [
        (i, fake_chat_text(MODEL, texts[i]), "stop") for i in texts
    ]


SAYS = {
    "disconnect": "bad reply: the stream broke off after",
    "early_end": "bad reply: the stream ended early (choice 0 has no finish reason) after",
    "stall": "bad reply: the stream stalled: no chunk for 0.3s (--idle-timeout) after",
    "malformed": "bad reply: the stream carried a malformed chunk after",
}


def test_each_stream_fault_is_a_failed_attempt_never_a_result(emulator, tmp_path):
    texts = {1: "a clean row", 2: "another clean row"}
    texts |= {10 + i: f"row with [[emulator:stream-{kind}]] in it" for i, kind in enumerate(STREAM_FAULTS)}
    src = write_texts(tmp_path / "in.parquet", texts)
    # A stall that would outlast the whole-request timeout: only the gap between chunks catches it early.
    emulator.configure(hang_seconds=60)
    retry = RetryPolicy(max_attempts=2, base_delay_s=0.01, max_delay_s=0.05)
    job = GenerateJob(model=MODEL, prompt="{text}")
    doc = run(emulator, job, src, tmp_path / "out", retry=retry, timeout_s=60, idle_timeout_s=0.3)

    assert doc["status"] == "completed with errors"
    assert_balanced(doc)
    assert doc["duration_s"] < 30, "the stall was not detected by --idle-timeout"
    assert [(r["id"], r["text"]) for r in rows_of(tmp_path / "out")] == [
        (1, fake_chat_text(MODEL, texts[1])),
        (2, fake_chat_text(MODEL, texts[2])),
    ]
    errors = {r["id"]: r for r in read_errors(tmp_path / "out").to_dicts()}
    assert sorted(errors) == [10, 11, 12, 13]
    for i, kind in enumerate(STREAM_FAULTS):
        error = errors[10 + i]
        assert error["error_message"].startswith(SAYS[kind]), (kind, error["error_message"])
        assert (error["error_type"], error["attempts"], error["retry"]) == ("transient", 2, "auto")
    assert emulator.stats["faults"] == {f"stream:{kind}": 2 for kind in STREAM_FAULTS}
    assert doc["requests"]["transient_errors"] == 8 and doc["requests"]["retries"] == 4
    assert doc["streaming"]["first_token"]["count"] == 2  # only complete answers are timed


def test_streams_that_break_often_are_retried_until_every_row_is_right(emulator, tmp_path):
    texts = {i: f"retry me, row {i}" for i in range(60)}
    src = write_texts(tmp_path / "in.parquet", texts)
    emulator.configure(seed=7, hang_seconds=60, **{f"stream_fault_rate_{kind}": 0.1 for kind in STREAM_FAULTS})
    doc = run(emulator, GenerateJob(model=MODEL, prompt="{text}"), src, tmp_path / "out", idle_timeout_s=0.3)

    assert doc["status"] == "completed" and doc["counts"]["succeeded"] == 60, doc["message"]
    faults = emulator.stats["faults"]
    assert all(faults.get(f"stream:{kind}", 0) > 0 for kind in STREAM_FAULTS), faults
    assert doc["requests"]["retries"] == doc["requests"]["transient_errors"] == sum(faults.values())
    assert [(r["id"], r["text"]) for r in rows_of(tmp_path / "out")] == [
        (i, fake_chat_text(MODEL, texts[i])) for i in texts
    ]


def test_stream_is_refused_for_jobs_whose_replies_are_not_chat(emulator, tmp_path):
    src = write_texts(tmp_path / "in.parquet", {1: "x"})
    for job in (
        EmbedJob(model="gemini-embedding-001"),
        TranscribeJob(model="whisper-1", api="transcriptions", base_dir=str(tmp_path)),
    ):
        with pytest.raises(ConfigError, match="--stream is for the chat jobs"):
            run(emulator, job, src, tmp_path / "out")
    assert emulator.stats["requests"] == 0


def test_the_emulator_streams_usage_last_and_marks_faults_on_the_wire(emulator):
    client = OpenAI(base_url=emulator.base_url, api_key=emulator.config.api_key, max_retries=0)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "one two three four five six seven eight nine"}],
        stream=True,
        stream_options={"include_usage": True},
        n=2,
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens > 0
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop", "stop"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == 1)
    assert text == fake_chat_text(MODEL, "one two three four five six seven eight nine") + " [choice 1]"
    # An early end: the SDK raises nothing and there is no finish reason (what tasks/jobs/chat.py checks).
    early = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x [[emulator:stream-early_end]]"}], stream=True
        )
    )
    assert early and all(c.choices[0].finish_reason is None for c in early if c.choices)


def test_first_token_figures_stay_bounded_and_exact_while_small():
    from tasks.engine.send.timings import Timings

    small = Timings()
    for s in (0.3, 0.1, 0.2, 0.4, 1.0):
        small.add(s)
    assert small.describe() == {"count": 5, "mean_s": 0.4, "p50_s": 0.3, "p95_s": 1.0, "max_s": 1.0}
    big = Timings(max_samples=1000)
    for i in range(100_000):
        big.add(i / 100_000)
    figures = big.describe()
    assert figures["count"] == 100_000 and figures["max_s"] == round(0.99999, 4)
    assert len(big._samples) == 1000  # bounded memory
    assert abs(figures["p50_s"] - 0.5) < 0.05 and abs(figures["p95_s"] - 0.95) < 0.02
    assert Timings().describe() == {"count": 0, "mean_s": None, "p50_s": None, "p95_s": None, "max_s": None}
