"""A deployment from deployments.yaml, run end to end by a real worker: `prefect server start` and
`prefect worker start --type process` as processes of their own, the flow run in the worker's child.

Everything Prefect here lives in this test's own PREFECT_HOME and port (the subprocesses' environment),
apart from the session's ``prefect_test_harness``.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from conftest import REPO, TEST_KEY, TEST_KEY_ENV, assert_balanced, read_output, write_corpus
from servers import PREFECT, free_port, prefect_cli, prefect_env, start_server, start_worker, stop
from test_embed import assert_vectors_match

# Slow tier: a real `prefect server start`, `prefect deploy` and a worker process (about a minute).
pytestmark = pytest.mark.slow

TEXTS = {i: f"worker sentence {i}" for i in range(7)}


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

    port = free_port()
    env = prefect_env(tmp_path / "prefect-home", port, **{TEST_KEY_ENV: TEST_KEY})
    server = worker = None
    try:
        server = start_server(env, tmp_path, tmp_path / "server.log")
        prefect_cli(env, "work-pool", "create", "test-pool", "--type", "process", timeout=120)
        prefect_cli(env, "deploy", "--prefect-file", str(prefect_file), "--all", timeout=120)
        worker_log = tmp_path / "worker.log"
        worker = start_worker(env, "test-pool", tmp_path, worker_log, "--type", "process")
        run = subprocess.run(
            [*PREFECT, "deployment", "run", "gembatch-embed/nightly-embed", "--watch", "--watch-interval", "1",
             "--watch-timeout", "75"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert run.returncode == 0 and "Completed" in run.stdout, (
            f"{run.stdout}\n{run.stderr}\nworker log:\n{worker_log.read_text()[-4000:]}"
        )
    finally:
        stop(worker)
        stop(server)

    assert_vectors_match(read_output(out), TEXTS, model="gemini-embedding-2")  # deployments.yaml's model
    (path,) = (out / "_runs").glob("*.json")
    doc = json.loads(path.read_text())
    assert doc["status"] == "completed" and doc["flow_run_id"]
    assert doc["counts"]["succeeded"] == len(TEXTS) and doc["requests"]["sent"] == 3  # chunks of 3, 3, 1
    assert_balanced(doc)
    # The deployment's nested options reached the run, and its metadata records them flat, as before.
    assert doc["parameters"]["base_url"] == emulator.base_url and doc["parameters"]["rpm"] == 1500
    # nightly-embed declares its quota only: the number in flight follows from the rate and the latency.
    assert doc["parameters"]["tpm"] == 1_000_000 and doc["parameters"]["max_concurrency"] is None
    assert doc["parameters"]["model"] == "gemini-embedding-2"
    assert "options" not in doc["parameters"] and "progress" not in doc["parameters"]
