"""Memory and speed of `gembatch embed` at corpus scale: a first run and its rerun.

    uv run python benchmarks/bench_scale.py --rows 3                 # the baseline
    uv run python benchmarks/bench_scale.py --rows 1000000
    uv run python benchmarks/bench_scale.py --rows 10000000 --keep   # ~20+ minutes on 2 cores

The corpus (unique ~200-character texts, int64 ids) is generated on the fly into a temporary folder
in blocks of 500,000 rows, never committed. The emulator runs in its own process without limits or
latency; `--dimensions 64` by default so that the vectors don't dominate. For each run it prints the
flow run's time, rows/s (first run: rows embedded per second; rerun: rows checked per second, i.e.
input rows / run time — the rerun hashes every row and sends nothing) and the peak RSS
(ru_maxrss) of the `gembatch embed` process.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import KEY, KEY_ENV, WORDS, emulator  # noqa: E402

BLOCK_ROWS = 500_000
CHAT_MODEL = "gemini-3.8-flash"


def make_corpus(path: Path, rows: int, *, revise: int = 0, short: bool = False) -> None:
    """Unique ~200-character texts (``short``: ~50, for extract), written block by block (10M rows never
    sit in memory). ``revise``: that many rows, spread evenly, get a changed text (for a superseding run)."""
    step = max(1, rows // revise) if revise else 0
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for lo in range(0, max(rows, 1), BLOCK_ROWS):
            hi = min(rows, lo + BLOCK_ROWS)
            if short:
                texts = [
                    f"Invoice {i:09d} from {WORDS[i % 20]} & {WORDS[(i // 20) % 20]}: {i * 31 % 997} EUR"
                    for i in range(lo, hi)
                ]
                writer.write_table(pa.table({"id": pa.array(range(lo, hi), pa.int64()), "text": texts}, schema=schema))
                continue
            texts = [
                f"Passage {i}: the {WORDS[i % 20]} near the {WORDS[(i // 20) % 20]} tells of the "
                f"{WORDS[(i * 7) % 20]} and the {WORDS[(i // 400) % 20]}, {i * 31 % 997} times over; a "
                f"{WORDS[(i * 3) % 20]} keeps the {WORDS[(i * 11) % 20]} of the {WORDS[(i * 13) % 20]} "
                f"until the {WORDS[(i // 8000) % 20]} comes back. {i:012d}"
                + (" (revised)" if step and i % step == 0 and i // step < revise else "")
                for i in range(lo, hi)
            ]
            writer.write_table(pa.table({"id": pa.array(range(lo, hi), pa.int64()), "text": texts}, schema=schema))


INVOICE = {
    "invoice_number": "A-1",
    "vendor": "ACME",
    "customer": None,
    "invoice_date": "2024-01-02",
    "due_date": None,
    "currency": "EUR",
    "line_items": [],
    "total": "1.00",
}


def make_output(corpus: Path, out: Path, dimensions: int, chunk_size: int, job_name: str = "embed") -> None:
    """What a finished first run leaves (one part per chunk, the same content hashes; zero vectors, or
    one fixed invoice for extract), written directly: a rerun of 10M rows can then be measured without
    the long first run."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from schemas.examples import Invoice
    from tasks.engine.plan.rows import prepare_chunk
    from tasks.engine.store.output import OutputStore
    from tasks.jobs.embed import EmbedJob
    from tasks.jobs.extract import ExtractJob

    if job_name == "extract":
        job = ExtractJob(model=CHAT_MODEL, schema=Invoice)
        row = job.mapping.row(Invoice.model_validate(INVOICE))
        results = pa.table(job.mapping.arrays([row] * chunk_size))
    else:
        job = EmbedJob(model="gemini-embedding-001", dimensions=dimensions)
        zeros = pa.array(np.zeros(chunk_size * dimensions, np.float32))
        results = pa.table({"embedding": pa.FixedSizeListArray.from_arrays(zeros, dimensions)})
    store = OutputStore(str(out))
    store.prepare()
    store.claim(job=job.name, model=job.model, run_id="synthetic", force=False)
    for batch in pq.ParquetFile(corpus).iter_batches(batch_size=chunk_size, columns=["id", "text"]):
        chunk = pa.Table.from_batches([batch])
        ready = prepare_chunk(job, chunk)
        columns = results.slice(0, chunk.num_rows)
        table = pa.table(
            {
                "id": chunk.column("id"),
                **{name: columns.column(name) for name in columns.column_names},
                "content_hash": pa.array(ready.hashes, pa.string()),
                "model": pa.array([job.model] * chunk.num_rows, pa.string()),
            }
        )
        store.write_part(table, errors=False, run_id="synthetic", id_col="id")


def make_output_elsewhere(corpus: Path, out: Path, dimensions: int, chunk_size: int, job_name: str) -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; import bench_scale as b; "
        "b.make_output(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])"
    )
    here = str(Path(__file__).resolve().parent)
    args = [here, str(corpus), str(out), str(dimensions), str(chunk_size), job_name]
    subprocess.run([sys.executable, "-c", code, *args], check=True)


def make_corpus_elsewhere(path: Path, rows: int, *, revise: int = 0, short: bool = False) -> None:
    """make_corpus in a child process. The peak RSS a parent reads from wait4() includes the parent's
    own peak at the time it spawned the child (Linux carries the old address space's high-water mark
    across exec): a parent that had built the corpus itself would inflate every figure."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; import bench_scale as b; "
        "b.make_corpus(Path(sys.argv[2]), int(sys.argv[3]), revise=int(sys.argv[4]), short=sys.argv[5] == '1')"
    )
    here = str(Path(__file__).resolve().parent)
    subprocess.run([sys.executable, "-c", code, here, str(path), str(rows), str(revise), str(int(short))], check=True)


def run_embed(
    corpus: Path, out: Path, base_url: str, env: dict, args: argparse.Namespace, label: str, *, dry: bool = False
) -> dict:
    """Run `gembatch embed` (or extract) and wait, sampling its peak RSS (VmHWM) and CPU every half second: a run
    stopped at ``--deadline`` (SIGINT: it writes its metadata as "interrupted") still has its figures."""
    cmd = [
        sys.executable, "-m", "flows.cli", args.job, str(corpus), "--output", str(out),
        "--base-url", base_url, "--api-key-env", KEY_ENV, "--no-progress", "--chunk-size", str(args.chunk_size),
    ]  # fmt: skip
    if args.job == "extract":
        cmd += ["--schema", "schemas.examples:Invoice", "--model", CHAT_MODEL, "--schema-dialect", "gemini"]
    else:
        cmd += ["--dimensions", str(args.dimensions)]
    if dry:
        cmd.append("--dry-run")
    before = {p.name for p in (out / "_runs").glob("*.json")} if (out / "_runs").exists() else set()
    started = time.monotonic()
    log = out.parent / f"{label}.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        hwm, stopped, last_note, own_cpu = 0, False, started, 0.0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            hwm = max(hwm, _vm_hwm_kib(proc.pid))
            own_cpu = _cpu_s(proc.pid) or own_cpu
            now = time.monotonic()
            if args.deadline and not stopped and time.time() >= args.deadline:
                proc.send_signal(signal.SIGINT)
                stopped = True
            if now - last_note >= 60:
                parts = sum(1 for _ in out.glob("part-*.parquet"))
                print(
                    f"  … {label}: {now - started:6.0f} s, {parts:,} parts, peak RSS so far {hwm / 1024:,.0f} MiB",
                    flush=True,
                )
                last_note = now
            time.sleep(0.5)
    wall = time.monotonic() - started
    if status != 0 and not stopped:
        raise SystemExit(f"gembatch {args.job} failed:\n{log.read_text()[-4000:]}")
    if dry:  # no _runs/ record: the command's own time
        run = {"status": "dry run", "duration_s": wall, "requests": {"sent": 0}, "counts": {}}
        print(log.read_text()[-1500:], flush=True)
    else:
        (new,) = [p for p in (out / "_runs").glob("*.json") if p.name not in before]
        run = json.loads(new.read_text())
    cpu = usage.ru_utime + usage.ru_stime
    # cpu_s: the command's and its child processes' (a rerun hashes in two); own_cpu_s: the command's
    # alone, as last sampled (up to 0.5 s before it ended).
    return {
        "run": run,
        "wall_s": wall,
        "cpu_s": cpu,
        "own_cpu_s": own_cpu,
        "peak_rss_mib": max(usage.ru_maxrss, hwm) / 1024,
    }


def _cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def report(label: str, rows: int, result: dict) -> None:
    run = result["run"]
    c = run["counts"]
    if run["status"] == "dry run":
        print(
            f"{label:<10} dry run    command {result['wall_s']:7.1f} s  {rows / result['wall_s']:>10,.0f} rows/s  "
            f"peak RSS {result['peak_rss_mib']:6,.0f} MiB  CPU {result['cpu_s']:7.1f} s",
            flush=True,
        )
        return
    if run["status"] != "completed":  # stopped at --deadline: the rows it finished
        rows = c["succeeded"] + c["deduplicated"] + c["skipped_done"]
    print(
        f"{label:<10} {run['status']:<10} run {run['duration_s']:8.1f} s  (command {result['wall_s']:7.1f} s)  "
        f"{rows / run['duration_s']:>10,.0f} rows/s  peak RSS {result['peak_rss_mib']:6,.0f} MiB  "
        f"CPU {result['cpu_s']:7.1f} s (own {result['own_cpu_s']:.1f})  sent {run['requests']['sent']:,}  "
        f"succeeded {c['succeeded']:,}  skipped {c['skipped_done']:,}",
        flush=True,
    )
    output = run.get("output", {})
    if output.get("existing_parts"):
        print(
            f"           parts read from the key cache (OUTPUT/_index/): "
            f"{output.get('parts_from_key_cache', 0):,} of {output['existing_parts']:,}",
            flush=True,
        )


def _clock(text: str) -> float:
    """HH:MM today (UTC) as a Unix time."""
    hours, minutes = (int(x) for x in text.split(":"))
    now = time.gmtime()
    return calendar.timegm((now.tm_year, now.tm_mon, now.tm_mday, hours, minutes, 0, 0, 0, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--job", choices=["embed", "extract"], default="embed", help="extract: ~50-character texts")
    parser.add_argument("--dry-run", action="store_true", help="also time `--dry-run` (before the rerun)")
    parser.add_argument("--dimensions", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=2000)
    parser.add_argument("--no-rerun", action="store_true")
    parser.add_argument(
        "--synthetic-first-run",
        action="store_true",
        help="write the first run's parts directly (same hashes, zero vectors) and measure the rerun",
    )
    parser.add_argument("--supersede", type=int, default=0, help="then change N texts and run again")
    parser.add_argument(
        "--work", default=None, help="folder for corpus and output, kept (default: a temp dir, removed unless --keep)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the corpus and output")
    parser.add_argument(
        "--reuse", action="store_true", help="rerun over the corpus and output left in --work (kept: implies --keep)"
    )
    parser.add_argument(
        "--deadline", type=_clock, default=None, help="HH:MM (UTC): stop a run still going then and report it"
    )
    args = parser.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gembatch-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus, out = work / "corpus.parquet", work / "out"
    t = time.monotonic()
    reuse = args.reuse and corpus.exists() and (out / "_runs").exists()
    if not reuse:
        make_corpus_elsewhere(corpus, args.rows, short=args.job == "extract")
    size_mib = corpus.stat().st_size / 2**20
    print(f"corpus    {args.rows:,} rows, {size_mib:,.0f} MiB, made in {time.monotonic() - t:.1f} s", flush=True)
    # Prefect's temporary server gets its own home (no lock shared with other runs) and time to start
    # on a busy machine.
    env = {
        **os.environ,
        KEY_ENV: KEY,
        "PREFECT_HOME": str(work / "prefect-home"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
    try:
        with emulator(env) as emu:
            base_url = emu.base_url
            if reuse:
                print("first run  reused: the corpus and output already in --work", flush=True)
            elif args.synthetic_first_run:
                t = time.monotonic()
                make_output_elsewhere(corpus, out, args.dimensions, args.chunk_size, args.job)
                print(f"first run  synthetic: parts written directly in {time.monotonic() - t:.1f} s", flush=True)
            else:
                first = run_embed(corpus, out, base_url, env, args, "first-run")
                report("first run", args.rows, first)
                if first["run"]["status"] != "completed":
                    return
            if args.dry_run:
                report("dry run", args.rows, run_embed(corpus, out, base_url, env, args, "dry-run", dry=True))
            if not args.no_rerun:
                report("rerun", args.rows, run_embed(corpus, out, base_url, env, args, "rerun"))
            if args.supersede:
                make_corpus_elsewhere(corpus, args.rows, revise=args.supersede)
                result = run_embed(corpus, out, base_url, env, args, "supersede")
                report("supersede", args.rows, result)
                print(f"           superseded rows removed: {result['run']['output']['superseded_rows_removed']:,}")
            own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"(this script's own peak RSS: {own:,.0f} MiB; a child's figure can't be below it)")
    finally:
        # A reused folder is never removed: it holds a finished output that took ~30 minutes to make.
        if not args.keep and not args.reuse and not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
