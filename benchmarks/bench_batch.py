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
import sys
import tempfile
from pathlib import Path

from _common import KEY, KEY_ENV, emulator, make_corpus, only_run, run_measured


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
    env = {**os.environ, KEY_ENV: KEY}
    with emulator(env) as emu:
        cmd = [
            sys.executable, "-m", "flows.cli", "embed", str(corpus), "--output", str(out),
            "--base-url", emu.base_url, "--api-key-env", KEY_ENV, "--dimensions", str(args.dimensions),
            "--chunk-size", str(args.chunk_size), "--mode", args.mode, "--batch-poll", "1",
            "--batch-max-requests", str(args.batch_max_requests), "--no-progress",
        ]  # fmt: skip
        measured = run_measured(cmd, env)
        wall = measured.wall_s
        run = only_run(out)
        records = [json.loads(p.read_text()) for p in sorted((out / "_batches").glob("*.json"))]
    batches = run.get("batches") or {}
    print(f"rows {args.rows:,}  mode {args.mode}  dims {args.dimensions}  chunk {args.chunk_size}")
    print(f"run status            {run['status']}  (counts {run['counts']})")
    print(f"run time              {run['duration_s']:.2f} s   (whole command: {wall:.2f} s)")
    print(f"batches               {batches.get('batches_created', 0)} created, requests {run['requests']['sent']}")
    print(
        f"uploaded              {sum(r.get('request_bytes') or 0 for r in records) / 2**20:,.1f} MiB of request lines"
    )
    print(f"estimated cost        {run['cost']['estimated_usd']} USD")
    print(f"peak RSS              {measured.peak_rss_mib:,.0f} MiB  (the gembatch embed process)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
