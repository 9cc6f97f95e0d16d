"""Benchmark `gembatch embed` against the emulator in a separate process.

    uv run python benchmarks/bench_embed.py --rows 100000
    uv run python benchmarks/bench_embed.py --rows 20000 --rpm 600 --latency 0.1

Prints rows/s, requests/s, peak RSS of the `gembatch embed` process, 429s, and with --rpm the run's
wall time against the physical floor: rows / batch size / rpm minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import KEY, KEY_ENV, emulator, make_corpus, only_run, run_measured  # noqa: E402


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
    env = {**os.environ, KEY_ENV: KEY}
    emu_args = ["--latency", str(args.latency)]
    emulator_rpm = int(args.rpm) if args.rpm else args.emulator_rpm
    if emulator_rpm:
        emu_args += ["--rpm", str(emulator_rpm)]
    with emulator(env, *emu_args) as emu:
        cmd = [
            sys.executable,
            "-m",
            "flows.cli",
            "embed",
            str(corpus),
            "--output",
            str(out),
            "--base-url",
            emu.base_url,
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
        measured = run_measured(cmd, env)
        run = only_run(out)
    wall = measured.wall_s
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
    print(f"peak RSS              {measured.peak_rss_mib:,.0f} MiB  (the gembatch embed process)")
    if args.rpm:
        floor_s = args.rows / args.batch_size / args.rpm * 60
        print(f"physical floor        {floor_s:.2f} s  -> run time is {100 * (run_s / floor_s - 1):+.1f}% over it")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
