"""`prefect server start` and `prefect worker start` as processes of their own, for tests and benchmarks.

Each gets its own PREFECT_HOME and port through its environment (:func:`prefect_env`), so nothing of
the caller's Prefect settings leaks in. Tests import it by name (pytest puts tests/ on the path);
benchmarks put tests/ on ``sys.path`` first. It imports nothing of conftest (which resets PREFECT_HOME
when imported).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PREFECT = [sys.executable, "-m", "prefect", "--no-prompt"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    """This environment without any PREFECT_ setting, then a server of its own at ``port`` and home
    ``home``; workers ask it for work every second. ``extra``: more variables (a key, worker settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url(port),
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "GEMBATCH_HOME": str(REPO),
        **extra,
    }
    return env


def api_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


def start_server(env: dict[str, str], cwd: Path, log: Path, *, timeout: float = 60) -> subprocess.Popen:
    """`prefect server start` on the environment's port, its output in ``log``; returns once healthy."""
    port = env["PREFECT_SERVER_API_PORT"]
    with log.open("w") as f:
        server = subprocess.Popen(
            [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port, "--no-ui"],
            env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_healthy(env["PREFECT_API_URL"], server, log, timeout=timeout)
    except BaseException:
        stop(server)
        raise
    return server


def wait_healthy(api: str, server: subprocess.Popen, log: Path, *, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
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
    raise AssertionError(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def start_worker(env: dict[str, str], pool: str, cwd: Path, log: Path, *args: str) -> subprocess.Popen:
    """`prefect worker start --pool POOL [ARGS]` in a session of its own, its output in ``log``."""
    with log.open("w") as f:
        return subprocess.Popen(
            [*PREFECT, "worker", "start", "--pool", pool, *args],
            env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def prefect_cli(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`prefect ARGS` against the environment's server; a failure raises with its output."""
    result = subprocess.run([*PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def stop(process: subprocess.Popen | None, *, timeout: float = 15) -> None:
    """Stop a process the caller started, and its children (its own session), by its id."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
