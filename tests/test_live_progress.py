"""A tracked run's live progress and events, without a Prefect server: the counts, the throttle, the
event names and payloads, the flow run's name, and an observer hearing a real run on the emulator."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess

import pytest
import yaml
from conftest import REPO, TEST_KEY_ENV, cli_env, embed_command, interrupt_after_first_part, read_output, write_corpus
from prefect.events.schemas.automations import AutomationCore

from flows.chunk_groups import TASK_RUNS_ENV, ChunkGroup, ChunkGroups, group_size, wait_for_group
from flows.events import _sum_rows, end_event, end_payload, live_row, resource_of, run_title, stop_event
from tasks.engine.report.live import EVERY_ENV, Snapshot, Throttle, cost_marks_passed, snapshot, watch_every_s
from tasks.engine.report.metadata import usage
from tasks.engine.run import RunOptions, run_job
from tasks.engine.send.context import RunStats
from tasks.engine.send.limits import Limits
from tasks.jobs.embed import EmbedJob
from tasks.provider.client import ProviderSettings

MODEL = "gemini-embedding-001"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_throttle_lets_one_update_through_per_interval():
    clock = FakeClock()
    throttle = Throttle(5.0, clock)
    seen = []
    for step in range(100):  # 100 rows settled over 20 s: one chance to update per row
        clock.now = step * 0.2
        if throttle.due():
            seen.append(clock.now)
    assert seen == [0.0, 5.0, 10.0, 15.0]


def test_the_interval_comes_from_the_environment_with_a_floor(monkeypatch):
    monkeypatch.delenv(EVERY_ENV, raising=False)
    assert watch_every_s() == 5.0
    monkeypatch.setenv(EVERY_ENV, "0.01")
    assert watch_every_s() == 0.5  # never a flood of API calls, whatever is asked
    monkeypatch.setenv(EVERY_ENV, "soon")
    with pytest.raises(ValueError, match=EVERY_ENV):
        watch_every_s()


def test_a_snapshot_counts_rows_settled_and_left():
    stats = RunStats(skipped_done=100, deduplicated=20, succeeded=280, failed=10, requests=31, rate_limited=2)
    stats.prompt_tokens = stats.total_tokens = 1_000_000
    now = snapshot(stats, total=1000, model=MODEL, elapsed_s=10.0, sent_since_start=310)
    assert (now.done, now.failed, now.settled, now.left) == (400, 10, 410, 590)
    assert now.percent == 41.0
    assert now.rows_per_s == 31.0 and round(now.eta_s) == 19
    assert now.cost_usd == pytest.approx(0.15)  # gemini-embedding-001: $0.15 per 1M input tokens
    assert snapshot(RunStats(), total=0, model=MODEL, elapsed_s=1.0, sent_since_start=0).percent == 100.0


def test_the_cost_so_far_prices_images_and_audio_as_the_run_metadata_does():
    images = RunStats(succeeded=10, images=10)
    now = snapshot(images, total=20, model="imagen-4.0-generate-001", elapsed_s=5.0, sent_since_start=10,
                   per_image_usd=0.04)  # fmt: skip
    assert now.cost_usd == pytest.approx(0.40)  # ten images at $0.04, no tokens at all
    audio = RunStats(succeeded=1)
    audio.prompt_tokens, audio.total_tokens = 1_000_000, 1_000_000
    as_text = snapshot(audio, total=1, model="gemini-2.5-flash", elapsed_s=1.0, sent_since_start=1)
    as_audio = snapshot(audio, total=1, model="gemini-2.5-flash", elapsed_s=1.0, sent_since_start=1, audio_input=True)
    assert as_audio.cost_usd == pytest.approx(usage(audio, "gemini-2.5-flash", audio_input=True)[1]["estimated_usd"])
    assert as_audio.cost_usd > as_text.cost_usd  # audio input is dearer than text


def test_cost_marks_are_told_once_each_as_they_are_passed():
    assert cost_marks_passed(0.0, 0.5) == []
    assert cost_marks_passed(0.5, 12.0) == [1, 2, 5, 10]
    assert cost_marks_passed(12.0, 49.99) == [20]
    assert cost_marks_passed(49.99, 50.0) == [50]
    assert cost_marks_passed(50.0, 50.5) == []
    assert cost_marks_passed(None, None) == []


@pytest.mark.parametrize(
    ("status", "event"),
    [
        ("completed", "gembatch.run.completed"),
        ("completed with errors", "gembatch.run.completed-with-errors"),
        ("stopped: daily quota", "gembatch.run.stopped"),
        ("stopped: budget", "gembatch.run.stopped"),
        ("interrupted", "gembatch.run.stopped"),
        ("failed: auth", "gembatch.run.failed"),
        ("failed: ConfigError", "gembatch.run.failed"),
    ],
)
def test_the_end_event_is_named_after_the_status(status, event):
    assert end_event(status) == event


def test_a_stop_is_told_by_its_reason():
    assert stop_event("stopped: daily quota") == "gembatch.run.stopping.daily-quota"
    assert stop_event("stopped: provider unavailable") == "gembatch.run.stopping.provider-unavailable"
    assert stop_event("stopped: budget") == "gembatch.run.stopping.budget"
    assert stop_event("failed: batch") is None  # a failure is told by the end event


def document(**over) -> dict:
    doc = {
        "run_id": "20261206T100000Z-abc123",
        "flow_run_id": "7b0c…",
        "job": "embed",
        "status": "completed with errors",
        "message": "4 of 400 rows failed, see https://u:pw@store.example/out?sig=s3cr3t/_errors/",
        "provider": {"model": MODEL},
        "input": {"path": "s3://bucket/corpus.parquet?X-Amz-Signature=s3cr3t"},
        "output": {"path": "https://u:pw@store.example/out?sig=s3cr3t"},
        "counts": {"input_rows": 400, "skipped_done": 0, "deduplicated": 0, "succeeded": 396, "failed": 4,
                   "not_attempted": 0},
        "requests": {"sent": 40, "rate_limited_429": 3},
        "tokens": {"total": 1200},
        "cost": {"estimated_usd": 0.00018},
        "duration_s": 9.5,
    }  # fmt: skip
    return doc | over


def test_the_end_payload_carries_the_counts_cost_and_status_and_no_secret():
    payload = end_payload(document())
    assert payload["status"] == "completed with errors" and payload["reason"] is None
    assert payload["counts"]["failed"] == 4 and payload["counts"]["succeeded"] == 396
    assert (payload["requests"], payload["rate_limited_429"], payload["tokens"]) == (40, 3, 1200)
    assert payload["cost_usd"] == 0.00018 and payload["model"] == MODEL
    assert "s3cr3t" not in repr(payload) and "pw@" not in repr(payload)
    assert end_payload(document(status="stopped: daily quota"))["reason"] == "daily quota"
    resource = resource_of("embed", document()["output"]["path"], run_id="r1", model=MODEL, shard="2/4")
    assert resource["prefect.resource.id"].startswith("gembatch.output.https://")
    assert resource["gembatch.shard"] == "2/4" and "s3cr3t" not in repr(resource)


def test_a_flow_run_is_named_after_what_it_does():
    assert run_title("embed", "data/corpus.parquet", "data/out/emb") == "embed corpus.parquet → data/out/emb"
    assert (
        run_title(
            "embed", "s3://bucket/in/corpus.parquet", "s3://bucket/a/very/long/prefix/of/many/folders/for/emb", "2/4"
        )
        == "embed corpus.parquet → s3://bucket/…/emb shard 2/4"
    )
    assert "s3cr3t" not in run_title("caption", "https://h/photos/?sig=s3cr3t", "out")


def test_the_shards_rows_add_up():
    one = Snapshot(total=100, done=60, failed=2, requests=7, rate_limited=1, tokens=70, cost_usd=0.5,
                   rows_per_s=10.0, elapsed_s=6)  # fmt: skip
    two = Snapshot(total=100, done=40, failed=0, requests=4, rate_limited=0, tokens=40, cost_usd=None,
                   rows_per_s=5.0, elapsed_s=6)  # fmt: skip
    rows = [live_row("shard 1/2", one), live_row("shard 2/2", two)]
    both = _sum_rows(rows)
    assert (both.total, both.done, both.failed, both.left) == (200, 100, 2, 98)
    assert (both.requests, both.rate_limited, both.cost_usd, both.rows_per_s) == (11, 1, 0.5, 15.0)
    assert both.percent == 51.0 and _sum_rows([]) is None


class Recorder:
    """An observer that keeps what it heard; ``broken``: every call raises, as an API outage would."""

    def __init__(self, *, broken: bool = False) -> None:
        self.calls: list[tuple[str, object]] = []
        self.broken = broken

    async def _hear(self, what: str, value: object) -> None:
        self.calls.append((what, value))
        if self.broken:
            raise ConnectionError("the Prefect API is down")

    async def started(self, document, first):
        await self._hear("started", first)

    async def progress(self, now):
        await self._hear("progress", now)

    async def cost_passed(self, mark_usd, now):
        await self._hear("cost", mark_usd)

    async def stopping(self, status, message, now):
        await self._hear("stopping", status)

    async def finished(self, document, last):
        await self._hear("finished", (document["status"], last))


def options(emulator, tmp_path, rows: int) -> RunOptions:
    texts = [f"live sentence {i}" for i in range(rows)]
    src = write_corpus(tmp_path / "in.parquet", list(range(rows)), texts)
    return RunOptions(
        input=str(src),
        output=str(tmp_path / "out"),
        provider=ProviderSettings(provider="local", base_url=emulator.base_url, api_key_env=TEST_KEY_ENV, timeout_s=5),
        limits=Limits(max_concurrency=1),
        chunk_size=40,
    )


def run_observed(emulator, tmp_path, observer, rows: int = 240) -> dict:
    job = EmbedJob(model=MODEL, batch_size=10)
    return asyncio.run(run_job(job, options(emulator, tmp_path, rows), observer=observer))


def test_an_observer_hears_a_run_start_progress_and_end(emulator, tmp_path, monkeypatch):
    monkeypatch.setenv(EVERY_ENV, "0.5")
    emulator.config.latency_seconds = 0.05  # 24 requests one at a time: over a second, so it ticks
    observer = Recorder()
    doc = run_observed(emulator, tmp_path, observer)
    assert doc["status"] == "completed"
    kinds = [k for k, _ in observer.calls]
    assert kinds[0] == "started" and kinds[-1] == "finished" and "progress" in kinds
    assert "stopping" not in kinds
    percents = [v.percent for k, v in observer.calls if k in ("started", "progress")]
    assert percents == sorted(percents) and percents[0] < 100
    status, last = observer.calls[-1][1]
    assert status == "completed" and last.percent == 100.0 and (last.done, last.left) == (240, 0)
    assert last.requests == doc["requests"]["sent"] == 24


def test_a_stop_is_told_when_it_happens_and_the_end_after_it(emulator, tmp_path):
    emulator.config.rpd = 5  # the day's quota: five requests
    observer = Recorder()
    doc = run_observed(emulator, tmp_path, observer)
    assert doc["status"] == "stopped: daily quota"
    kinds = [k for k, _ in observer.calls]
    assert kinds.count("stopping") == 1 and kinds.index("stopping") < kinds.index("finished")
    assert ("stopping", "stopped: daily quota") in observer.calls
    _, last = observer.calls[-1][1]
    assert 0 < last.percent < 100


def test_an_observer_that_fails_never_fails_the_run(emulator, tmp_path, caplog):
    observer = Recorder(broken=True)
    doc = run_observed(emulator, tmp_path, observer, rows=80)
    assert doc["status"] == "completed" and doc["counts"]["succeeded"] == 80
    assert [k for k, _ in observer.calls][-1] == "finished"
    assert "the Prefect API is down" in caplog.text and "the run goes on" in caplog.text


@pytest.mark.parametrize("name", ["notify-on-errors.yaml", "notify-on-cost.yaml"])
def test_the_shipped_automations_are_valid(name):
    spec = yaml.safe_load((REPO / "automations" / name).read_text())
    automation = AutomationCore.model_validate(spec)
    assert all(event.startswith("gembatch.run.") for event in automation.trigger.expect)


def test_the_how_to_shows_the_shipped_automation():
    page = (REPO / "docs" / "how-to" / "watch-and-alert.md").read_text()
    (shown,) = re.findall(r"```yaml\n(.*?)```", page, re.S)
    assert yaml.safe_load(shown) == yaml.safe_load((REPO / "automations" / "notify-on-errors.yaml").read_text())


def test_group_size_keeps_a_run_to_about_a_hundred_task_runs():
    assert group_size(100 * 2000, 2000, 100) == 1  # 100 chunks: one task run each, as before
    assert group_size(100 * 2000 + 1, 2000, 100) == 2
    assert group_size(10_000_000, 2000, 100) == 50  # 5,000 chunks: 100 task runs of 50
    assert group_size(0, 2000, 100) == 1


def test_chunk_groups_frame_consecutive_chunks_and_end_after_their_last(emulator, tmp_path):
    framed: list[tuple[int, int, dict]] = []

    async def group_task(first, last, group):
        framed.append((first, last, await wait_for_group(first, last, group)))

    async def not_used(*args):
        raise AssertionError("a run of more chunks than task runs is grouped")

    runner = ChunkGroups(not_used, group_task, chunk_size=40, task_runs=3)

    async def run():
        try:
            return await run_job(
                EmbedJob(model=MODEL, batch_size=10), options(emulator, tmp_path, 240), chunk_runner=runner
            )
        finally:
            await runner.close()

    doc = asyncio.run(run())
    assert doc["status"] == "completed" and doc["counts"]["succeeded"] == 240
    # 6 chunks of 40, at most 3 task runs: chunks 0-1, 2-3, 4-5, each with its chunks' rows (groups send
    # side by side: the order they end in is the server's).
    assert sorted((first, last) for first, last, _ in framed) == [(0, 1), (2, 3), (4, 5)]
    assert all(summary == {"chunks": 2, "rows": 80, "written": 80, "errors": 0} for *_, summary in framed)


def test_a_group_with_a_failed_chunk_fails():
    group = ChunkGroup(0, 9)
    group.errors.append(OSError("disk full"))
    group.close()
    with pytest.raises(RuntimeError, match="1 of the chunks 0-9 did not finish: OSError: disk full"):
        asyncio.run(wait_for_group(0, 9, group))


async def task_runs_of(flow_run_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_a_large_tracked_run_makes_grouped_task_runs(prefect_server, emulator, tmp_path, monkeypatch):
    from flows.embed import embed_flow
    from flows.params import CommonOptions

    monkeypatch.setenv(TASK_RUNS_ENV, "4")
    src = write_corpus(tmp_path / "in.parquet", list(range(90)), [f"grouped {i}" for i in range(90)])
    common = CommonOptions(base_url=emulator.base_url, api_key_env=TEST_KEY_ENV, provider="local", chunk_size=10)
    doc = asyncio.run(embed_flow(input=str(src), output=str(tmp_path / "out"), batch_size=10, options=common))
    assert doc["status"] == "completed" and doc["counts"]["succeeded"] == 90

    runs = asyncio.run(task_runs_of(doc["flow_run_id"]))
    # 9 chunks, at most 4 task runs: groups of 3.
    assert sorted(t.name for t in runs) == ["chunks 0-2", "chunks 3-5", "chunks 6-8"]
    assert all(t.state.is_completed() for t in runs)


@pytest.mark.slow
def test_ctrl_c_on_a_grouped_tracked_run_stops_cleanly_and_a_rerun_resumes(prefect_server, emulator, tmp_path):
    from prefect.settings import PREFECT_API_URL

    emulator.configure(latency_seconds=0.2)
    n = 1000
    src = write_corpus(tmp_path / "in.parquet", list(range(n)), [f"interrupt me {i}" for i in range(n)])
    out = tmp_path / "out"
    # 5 chunks of 200, at most 2 task runs: the chunks run in groups of 3.
    env = cli_env(PREFECT_API_URL.value(), **{TASK_RUNS_ENV: "2"})
    argv = embed_command(src, out, emulator.base_url, batch_size=20, chunk_size=200)
    interrupt_after_first_part(argv, env, tmp_path, out)

    (run,) = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    assert run["status"] == "interrupted"
    written = read_output(out).height
    assert run["counts"]["succeeded"] == written < n and run["counts"]["not_attempted"] == n - written
    names = {t.name for t in asyncio.run(task_runs_of(run["flow_run_id"]))}
    assert "chunks 0-2" in names and names <= {"chunks 0-2", "chunks 3-5"}

    emulator.reset_stats()
    result = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert emulator.stats["embedding_inputs"] == n - written
    assert read_output(out).height == n
