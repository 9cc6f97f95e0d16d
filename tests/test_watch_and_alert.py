"""Watching a tracked run from Prefect, on a real `prefect server start`: the progress artifact moves
during the run and ends at 100, the end event carries the run's counts, and the shipped automation
(automations/notify-on-errors.yaml) calls a webhook on a local HTTP server started here."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import REPO, TEST_KEY, TEST_KEY_ENV, cli_env, embed_command, write_corpus
from servers import free_port, prefect_cli, prefect_env, start_server, start_worker, stop

from emulator import Emulator, EmulatorConfig
from flows.events import run_title

# Slow tier: a real `prefect server start` (its triggers service runs the automation).
pytestmark = pytest.mark.slow

ROWS = 400
FAILING = {7, 107, 207, 307}  # no text: error rows, so the run ends "completed with errors"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    env = prefect_env(home, free_port(), **{TEST_KEY_ENV: TEST_KEY})
    process = start_server(env, home, home / "server.log")
    try:
        yield env
    finally:
        stop(process)


class Hooks:
    """A local HTTP server that keeps the JSON bodies POSTed to it (the automation's webhook)."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                hooks.bodies.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}/hook"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def api(env: dict) -> httpx.Client:
    return httpx.Client(base_url=env["PREFECT_API_URL"], timeout=10)


def events(env: dict) -> list[dict]:
    with api(env) as client:
        answer = client.post("/events/filter", json={"filter": {"event": {"prefix": ["gembatch."]}}, "limit": 50})
    answer.raise_for_status()
    return sorted(answer.json()["events"], key=lambda e: e["occurred"])


def artifacts(env: dict, key: str) -> list[dict]:
    with api(env) as client:
        answer = client.post("/artifacts/filter", json={"artifacts": {"key": {"any_": [key]}}})
    answer.raise_for_status()
    return answer.json()


def install_automation(env: dict, tmp_path: Path, hook_url: str) -> None:
    """The shipped YAML, with the id of a Webhook block that points at ``hook_url``."""
    made = subprocess.run(
        [sys.executable, "-c", "import sys; from prefect.blocks.webhook import Webhook; "
         "print(Webhook(url=sys.argv[1]).save('gembatch-test-hook'))", hook_url],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    spec = yaml.safe_load((REPO / "automations" / "notify-on-errors.yaml").read_text())
    spec["actions"][0]["block_document_id"] = made.stdout.strip().splitlines()[-1]
    path = tmp_path / "automation.yaml"
    path.write_text(yaml.safe_dump(spec))
    prefect_cli(env, "automation", "create", "--from-file", str(path), timeout=120)


def wait_for(what, check, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.3)
    raise AssertionError(f"{what}: not seen within {timeout_s} s")


def test_progress_moves_the_end_event_carries_the_counts_and_the_automation_fires(server, tmp_path):
    hooks = Hooks()
    try:
        install_automation(server, tmp_path, hooks.url)
        src = write_corpus(
            tmp_path / "in.parquet", list(range(ROWS)), [None if i in FAILING else f"watched {i}" for i in range(ROWS)]
        )
        out = tmp_path / "out"
        # 40 requests of 10 rows, one at a time at 0.25 s each: a run of about ten seconds, updated every 0.5 s.
        with Emulator(EmulatorConfig(api_key=TEST_KEY, latency_seconds=0.25)) as emu:
            argv = embed_command(src, out, emu.base_url, batch_size=10, chunk_size=40)
            argv[argv.index("--max-concurrency") + 1] = "1"
            env = cli_env(
                server["PREFECT_API_URL"], GEMBATCH_PROGRESS_EVERY_S="0.5", PREFECT_HOME=server["PREFECT_HOME"]
            )
            run = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            seen: list[float] = []
            while run.poll() is None:
                seen += [a["data"] for a in artifacts(server, "gembatch-embed-progress")]
                time.sleep(0.2)
            output = run.stdout.read()
        assert run.returncode == 4, output  # completed with errors
        (progress,) = artifacts(server, "gembatch-embed-progress")
        assert progress["data"] == 100.0
        assert any(0 < value < 100 for value in seen), seen  # it moved while the run worked
        assert "400 of 400 rows settled (4 failed)" in progress["description"]
        (table,) = artifacts(server, "gembatch-embed-live")
        (row,) = json.loads(table["data"])
        assert (row["done"], row["failed"], row["left"], row["requests"]) == (396, 4, 0, 40)

        # The server stores events in batches: wait for the end one.
        (end,) = wait_for(
            "the end event", lambda: [e for e in events(server) if e["event"] == "gembatch.run.completed-with-errors"]
        )
        assert [e["event"] for e in events(server)][0] == "gembatch.run.started"
        assert end["resource"]["prefect.resource.id"] == f"gembatch.output.{out}"
        payload = end["payload"]
        assert payload["status"] == "completed with errors"
        assert payload["counts"] == {"input_rows": 400, "skipped_done": 0, "deduplicated": 0, "succeeded": 396,
                                     "failed": 4, "not_attempted": 0}  # fmt: skip
        assert payload["requests"] == 40 and payload["cost_usd"] is not None
        (doc,) = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
        assert payload["run_id"] == doc["run_id"] and payload["flow_run_id"] == doc["flow_run_id"]
        # Inside the flow run, Prefect links the run to the event.
        related = {r["prefect.resource.id"] for r in end["related"]}
        assert f"prefect.flow-run.{doc['flow_run_id']}" in related

        with api(server) as client:
            flow_run = client.get(f"/flow_runs/{doc['flow_run_id']}").json()
        assert flow_run["name"] == run_title("embed", str(src), str(out))

        (hook,) = wait_for("the automation's webhook", lambda: hooks.bodies)
        assert hook["event"] == "gembatch.run.completed-with-errors" and hook["run_id"] == doc["run_id"]
        assert hook["status"] == "completed with errors" and hook["failed"] == 4
        assert "4 rows failed" in hook["text"] and TEST_KEY not in json.dumps(hook)
    finally:
        hooks.close()


def test_a_daily_quota_stop_is_an_event_when_it_happens(server, tmp_path):
    src = write_corpus(tmp_path / "in.parquet", list(range(200)), [f"quota {i}" for i in range(200)])
    out = tmp_path / "out"
    before = {e["id"] for e in events(server)}
    with Emulator(EmulatorConfig(api_key=TEST_KEY, rpd=5)) as emu:
        argv = embed_command(src, out, emu.base_url, batch_size=10, chunk_size=40)
        env = cli_env(server["PREFECT_API_URL"], PREFECT_HOME=server["PREFECT_HOME"])
        run = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 3, run.stdout + run.stderr
    wait_for("the end event", lambda: [e for e in events(server) if e["event"] == "gembatch.run.stopped"])
    new = [e for e in events(server) if e["id"] not in before]
    names = [e["event"] for e in new]
    assert names.index("gembatch.run.stopping.daily-quota") < names.index("gembatch.run.stopped")
    (stopped,) = [e for e in new if e["event"] == "gembatch.run.stopped"]
    assert stopped["payload"]["reason"] == "daily quota" and stopped["payload"]["status"] == "stopped: daily quota"
    assert stopped["payload"]["counts"]["succeeded"] == 50 and "per-day quota" in stopped["payload"]["message"]
    (stopping,) = [e for e in new if e["event"] == "gembatch.run.stopping.daily-quota"]
    assert stopping["payload"]["reason"] == "daily quota" and stopping["payload"]["rows_left"] > 0


def test_a_sharded_runs_parent_adds_up_its_shards_and_each_is_named(server, tmp_path):
    spec = yaml.safe_load((REPO / "deployments.yaml").read_text())
    spec["deployments"] = [d for d in spec["deployments"] if d["name"] == "nightly-embed"]
    spec["deployments"][0].pop("schedules")
    spec["deployments"][0]["work_pool"]["name"] = "watch-pool"
    prefect_file = tmp_path / "deployments.yaml"
    prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    prefect_cli(server, "work-pool", "create", "watch-pool", "--type", "process")
    prefect_cli(server, "deploy", "--prefect-file", str(prefect_file), "--all")
    env = server | {"GEMBATCH_PROGRESS_EVERY_S": "0.5"}
    worker = start_worker(env, "watch-pool", tmp_path, tmp_path / "worker.log", "--type", "process")
    src = write_corpus(tmp_path / "in.parquet", list(range(2000)), [f"sharded {i}" for i in range(2000)])
    out = tmp_path / "out"
    try:
        with Emulator(EmulatorConfig(api_key=TEST_KEY, latency_seconds=0.1)) as emu:
            argv = embed_command(src, out, emu.base_url, "--shards", "2", batch_size=20, chunk_size=200)
            run = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        stop(worker)
    assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "worker.log").read_text()[-3000:]
    docs = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    (parent,) = [d for d in docs if "shards" in d]
    with api(server) as client:
        shown = client.post(
            "/artifacts/filter",
            json={
                "artifacts": {
                    "key": {"any_": ["gembatch-embed-live"]},
                    "flow_run_id": {"any_": [parent["flow_run_id"]]},
                }
            },
        ).json()
        children = client.post(
            "/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [parent["flow_run_id"]]}}}
        ).json()
    (table,) = shown
    rows = {row["run"]: row for row in json.loads(table["data"])}
    assert sorted(rows) == ["all shards", "shard 1/2", "shard 2/2"]
    assert rows["all shards"]["done"] == 2000 and rows["all shards"]["left"] == 0
    assert rows["shard 1/2"]["done"] + rows["shard 2/2"]["done"] == 2000
    assert sorted(c["name"] for c in children) == [run_title("embed", str(src), str(out), f"{i}/2") for i in (1, 2)]
    ends = wait_for(
        "three end events",
        lambda: (found := [e for e in events(server) if e["event"] == "gembatch.run.completed"
                           and e["payload"]["output"] == str(out)]) and len(found) == 3 and found,
    )  # fmt: skip
    assert sorted(e["payload"].get("shard", "parent") for e in ends) == ["1/2", "2/2", "parent"]
    # The parent says it started too, before its shards, with the whole input's rows.
    starts = [e for e in events(server) if e["event"] == "gembatch.run.started" and e["payload"]["output"] == str(out)]
    assert sorted(e["resource"].get("gembatch.shard", "parent") for e in starts) == ["1/2", "2/2", "parent"]
    (parent_start,) = [e for e in starts if "gembatch.shard" not in e["resource"]]
    assert parent_start["payload"]["rows_total"] == 2000 and parent_start["payload"]["run_id"] == parent["run_id"]
