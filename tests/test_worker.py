"""A deployment from deployments.yaml, run end to end by a real worker: `prefect server start` and
`prefect worker start --type process` as processes of their own, the flow run in the worker's child.

Everything Prefect here lives in this test's own PREFECT_HOME and port (the subprocesses' environment),
apart from the session's ``prefect_test_harness``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from conftest import REPO, TEST_KEY, TEST_KEY_ENV, assert_balanced, read_output, write_corpus
from test_embed import assert_vectors_match

TEXTS = {i: f"worker sentence {i}" for i in range(7)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(api: str, server: subprocess.Popen, log: Path, deadline_s: float = 60) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"prefect server exited {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"prefect server not healthy after {deadline_s} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen | None) -> None:
    """Stop a process this test started, and its children (its own session), by its id."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


def test_a_worker_runs_the_embed_deployment_with_nested_options(emulator, tmp_path):
    src = write_corpus(tmp_path / "in.parquet", list(TEXTS), list(TEXTS.values()))
    out = tmp_path / "out"
    # The nightly-embed deployment as deployments.yaml declares it, pointed at the emulator and tmp_path.
    spec = yaml.safe_load((REPO / "deployments.yaml").read_text())
    (deployment,) = [d for d in spec["deployments"] if d["name"] == "nightly-embed"]
    deployment.pop("schedules")
    deployment["work_pool"]["name"] = "test-pool"
    deployment["parameters"].update(input=str(src), output=str(out))
    deployment["parameters"]["options"] = {
        **deployment["parameters"]["options"],
        "base_url": emulator.base_url,
        "api_key_env": TEST_KEY_ENV,
        "chunk_size": 3,
    }
    spec["deployments"] = [deployment]
    prefect_file = tmp_path / "deployments.yaml"
    prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False))

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "GEMBATCH_HOME": str(REPO),
        TEST_KEY_ENV: TEST_KEY,
    }
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    server = worker = None
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    try:
        with server_log.open("w") as log:
            server = subprocess.Popen(
                [*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        _wait_healthy(api, server, server_log)

        def prefect_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
            result = subprocess.run(
                [*prefect, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
            )
            assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
            return result

        prefect_cli("work-pool", "create", "test-pool", "--type", "process")
        prefect_cli("deploy", "--prefect-file", str(prefect_file), "--all")
        with worker_log.open("w") as log:
            worker = subprocess.Popen(
                [*prefect, "worker", "start", "--pool", "test-pool", "--type", "process"],
                env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        run = subprocess.run(
            [*prefect, "deployment", "run", "gembatch-embed/nightly-embed", "--watch", "--watch-interval", "1",
             "--watch-timeout", "75"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert run.returncode == 0 and "Completed" in run.stdout, (
            f"{run.stdout}\n{run.stderr}\nworker log:\n{worker_log.read_text()[-4000:]}"
        )
    finally:
        _stop(worker)
        _stop(server)

    assert_vectors_match(read_output(out), TEXTS)
    (path,) = (out / "_runs").glob("*.json")
    doc = json.loads(path.read_text())
    assert doc["status"] == "completed" and doc["flow_run_id"]
    assert doc["counts"]["succeeded"] == len(TEXTS) and doc["requests"]["sent"] == 3  # chunks of 3, 3, 1
    assert_balanced(doc)
    # The deployment's nested options reached the run, and its metadata records them flat, as before.
    assert doc["parameters"]["base_url"] == emulator.base_url and doc["parameters"]["rpm"] == 1500
    assert doc["parameters"]["max_concurrency"] == 16 and doc["parameters"]["model"] == "gemini-embedding-001"
    assert "options" not in doc["parameters"] and "progress" not in doc["parameters"]
