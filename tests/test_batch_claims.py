"""Two `--mode batch` runs on one output never submit a row twice (plan/claims.py, in batch mode).

Real `gembatch embed --mode batch` processes against the emulator's batch API on loopback, whose files
and batches requests are slowed down so that the runs' submissions overlap. What the runs submitted is
read back from the emulator's own copies of the uploaded request files of every batch it created; the
table is read back from Parquet and checked value by value.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import assert_balanced, hurry_batches, write_corpus
from test_claims import (
    BATCH,
    assert_no_claims_left,
    assert_table,
    embed_cmd,
    finish,
    run_docs,
    start,
    texts_for,
)

ROWS = 2000
# 4 lines a chunk (CHUNK / BATCH), 6 lines a request file: a chunk's lines often span two files.
BATCH_ARGS = ("--mode", "batch", "--batch-poll", "0.2", "--batch-max-requests", "6")
SLOW_BATCH_API = {"batch_request_seconds": 0.15, "batch_seconds": 1.0}


def submitted_inputs(emulator) -> Counter:
    """Every embedding input in the request files of the batches the emulator created (what is paid)."""
    seen: Counter = Counter()
    for batch in emulator.batches.batches.values():
        with emulator.batches.files.files[batch.input_file_id].path.open("rb") as f:
            for raw in f:
                if raw.strip():
                    seen.update(json.loads(raw)["body"]["input"])
    return seen


def assert_submitted_once(emulator, texts: dict[int, str]) -> None:
    seen = submitted_inputs(emulator)
    twice = {text: n for text, n in seen.items() if n > 1}
    assert not twice, f"{len(twice)} rows were submitted more than once"
    assert set(seen) == set(texts.values()), "every row was submitted"
    lines = sum(b.total for b in emulator.batches.batches.values())
    assert lines == ROWS // BATCH and all(b.status == "completed" for b in emulator.batches.batches.values())


def assert_accounts(doc: dict) -> None:
    assert doc["status"] == "completed", doc["message"]
    assert_balanced(doc)
    c = doc["counts"]
    assert c["not_attempted"] == 0 and c["failed"] == 0 and c["input_rows"] == ROWS, c


def records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "_batches").glob("[!.]*.json"))]


def test_two_batch_runs_started_together_submit_every_row_once(emulator, tmp_path):
    emulator.configure(**SLOW_BATCH_API)
    texts = texts_for(ROWS)
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    out = tmp_path / "out"

    results = finish([start(embed_cmd(src, out, emulator.base_url, *BATCH_ARGS), tmp_path) for _ in range(2)])

    assert_submitted_once(emulator, texts)
    assert_table(out, texts)
    docs = run_docs(out)
    assert len(docs) == 2
    for doc in docs:
        assert_accounts(doc)
        assert doc["claims"]["other_runs"], "each run saw the other at work"
    # Each row written once, by one of the runs; the other counted it as done.
    assert sum(d["counts"]["succeeded"] for d in docs) == ROWS
    assert sum(d["batches"]["requests_submitted"] for d in docs) == ROWS // BATCH
    assert sum(d["batches"]["batches_created"] for d in docs) == len(emulator.batches.created)
    written = [name for d in docs for name in d["batches"]["batches_written"]]
    assert sorted(written) == sorted(r["name"] for r in records(out)), "each batch written by one run"
    assert all(r["state"] == "written" for r in records(out))
    # The runs overlapped: one left chunks to the other and said so, naming it.
    declined = [d for d in docs if d["claims"]["declined_chunks"]]
    assert declined, [d["claims"] for d in docs]
    said = [text for _code, text in results if "is being submitted by run" in text]
    assert len(said) == len(declined)
    for text in said:
        assert "on host" in text and "checks them again at the end" in text, text
    assert_no_claims_left(out)
    print("; ".join(f"{d['counts']}, {d['batches']['batches_created']} created, {d['claims']}" for d in docs))


# Slow tier: B must start (a new process) while A still submits its 7 batches (a few seconds): with two
# other test workers on 2 cores, A has been seen to submit every chunk before B arrived.
@pytest.mark.slow
def test_a_batch_run_killed_mid_submission_leaves_its_chunks_and_batches_to_the_other(emulator, tmp_path):
    """A is killed (SIGKILL) while it submits, holding chunk claims and batches it has not written, and
    while B, at work beside it, has left A's chunks and batches to A. B takes A's claims over (A's pid
    is gone), re-attaches to A's batches, and submits what A had not."""
    # A's batches run 5 min: B (a new process, seconds to a minute to start on a loaded machine) starts
    # while they do; once A is killed they are hurried along.
    emulator.configure(batch_request_seconds=0.3, batch_seconds=300.0)
    texts = texts_for(ROWS)
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    out = tmp_path / "out"
    a = start(embed_cmd(src, out, emulator.base_url, *BATCH_ARGS), tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not (out / "_batches").exists() or not records(out):
            assert a.poll() is None and time.monotonic() < deadline, a.communicate()
            time.sleep(0.02)
        killed = records(out)[0]["run_id"]
        b = start(embed_cmd(src, out, emulator.base_url, *BATCH_ARGS), tmp_path)
        # B is submitting too (a record of its own), and A has batches running.
        while not (
            any(r["run_id"] != killed for r in records(out))
            and any(r["run_id"] == killed and r["state"] == "submitted" for r in records(out))
        ):
            assert a.poll() is None and time.monotonic() < deadline, a.communicate()
            time.sleep(0.02)
        held = [p.name for p in (out / "_claims").glob("chunk-*.json")]
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    assert held, "chunk claims were held when A was killed"
    a_batches = [r for r in records(out) if r["run_id"] == killed and r.get("batch_id")]
    assert a_batches and all(r["state"] == "submitted" for r in a_batches), "A's batches were still running"
    # A is gone, its batches unwritten: they (and B's) need not run on.
    hurry_batches(emulator, SLOW_BATCH_API["batch_seconds"])

    ((_code, text),) = finish([b])

    assert_submitted_once(emulator, texts)
    assert_table(out, texts)
    doc = next(d for d in run_docs(out) if d["run_id"] != killed)
    assert_accounts(doc)
    written_by_a = sum(
        pq.read_metadata(p).num_rows
        for p in out.glob("part-*.parquet")
        if json.loads(pq.read_schema(p).metadata[b"gembatch"])["run_id"] == killed
    )
    assert written_by_a == 0, "A's batches were still running when it was killed"
    assert doc["counts"]["succeeded"] == ROWS, "B wrote every row: A's batches too"
    assert doc["claims"]["taken_over"] >= 1 and f"taking over a claim of run {killed}" in text, text
    assert doc["batches"]["batches_reattached"] >= len(a_batches)
    assert f"of run {killed}: that run is gone, this run polls and writes it" in text
    assert {r["name"] for r in a_batches} <= set(doc["batches"]["batches_written"])
    assert all(r["state"] == "written" and r["written_by_run"] == doc["run_id"] for r in records(out))
    assert_no_claims_left(out)
