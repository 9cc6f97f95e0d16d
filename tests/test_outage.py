"""A provider outage is not the rows' fault: pause, probe, resume — and never leave rows behind.

Each test runs a real embed job over HTTP against the emulator and flips the emulator's fault switches
from another thread while the run is going: every POST answered 500 or 503 is "the provider is down".
Requests the server saw during the outage are counted at the emulator. Outages are kept short (a few
seconds, probed every 0.5-2 s instead of 2-60 s) so the suite stays fast; the default probe schedule is
checked on the breaker itself with a clock the test turns; benchmarks/bench_outage.py runs a 4-minute
outage.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import TEST_KEY, TEST_KEY_ENV, assert_balanced, read_errors, read_output, write_corpus
from test_embed import expected_vector

from tasks.engine.run import RunOptions, run_job
from tasks.engine.send.context import RetryPolicy
from tasks.engine.send.limits import Limits
from tasks.engine.send.outage import DEFAULT_MAX_OUTAGE_S, OutageBreaker, OutagePolicy
from tasks.jobs.embed import EmbedJob
from tasks.provider.client import ProviderSettings

MODEL = "gemini-embedding-001"
DOWN = {"fault_rate_500": 0.5, "fault_rate_503": 0.5}
UP = {"fault_rate_500": 0.0, "fault_rate_503": 0.0}
BATCH = 10
RPM = 600  # 10 requests a second: 1,000 rows of 10 per request take 10 s
# Short back-off so that rows which do fail on their own fail quickly; attempts stay the default (8).
FAST_RETRY = RetryPolicy(base_delay_s=0.05, max_delay_s=0.5)
# "A few dozen": failures before the breaker opens (about 10-16) plus one probe per interval.
MAX_REQUESTS_WHILE_DOWN = 36
# Probes 0.5 s after the breaker opens, then 1, 2, 2 … s apart: the runs wait out their short outages
# in seconds (the default, 2 s doubling to 60, is test_the_default_probes_come_2_4_8_up_to_60_s_apart).
QUICK_PROBES = OutagePolicy(first_probe_s=0.5, max_probe_s=2.0)


def texts_for(n: int, bad: set[int] = frozenset()) -> dict[int, str]:
    return {
        i: f"outage row {i}: kelp, granite and {i * 37 % 1009}" + (" [[emulator:400]]" if i in bad else "")
        for i in range(n)
    }


def run_embed(emu, src: Path, out: Path, *, outage: OutagePolicy = QUICK_PROBES, **kw) -> dict:
    options = RunOptions(
        input=str(src),
        output=str(out),
        provider=ProviderSettings(provider="local", base_url=emu.base_url, api_key_env=TEST_KEY_ENV, timeout_s=5),
        limits=kw.pop("limits", Limits(rpm=RPM)),
        chunk_size=kw.pop("chunk_size", 200),
        retry=kw.pop("retry", FAST_RETRY),
        outage=outage,
        **kw,
    )
    return asyncio.run(run_job(EmbedJob(model=MODEL, batch_size=BATCH), options))


class Outage:
    """Take the emulator down once ``after_requests`` embedding requests have arrived, for
    ``seconds`` (None: until :meth:`end`), and count the requests that arrive meanwhile."""

    def __init__(self, emu, *, after_requests: int, seconds: float | None) -> None:
        self.emu, self.after, self.seconds = emu, after_requests, seconds
        self.began = self.ended = None
        self.at_start = self.at_end = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sent(self) -> int:
        return self.emu.stats["by_route"]["embeddings"]

    def _run(self) -> None:
        while self._sent() < self.after and not self._done.is_set():
            time.sleep(0.01)
        self.emu.configure(**DOWN)
        self.at_start, self.began = self._sent(), time.monotonic()
        self._done.wait(self.seconds)
        self.end()

    def end(self) -> None:
        if self.at_end is None and self.began is not None:
            self.at_end, self.ended = self._sent(), time.monotonic()
            self.emu.configure(**UP)
        self._done.set()

    def __enter__(self) -> Outage:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=30)
        self.end()

    @property
    def requests_while_down(self) -> int:
        return self.at_end - self.at_start


def check_vectors(out: pl.DataFrame, texts: dict[int, str]) -> None:
    got = out.sort("id")
    want = np.stack([expected_vector(texts[i]) for i in got["id"].to_list()])
    np.testing.assert_allclose(got["embedding"].to_numpy(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_a_full_outage_mid_run_pauses_sending_and_leaves_no_row_behind(emulator, tmp_path):
    n = 600
    texts = texts_for(n)
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    out = tmp_path / "out"

    with Outage(emulator, after_requests=25, seconds=6) as outage:
        doc = run_embed(emulator, src, out)

    assert outage.began is not None and outage.ended is not None, "the run ended before the outage"
    # The table is complete after recovery, value by value, and nothing is in _errors/.
    assert doc["status"] == "completed", doc["message"]
    assert doc["message"] == ""
    assert_balanced(doc)
    assert doc["counts"]["succeeded"] == n and doc["counts"]["failed"] == 0
    out_rows = read_output(out)
    assert out_rows.height == n and out_rows["id"].n_unique() == n
    check_vectors(out_rows, texts)
    assert read_errors(out).height == 0
    # The server was asked a few dozen times while down, not every row's requests and their retries
    # (6 s at 10 requests/s = 60).
    assert outage.requests_while_down <= MAX_REQUESTS_WHILE_DOWN, outage.requests_while_down
    facts = doc["outage"]
    assert facts["outages"] == 1 and not facts["open_at_end"], facts
    # Opened within ~1-2 s of the outage's start; closed by the first probe after its end (probes 0.5,
    # 1.5, 3.5, 5.5, 7.5 s after opening).
    assert 3 <= facts["paused_s"] <= 6 + 2, facts
    assert 1 <= facts["probes"] <= 5, facts
    # Every request the run counts reached the server; failures during the outage used no attempts.
    assert doc["requests"]["sent"] == emulator.stats["by_route"]["embeddings"]
    assert doc["requests"]["sent"] == n // BATCH + doc["requests"]["retries"]
    assert doc["requests"]["transient_errors"] == sum(emulator.stats["faults"].values())
    print(
        f"\noutage of {outage.ended - outage.began:.1f} s: {outage.requests_while_down} requests while down, "
        f"{facts['probes']} probes, paused {facts['paused_s']:.1f} s; run {doc['duration_s']:.1f} s"
    )


def test_an_outage_longer_than_max_outage_stops_resumably_and_a_plain_rerun_finishes(emulator, tmp_path):
    n = 1000
    texts = texts_for(n)
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    out = tmp_path / "out"

    with Outage(emulator, after_requests=25, seconds=None) as outage:
        began = time.monotonic()
        doc = run_embed(emulator, src, out, outage=OutagePolicy(max_outage_s=2, first_probe_s=0.5, max_probe_s=2))
        took = time.monotonic() - began
        outage.end()

    assert doc["status"] == "stopped: provider unavailable", doc["status"]
    assert "--max-outage 2" in doc["message"] and "rerun" in doc["message"]
    assert_balanced(doc)
    c = doc["counts"]
    assert c["failed"] == 0 and c["not_attempted"] > 0 and c["succeeded"] >= 200, c
    assert read_errors(out).height == 0
    assert doc["outage"]["open_at_end"] and doc["outage"]["outages"] == 1, doc["outage"]
    assert outage.requests_while_down <= MAX_REQUESTS_WHILE_DOWN, outage.requests_while_down
    assert took < 25, took  # gave up after 2 s of outage, not after every row's attempts

    emulator.reset_stats()
    again = run_embed(emulator, src, out, limits=Limits())  # the resume, at no rate: it is about the rows
    assert again["status"] == "completed", again["message"]
    assert_balanced(again)
    assert again["counts"]["skipped_done"] == c["succeeded"] and again["counts"]["succeeded"] == n - c["succeeded"]
    assert emulator.stats["embedding_inputs"] == n - c["succeeded"]  # no row paid twice
    final = read_output(out)
    assert final.height == n and final["id"].n_unique() == n
    check_vectors(final, texts)
    assert read_errors(out).height == 0


@pytest.mark.slow
def test_a_bad_row_and_an_outage_only_the_bad_row_stays_in_errors(emulator, tmp_path):
    """Besides the outage, 20% of requests fail at random and rows get only 2 attempts: some rows use
    them up on transient errors (retry "auto"), one row is refused with a 400 (retry "on_request")."""
    n, bad = 1000, 437
    texts = texts_for(n, {bad})
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    out = tmp_path / "out"
    emulator.configure(fault_rate_drop=0.2, seed=18)

    with Outage(emulator, after_requests=30, seconds=4) as outage:
        doc = run_embed(emulator, src, out, retry=RetryPolicy(max_attempts=2, base_delay_s=0.05, max_delay_s=0.5))
    emulator.configure(fault_rate_drop=0.0)

    assert outage.ended is not None
    assert doc["outage"]["outages"] == 1, doc["outage"]
    assert outage.requests_while_down <= MAX_REQUESTS_WHILE_DOWN
    assert doc["status"] == "completed with errors", doc["status"]
    assert_balanced(doc)
    errors = read_errors(out)
    by_id = {r["id"]: r for r in errors.iter_rows(named=True)}
    auto = {i for i, r in by_id.items() if r["retry"] == "auto"}
    # The bad row is refused with a 400 (unless its request used up its 2 attempts on drops first).
    assert bad in by_id and set(by_id) - auto <= {bad}
    if bad not in auto:
        assert by_id[bad]["error_type"] == "invalid_request" and by_id[bad]["retry"] == "on_request"
    assert auto - {bad}, "some rows used up their 2 attempts on transient errors"
    assert {by_id[i]["error_type"] for i in auto} == {"transient"}
    # 2 attempts each, except rows that shared the bad row's request of 100 (ids 400-499): its 400 is
    # bisected, and a part that then fails transiently carries the attempts of every split above it.
    assert {by_id[i]["attempts"] for i in auto if not 400 <= i < 500} <= {2}
    assert {by_id[i]["attempts"] for i in auto if 400 <= i < 500} <= set(range(2, 2 + 8))
    assert doc["failed_rows"] == {"retry_auto": len(auto), "retry_on_request": len(by_id) - len(auto)}
    assert doc["counts"]["failed"] == len(by_id)
    assert f"{len(auto)} failed on transient errors only" in doc["message"]

    # A plain rerun sends exactly the rows that failed on transient errors; the bad row stays out.
    emulator.reset_stats()
    again = run_embed(emulator, src, out)
    assert emulator.stats["embedding_inputs"] == len(auto - {bad})  # a refused input is not counted
    assert again["counts"]["succeeded"] == len(auto - {bad}) and again["counts"]["failed"] == 1, again["counts"]
    assert again["status"] == "completed with errors" and "1 failed for their own input" in again["message"]
    errors = read_errors(out)
    assert errors["id"].to_list() == [bad] and errors["retry"].to_list() == ["on_request"]
    assert errors["error_type"].to_list() == ["invalid_request"] and "HTTP 400" in errors["error_message"][0]
    final = read_output(out)
    assert sorted(final["id"].to_list()) == sorted(set(range(n)) - {bad})
    check_vectors(final, texts)

    # Tolerated by --max-failed-pct: the same state reads as completed.
    emulator.reset_stats()
    tolerant = run_embed(emulator, src, out, max_failed_pct=0.5)
    assert tolerant["status"] == "completed" and "within --max-failed-pct 0.5" in tolerant["message"]
    assert emulator.stats["embedding_inputs"] == 0
    # --retry-errors resends the bad row; the server refuses it again.
    retried = run_embed(emulator, src, out, retry_errors=True)
    assert emulator.stats["by_route"]["embeddings"] == 1 and retried["counts"]["failed"] == 1


def test_the_default_probes_come_2_4_8_up_to_60_s_apart_and_the_first_success_closes(tmp_path):
    """The breaker alone, on a clock the test turns: no probe before it is due, one when it is."""
    now = [100.0]
    breaker = OutageBreaker(OutagePolicy(), clock=lambda: now[0])

    async def probe_due_at(t: float) -> None:
        stop = asyncio.Event()
        now[0] = t - 0.01
        waiting = asyncio.create_task(breaker.admit(stop))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done(), f"a probe went out before {t - 100:g} s"
        now[0] = t
        breaker.wake()
        assert await asyncio.wait_for(waiting, timeout=10) is True, "the probe was due"

    async def scenario() -> None:
        for i in range(10):  # 10 distinct requests fail: the provider looks down
            breaker.record_failure("transient", started=now[0], probe=False, key=f"request {i}")
        assert breaker.is_open and breaker.opened_at == 100.0
        for t in (102, 106, 114, 130, 162, 222, 282):  # 2 s, then 4, 8, 16, 32, 60, 60 apart
            await probe_due_at(t)
            assert breaker.record_failure("transient", started=t, probe=True, key="probe") is True
        await probe_due_at(342)
        breaker.record_success(started=342, probe=True, key="probe")
        assert not breaker.is_open
        assert breaker.describe() | {"failures_not_counted": None} == {
            "outages": 1,
            "paused_s": 242.0,
            "longest_s": 242.0,
            "probes": 8,
            "failures_not_counted": None,
            "open_at_end": False,
            "max_outage_s": DEFAULT_MAX_OUTAGE_S,
        }
        # Open again for longer than --max-outage: the waiting request is told to give up.
        for i in range(10):
            breaker.record_failure("transient", started=now[0], probe=False, key=f"again {i}")
        assert breaker.is_open
        now[0] += DEFAULT_MAX_OUTAGE_S
        assert await breaker.admit(asyncio.Event()) is False and breaker.gave_up

    asyncio.run(scenario())


def test_errors_written_before_the_retry_column_are_judged_by_their_error_type(emulator, tmp_path):
    n, bad = 300, 5
    texts = texts_for(n, {bad})
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    out = tmp_path / "out"
    emulator.configure(fault_rate_500=0.3, seed=3)
    doc = run_embed(emulator, src, out, retry=RetryPolicy(max_attempts=1), limits=Limits())
    emulator.configure(**UP)
    assert doc["outage"]["outages"] == 0, doc["outage"]  # 30% failures is not an outage
    transient = doc["failed_rows"]["retry_auto"]
    assert transient > 0
    legacy_auto = set(read_errors(out).filter(pl.col("retry") == "auto")["id"].to_list())
    # Rewrite _errors/ as an older gembatch wrote it: no `retry` column.
    for path in (out / "_errors").glob("*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["retry"]).replace_schema_metadata(table.schema.metadata), path)

    emulator.reset_stats()
    again = run_embed(emulator, src, out, limits=Limits())
    # error_type "transient" rows are sent again by the plain rerun; the 400 row (if the first run
    # reached it) stays out.
    assert again["counts"]["succeeded"] == len(legacy_auto - {bad}), again["counts"]
    assert again["counts"]["failed"] == 1
    assert emulator.stats["embedding_inputs"] == len(legacy_auto - {bad})
    assert read_errors(out)["id"].to_list() == [bad]
    assert read_output(out).height == n - 1


def test_one_row_that_always_gets_a_500_is_not_an_outage(emulator, tmp_path):
    """Its retries alone would fill the window with failures: they come from one request, so the
    breaker stays closed and the row uses up its own attempts (and is retried by the next run)."""
    n = 40
    texts = texts_for(n)
    texts[7] += " [[emulator:500]]"
    texts[17] += " [[emulator:503]]"
    src = write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values()))
    out = tmp_path / "out"
    job_retry = RetryPolicy(base_delay_s=0.01, max_delay_s=0.02)
    doc = run_embed(emulator, src, out, retry=job_retry, limits=Limits())
    # Batches of 10: a 5xx is not split to find its row, so both batches (20 rows) use their 8
    # attempts: 16 failures out of 18 outcomes, but from 2 requests.
    assert doc["outage"]["outages"] == 0, doc["outage"]
    assert doc["requests"]["transient_errors"] == 16
    errors = read_errors(out)
    assert sorted(errors["id"].to_list()) == list(range(20)) and set(errors["retry"]) == {"auto"}
    assert set(errors["attempts"]) == {8}
    assert doc["status"] == "completed with errors"


@pytest.fixture
def api_url(prefect_server) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def test_failed_rows_fail_the_flow_run_and_the_command_exits_4(api_url, emulator, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.embed import embed_flow
    from tasks.errors import RunNotCompleted

    texts = ["fine", "refused by the server [[emulator:400]]", "also fine"]
    src = write_corpus(tmp_path / "in.parquet", [1, 2, 3], texts)
    common = {"base_url": emulator.base_url, "api_key_env": TEST_KEY_ENV, "provider": "local"}
    with pytest.raises(RunNotCompleted) as excinfo:
        asyncio.run(embed_flow(input=str(src), output=str(tmp_path / "out"), options=common))
    doc = excinfo.value.document  # the run metadata is still handed back (and written to _runs/)
    assert doc["status"] == "completed with errors" and doc["counts"]["succeeded"] == 2
    assert (tmp_path / "out" / "_runs" / f"{doc['run_id']}.json").exists()

    async def state():
        async with get_client() as client:
            return (await client.read_flow_run(doc["flow_run_id"])).state

    flow_state = asyncio.run(state())
    assert flow_state.is_failed() and "completed with errors" in flow_state.message

    # Within the threshold the flow run completes and returns the document.
    ok = asyncio.run(
        embed_flow(input=str(src), output=str(tmp_path / "out2"), options={**common, "max_failed_pct": 50})
    )
    assert ok["status"] == "completed" and ok["counts"]["failed"] == 1

    env = {**os.environ, "PREFECT_API_URL": api_url, TEST_KEY_ENV: TEST_KEY}
    cmd = [sys.executable, "-m", "flows.cli", "embed", str(src), "--output", str(tmp_path / "out3")]
    cmd += ["--base-url", emulator.base_url, "--api-key-env", TEST_KEY_ENV, "--no-progress"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "completed with errors" in result.stderr and "1 failed for their own input" in result.stderr
