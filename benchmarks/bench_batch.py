"""Benchmark `gembatch embed --mode batch` against the emulator in a separate process.

    uv run python benchmarks/bench_batch.py --rows 100000
    uv run python benchmarks/bench_batch.py --rows 10000 --dimensions 256

Prints the run's wall time, the peak RSS of the `gembatch embed` process (request files are streamed to
disk and uploaded from it, results streamed from the download: memory should not grow with the rows),
the batches made and the bytes uploaded. The emulator answers every batch at its first poll.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_embed import KEY_ENV, free_port, make_corpus, wait_up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dimensions", type=int, default=256, help="shorter vectors keep the download small")
    parser.add_argument("--chunk-size", type=int, default=2000)
    parser.add_argument("--batch-max-requests", type=int, default=50_000)
    parser.add_argument("--mode", default="batch", choices=("batch", "auto", "live"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gembatch-bench-batch-"))
    corpus, out = work / "corpus.parquet", work / "out"
    make_corpus(corpus, args.rows)
    port, key = free_port(), "bench-key"
    env = {**os.environ, KEY_ENV: key}
    emu_cmd = [sys.executable, "-m", "flows.cli", "emulator", "--port", str(port), "--api-key-env", KEY_ENV]
    emulator = subprocess.Popen(emu_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}/v1beta/openai/"
    try:
        wait_up(base_url, key)
        cmd = [
            sys.executable, "-m", "flows.cli", "embed", str(corpus), "--output", str(out),
            "--base-url", base_url, "--api-key-env", KEY_ENV, "--dimensions", str(args.dimensions),
            "--chunk-size", str(args.chunk_size), "--mode", args.mode, "--batch-poll", "1",
            "--batch-max-requests", str(args.batch_max_requests), "--no-progress",
        ]  # fmt: skip
        started = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output = proc.stdout.read().decode()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - started
        if status != 0:
            raise SystemExit(f"gembatch embed failed:\n{output}")
        (run,) = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
        records = [json.loads(p.read_text()) for p in sorted((out / "_batches").glob("*.json"))]
    finally:
        emulator.terminate()
        emulator.wait()
    batches = run.get("batches") or {}
    print(f"rows {args.rows:,}  mode {args.mode}  dims {args.dimensions}  chunk {args.chunk_size}")
    print(f"run status            {run['status']}  (counts {run['counts']})")
    print(f"run time              {run['duration_s']:.2f} s   (whole command: {wall:.2f} s)")
    print(f"batches               {batches.get('batches_created', 0)} created, requests {run['requests']['sent']}")
    print(
        f"uploaded              {sum(r.get('request_bytes') or 0 for r in records) / 2**20:,.1f} MiB of request lines"
    )
    print(f"estimated cost        {run['cost']['estimated_usd']} USD")
    print(f"peak RSS              {usage.ru_maxrss / 1024:,.0f} MiB  (the gembatch embed process)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
