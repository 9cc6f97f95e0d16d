"""What the benchmarks share: the emulator as a process of its own, a `gembatch` command run and
measured (wall time, peak RSS and CPU of its process, from wait4), the emulator's admin routes, and
the text corpus most of them embed.

Benchmarks import it by name: the folder a script runs from is on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

KEY_ENV = "GEMBATCH_BENCH_KEY"
KEY = "bench-key"
WORDS = (
    "river mountain engine market garden signal theory harbor violin forest copper ledger orbit "
    "lantern meadow protein archive canyon festival glacier"
).split()


def make_corpus(path: Path, rows: int) -> None:
    texts = [
        f"Row {i}: the {WORDS[i % 20]} near the {WORDS[(i // 20) % 20]} tells of {WORDS[(i * 7) % 20]} {i * 31 % 997}."
        for i in range(rows)
    ]
    pq.write_table(pa.table({"id": pa.array(range(rows), pa.int64()), "text": texts}), path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, key: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(url + "models", headers={"Authorization": f"Bearer {key}"})
            urllib.request.urlopen(req, timeout=60).read()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the emulator did not come up")


@dataclass(frozen=True)
class Emulator:
    process: subprocess.Popen
    host: str  # http://127.0.0.1:PORT/ (admin routes under it)

    @property
    def base_url(self) -> str:
        return self.host + "v1beta/openai/"


@contextmanager
def emulator(
    env: dict[str, str], *args: str, python: str = sys.executable, cwd: Path | None = None, timeout: float = 120
) -> Iterator[Emulator]:
    """`gembatch emulator ARGS` on a free port, its key from ``env[KEY_ENV]``; stopped on the way out."""
    port = free_port()
    cmd = [python, "-m", "flows.cli", "emulator", "--port", str(port), "--api-key-env", KEY_ENV, *args]
    process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    emu = Emulator(process, f"http://127.0.0.1:{port}/")
    try:
        wait_up(emu.base_url, env[KEY_ENV], timeout=timeout)
        yield emu
    finally:
        process.terminate()
        process.wait()


@dataclass(frozen=True)
class Measured:
    output: str  # stdout and stderr
    wall_s: float
    peak_rss_kib: int  # ru_maxrss of the process
    cpu_s: float  # its user + system time

    @property
    def peak_rss_mib(self) -> float:
        return self.peak_rss_kib / 1024


def run_measured(cmd: list[str], env: dict[str, str], *, cwd: Path | None = None) -> Measured:
    """Run a command to its end; a failure stops the benchmark with its output."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    if status != 0:
        name = " ".join(cmd[2:4]) if cmd[1:2] == ["-m"] else cmd[0]
        raise SystemExit(f"{name.replace('flows.cli', 'gembatch')} failed:\n{output}")
    return Measured(output, wall, usage.ru_maxrss, usage.ru_utime + usage.ru_stime)


def only_run(out: Path) -> dict:
    """The run document of an output one run wrote."""
    (run,) = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    return run


def emulator_stats(host: str) -> dict:
    with urllib.request.urlopen(host + "_emulator/stats", timeout=5) as reply:
        return json.loads(reply.read())


def configure(host: str, key: str, changes: dict) -> None:
    """Change a running emulator's settings (its admin route)."""
    request = urllib.request.Request(
        host + "_emulator/config",
        data=json.dumps(changes).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as reply:
        reply.read()
