"""--shards N on real Prefect workers under one shared --rpm: run time against the floor.

    uv run python benchmarks/bench_shards.py                       # 100k rows, 4 shards, 2 workers, --rpm 600
    uv run python benchmarks/bench_shards.py --rows 50000 --rpm 300 --shards 2 --workers 1

Starts everything as separate processes, each in this run's own PREFECT_HOME and ports: `prefect server
start`, a process work pool with the nightly-embed deployment of deployments.yaml, N `prefect worker
start`, and the emulator with the same --rpm as the client (a sliding 60 s window counted at arrival).
Then `gembatch embed --shards N --rpm R` runs the parent from here. It prints the run time against the
floor (requests / rpm minutes), the start-up (parent start to the first request at the provider), the
busiest 60 s window the emulator saw, 429s, lost/duplicated rows, and the peak RSS of each kind of
process (sampled from /proc every 0.5 s).
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
import urllib.request
from datetime import datetime
from pathlib import Path

import pyarrow.dataset as pds
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(REPO / "tests"))
from _common import KEY_ENV, make_corpus, wait_up  # noqa: E402
from servers import descendants, free_port, prefect_cli, prefect_env, start_server, start_worker, stop  # noqa: E402

from emulator.limits import busiest_window  # noqa: E402


class RssSampler(threading.Thread):
    """Peak resident memory of every process below this one, by kind (from its command line)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[str, int] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            for pid, cmd in _commands_below(os.getpid()):
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")), 0)
                kind = _kind(cmd)
                self.peaks[kind] = max(self.peaks.get(kind, 0), rss)


def _kind(cmd: str) -> str:
    for marker, kind in (
        ("server start", "prefect server"),
        ("worker start", "prefect worker"),
        ("flows.cli emulator", "emulator"),
        ("--shards", "parent (gembatch embed --shards)"),
        ("prefect.engine", "shard flow run"),
    ):
        if marker in cmd:
            return kind
    return "shard flow run" if "prefect" in cmd else "other"


def _commands_below(root: int) -> list[tuple[int, str]]:
    found = []
    for child in descendants(root):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmd = ""
        found.append((child, cmd))
    return found


def run(
    rows: int, rpm: float, shards: int, workers: int, chunk_size: int, keep: bool, pace: float | None = None
) -> dict:
    work = Path(tempfile.mkdtemp(prefix="gembatch-shards-"))
    source, out = work / "in.parquet", work / "out"
    make_corpus(source, rows)
    port, emu_port, key = free_port(), free_port(), "bench-key"
    env = prefect_env(work / "prefect-home", port, **{KEY_ENV: key})
    spec = yaml.safe_load((REPO / "deployments.yaml").read_text())
    spec["deployments"] = [d for d in spec["deployments"] if d["name"] == "nightly-embed"]
    spec["deployments"][0].pop("schedules")
    (work / "deployments.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    sampler = RssSampler()
    sampler.start()
    started_procs: list[subprocess.Popen] = []

    def start(cmd: list[str], log: str) -> subprocess.Popen:
        with (work / log).open("w") as f:
            process = subprocess.Popen(
                cmd, env=env, cwd=work, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        started_procs.append(process)
        return process

    try:
        start(
            [sys.executable, "-m", "flows.cli", "emulator", "--port", str(emu_port), "--api-key-env", KEY_ENV,
             "--rpm", str(int(rpm)), *(["--pace", str(pace)] if pace else [])],
            "emulator.log",
        )  # fmt: skip
        host = f"http://127.0.0.1:{emu_port}/"
        base_url = host + "v1beta/openai/"
        started_procs.append(start_server(env, work, work / "server.log", timeout=180))
        wait_up(base_url, key)
        prefect_cli(env, "work-pool", "create", "gembatch", "--type", "process", timeout=300)
        prefect_cli(env, "deploy", "--prefect-file", str(work / "deployments.yaml"), "--all", timeout=300)
        for n in range(workers):
            started_procs.append(start_worker(env, "gembatch", work, work / f"worker-{n}.log", "--name", f"w{n}"))
        cmd = [sys.executable, "-m", "flows.cli", "embed", str(source), "-o", str(out), "--base-url", base_url,
               "--api-key-env", KEY_ENV, "--rpm", str(rpm), "--shards", str(shards), "--chunk-size",
               str(chunk_size), "--dimensions", "64", "--no-progress"]  # fmt: skip
        began = time.monotonic()
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        wall = time.monotonic() - began
        if proc.returncode != 0:
            raise SystemExit(f"gembatch embed --shards failed:\n{proc.stdout}\n{proc.stderr}")
        with urllib.request.urlopen(host + "_emulator/stats?arrivals=1", timeout=10) as reply:
            stats = json.loads(reply.read())
        docs = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
        table = pds.dataset(str(out), format="parquet").to_table(columns=["id"])
    finally:
        for process in reversed(started_procs):
            stop(process, timeout=20)
        sampler.stopped.set()
        sampler.join()
        if keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    (summary,) = [d for d in docs if "shards" in d]
    shard_docs = [d for d in docs if d.get("shard")]
    # When the provider saw the first and the last request (the emulator's clock: the same machine's).
    arrivals = sorted(stats.pop("admitted_unix"))
    parent_start = _at(summary["started_at"])
    startup = arrivals[0] - parent_start
    requests = summary["requests"]["sent"]
    floor = requests / rpm * 60
    ids = table.column("id").to_pylist()
    return {
        "rows": rows,
        "shards": shards,
        "workers": workers,
        "rpm": rpm,
        "status": summary["status"],
        "requests": requests,
        "run_s": summary["duration_s"],
        "wall_s": round(wall, 1),
        "startup_s": round(startup, 1),
        "floor_s": round(floor, 1),
        "ratio_after_startup": round((summary["duration_s"] - startup) / floor, 3),
        "busiest_60s": stats["busiest_window"],
        "busiest_1s": busiest_window(arrivals, 1.0),
        "pace_s_at_emulator": pace,
        "429s": stats["by_status"].get("429", 0),
        "lost": rows - len(set(ids)),
        "duplicates": len(ids) - len(set(ids)),
        "shared_limit_waits_s": [d["shared_limits"]["rpm"]["wait_s"] for d in shard_docs if d.get("shared_limits")],
        "shard_sending_s": [
            round(d["limits"]["last_request_at_s"] - d["limits"]["first_request_at_s"], 1)
            for d in shard_docs
            if d["limits"].get("last_request_at_s") is not None
        ],
        "restarts": sum(s["restarts_after_crash"] for s in summary["shards"]),
        "sending_s": round(arrivals[-1] - arrivals[0], 1),
        "after_last_request_s": round(parent_start + summary["duration_s"] - arrivals[-1], 1),
        "requests_per_10s": _histogram(arrivals, arrivals[0], 10.0),
        "shard_timelines": [_timeline(d, parent_start) for d in sorted(shard_docs, key=lambda d: d["shard"])],
        "peak_rss_mib": {k: round(v / 1024) for k, v in sorted(sampler.peaks.items())},
    }


def _histogram(times: list[float], origin: float, step: float) -> list[int]:
    counts = [0] * (int((times[-1] - origin) // step) + 1)
    for t in times:
        counts[int((t - origin) // step)] += 1
    return counts


def _timeline(doc: dict, origin: float) -> dict:
    """One shard in seconds after the parent started: start, first and last request, end; its permits."""
    limits, rpm = doc["limits"], (doc.get("shared_limits") or {}).get("rpm") or {}
    unit = rpm.get("slots_per_unit") or 1
    return {
        "shard": doc["shard"],
        "started": round(_at(doc["started_at"]) - origin, 1),
        "first_request": round(_at(limits["first_request_at"]) - origin, 1) if limits.get("first_request_at") else None,
        "last_request": round(_at(limits["last_request_at"]) - origin, 1) if limits.get("last_request_at") else None,
        "finished": round(_at(doc["finished_at"]) - origin, 1),
        "requests": doc["requests"]["sent"],
        "permits_taken": rpm.get("slots_taken", 0) // unit,
        "permits_unused": rpm.get("slots_unused", 0) // unit,
        "asks": rpm.get("asks"),
        "denied": rpm.get("denied_423"),
        "mean_ask_s": rpm.get("mean_ask_s"),
        "slowest_ask_s": rpm.get("slowest_ask_s"),
        "shared_wait_s": rpm.get("wait_s"),
    }


def _at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rpm", type=float, default=600)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=2000)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (input, output, logs)")
    parser.add_argument(
        "--pace",
        type=float,
        default=None,
        help="the emulator also holds --rpm over every PACE seconds, as OpenAI does (1: 600 RPM = 10 a second)",
    )
    args = parser.parse_args()
    result = run(args.rows, args.rpm, args.shards, args.workers, args.chunk_size, args.keep, args.pace)
    for key, value in result.items():
        if key == "shard_timelines":
            for line in value:
                print(f"shard {line['shard']}: {json.dumps({k: v for k, v in line.items() if k != 'shard'})}")
        else:
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
