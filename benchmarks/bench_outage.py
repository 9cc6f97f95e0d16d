"""An outage scenario: `gembatch embed` while the provider goes down for minutes, then comes back.

    uv run python benchmarks/bench_outage.py                       # 3,000 rows, --rpm 600, 240 s outage 15 s in
    uv run python benchmarks/bench_outage.py --outage-for 60 --max-outage 30   # a stop, then a plain rerun

The emulator runs in its own process; 15 s after the first embedding request arrives, every POST is
answered 500 or 503 (switched through the emulator's admin route, /_emulator/config) until the outage
ends. Prints the rows in _errors/, the requests the server saw while it was down, the run's status
and time, and the outage facts from the run metadata. When the run stops (`--max-outage` shorter than
the outage), a plain rerun follows and must finish every row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
from _common import KEY, KEY_ENV, configure, emulator, make_corpus
from _common import emulator_stats as stats

DOWN = {"fault_rate_500": 0.5, "fault_rate_503": 0.5}
UP = {"fault_rate_500": 0.0, "fault_rate_503": 0.0}


def embeddings_seen(root: str) -> int:
    return stats(root)["by_route"]["embeddings"]


def rows_in(folder: Path) -> int:
    return sum(pq.read_metadata(p).num_rows for p in folder.glob("part-*.parquet")) if folder.exists() else 0


def read_runs(out: Path) -> list[dict]:
    docs = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    return sorted(docs, key=lambda d: d["started_at"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--rpm", type=float, default=600)
    parser.add_argument("--batch-size", type=int, default=10, help="texts per request (10: the run lasts ~30 s)")
    parser.add_argument("--latency", type=float, default=0.2, help="emulator latency per request (s)")
    parser.add_argument("--outage-at", type=float, default=15.0, help="seconds after the first request")
    parser.add_argument("--outage-for", type=float, default=240.0)
    parser.add_argument("--max-outage", type=float, default=None, help="gembatch --max-outage (default: its own)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gembatch-outage-"))
    corpus, out = work / "corpus.parquet", work / "out"
    make_corpus(corpus, args.rows)
    key = KEY
    env = {**os.environ, KEY_ENV: key}
    with emulator(env, "--latency", str(args.latency), "--rpm", str(int(args.rpm))) as emu:
        root, base_url = emu.host, emu.base_url
        cmd = [sys.executable, "-m", "flows.cli", "embed", str(corpus), "--output", str(out), "--base-url", base_url]
        cmd += ["--api-key-env", KEY_ENV, "--batch-size", str(args.batch_size), "--rpm", str(args.rpm), "--no-progress"]
        if args.max_outage is not None:
            cmd += ["--max-outage", str(args.max_outage)]
        outage: dict = {}
        stop = threading.Event()

        def schedule() -> None:
            while embeddings_seen(root) == 0 and not stop.is_set():
                time.sleep(0.05)
            if stop.wait(args.outage_at):
                return
            outage["requests_at_start"] = embeddings_seen(root)
            configure(root, key, DOWN)
            outage["began"] = time.monotonic()
            stop.wait(args.outage_for)
            outage["requests_at_end"] = embeddings_seen(root)
            configure(root, key, UP)
            outage["ended"] = time.monotonic()

        timer = threading.Thread(target=schedule, daemon=True)
        timer.start()
        started = time.monotonic()
        first = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.monotonic() - started
        if "ended" not in outage and "began" in outage:
            # The run stopped before the outage ended (--max-outage): let the outage run its course.
            timer.join()
        stop.set()
        timer.join(timeout=10)
        runs = read_runs(out) if (out / "_runs").exists() else []
        if len(runs) != 1:
            raise SystemExit(f"gembatch embed wrote no run (exit {first.returncode}):\n{first.stdout}\n{first.stderr}")
        (run,) = runs
        errors = sum(pq.read_metadata(p).num_rows for p in (out / "_errors").glob("*.parquet"))
        rerun = None
        if run["status"] != "completed":
            rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
            runs = read_runs(out)

    down = outage.get("requests_at_end", 0) - outage.get("requests_at_start", 0)
    print(
        f"rows {args.rows:,}  batch {args.batch_size}  --rpm {args.rpm:g}  latency {args.latency}s  "
        f"outage {args.outage_for:g} s from {args.outage_at:g} s after the first request"
    )
    print(f"status                {run['status']}  (exit code {first.returncode})")
    print(f"counts                {run['counts']}")
    print(f"requests before the outage       {outage.get('requests_at_start')}")
    print(f"rows in _errors/      {errors}")
    print(f"requests while down   {down}  (the server saw {embeddings_seen_total(runs)} requests in all)")
    print(f"outage facts          {run['outage']}")
    print(f"run time              {run['duration_s']:.1f} s   (whole command incl. Prefect start-up: {wall:.1f} s)")
    print(f"requests / retries    {run['requests']['sent']} / {run['requests']['retries']}")
    if rerun is not None:
        last = runs[-1]
        print(f"plain rerun           {last['status']} (exit {rerun.returncode}), counts {last['counts']}")
        print(f"rows in the output    {rows_in(out)} of {args.rows}")
    shutil.rmtree(work, ignore_errors=True)


def embeddings_seen_total(runs: list[dict]) -> int:
    return sum(r["requests"]["sent"] for r in runs)


if __name__ == "__main__":
    main()
