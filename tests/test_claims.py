"""Two and three runs on one output at once never pay twice.

Real `gembatch embed` processes (untracked: no Prefect API) against the emulator on loopback, whose
latency makes them overlap; the emulator counts what it was sent (GET /_emulator/stats), the table is
read back from Parquet and checked value by value. The in-process tests at the end cover what needs a
claim left by another machine (stale after its TTL) and compaction left to the last run.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    REPO,
    TEST_KEY,
    TEST_KEY_ENV,
    assert_balanced,
    cli_env,
    embed_command,
    read_errors,
    read_output,
    write_corpus,
)
from test_embed import expected_vector

from emulator import Emulator, EmulatorConfig
from tasks.engine.plan.claim_files import CLAIMS_DIR
from tasks.engine.plan.claims import ClaimPolicy, chunk_key
from tasks.engine.run import RunOptions, run_job
from tasks.jobs.embed import EmbedJob
from tasks.provider.client import ProviderSettings

DIMS = 16
BATCH = 50
CHUNK = 200
LATENCY_S = 0.3
DECLINED = "is being sent by run"  # what a run prints when it leaves a chunk to another


def texts_for(n: int, start: int = 0) -> dict[int, str]:
    return {i: f"claims test row {i}: gulls over the breakwater, {i * 31 % 977} of them" for i in range(start, n)}


def embed_cmd(src: Path, out: Path, base_url: str, *extra: str) -> list[str]:
    return embed_command(src, out, base_url, "--dimensions", str(DIMS), *extra, batch_size=BATCH, chunk_size=CHUNK)


def start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=cli_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        results.append((proc.returncode, out + err))
    for code, text in results:
        assert code == 0, text
    return results


def run_docs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "_runs").glob("*.json"))]


def assert_table(out: Path, texts: dict[int, str]) -> pl.DataFrame:
    table = read_output(out)
    assert table.height == len(texts), f"{table.height} rows for {len(texts)} ids"
    assert table["id"].n_unique() == len(texts) and set(table["id"].to_list()) == set(texts)
    for row_id, vector in zip(table["id"].to_list(), table["embedding"].to_list(), strict=True):
        np.testing.assert_allclose(
            np.asarray(vector, np.float32), expected_vector(texts[row_id], DIMS), rtol=1e-6, atol=1e-7
        )
    return table


def assert_no_claims_left(out: Path) -> None:
    assert [p.name for p in (out / CLAIMS_DIR).iterdir()] == [], "every claim is released at the end"


@pytest.mark.parametrize("runs", [2, 3])
def test_runs_started_together_send_every_row_once(emulator, tmp_path, runs):
    emulator.configure(latency_seconds=LATENCY_S)
    texts = texts_for(2000)
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    out = tmp_path / "out"

    results = finish([start(embed_cmd(src, out, emulator.base_url), tmp_path) for _ in range(runs)])

    stats = emulator.stats
    assert stats["embedding_inputs"] == len(texts), "each row was sent once"
    assert stats["by_route"]["embeddings"] == len(texts) // BATCH
    assert_table(out, texts)
    docs = run_docs(out)
    assert len(docs) == runs and all(d["status"] == "completed" for d in docs)
    for doc in docs:
        assert_balanced(doc)
        assert doc["counts"]["skipped_done"] + doc["counts"]["succeeded"] == len(texts)
        assert len(doc["claims"]["other_runs"]) >= 1, "each run saw another at work"
    assert sum(d["counts"]["succeeded"] for d in docs) == len(texts)
    assert sum(d["requests"]["items_sent"] for d in docs) == len(texts)
    # Runs that overlapped left chunks to each other, and said so, naming the holder.
    declined = [d for d in docs if d["claims"]["declined_chunks"]]
    assert declined, [d["claims"] for d in docs]
    said = [text for _code, text in results if DECLINED in text]
    assert len(said) == len(declined), "every run that left chunks to another said so"
    for text in said:
        assert "on host" in text and "since" in text and "checks them again at the end" in text, text
    # Exactly the run that finished last compacted; the others left it to it.
    compactions = sorted(d["output"]["compaction"] for d in docs)
    assert compactions.count("done") >= 1, compactions
    assert all(c == "done" or c.startswith("left to") for c in compactions), compactions
    assert_no_claims_left(out)
    print(f"{runs} runs: " + "; ".join(f"{d['counts']['succeeded']} sent, {d['claims']}" for d in docs))


def test_plain_and_retry_errors_runs_together_resend_failed_rows_once(emulator, tmp_path):
    """Rows that failed for their own input (a 400) are resent only by --retry-errors runs, and by one
    of them only: a run that sees another record the row's failure while it runs leaves it."""
    old = texts_for(1000)
    bad = {i for i in old if i % 200 == 7}  # one row per chunk fails for itself, every time
    for i in bad:
        old[i] += " [[emulator:400]]"
    src = write_corpus(tmp_path / "in.parquet", list(old), list(old.values()))
    out = tmp_path / "out"
    emulator.configure(latency_seconds=0)
    first = run_embed(emulator, src, out, max_failed_pct=1.0)
    assert first["counts"]["failed"] == len(bad)
    emulator.configure(latency_seconds=LATENCY_S)
    assert sorted(read_errors(out)["id"].to_list()) == sorted(bad)

    texts = {**old, **texts_for(1600, start=1000)}  # then 600 new rows arrive
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    emulator.reset_stats()
    tolerate = ("--max-failed-pct", "1")  # the failed rows are expected: the runs end "completed"
    cmds = [
        embed_cmd(src, out, emulator.base_url, *tolerate),
        embed_cmd(src, out, emulator.base_url, "--retry-errors", *tolerate),
        embed_cmd(src, out, emulator.base_url, "--retry-errors", *tolerate),
    ]
    finish([start(cmd, tmp_path) for cmd in cmds])

    stats = emulator.stats
    docs = run_docs(out)[1:]  # the three runs (run ids sort by start time)
    # The new rows once, and each failed row once more (alone in its request: the rest of its chunk is
    # done), by one of the --retry-errors runs.
    assert stats["embedding_inputs"] == 600, stats  # inputs of successful requests
    assert stats["faults"].get("marker:400") == stats["by_status"][400] == len(bad), (stats, docs)
    good = {i: t for i, t in texts.items() if i not in bad}
    assert_table(out, good)
    errors = read_errors(out)
    assert set(errors["id"].to_list()) == bad and set(errors["error_type"].to_list()) == {"invalid_request"}
    assert len(docs) == 3 and all(d["status"] == "completed" for d in docs)
    assert sum(d["counts"]["succeeded"] for d in docs) == 600
    assert_no_claims_left(out)


@pytest.mark.slow
def test_a_run_killed_mid_way_is_restarted_while_another_runs(tmp_path):
    """Run B is killed (SIGKILL) holding claims; its restart and run A, still at work, share what B left:
    B's stale claims (its pid is gone) are taken over at once, and no row written before is sent again.

    A and the restarted B talk to one emulator, the killed B to another, so each side's requests are
    counted apart."""
    texts = texts_for(3000)
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    out = tmp_path / "out"
    with (
        Emulator(EmulatorConfig(api_key=TEST_KEY, latency_seconds=LATENCY_S)) as shared,
        Emulator(EmulatorConfig(api_key=TEST_KEY, latency_seconds=LATENCY_S)) as killed_side,
    ):
        b = start(embed_cmd(src, out, killed_side.base_url), tmp_path)
        deadline = time.monotonic() + 60
        while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline:
            assert b.poll() is None, b.communicate()
            time.sleep(0.05)
        a = start(embed_cmd(src, out, shared.base_url), tmp_path)
        time.sleep(0.5)
        held = list((out / CLAIMS_DIR).glob("chunk-*.json"))
        b.send_signal(signal.SIGKILL)
        b.wait()
        assert held, "B held claims when it was killed"
        killed_run = next(d for d in run_docs(out) if d["status"] == "running")["run_id"]
        restarted = start(embed_cmd(src, out, shared.base_url), tmp_path)
        (code_a, text_a), (code_r, text_r) = finish([a, restarted])

        written_by_b = sum(
            pq.read_metadata(p).num_rows
            for p in out.glob("part-*.parquet")
            if json.loads(pq.read_schema(p).metadata[b"gembatch"])["run_id"] == killed_run
        )
        sent_by_b = killed_side.stats["embedding_inputs"]
        assert 0 < written_by_b < len(texts)
        # What A and the restart sent: exactly the rows B had not written (B's lost in-flight rows included).
        assert shared.stats["embedding_inputs"] == len(texts) - written_by_b, (shared.stats, written_by_b)
        assert 0 <= sent_by_b - written_by_b <= 32 * CHUNK
    assert_table(out, texts)
    docs = {d["run_id"]: d for d in run_docs(out)}
    assert docs.pop(killed_run)["status"] == "running"  # it never finished
    assert all(d["status"] == "completed" for d in docs.values())
    taken = sum(d["claims"]["taken_over"] for d in docs.values())
    assert taken >= 1 and "taking over a claim of run " + killed_run in text_a + text_r
    assert "its process" in text_a + text_r
    assert_no_claims_left(out)


# -- in process: a claim from another machine, and compaction left to the last run -----------------
def run_embed(emu, src: Path, out: Path, **kw) -> dict:
    options = RunOptions(
        input=str(src),
        output=str(out),
        provider=ProviderSettings(provider="local", base_url=emu.base_url, api_key_env=TEST_KEY_ENV, timeout_s=5),
        chunk_size=CHUNK,
        **kw,
    )
    return asyncio.run(run_job(EmbedJob(model="gemini-embedding-001", dimensions=DIMS, batch_size=BATCH), options))


def foreign_claim(path: Path, *, run_id: str, renewed_ago_s: float) -> None:
    """A claim as a run on another machine writes it (another host: its pid can't be checked here)."""
    now = time.time()
    doc = {"run_id": run_id, "host": "other-machine", "pid": 4242, "since": now - 300, "renewed": now - renewed_ago_s}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Whole or not at all, as a run writes its claims (a heartbeat rewrites it while the run reads it).
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def first_chunk_key(texts: dict[int, str]) -> str:
    from tasks.engine.plan.rows import prepare_chunk

    job = EmbedJob(model="gemini-embedding-001", dimensions=DIMS, batch_size=BATCH)
    ids = list(texts)[:CHUNK]
    chunk = pa.table({"id": pa.array(ids, pa.int64()), "text": [texts[i] for i in ids]})
    return chunk_key(ids, prepare_chunk(job, chunk).hashes)


def test_a_claim_from_another_machine_is_waited_for_until_it_goes_stale(emulator, tmp_path, caplog):
    texts = texts_for(600)
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    out = tmp_path / "out"
    key = first_chunk_key(texts)
    # Chunk 0 is held by a run elsewhere that renews its claim until this run has written the other
    # chunks, then goes silent (its machine is lost): with a 2 s TTL its claim goes stale soon after.
    claim = out / CLAIMS_DIR / f"chunk-{key}.0.json"
    foreign_claim(claim, run_id="elsewhere-1", renewed_ago_s=0)
    silent = threading.Event()

    def heartbeat() -> None:
        while len(list(out.glob("part-*.parquet"))) < 2:
            foreign_claim(claim, run_id="elsewhere-1", renewed_ago_s=0)
            time.sleep(0.2)
        silent.set()

    beating = threading.Thread(target=heartbeat, daemon=True)
    beating.start()
    policy = ClaimPolicy(ttl_s=2.0, heartbeat_s=0.5, poll_s=0.2)
    with caplog.at_level("WARNING", logger="gembatch.claims"):
        doc = run_embed(emulator, src, out, claims=policy)
    beating.join(timeout=5)
    assert silent.is_set()
    assert doc["status"] == "completed" and doc["counts"]["succeeded"] == 600
    assert doc["claims"]["declined_chunks"] == 1 and doc["claims"]["taken_over"] == 1
    assert doc["claims"]["waited_s"] >= 1.0
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "chunk 0 (rows 0-199) is being sent by run elsewhere-1 on host other-machine (pid 4242)" in messages
    assert "waiting for 1 chunk(s) held by run elsewhere-1" in messages
    assert "taking over a claim of run elsewhere-1" in messages and "not renewed for" in messages
    assert emulator.stats["embedding_inputs"] == 600
    assert_table(out, texts)
    assert_no_claims_left(out)


def test_a_stale_claim_is_taken_over_at_once_and_compaction_waits_for_the_last_run(emulator, tmp_path):
    texts = texts_for(400)
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    out = tmp_path / "out"
    key = first_chunk_key(texts)
    foreign_claim(out / CLAIMS_DIR / f"chunk-{key}.0.json", run_id="dead-1", renewed_ago_s=600)
    # Another machine's run is live on the folder for the whole run (its lease renewed just now).
    lease = out / CLAIMS_DIR / "run-elsewhere-2.json"
    foreign_claim(lease, run_id="elsewhere-2", renewed_ago_s=0)
    doc = run_embed(emulator, src, out)
    assert doc["claims"]["taken_over"] == 1 and doc["claims"]["declined_chunks"] == 0
    assert doc["claims"]["other_runs"] == ["elsewhere-2"]
    assert doc["output"]["compaction"].startswith("left to the last run: run elsewhere-2 on host other-machine")

    # The rows change: a run alone on the folder supersedes the old records (compaction is its job now).
    lease.unlink()
    changed = {i: t + " (revised)" for i, t in texts.items()}
    src = write_corpus(tmp_path / "in.parquet", list(changed), list(changed.values()))
    doc = run_embed(emulator, src, out)
    assert doc["output"]["compaction"] == "done" and doc["output"]["superseded_rows_removed"] == 400
    assert_table(out, changed)
    assert_no_claims_left(out)


# -- the claim primitives, on local disk and on an fsspec store without rename (memory://) ----------
@pytest.fixture(params=["local", "memory"])
def folder(request, tmp_path):
    import uuid

    import fsspec

    if request.param == "local":
        return fsspec.filesystem("file"), str(tmp_path / "out")
    fs = fsspec.filesystem("memory")
    root = f"/claims-{uuid.uuid4().hex}"
    fs.makedirs(root, exist_ok=True)
    return fs, root


def test_one_holder_at_a_time_and_a_stale_claim_goes_to_one_taker(folder):
    from tasks.engine.plan.claims import ClaimBook

    fs, root = folder
    a, b, c = (ClaimBook(fs, root, run_id) for run_id in ("run-a", "run-b", "run-c"))
    for book in (a, b, c):
        book.start()
    try:
        assert a.acquire("k1") is None
        held = b.acquire("k1")
        assert held is not None and held.run_id == "run-a" and b.others_seen.keys() == {"run-a"}
        assert {h.run_id for h in b.other_runs()} == {"run-a", "run-c"}
        a.release("k1")
        assert b.holder_of("k1") is None and b.acquire("k1") is None
        assert c.acquire("k1").run_id == "run-b"

        # run-b dies without a word: its claim, not renewed for longer than the TTL, is stale.
        path = f"{root}/{CLAIMS_DIR}/chunk-k1.0.json"
        doc = json.loads(fs.cat_file(path))
        fs.pipe_file(path, json.dumps({**doc, "host": "other-machine", "renewed": time.time() - 120}).encode())
        assert a.acquire("k1") is None and a.taken_over == 1
        assert c.acquire("k1").run_id == "run-a", "one taker: the next generation is created exclusively"
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{CLAIMS_DIR}", detail=False))
        assert "chunk-k1.1.json" in names and "chunk-k1.0.json" not in names
    finally:
        for book in (a, b, c):
            book.stop()
    assert fs.ls(f"{root}/{CLAIMS_DIR}", detail=False) == [], "stop() releases claims and leases"


def test_a_claim_lapses_when_its_run_stops_ticking(folder):
    from tasks.engine.plan.claims import ClaimBook

    fs, root = folder
    policy = ClaimPolicy(ttl_s=0.6, heartbeat_s=0.1, poll_s=0.05)
    live, waiting = ClaimBook(fs, root, "run-live", policy), ClaimBook(fs, root, "run-waiting", policy)
    live.start()
    waiting.start()
    try:
        assert live.acquire("k") is None
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # renewed by the heartbeat while the run ticks
            live.tick()
            waiting.tick()
            assert waiting.holder_of("k") is not None
            time.sleep(0.05)
        # Its event loop stops answering: the heartbeat stops renewing, and after the TTL the claim is free.
        deadline = time.monotonic() + 5
        while waiting.holder_of("k") is not None and time.monotonic() < deadline:
            waiting.tick()
            time.sleep(0.05)
        assert waiting.holder_of("k") is None
        assert waiting.acquire("k") is None and waiting.taken_over == 1
    finally:
        live.stop()
        waiting.stop()


def test_an_unreadable_claim_counts_from_its_modification_time(tmp_path):
    import fsspec

    from tasks.engine.plan.claims import ClaimBook

    book = ClaimBook(fsspec.filesystem("file"), str(tmp_path), "run-x")
    book.start()
    try:
        cut = tmp_path / CLAIMS_DIR / "chunk-k.0.json"
        cut.write_bytes(b'{"run_id": "run-')  # a write cut short by a crash
        assert book.acquire("k").run_id == "(unreadable claim)", "recent: someone may be writing it"
        os.utime(cut, (time.time() - 120, time.time() - 120))
        assert book.acquire("k") is None and book.taken_over == 1
    finally:
        book.stop()


def test_two_runs_at_once_on_an_object_store_output_send_every_row_once(emulator, tmp_path):
    """The same on an fsspec store (memory://: no O_EXCL, no hard links; exclusive create is
    ``pipe_file(mode="create")``): two runs in one process, gathered on one event loop."""
    import uuid

    import fsspec

    emulator.configure(latency_seconds=0.1)
    texts = texts_for(1200)
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    out = f"memory://claims-{uuid.uuid4().hex}/out"
    job = EmbedJob(model="gemini-embedding-001", dimensions=DIMS, batch_size=BATCH)
    options = RunOptions(
        input=str(src),
        output=out,
        provider=ProviderSettings(provider="local", base_url=emulator.base_url, api_key_env=TEST_KEY_ENV, timeout_s=5),
        chunk_size=CHUNK,
    )

    async def both():
        return await asyncio.gather(run_job(job, options), run_job(job, options))

    docs = asyncio.run(both())
    assert [d["status"] for d in docs] == ["completed", "completed"]
    assert emulator.stats["embedding_inputs"] == len(texts)
    assert sum(d["counts"]["succeeded"] for d in docs) == len(texts)
    assert sum(d["claims"]["declined_chunks"] for d in docs) >= 1
    fs, root = fsspec.core.url_to_fs(out)
    parts = [p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("part-")]
    table = pl.from_arrow(pa.concat_tables(pq.read_table(p, filesystem=fs) for p in parts))
    assert table.height == len(texts) and table["id"].n_unique() == len(texts)
    for row_id, vector in zip(table["id"].to_list(), table["embedding"].to_list(), strict=True):
        np.testing.assert_allclose(np.asarray(vector, np.float32), expected_vector(texts[row_id], DIMS), rtol=1e-6)
    assert fs.ls(f"{root}/{CLAIMS_DIR}", detail=False) == []
