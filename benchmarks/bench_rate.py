"""Does a run reach the declared rate whatever the latency, without passing it?

    uv run python benchmarks/bench_rate.py extract --latency 1.0          # 3,000 rows at --rpm 3000
    uv run python benchmarks/bench_rate.py extract --latency 0.2 --latency 1 --latency 5
    uv run python benchmarks/bench_rate.py embed                          # 20k rows at --rpm 120

The emulator runs in its own process with the same limit as the client's --rpm (a sliding 60 s window
counted at arrival) and a lognormal latency (mean --latency, sigma --jitter). For each latency it
prints the run time against the floor (requests / rpm minutes), 429s, the busiest 60 s window the
server saw, and the most requests in flight.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from _common import KEY, KEY_ENV, emulator, emulator_stats, make_corpus, only_run  # noqa: E402


def make_texts(path: Path, rows: int) -> None:
    texts = [f"Order {i}: {i % 7 + 1} boxes of SKU-{i * 37 % 1000:03d} for customer C{i % 97}." for i in range(rows)]
    pq.write_table(pa.table({"id": pa.array(range(rows), pa.int64()), "text": texts}), path)


def run_once(job: str, rows: int, rpm: float, latency: float, jitter: float, extra: list[str]) -> dict:
    work = Path(tempfile.mkdtemp(prefix="gembatch-rate-"))
    source, out = work / "in.parquet", work / "out"
    (make_texts if job == "extract" else make_corpus)(source, rows)
    env = {**os.environ, KEY_ENV: KEY}
    try:
        with emulator(env, "--rpm", str(int(rpm)), "--latency", str(latency), "--latency-jitter", str(jitter)) as emu:
            cmd = [sys.executable, "-m", "flows.cli", job, str(source), "-o", str(out), "--base-url", emu.base_url]
            cmd += ["--api-key-env", KEY_ENV, "--rpm", str(rpm), "--no-progress", *extra]
            if job == "extract":
                cmd += ["--schema", "schemas.examples:CalendarEvent"]
            started = time.monotonic()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.monotonic() - started
            if proc.returncode != 0:
                raise SystemExit(f"gembatch {job} failed:\n{proc.stdout}\n{proc.stderr}")
            run = only_run(out)
            stats = emulator_stats(emu.host)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    requests = run["requests"]["sent"]
    floor = requests / rpm * 60
    return {
        "job": job,
        "rows": rows,
        "rpm": rpm,
        "latency": latency,
        "status": run["status"],
        "done": run["counts"]["succeeded"] + run["counts"]["deduplicated"],
        "requests": requests,
        "run_s": run["duration_s"],
        "wall_s": round(wall, 1),
        "floor_s": round(floor, 1),
        "ratio": round(run["duration_s"] / floor, 3),
        "429s": stats["by_status"].get("429", 0),
        "busiest_60s": stats["busiest_window"],
        "max_in_flight": run["limits"]["max_in_flight_seen"],
        "sending_s": round(run["limits"]["last_request_at_s"] - run["limits"]["first_request_at_s"], 2),
        "first_request_at_s": run["limits"]["first_request_at_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=["extract", "embed"])
    parser.add_argument("--rows", type=int, default=None, help="default: 3,000 (extract), 20,000 (embed)")
    parser.add_argument("--rpm", type=float, default=None, help="default: 3000 (extract), 120 (embed)")
    parser.add_argument("--latency", type=float, action="append", help="mean emulator latency (s); repeatable")
    parser.add_argument("--jitter", type=float, default=0.5, help="lognormal sigma of the latency")
    parser.add_argument("extra", nargs="*", help="more gembatch options, after --")
    args = parser.parse_args()
    rows = args.rows or (3000 if args.job == "extract" else 20000)
    rpm = args.rpm or (3000 if args.job == "extract" else 120)
    for n, latency in enumerate(args.latency or [1.0]):
        result = run_once(args.job, rows, rpm, latency, args.jitter, args.extra)
        if n == 0:
            print(" | ".join(result), flush=True)
        print(" | ".join(str(v) for v in result.values()), flush=True)


if __name__ == "__main__":
    main()
