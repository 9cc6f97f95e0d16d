"""What does --stream cost, and what does it buy?

    uv run python benchmarks/bench_stream.py    # 3,000 rows at --rpm 3000, latency 0.5 s, 20 ms between chunks
    uv run python benchmarks/bench_stream.py --rows 20000 --latency 1 --chunk-delay 0.05 --stall-rate 0.01

Runs `gembatch generate` (the real command, in a subprocess) twice over the same generated rows against
the emulator in another process: plain, then with --stream. Prints the run time, rows/s, time to first
token (from _runs/), retries, and the peak RSS of the gembatch process. With --stall-rate, that share of
streamed replies stalls after their first chunks: the plain run has no such fault (it can't: a plain
reply is one body), the streamed run recovers each stall after --idle-timeout instead of --timeout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from _common import KEY, KEY_ENV, configure, emulator, only_run, run_measured  # noqa: E402


def make_rows(path: Path, rows: int) -> None:
    reviews = [
        f"Review {i}: the {('kettle', 'stove', 'lamp', 'grinder')[i % 4]} arrived on day {i % 28 + 1}, works well, "
        f"but part {i * 37 % 1000:03d} rattles after {i % 9 + 1} weeks of daily use."
        for i in range(rows)
    ]
    pq.write_table(pa.table({"id": pa.array(range(rows), pa.int64()), "review": reviews}), path)


def run_once(args: argparse.Namespace, stream: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix="gembatch-stream-"))
    source, out = work / "in.parquet", work / "out"
    make_rows(source, args.rows)
    env = {**os.environ, KEY_ENV: KEY}
    try:
        with emulator(env, "--latency", str(args.latency)) as emu:
            configure(
                emu.host,
                KEY,
                {
                    "stream_chunk_delay_seconds": args.chunk_delay,
                    "stream_fault_rate_stall": args.stall_rate,
                    "hang_seconds": 3600,
                },
            )
            cmd = [sys.executable, "-m", "flows.cli", "generate", str(source), "-o", str(out)]
            cmd += ["--base-url", emu.base_url, "--api-key-env", KEY_ENV, "--no-progress"]
            cmd += ["--prompt", "Summarise in one line: {review}"]
            cmd += ["--rpm", str(args.rpm), "--timeout", str(args.timeout), "--idle-timeout", str(args.idle_timeout)]
            if stream:
                cmd.append("--stream")
            measured = run_measured(cmd, env)
            run = only_run(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall = measured.wall_s
    first = run.get("streaming", {}).get("first_token", {})
    return {
        "mode": "stream" if stream else "plain",
        "rows": args.rows,
        "status": run["status"],
        "ok": run["counts"]["succeeded"],
        "run_s": run["duration_s"],
        "wall_s": round(wall, 1),
        "rows_per_s": round(args.rows / run["duration_s"], 1),
        "retries": run["requests"]["retries"],
        "ttft_p50_s": first.get("p50_s"),
        "ttft_p95_s": first.get("p95_s"),
        "peak_rss_mib": round(measured.peak_rss_mib),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--rpm", type=float, default=3000, help="the client's --rpm")
    parser.add_argument("--latency", type=float, default=0.5, help="emulator latency before the first byte (s)")
    parser.add_argument("--chunk-delay", type=float, default=0.02, help="seconds between streamed chunks")
    parser.add_argument("--stall-rate", type=float, default=0.0, help="share of streamed replies that stall")
    parser.add_argument("--timeout", type=float, default=60.0, help="the client's --timeout")
    parser.add_argument("--idle-timeout", type=float, default=2.0, help="the client's --idle-timeout")
    args = parser.parse_args()
    for n, stream in enumerate((False, True)):
        result = run_once(args, stream)
        if n == 0:
            print(" | ".join(result), flush=True)
        print(" | ".join(str(v) for v in result.values()), flush=True)


if __name__ == "__main__":
    main()
