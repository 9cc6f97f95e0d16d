"""Fault tolerance of every job: a run over a few thousand rows against an emulator that fails often.

The requirement: "With 5% 500/503, 1% hangs past the request timeout, 1% truncated bodies and 1% dropped
connections on a few thousand rows: the run completes; every input row is either in the output or in
`_errors/` (the counts balance); no id appears twice in the output; with the default retries nearly
every row succeeds; a second run with `--retry-errors` finishes the rest."

The retry logic is the engine's own; only its delays shrink (``RetryPolicy(base_delay_s=0.01,
max_delay_s=0.05)``) and the request timeout is short (1 s), so hangs cost one second each instead of
two minutes. Run with ``-s`` to see one line of figures per job.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from conftest import TEST_KEY_ENV, assert_balanced, read_errors, read_output
from PIL import Image
from test_caption import expected_caption
from test_embed import expected_vector
from test_extract import expected as expected_invoice
from test_extract import invoice_row
from test_transcribe import expected as expected_transcript

from emulator.fake_json import fake_json_for_schema
from emulator.fakes import fake_chat_text, fake_png
from schemas.examples import Contract, Invoice, Receipt
from tasks.engine.run import RunOptions, run_job
from tasks.engine.send.context import RetryPolicy
from tasks.engine.send.limits import Limits
from tasks.jobs.caption import CaptionJob
from tasks.jobs.embed import EmbedJob
from tasks.jobs.extract import ExtractJob
from tasks.jobs.generate import GenerateJob
from tasks.jobs.images import IMAGES_DIR, ImagesJob
from tasks.jobs.media import base_dir_of
from tasks.jobs.tools import ToolsExtractJob
from tasks.jobs.transcribe import TranscribeJob
from tasks.provider.client import ProviderSettings

# 5% 5xx (half 500, half 503), 1% hangs, 1% truncated bodies, 1% dropped connections: 8% of all
# POSTs fail (the model check is a GET and is never faulted).
FAULTS = {
    "fault_rate_500": 0.025,
    "fault_rate_503": 0.025,
    "fault_rate_hang": 0.01,
    "fault_rate_truncate": 0.01,
    "fault_rate_drop": 0.01,
}
FAULT_KINDS = ("500", "503", "hang", "truncate", "drop")
SEED = 1234
HANG_S = 3600.0  # far past the request timeout: a hang only ends when the client gives up
TIMEOUT_S = 1.0
FAST_RETRY = RetryPolicy(base_delay_s=0.01, max_delay_s=0.05)  # default max_attempts (8)
LIMITS = Limits(max_concurrency=32)  # enough that 1-second hangs don't serialise the run
CHUNK_SIZE = 500
MAX_FAILED_FRACTION = 0.01


@dataclass
class Case:
    """One job over ``rows`` rows: how to build the input, the job, and how to check an output row."""

    name: str
    rows: int
    route: str
    per_request: int
    make_input: Callable[[Path, int], tuple[Path, dict[int, Any]]]
    make_job: Callable[[Path, Path], Any]
    check_rows: Callable[[Any, Path, pl.DataFrame, dict[int, Any]], None]
    # Replies as streams (--stream), with these stream faults on top of the transport faults.
    stream_faults: dict[str, float] = field(default_factory=dict)

    @property
    def stream(self) -> bool:
        return bool(self.stream_faults)

    @property
    def fault_kinds(self) -> tuple[str, ...]:
        return FAULT_KINDS + tuple(f"stream:{k}" for k in self.stream_faults)


# -- embed ---------------------------------------------------------------------------------------
EMBED_MODEL = "gemini-embedding-001"


def embed_input(folder: Path, n: int) -> tuple[Path, dict[int, str]]:
    texts = {i: f"row {i}: a sentence about tide pools, basalt and the number {i * 7919 % 10007}" for i in range(n)}
    path = folder / "texts.parquet"
    pq.write_table(pa.table({"id": pa.array(list(texts), pa.int64()), "text": list(texts.values())}), path)
    return path, texts


def embed_check(_job, _out: Path, out: pl.DataFrame, texts: dict[int, str]) -> None:
    got = out["embedding"].to_numpy()  # pl.Array(Float32, 3072): one row per output row
    want = np.stack([expected_vector(texts[i]) for i in out["id"].to_list()])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# -- extract -------------------------------------------------------------------------------------
def extract_input(folder: Path, n: int) -> tuple[Path, dict[int, str]]:
    texts = {
        i: f"INVOICE #F-{i:05d} from Vendor {i % 97} Ltd to Customer {i % 89}; {i % 9 + 1} widgets at ${i % 50}.99"
        for i in range(n)
    }
    path = folder / "texts.parquet"
    pq.write_table(pa.table({"id": pa.array(list(texts), pa.int64()), "text": list(texts.values())}), path)
    return path, texts


def extract_check(job: ExtractJob, _out: Path, out: pl.DataFrame, texts: dict[int, str]) -> None:
    for row in out.to_arrow().to_pylist():
        want = invoice_row(expected_invoice(job, texts[row["id"]]))
        assert {k: row[k] for k in want} == want, f"id {row['id']}"


# -- caption: a few hundred tiny distinct PNGs (identical files would share one content hash) -----
def caption_input(folder: Path, n: int) -> tuple[Path, dict[int, Path]]:
    (folder / "pics").mkdir()
    files = {}
    for i in range(n):
        path = folder / "pics" / f"{i}.png"
        Image.new("RGB", (8, 6), (i % 256, i // 256 % 256, 77)).save(path)
        files[i] = path
    table = pa.table({"id": pa.array(list(files), pa.int64()), "image": [f"pics/{i}.png" for i in files]})
    pcsv.write_csv(table, folder / "list.csv")
    return folder / "list.csv", files


def caption_check(_job, _out: Path, out: pl.DataFrame, files: dict[int, Path]) -> None:
    for row in out.iter_rows(named=True):
        assert row["caption"] == expected_caption(files[row["id"]]), f"id {row['id']}"
        assert (row["image_width"], row["image_height"]) == (8, 6)


# -- transcribe: a few hundred tiny distinct WAVs -------------------------------------------------
WAV_RATE, WAV_FRAMES = 8000, 400  # 0.05 s


def transcribe_input(folder: Path, n: int) -> tuple[Path, dict[int, Path]]:
    (folder / "clips").mkdir()
    files = {}
    for i in range(n):
        path = folder / "clips" / f"{i}.wav"
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(WAV_RATE)
            pitch = 1 + i / 50
            w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(k * pitch / 8))) for k in range(WAV_FRAMES)))
        files[i] = path
    table = pa.table({"id": pa.array(list(files), pa.int64()), "audio": [f"clips/{i}.wav" for i in files]})
    pcsv.write_csv(table, folder / "list.csv")
    return folder / "list.csv", files


def transcribe_check(_job, _out: Path, out: pl.DataFrame, files: dict[int, Path]) -> None:
    for row in out.iter_rows(named=True):
        assert row["transcript"] == expected_transcript(files[row["id"]]), f"id {row['id']}"
        assert row["duration_s"] == pytest.approx(WAV_FRAMES / WAV_RATE)


# -- images --------------------------------------------------------------------------------------
IMAGE_W, IMAGE_H = 16, 16


def images_input(folder: Path, n: int) -> tuple[Path, dict[int, str]]:
    prompts = {i: f"a lighthouse at dusk, variant {i}" for i in range(n)}
    path = folder / "prompts.parquet"
    pq.write_table(pa.table({"id": pa.array(list(prompts), pa.int64()), "prompt": list(prompts.values())}), path)
    return path, prompts


def images_check(_job, out_dir: Path, out: pl.DataFrame, prompts: dict[int, str]) -> None:
    # One PNG per output row, and no temporary file left by a request that broke off.
    files = sorted(p.name for p in (out_dir / IMAGES_DIR).iterdir())
    assert files == sorted(p.rsplit("/", 1)[1] for p in out["image_path"].to_list())
    for row in out.iter_rows(named=True):
        prompt = prompts[row["id"]]
        want = fake_png(prompt, IMAGE_W, IMAGE_H)
        assert row["image_path"] == f"{IMAGES_DIR}/{row['content_hash']}.png"
        assert (out_dir / row["image_path"]).read_bytes() == want, f"id {row['id']}"
        assert row["image_bytes"] == len(want) and row["image_index"] == 0
        assert row["revised_prompt"] == f"[emulator] {prompt}"


# -- generate (plain and streamed) ---------------------------------------------------------------
GENERATE_TEMPLATE = "Rewrite for a child: {text}"


def generate_input(folder: Path, n: int) -> tuple[Path, dict[int, str]]:
    texts = {i: f"row {i}: the tide comes in twice a day near pier {i * 7919 % 10007}" for i in range(n)}
    path = folder / "texts.parquet"
    pq.write_table(pa.table({"id": pa.array(list(texts), pa.int64()), "text": list(texts.values())}), path)
    return path, texts


def generate_check(job: GenerateJob, _out: Path, out: pl.DataFrame, texts: dict[int, str]) -> None:
    for row in out.iter_rows(named=True):
        user = job.prompt.format(text=texts[row["id"]])
        assert (row["text"], row["finish_reason"], row["truncated"]) == (
            fake_chat_text(job.model, user),
            "stop",
            False,
        ), f"id {row['id']}"


# -- extract --via tools, three schemas (triage) -------------------------------------------------
TRIAGE_KINDS = ("invoice", "receipt", "contract")


def triage_input(folder: Path, n: int) -> tuple[Path, dict[int, str]]:
    # The emulator calls the function whose name is in the text: each row's kind is known.
    texts = {i: f"{TRIAGE_KINDS[i % 3].upper()} no. {i}: Harbour Supplies, item {i * 7919 % 10007}" for i in range(n)}
    path = folder / "texts.parquet"
    pq.write_table(pa.table({"id": pa.array(list(texts), pa.int64()), "text": list(texts.values())}), path)
    return path, texts


def triage_check(job: ToolsExtractJob, _out: Path, out: pl.DataFrame, texts: dict[int, str]) -> None:
    for row in out.to_arrow().to_pylist():
        kind = TRIAGE_KINDS[row["id"] % 3]
        branch = job.branches[kind]
        args = fake_json_for_schema(json.loads(json.dumps(branch.json_schema)), seed=texts[row["id"]])
        assert row["kind"] == kind and row[kind] == branch.mapping.row(branch.schema.model_validate(args)), row["id"]
        assert all(row[other] is None for other in TRIAGE_KINDS if other != kind)


# Each stream fault on 1% of streamed replies: closed mid-body, ended without a finish reason, stalled
# past --idle-timeout, a chunk that is not JSON.
STREAM_FAULTS = {
    "stream_fault_rate_disconnect": 0.01,
    "stream_fault_rate_early_end": 0.01,
    "stream_fault_rate_stall": 0.01,
    "stream_fault_rate_malformed": 0.01,
}
IDLE_TIMEOUT_S = 1.0  # as TIMEOUT_S: a loaded machine can leave 0.5 s between two chunks of a sound stream

CASES = [
    Case(
        "embed",
        3000,
        "embeddings",
        10,
        embed_input,
        lambda _inp, _out: EmbedJob(model=EMBED_MODEL, batch_size=10),
        embed_check,
    ),
    Case(
        "extract",
        3000,
        "chat/completions",
        1,
        extract_input,
        lambda _inp, _out: ExtractJob(model="gemini-3.8-flash", schema=Invoice),
        extract_check,
    ),
    Case(
        "caption",
        1000,
        "chat/completions",
        1,
        caption_input,
        lambda inp, _out: CaptionJob(model="gemini-3.8-flash", base_dir=base_dir_of(str(inp))),
        caption_check,
    ),
    Case(
        "transcribe",
        1000,
        "chat/completions",
        1,
        transcribe_input,
        lambda inp, _out: TranscribeJob(model="gemini-3.8-flash", base_dir=base_dir_of(str(inp))),
        transcribe_check,
    ),
    Case(
        "images",
        3000,
        "images/generations",
        1,
        images_input,
        lambda _inp, out: ImagesJob(model="gemini-nano-banana-2.1", output=str(out), size=f"{IMAGE_W}x{IMAGE_H}"),
        images_check,
    ),
    Case(
        "generate",
        1000,
        "chat/completions",
        1,
        generate_input,
        lambda _inp, _out: GenerateJob(model="gemini-3.8-flash", prompt=GENERATE_TEMPLATE),
        generate_check,
    ),
    Case(
        "triage",
        1000,
        "chat/completions",
        1,
        triage_input,
        lambda _inp, _out: ToolsExtractJob(model="gemini-3.8-flash", schemas=(Invoice, Receipt, Contract)),
        triage_check,
    ),
    Case(
        "gen-stream",
        1000,
        "chat/completions",
        1,
        generate_input,
        lambda _inp, _out: GenerateJob(model="gemini-3.8-flash", prompt=GENERATE_TEMPLATE),
        generate_check,
        stream_faults={k.removeprefix("stream_fault_rate_"): v for k, v in STREAM_FAULTS.items()},
    ),
]


def stream_faults(case: Case) -> dict[str, float]:
    return {f"stream_fault_rate_{kind}": rate for kind, rate in case.stream_faults.items()}


def run(emulator, job, source: Path, out_dir: Path, stream: bool = False, **kw) -> dict:
    options = RunOptions(
        input=str(source),
        output=str(out_dir),
        provider=ProviderSettings(
            provider="local",
            base_url=emulator.base_url,
            api_key_env=TEST_KEY_ENV,
            timeout_s=TIMEOUT_S,
            stream=stream,
            idle_timeout_s=IDLE_TIMEOUT_S,
        ),
        limits=LIMITS,
        chunk_size=CHUNK_SIZE,
        **{"retry": FAST_RETRY, **kw},
    )
    return asyncio.run(run_job(job, options))


def ids_of(frame: pl.DataFrame) -> list[int]:
    return frame["id"].to_list() if frame.height else []


_header_printed = False


def report(case: Case, doc: dict, faults: dict, retry_doc: dict, final_ok: int, final_err: int, wall_s: float) -> None:
    """One line of figures per job (shown with ``pytest -s``)."""
    global _header_printed
    if not _header_printed:
        print(
            "\n\n                              faults injected (by kind)    first run         --retry-errors run"
            "\njob         rows requests retries  500  503 hang trunc drop    ok error    s  sent"
            "   final ok error  test s"
        )
        _header_printed = True
    c, r = doc["counts"], doc["requests"]
    kinds = " ".join(f"{faults.get(k, 0):>{w}}" for k, w in zip(FAULT_KINDS, (4, 4, 4, 5, 4), strict=True))
    print(
        f"{case.name:<10} {case.rows:>5} {r['sent']:>8} {r['retries']:>7} {kinds}"
        f" {c['succeeded']:>5} {c['failed']:>5} {doc['duration_s']:>4.1f}"
        f" {retry_doc['requests']['sent']:>5} {final_ok:>10} {final_err:>5} {wall_s:>7.1f}"
        + "".join(f"  {k}: {v}" for k, v in sorted(faults.items()) if k.startswith("stream:")),
        flush=True,
    )


# The three longest cases (3,000 images, 1,000 recordings, 3,000 extractions: 11-15 s each) run in the slow tier.
LONG_CASES = {"extract", "transcribe", "images"}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.name in LONG_CASES else []) for c in CASES],
)
def test_a_faulty_server_loses_no_row_and_a_retry_errors_run_finishes_the_rest(emulator, tmp_path, case: Case):
    began = time.monotonic()
    source, expected_by_id = case.make_input(tmp_path, case.rows)
    out_dir = tmp_path / "out"
    job = case.make_job(source, out_dir)
    all_ids = set(range(case.rows))
    emulator.configure(**FAULTS, **stream_faults(case), seed=SEED, hang_seconds=HANG_S)

    doc = run(emulator, job, source, out_dir, stream=case.stream)
    faults = emulator.stats["faults"]
    by_route = emulator.stats["by_route"]

    # The run completes and every row is accounted for (a row still failing after 8 attempts makes it
    # "completed with errors").
    c = doc["counts"]
    assert doc["status"] == ("completed with errors" if c["failed"] else "completed"), doc["message"]
    assert_balanced(doc)
    assert c["input_rows"] == case.rows
    assert c["skipped_done"] == c["deduplicated"] == c["not_attempted"] == 0, c
    assert c["succeeded"] + c["failed"] == case.rows, c

    # Every input id is in the output or in _errors: never both, never twice, nothing else.
    out, errors = read_output(out_dir), read_errors(out_dir)
    out_ids, error_ids = ids_of(out), ids_of(errors)
    assert len(out_ids) == len(set(out_ids)) == c["succeeded"], "an id appears twice in the output"
    assert len(error_ids) == len(set(error_ids)) == c["failed"], "an id appears twice in _errors"
    assert not set(out_ids) & set(error_ids), "an id is both in the output and in _errors"
    assert set(out_ids) | set(error_ids) == all_ids
    if errors.height:
        # Only retries running out may fail a row here: transient faults, 8 attempts each.
        assert set(errors["error_type"]) == {"transient"}, errors["error_message"].to_list()[:3]
        assert set(errors["attempts"]) == {FAST_RETRY.max_attempts}
        assert set(errors["retry"]) == {"auto"}, "transient failures only: the next plain run resends them"
    assert doc["outage"]["outages"] == 0, "8% of requests failing is not an outage"

    # Each stored value is the emulator's deterministic answer for that row.
    case.check_rows(job, out_dir, out, expected_by_id)

    # Nearly every row succeeds with the default retries: a row fails only after 8 faults in a row
    # (about 0.08**8 ≈ 2e-9 per request at these rates). Observed: 0 failed rows for every job
    # with seed 1234 (see the printed matrix).
    assert c["failed"] <= MAX_FAILED_FRACTION * case.rows, c

    # Every fault kind happened, the engine saw each one as a transient failure, and every request
    # the engine counts reached the server.
    assert all(faults.get(kind, 0) > 0 for kind in case.fault_kinds), faults
    assert set(faults) <= set(case.fault_kinds), faults
    requests = doc["requests"]
    assert requests["sent"] == by_route[case.route], (requests, by_route)
    assert requests["transient_errors"] == sum(faults.values()), (requests, faults)
    first_requests = math.ceil(case.rows / case.per_request)
    assert requests["sent"] == first_requests + requests["retries"], requests
    assert requests["rate_limited_429"] == 0

    # A second run with --retry-errors and a healthy server finishes the rest.
    emulator.configure(**dict.fromkeys(FAULTS, 0.0), **dict.fromkeys(stream_faults(case), 0.0))
    emulator.reset_stats()
    retry_doc = run(emulator, job, source, out_dir, stream=case.stream, retry_errors=True)
    assert retry_doc["status"] == "completed", retry_doc["message"]
    assert_balanced(retry_doc)
    rc = retry_doc["counts"]
    assert rc["skipped_done"] == c["succeeded"] and rc["succeeded"] == c["failed"], rc
    assert rc["failed"] == rc["not_attempted"] == rc["deduplicated"] == 0, rc
    assert emulator.stats["faults"] == {}
    final, final_errors = read_output(out_dir), read_errors(out_dir)
    final_ids = ids_of(final)
    assert len(final_ids) == len(set(final_ids)) and set(final_ids) == all_ids
    assert final_errors.height == 0, "a row that succeeded on retry leaves _errors"
    case.check_rows(job, out_dir, final, expected_by_id)

    report(case, doc, faults, retry_doc, len(final_ids), final_errors.height, time.monotonic() - began)


# With the default retries the run above leaves (almost surely) no error row, so its --retry-errors
# run has nothing to do. Here no retry is allowed (max_attempts=1): every fault becomes an error row
# in _errors/ marked retry "auto", and the next plain run, against the same faulty server
# and with the default attempts, must finish exactly those rows without --retry-errors.
NO_RETRY = RetryPolicy(max_attempts=1, base_delay_s=0.01, max_delay_s=0.05)
SMALL_ROWS = {
    "embed": 1000, "extract": 400, "caption": 300, "transcribe": 300, "images": 400, "generate": 300, "gen-stream": 400,
    "triage": 300,
}  # fmt: skip
# What the engine stores for each fault: 500, 503, a hang (read timeout), a truncated body or a
# dropped connection (both "connection failed: …" from the SDK, "the connection broke" from httpx).
FAULT_MESSAGES = (
    "HTTP 500", "HTTP 503", "the request timed out", "connection failed", "the connection broke",
    # --stream: a stream that broke off, ended early, stalled or carried a malformed chunk (tasks/jobs/chat.py).
    "bad reply: the stream",
)  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_rows_that_ran_out_of_retries_are_finished_by_the_next_plain_run(emulator, tmp_path, case: Case):
    rows = SMALL_ROWS[case.name]
    source, expected_by_id = case.make_input(tmp_path, rows)
    out_dir = tmp_path / "out"
    job = case.make_job(source, out_dir)
    all_ids = set(range(rows))
    emulator.configure(**FAULTS, **stream_faults(case), seed=SEED, hang_seconds=HANG_S)

    doc = run(emulator, job, source, out_dir, stream=case.stream, retry=NO_RETRY)
    assert doc["status"] == "completed with errors", doc["message"]
    assert_balanced(doc)
    c = doc["counts"]
    faults = sum(emulator.stats["faults"].values())
    assert doc["requests"]["retries"] == 0 and doc["requests"]["sent"] == math.ceil(rows / case.per_request)
    out, errors = read_output(out_dir), read_errors(out_dir)
    out_ids, error_ids = ids_of(out), ids_of(errors)
    assert c["failed"] > 0, "no fault at all: the test proves nothing"
    assert len(error_ids) == len(set(error_ids)) == c["failed"]
    assert len(out_ids) == len(set(out_ids)) == c["succeeded"]
    assert set(out_ids).isdisjoint(error_ids) and set(out_ids) | set(error_ids) == all_ids
    # One failed request fails every row it carried (10 for embed, 1 for the others).
    assert c["failed"] == faults * case.per_request, (c, faults)
    assert set(errors["error_type"]) == {"transient"} and set(errors["attempts"]) == {1}
    assert set(errors["retry"]) == {"auto"}
    assert doc["failed_rows"] == {"retry_auto": c["failed"], "retry_on_request": 0}
    assert doc["outage"]["outages"] == 0
    for message in errors["error_message"]:
        assert message.startswith(FAULT_MESSAGES), message
    # 500, 503, a hang (timed out) and a truncated or dropped connection each left an error row.
    seen = {prefix for prefix in FAULT_MESSAGES for m in errors["error_message"] if m.startswith(prefix)}
    assert seen >= {"HTTP 500", "HTTP 503", "the request timed out", "connection failed"}, seen
    if case.stream:
        # Each stream fault left an error row saying what happened to the stream, never a result.
        said = {
            "disconnect": "bad reply: the stream broke off after",
            "early_end": "bad reply: the stream ended early (choice 0 has no finish reason) after",
            "stall": f"bad reply: the stream stalled: no chunk for {IDLE_TIMEOUT_S:g}s (--idle-timeout) after",
            "malformed": "bad reply: the stream carried a malformed chunk after",
        }
        for kind, start in said.items():
            assert any(m.startswith(start) for m in errors["error_message"]), (kind, errors["error_message"].to_list())
    case.check_rows(job, out_dir, out, expected_by_id)

    # The next plain run (no --retry-errors) sends them again, with the default attempts, against
    # the same faulty server.
    emulator.reset_stats()
    retry_doc = run(emulator, job, source, out_dir, stream=case.stream)
    assert retry_doc["status"] == "completed", retry_doc["message"]
    assert_balanced(retry_doc)
    rc = retry_doc["counts"]
    assert rc["skipped_done"] == c["succeeded"] and rc["succeeded"] == c["failed"] and rc["failed"] == 0, rc
    assert retry_doc["requests"]["items_sent"] >= c["failed"]
    final, final_errors = read_output(out_dir), read_errors(out_dir)
    final_ids = ids_of(final)
    assert len(final_ids) == len(set(final_ids)) and set(final_ids) == all_ids
    assert final_errors.height == 0, "rows that succeeded on retry must leave _errors"
    case.check_rows(job, out_dir, final, expected_by_id)
    print(
        f"\nno retries: {case.name:<10} {rows:>5} rows, {doc['requests']['sent']:>4} requests, {faults:>2} faults"
        f" -> {c['failed']:>3} error rows; plain rerun (faults on, default attempts):"
        f" {retry_doc['requests']['sent']} requests, {retry_doc['requests']['retries']} retries"
        f" (faults {emulator.stats['faults']}), {rc['succeeded']} ok, {rc['failed']} errors",
        flush=True,
    )
