"""Benchmark `gembatch embed` against the emulator in a separate process.

    uv run python benchmarks/bench_embed.py --rows 100000
    uv run python benchmarks/bench_embed.py --rows 20000 --rpm 600 --latency 0.1

Prints rows/s, requests/s, peak RSS of the `gembatch embed` process, 429s, and with --rpm the run's
wall time against the physical floor: rows / batch size / rpm minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

KEY_ENV = "GEMBATCH_BENCH_KEY"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rpm", type=float, default=None, help="client --rpm, and the emulator's limit")
    parser.add_argument("--emulator-rpm", type=int, default=None, help="emulator limit if not --rpm")
    parser.add_argument("--latency", type=float, default=0.0, help="emulator latency per request (s)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--chunk-size", type=int, default=2000)
    parser.add_argument("--max-concurrency", type=int, default=None, help="default: automatic")
    parser.add_argument("--dimensions", type=int, default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gembatch-bench-"))
    corpus, out = work / "corpus.parquet", work / "out"
    make_corpus(corpus, args.rows)
    port, key = free_port(), "bench-key"
    env = {**os.environ, KEY_ENV: key}
    emu_cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "emulator",
        "--port",
        str(port),
        "--api-key-env",
        KEY_ENV,
        "--latency",
        str(args.latency),
    ]
    emulator_rpm = int(args.rpm) if args.rpm else args.emulator_rpm
    if emulator_rpm:
        emu_cmd += ["--rpm", str(emulator_rpm)]
    emulator = subprocess.Popen(emu_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}/v1beta/openai/"
    try:
        wait_up(base_url, key)
        cmd = [
            sys.executable,
            "-m",
            "flows.cli",
            "embed",
            str(corpus),
            "--output",
            str(out),
            "--base-url",
            base_url,
            "--api-key-env",
            KEY_ENV,
            "--batch-size",
            str(args.batch_size),
            "--chunk-size",
            str(args.chunk_size),
            "--no-progress",
        ]
        if args.rpm:
            cmd += ["--rpm", str(args.rpm)]
        if args.max_concurrency:
            cmd += ["--max-concurrency", str(args.max_concurrency)]
        if args.dimensions:
            cmd += ["--dimensions", str(args.dimensions)]
        started = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output = proc.stdout.read().decode()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - started
        if status != 0:
            raise SystemExit(f"gembatch embed failed:\n{output}")
        (run,) = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    finally:
        emulator.terminate()
        emulator.wait()
    requests = run["requests"]["sent"]
    run_s = run["duration_s"]
    print(
        f"rows {args.rows:,}  batch {args.batch_size}  rpm {args.rpm}  latency {args.latency}s  "
        f"dims {args.dimensions or 3072}"
    )
    print(f"run status            {run['status']}  (counts {run['counts']})")
    print(f"run time (flow run)   {run_s:.2f} s   (whole command incl. Prefect start-up: {wall:.2f} s)")
    print(f"rows/s                {args.rows / run_s:,.0f}")
    print(f"requests/s            {requests / run_s:,.1f}  ({requests} requests)")
    print(f"429 responses         {run['requests']['rate_limited_429']}")
    print(f"peak RSS              {usage.ru_maxrss / 1024:,.0f} MiB  (the gembatch embed process)")
    if args.rpm:
        floor_s = args.rows / args.batch_size / args.rpm * 60
        print(f"physical floor        {floor_s:.2f} s  -> run time is {100 * (run_s / floor_s - 1):+.1f}% over it")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
