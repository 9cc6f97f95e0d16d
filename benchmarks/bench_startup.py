"""Start-up cost of the `gembatch` command (run by hand; not a test).

    uv run python benchmarks/bench_startup.py              # median of 5 runs each
    uv run python benchmarks/bench_startup.py --repeat 3
    uv run python benchmarks/bench_startup.py --api-url http://127.0.0.1:4200/api   # tracked runs
    git archive REV | tar -x -C /tmp/old && PYTHONPATH=/tmp/old uv run python benchmarks/bench_startup.py
                                                     # another revision's code, same environment

Times, as wall clock of a fresh process each: `gembatch --help`, `gembatch embed --help`, a 3-row
`gembatch embed --provider local` run (a new output folder each time), a `--dry-run` of 20,000 rows, and
a bare `python -c "import openai, pyarrow"` — the floor any command that reads Parquet and talks to an
API pays. Prints the median of each and its ratio to that floor. PREFECT_API_URL is removed from the
environment unless --api-url is given. One untimed warm-up run of each comes first (bytecode caches).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def make_corpus(path: Path, rows: int) -> None:
    texts = [f"start-up benchmark sentence number {i} about the river and the mountain" for i in range(rows)]
    pq.write_table(pa.table({"id": pa.array(range(rows), pa.int64()), "text": texts}), path)


def wall(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each command (the median is shown)")
    parser.add_argument("--api-url", default=None, help="a Prefect API to report to (default: none configured)")
    args = parser.parse_args()

    repo = Path(__file__).resolve().parent.parent
    gembatch = str(Path(sys.executable).with_name("gembatch"))
    work = Path(tempfile.mkdtemp(prefix="gembatch-startup-"))
    small, big, dry = work / "three.parquet", work / "twenty-thousand.parquet", work / "dry"
    make_corpus(small, 3)
    make_corpus(big, 20_000)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    if args.api_url:
        env["PREFECT_API_URL"] = args.api_url
    runs = iter(range(1_000_000))

    def embed_small() -> list[str]:
        out = work / f"out-{next(runs)}"
        return [gembatch, "embed", str(small), "-o", str(out), "--provider", "local", "--no-progress"]

    cases: dict[str, Callable[[], list[str]]] = {
        "python -c 'import openai, pyarrow'": lambda: [sys.executable, "-c", "import openai, pyarrow"],
        "gembatch --help": lambda: [gembatch, "--help"],
        "gembatch embed --help": lambda: [gembatch, "embed", "--help"],
        "gembatch embed (3 rows, --provider local)": embed_small,
        "gembatch embed --dry-run (20,000 rows)": lambda: [gembatch, "embed", str(big), "-o", str(dry), "--dry-run"],
    }
    medians: dict[str, float] = {}
    try:
        for name, make in cases.items():
            wall(make(), env, repo)  # warm-up
            times = [wall(make(), env, repo) for _ in range(args.repeat)]
            medians[name] = statistics.median(times)
            print(f"  {name}: " + ", ".join(f"{t:.2f}" for t in times), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    floor = medians["python -c 'import openai, pyarrow'"]
    mode = f"PREFECT_API_URL={args.api_url}" if args.api_url else "no Prefect API configured"
    print(f"\nmedian of {args.repeat} runs, {os.cpu_count()} CPUs, {mode}\n")
    print(f"| {'command':<45} | {'wall (s)':>8} | {'× import':>8} |")
    print(f"|{'-' * 47}|{'-' * 9}:|{'-' * 9}:|")
    for name, seconds in medians.items():
        print(f"| {name:<45} | {seconds:>8.2f} | {seconds / floor:>8.1f} |")


if __name__ == "__main__":
    main()
