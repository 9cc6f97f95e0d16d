"""`gembatch embed` into a LanceDB table against the same run into a Parquet folder: rows/s and peak RSS.

    uv run python benchmarks/bench_lance.py --rows 1000000          # ~15 minutes on 2 cores
    uv run python benchmarks/bench_lance.py --rows 20000            # a quick look

One corpus (bench_scale.py's unique ~200-character passages), the emulator in a process of its own (no
limits, no latency), `--dimensions 64`. It runs, each in a fresh output: a 3-row run into a table (the
RSS baseline) and into a folder, the N-row first run into a folder, the same into a table, then a
rerun of the table after 1% of the texts changed (with --delete-missing and 10 ids gone), and one more
with --keep-text (the table made again with the text column, no request). Rows/s is
rows / (the run's ``duration_s`` + the table update's ``sync_s``, which happens after the run's own
clock stops); peak RSS is the `gembatch` process's (VmHWM sampled, and ru_maxrss).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import KEY, KEY_ENV, emulator  # noqa: E402
from bench_scale import _vm_hwm_kib, make_corpus_elsewhere  # noqa: E402


def run(
    src: Path, output: str, runs_dir: Path, base_url: str, env: dict, args: argparse.Namespace, *extra: str
) -> dict:
    cmd = [
        sys.executable, "-m", "flows.cli", "embed", str(src), "--output", output, "--base-url", base_url,
        "--api-key-env", KEY_ENV, "--no-progress", "--chunk-size", str(args.chunk_size),
        "--dimensions", str(args.dimensions), *extra,
    ]  # fmt: skip
    before = {p.name for p in runs_dir.glob("*.json")} if runs_dir.exists() else set()
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    hwm = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        hwm = max(hwm, _vm_hwm_kib(proc.pid))
        time.sleep(0.25)
    wall = time.monotonic() - started
    printed = proc.stdout.read().decode()
    if status != 0:
        raise SystemExit(f"gembatch embed failed:\n{printed[-4000:]}")
    (new,) = [p for p in runs_dir.glob("*.json") if p.name not in before]
    document = json.loads(new.read_text())
    table = document["output"].get("table", {})
    seconds = document["duration_s"] + table.get("sync_s", 0.0)
    return {
        "doc": document,
        "wall_s": wall,
        "seconds": seconds,
        "rss_mib": max(usage.ru_maxrss, hwm) / 1024,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def report(label: str, rows: int, result: dict, baseline: float | None = None) -> None:
    table = result["doc"]["output"].get("table")
    ratio = f" ({result['rss_mib'] / baseline:.2f}× the 3-row run)" if baseline else ""
    print(
        f"{label:<28} {result['seconds']:8.1f} s (command {result['wall_s']:6.1f} s)  "
        f"{rows / result['seconds']:>9,.0f} rows/s  peak RSS {result['rss_mib']:5.0f} MiB{ratio}  "
        f"CPU {result['cpu_s']:6.1f} s",
        flush=True,
    )
    if table:
        print(
            f"{'':<28} table: sync {table.get('sync_s', 0):.1f} s, {table.get('inserted')} inserted, "
            f"{table.get('updated')} updated, {table.get('deleted')} deleted, {table.get('unchanged')} unchanged",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dimensions", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=2000)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--table-only", action="store_true", help="no Parquet-folder runs: the table's figures only")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gembatch-lance-"))
    env = {
        **os.environ,
        KEY_ENV: KEY,
        "PREFECT_HOME": str(work / "prefect-home"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
    env.pop("PREFECT_API_URL", None)
    tiny, corpus = work / "tiny.parquet", work / "corpus.parquet"
    make_corpus_elsewhere(tiny, 3)
    make_corpus_elsewhere(corpus, args.rows)
    print(f"corpus {args.rows:,} rows, {corpus.stat().st_size / 2**20:,.0f} MiB; dimensions {args.dimensions}")
    try:
        with emulator(env) as emu:
            url = emu.base_url
            db = work / "db"
            base = run(tiny, f"lancedb://{db}/tiny", db / "tiny.gembatch" / "_runs", url, env, args)
            report("table, 3 rows (baseline)", 3, base)
            if not args.table_only:
                report(
                    "folder, 3 rows", 3, run(tiny, str(work / "tiny-out"), work / "tiny-out" / "_runs", url, env, args)
                )
                folder = run(corpus, str(work / "out"), work / "out" / "_runs", url, env, args)
                report(f"folder, {args.rows:,} rows", args.rows, folder, base["rss_mib"])
                shutil.rmtree(work / "out")
            table = run(corpus, f"lancedb://{db}/docs", db / "docs.gembatch" / "_runs", url, env, args)
            report(f"table, {args.rows:,} rows", args.rows, table, base["rss_mib"])
            if not args.table_only:
                faster = folder["seconds"] / table["seconds"] - 1
                print(f"{'':<28} the table's rows/s: {faster:+.1%} against the folder's", flush=True)

            # 1% of the texts change and the last 10 ids leave the corpus (made in a child process: this
            # one's memory would count in the next child's ru_maxrss).
            edited = work / "edited.parquet"
            make_corpus_elsewhere(edited, args.rows - 10, revise=args.rows // 100)
            rerun = run(
                edited, f"lancedb://{db}/docs", db / "docs.gembatch" / "_runs", url, env, args, "--delete-missing"
            )
            report("table, rerun after 1% edits", args.rows, rerun, base["rss_mib"])
            # --keep-text switched on: the table is made again from the staging folder with the input's
            # text, no request; the texts of the rows applied (here all of them) are held while it is written.
            texts = run(edited, f"lancedb://{db}/docs", db / "docs.gembatch" / "_runs", url, env, args, "--keep-text")
            report("table, rerun with --keep-text", args.rows - 10, texts, base["rss_mib"])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept: {work}")


if __name__ == "__main__":
    main()
