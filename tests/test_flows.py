"""The real Prefect flows and the `gembatch` command: few tests, each one worth a server."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import time

import conftest
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO, TEST_KEY, TEST_KEY_ENV, assert_balanced, cli_env, embed_command, read_output, write_corpus

from emulator.fakes import fake_embedding


@pytest.fixture
def api_url(prefect_server) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def test_embed_flow_runs_one_task_per_chunk_and_publishes_the_summary(prefect_server, emulator, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    from flows.embed import embed_flow
    from flows.params import CommonOptions

    texts = [f"flow text {i}" for i in range(250)]
    src = write_corpus(tmp_path / "in.csv", list(range(250)), texts)
    doc = asyncio.run(
        embed_flow(
            input=str(src),
            output=str(tmp_path / "out"),
            batch_size=50,
            options=CommonOptions(
                base_url=emulator.base_url, api_key_env=TEST_KEY_ENV, provider="local", chunk_size=100
            ),
        )
    )
    assert doc["status"] == "completed" and doc["counts"]["succeeded"] == 250
    assert_balanced(doc)

    async def inspect():
        async with get_client() as client:
            flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[doc["flow_run_id"]]))
            task_runs = await client.read_task_runs(flow_run_filter=flow_filter)
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["gembatch-embed-run"])),
                flow_run_filter=flow_filter,
            )
            return task_runs, artifacts

    task_runs, artifacts = asyncio.run(inspect())
    assert sorted(t.name for t in task_runs) == ["chunk-0", "chunk-1", "chunk-2"]
    assert all(t.state.is_completed() for t in task_runs)
    assert len(artifacts) == 1
    table = {row["metric"]: row["value"] for row in json.loads(artifacts[0].data)}
    assert table["succeeded"] == "250" and table["status"] == "completed"
    assert TEST_KEY not in artifacts[0].data


def _embed_cmd(src, out, base_url) -> list[str]:
    return embed_command(src, out, base_url, batch_size=20, chunk_size=200)


# Slow tier: four tracked `gembatch` processes over 4,000 rows, three of them killed (30-60 s). The default
# tier keeps SIGKILL-and-resume in tests/test_claims.py, test_audio.py and test_batch.py, and Ctrl-C below.
@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_to_the_same_table_without_paying_twice(api_url, emulator, tmp_path):
    emulator.configure(latency_seconds=0.1)
    n = 4000
    texts = [f"kill test sentence {i}" for i in range(n)]
    src = write_corpus(tmp_path / "in.parquet", list(range(n)), texts)
    out = tmp_path / "out"
    env = cli_env(api_url)
    rng = random.Random(7)
    trials = 3
    for trial in range(trials):
        parts_before = len(list(out.glob("part-*.parquet")))
        proc = subprocess.Popen(
            _embed_cmd(src, out, emulator.base_url),
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while len(list(out.glob("part-*.parquet"))) <= parts_before and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.05)
        time.sleep(rng.uniform(0.1, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_before = read_output(out).height
        assert parts_before < len(list(out.glob("part-*.parquet"))), f"trial {trial} wrote nothing before the kill"
        assert done_before < n, f"trial {trial}: the run finished before the kill"

    time.sleep(0.5)  # requests the killed run left in flight finish at the emulator (latency 0.1 s)
    sent_by_killed_runs = emulator.stats["embedding_inputs"]
    emulator.reset_stats()
    result = subprocess.run(
        _embed_cmd(src, out, emulator.base_url), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Only rows missing after the kills were sent again...
    assert emulator.stats["embedding_inputs"] == n - done_before
    # ...and each kill lost at most the chunks in flight (4 chunks of 200 rows).
    lost = sent_by_killed_runs - done_before
    assert 0 <= lost <= trials * 4 * 200, lost
    print(f"kill test: {trials} kills, {done_before} rows kept, {lost} rows' requests lost in flight")
    final = read_output(out)
    assert final.height == n and final["id"].n_unique() == n
    for row_id, vector in zip(final["id"].to_list(), final["embedding"].to_list(), strict=True):
        np.testing.assert_allclose(
            np.asarray(vector, np.float32), fake_embedding(texts[row_id], "gemini-embedding-001"), rtol=1e-6, atol=1e-7
        )
    assert not [p for p in out.rglob(".tmp-*")], "no temporary file survives the rerun"
    runs = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    assert sorted(r["status"] for r in runs) == ["completed"] + ["running"] * trials  # killed runs never finished
    last = next(r for r in runs if r["status"] == "completed")
    assert last["counts"]["skipped_done"] == done_before and last["counts"]["succeeded"] == n - done_before
    assert "Run metadata:" in result.stdout


def test_the_demo_runs_every_job_and_a_second_run_sends_nothing(prefect_server, tmp_path):
    """The first run as Prefect flows, the second untracked (no Prefect API): both see the same folders."""
    from io import StringIO

    from rich.console import Console

    from flows.demo import run_demo

    console = Console(file=StringIO(), width=100)
    first = run_demo(output=str(tmp_path / "demo"), fresh=False, console=console)
    assert [d["job"] for d in first] == ["embed", "extract", "caption", "transcribe", "images", "extract", "generate"]
    assert first[5]["job_parameters"]["via"] == "tools" and first[6]["streaming"]["first_token"]["count"] == 8
    for doc in first:
        assert doc["status"] == "completed" and doc["counts"]["failed"] == 0, doc["job"]
        assert doc["counts"]["succeeded"] + doc["counts"]["deduplicated"] == doc["counts"]["input_rows"] > 0
        assert_balanced(doc)
    assert all(d["flow_run_id"] for d in first)
    second = run_demo(output=str(tmp_path / "demo"), fresh=False, console=console, tracked=False)
    assert [d["flow_run_id"] for d in second] == [None] * 7
    assert [d["requests"]["sent"] for d in second] == [0] * 7
    assert [d["counts"]["skipped_done"] for d in second] == [d["counts"]["input_rows"] for d in first]
    assert "gembatch demo" in console.file.getvalue()
    images = tmp_path / "demo" / "images"
    table = pq.read_table(images)  # the images sit in _images/, out of Arrow's way
    assert table.num_rows == 12 and set(table.column("image_format").to_pylist()) == {"png"}
    for path in table.column("image_path").to_pylist():
        assert path.startswith("_images/") and (images / path).is_file()


def test_a_part_write_under_way_when_ctrl_c_comes_lands_and_is_counted_before_the_run_ends():
    """Ctrl-C cancels the chunk awaiting its part write; the write's thread goes on regardless. The
    cancellation must wait for it, or the run ends (counting the rows as not attempted) and the write
    then lands and counts them as succeeded too."""
    import threading
    import time as clock

    from tasks.engine.store.part_files import write_in_thread

    landed: list[str] = []
    started = threading.Event()

    def write(name: str) -> str:
        started.set()
        clock.sleep(0.5)
        landed.append(name)
        return name

    async def scenario() -> list[str]:
        chunk = asyncio.ensure_future(write_in_thread(write, "part-1"))
        await asyncio.to_thread(started.wait, 5)
        chunk.cancel()
        with pytest.raises(asyncio.CancelledError):
            await chunk
        return list(landed)  # what the run's end sees

    assert asyncio.run(scenario()) == ["part-1"]
    assert asyncio.run(write_in_thread(write, "part-2")) == "part-2"


@pytest.mark.parametrize(
    "tracked", [pytest.param(True, id="tracked", marks=pytest.mark.slow), pytest.param(False, id="untracked")]
)
def test_ctrl_c_stops_cleanly_with_interrupted_metadata_and_resumes(tracked, request, emulator, tmp_path):
    emulator.configure(latency_seconds=0.2)
    n = 1000
    texts = [f"interrupt me {i}" for i in range(n)]
    src = write_corpus(tmp_path / "in.parquet", list(range(n)), texts)
    out = tmp_path / "out"
    env = cli_env(request.getfixturevalue("api_url") if tracked else None)
    conftest.interrupt_after_first_part(_embed_cmd(src, out, emulator.base_url), env, tmp_path, out)

    (run,) = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    assert run["status"] == "interrupted"
    assert_balanced(run)
    written = read_output(out).height
    assert run["counts"]["succeeded"] == written < n
    assert run["counts"]["not_attempted"] == n - written
    assert not list(out.rglob(".tmp-*"))

    emulator.reset_stats()
    emulator.configure(latency_seconds=0)  # the latency was there to interrupt a run mid-way
    result = subprocess.run(_embed_cmd(src, out, emulator.base_url), env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert emulator.stats["embedding_inputs"] == n - written
    assert read_output(out).height == n


def test_the_key_leaks_nowhere_outputs_metadata_artifacts_or_logs(
    prefect_server, emulator, tmp_path, capfd, monkeypatch
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    from flows.caption import caption_flow
    from flows.embed import embed_flow
    from flows.extract import extract_flow
    from flows.images import images_flow
    from flows.transcribe import transcribe_flow
    from tasks.errors import ConfigError, RunNotCompleted

    data = REPO / "data"
    common = {"base_url": emulator.base_url, "api_key_env": TEST_KEY_ENV, "provider": "local"}
    texts = ["fine", "refused by the server [[emulator:400]]", "also fine"]
    src = write_corpus(tmp_path / "in.parquet", [1, 2, 3], texts)
    out = tmp_path / "out"

    async def embed_with_a_refused_row():
        # The refused row makes the run "completed with errors": the flow run fails with the document.
        try:
            await embed_flow(input=str(src), output=str(out / "embed"), options=common)
        except RunNotCompleted as exc:
            return exc.document
        raise AssertionError("a run with a failed row must not end as a clean success")

    async def run_all():
        return [
            await embed_with_a_refused_row(),
            await extract_flow(
                input=str(data / "extract" / "events.csv"), output=str(out / "extract"),
                schema_ref="schemas.examples:CalendarEvent", options=common,
            ),
            await caption_flow(input=str(data / "images.csv"), output=str(out / "caption"), options=common),
            await transcribe_flow(input=str(data / "audio.csv"), output=str(out / "transcribe"), options=common),
            await images_flow(
                input=str(data / "prompts.csv"), output=str(out / "images"), size="32x32", options=common
            ),
        ]  # fmt: skip

    docs = asyncio.run(run_all())
    assert docs[0]["status"] == "completed with errors" and all(d["status"] == "completed" for d in docs[1:])
    assert docs[0]["counts"]["failed"] == 1  # the refused row's error message is stored too

    async def prefect_records():
        async with get_client() as client:
            ids = [d["flow_run_id"] for d in docs]
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
            artifacts = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            return [log.message for log in logs], [str(a.data) for a in artifacts]

    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    logs, artifacts = asyncio.run(prefect_records())
    # Per run: the summary, the progress and the live table (flows/events.py).
    assert len(artifacts) == 3 * 5 and len(logs) >= 5
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any("_runs" in str(p) for p in files) and any("_errors" in str(p) for p in files)
    captured = capfd.readouterr()
    key = TEST_KEY.encode()
    leaks = [str(p) for p in files if key in p.read_bytes()]
    leaks += [m for m in logs + artifacts if TEST_KEY in m]
    leaks += [stream for stream in (captured.out, captured.err) if TEST_KEY in stream]
    assert leaks == []

    with pytest.raises(ConfigError) as excinfo:
        monkeypatch.setenv(TEST_KEY_ENV, "a-wrong-key-that-must-not-be-echoed")
        asyncio.run(embed_flow(input=str(src), output=str(out / "embed"), options=common))
    assert "a-wrong-key-that-must-not-be-echoed" not in str(excinfo.value)
    assert "rejected" in str(excinfo.value)


def test_the_key_can_come_from_a_prefect_secret_block(prefect_server, emulator, tmp_path, monkeypatch):
    from prefect.blocks.system import Secret

    from flows.embed import embed_flow
    from tasks.errors import ConfigError

    Secret(value=TEST_KEY).save("gembatch-test-key", overwrite=True)
    monkeypatch.delenv(TEST_KEY_ENV)
    src = write_corpus(tmp_path / "in.parquet", [1, 2], ["secret one", "secret two"])
    doc = asyncio.run(
        embed_flow(
            input=str(src), output=str(tmp_path / "out"),
            options={"base_url": emulator.base_url, "api_key_secret": "gembatch-test-key", "provider": "local"},
        )
    )  # fmt: skip
    assert doc["status"] == "completed" and doc["counts"]["succeeded"] == 2
    assert doc["parameters"]["api_key_secret"] == "gembatch-test-key"
    with pytest.raises(ConfigError, match="no Prefect Secret block named 'nope'"):
        asyncio.run(
            embed_flow(input=str(src), output=str(tmp_path / "o2"),
                       options={"base_url": emulator.base_url, "api_key_secret": "nope", "provider": "local"})
        )  # fmt: skip
