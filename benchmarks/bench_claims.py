"""One, two and three `gembatch embed` runs at once on one output, and what a claim costs.

    uv run python benchmarks/bench_claims.py                 # 20,000 rows, latency 0.5 s, 1-3 runs at once
    uv run python benchmarks/bench_claims.py --rows 5000 --runs 1 2
    uv run python benchmarks/bench_claims.py --mode batch --runs 1 2   # the same through the batch API

For each count of runs: a fresh output, that many identical commands started together against one
emulator (its own process), and then the requests the emulator answered, the rows in the table
(distinct ids), the wall time until the last run ended, each run's chunks left to another and time
spent waiting at the end, and each run's peak RSS. Every count must show requests = rows / batch and
inputs = rows. With ``--mode batch`` the runs submit batches (every files/batches request slowed to
``--batch-request-s``, every batch taking ``--batch-s``, so that the runs' submissions overlap) and
the requests are the batch lines the emulator created.

Then the cost a claim adds to every chunk on local disk, alone on the folder: take the claim, look for
parts other runs wrote (listing an output that already holds ``--parts`` parts), release.
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

import pyarrow as pa
import pyarrow.parquet as pq
from _common import KEY, KEY_ENV, configure, emulator, make_corpus
from _common import emulator_stats as stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.engine.plan.claims import ClaimBook, chunk_key  # noqa: E402
from tasks.engine.store.output import OutputStore  # noqa: E402


def run_together(cmd: list[str], runs: int, env: dict) -> tuple[float, list[tuple[int, int, str]]]:
    """Start ``runs`` copies of ``cmd`` at once; (wall seconds, [(exit code, peak RSS KiB, output)])."""
    started = time.monotonic()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(runs)]
    done = []
    for proc in procs:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.append((proc.returncode, usage.ru_maxrss, proc.stdout.read().decode()))
    return time.monotonic() - started, done


def claim_cost(work: Path, parts: int, rounds: int) -> float:
    """Milliseconds a chunk spends on its claim when nobody else works on the folder."""
    out = work / "claim-cost"
    store = OutputStore(str(out))
    store.prepare()
    table = pa.table({"id": pa.array([0], pa.int64()), "content_hash": ["0" * 64]})
    for i in range(parts):
        pq.write_table(table, out / f"part-{i:06d}.parquet")
    index = store.scan("id")
    claims = ClaimBook(store.fs, store.root, "bench-run")
    claims.start()
    try:
        started = time.perf_counter()
        for n in range(rounds):
            key = chunk_key([n], [f"{n:064x}"])
            assert claims.acquire(key) is None
            store.read_new_parts({*index.parts, *index.error_parts}, "id").add_to(index)
            claims.release(key)
        return (time.perf_counter() - started) / rounds * 1000
    finally:
        claims.stop()


def _docs(out: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")), key=lambda d: d["started_at"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--latency", type=float, default=0.5, help="emulator latency per request (s)")
    parser.add_argument("--parts", type=int, default=1000, help="parts in the output for the claim-cost figure")
    parser.add_argument("--mode", choices=("live", "batch"), default="live")
    parser.add_argument("--batch-max-requests", type=int, default=20, help="--mode batch: lines per batch")
    parser.add_argument("--batch-request-s", type=float, default=0.2, help="--mode batch: each files/batches call")
    parser.add_argument("--batch-s", type=float, default=5.0, help="--mode batch: each batch's processing time")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gembatch-claims-"))
    corpus = work / "corpus.parquet"
    make_corpus(corpus, args.rows)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env[KEY_ENV] = KEY
    print(
        f"rows {args.rows:,}  batch {args.batch_size}  chunk {args.chunk_size}  --max-concurrency "
        f"{args.max_concurrency}  latency {args.latency}s  mode {args.mode}  load average {os.getloadavg()[0]:.1f}"
    )
    with emulator(env, "--latency", str(args.latency)) as emu:
        root = emu.host
        if args.mode == "batch":
            configure(root, KEY, {"batch_request_seconds": args.batch_request_s, "batch_seconds": args.batch_s})
        for runs in args.runs:
            out = work / f"out-{runs}"
            cmd = [sys.executable, "-m", "flows.cli", "embed", str(corpus), "--output", str(out)]
            cmd += ["--base-url", root + "v1beta/openai/", "--api-key-env", KEY_ENV, "--no-progress"]
            cmd += ["--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size)]
            cmd += ["--max-concurrency", str(args.max_concurrency)]
            if args.mode == "batch":
                cmd += ["--mode", "batch", "--batch-poll", "1", "--batch-max-requests", str(args.batch_max_requests)]
            before = stats(root)
            wall, done = run_together(cmd, runs, env)
            after = stats(root)
            if args.mode == "batch":
                requests = sum(d["batches"]["requests_submitted"] for d in _docs(out))
            else:
                requests = after["by_route"]["embeddings"] - before["by_route"]["embeddings"]
            inputs = after["embedding_inputs"] - before["embedding_inputs"]
            for code, _rss, text in done:
                if code != 0:
                    raise SystemExit(f"a run failed (exit {code}):\n{text}")
            ids = pa.concat_tables(pq.read_table(p, columns=["id"]) for p in out.glob("part-*.parquet"))["id"]
            docs = _docs(out)
            per_run = ", ".join(
                f"[{d['counts']['succeeded']} sent, {d['claims']['declined_chunks']} chunks left to another, "
                f"waited {d['claims']['waited_s']:.1f} s, compaction {d['output']['compaction'][:20]!r}]"
                if "claims" in d  # a version before claims (run from its checkout for comparison)
                else f"[{d['counts']['succeeded']} sent]"
                for d in docs
            )
            rss = ", ".join(f"{r // 1024} MiB" for _c, r, _t in done)
            print(
                f"{runs} run(s): wall {wall:.1f} s  requests {requests} (rows/batch = {args.rows // args.batch_size})  "
                f"inputs {inputs}  "
                f"table {len(ids)} rows, {len(set(ids.to_pylist()))} distinct ids  peak RSS {rss}"
            )
            print(f"    {per_run}")
    for parts in (0, args.parts):
        print(f"claim per chunk, alone, output with {parts} parts: {claim_cost(work / str(parts), parts, 200):.2f} ms")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
