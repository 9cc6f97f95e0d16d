"""Benchmark `gembatch transcribe` on long recordings against the emulator in a separate process.

    uv run python benchmarks/bench_audio.py                      # 4 x 30 min folder, then one 2-hour file
    uv run python benchmarks/bench_audio.py --files 8 --minutes 45 --rpm 120 --latency 5
    uv run python benchmarks/bench_audio.py --skip-long          # only the folder
    uv run python benchmarks/bench_audio.py --skip-folder        # only the 6-minute and 2-hour files

Recordings are podcast-like MP3s (44.1 kHz stereo, 128 kbps: tone bursts with a quiet gap each
minute), made here in seconds (one minute encoded once, its frames muxed again with later times).

Prints, for a folder of ``--files`` recordings of ``--minutes`` each: audio hours transcribed per
hour of wall time at ``--rpm`` (the emulator answers after ``--latency`` s and enforces the same RPM),
the dry run's token estimate against the tokens the run reported, and the peak RSS of the process;
then the peak RSS of transcribing one ``--long-hours`` file (memory must not grow with its length).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import KEY, KEY_ENV, emulator, run_measured  # noqa: E402

RATE = 44_100
# 287 x 9216 samples: a whole number of MP3 frames (1152) in one minute-long period (59.977 s).
PERIOD = 287 * 9216


def make_mp3(path: Path, seconds: float, tone_hz: float) -> None:
    with av.open(str(path), mode="w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=RATE, layout="stereo")
        stream.bit_rate = 128_000
        t = np.arange(PERIOD) / RATE
        x = 0.3 * np.sin(2 * np.pi * tone_hz * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t))
        x[t > PERIOD / RATE - 2.0] = 0.0
        pcm = np.repeat((x * 32767).astype(np.int16).reshape(-1, 1), 2, axis=1).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
        frame.sample_rate = RATE
        packets = [bytes(p) for p in [*stream.encode(frame), *stream.encode(None)]]
        size = stream.codec_context.frame_size
        kept = packets[: PERIOD // size]
        for copy in range(max(1, round(seconds * RATE / PERIOD))):
            for i, data in enumerate(kept):
                packet = av.Packet(data)
                packet.pts = packet.dts = copy * PERIOD + i * size
                packet.duration = size
                packet.time_base = Fraction(1, RATE)
                packet.stream = stream
                container.mux(packet)


def transcribe(input: Path, out: Path, base_url: str, env: dict, extra: list[str]) -> tuple[str, float, int, float]:
    """Run `gembatch transcribe`; its output, wall time, peak RSS (KiB) and CPU seconds."""
    cmd = [sys.executable, "-m", "flows.cli", "transcribe", str(input), "--output", str(out)]
    cmd += ["--base-url", base_url, "--api-key-env", KEY_ENV, "--no-progress", *extra]
    measured = run_measured(cmd, env)
    return measured.output, measured.wall_s, measured.peak_rss_kib, measured.cpu_s


def dry_run(folder: Path, out: Path, args: argparse.Namespace) -> dict:
    """What `gembatch transcribe --dry-run` prints, as its document."""
    import asyncio

    from tasks.engine.dry_run import plan_job
    from tasks.engine.run import RunOptions
    from tasks.engine.send.limits import Limits
    from tasks.jobs.transcribe import TranscribeJob

    job = TranscribeJob(model="gemini-3.8-flash", segment_s=args.segment_s, segment_format=args.segment_format)
    options = RunOptions(input=str(folder), output=str(out), dry_run=True, limits=Limits(rpm=args.rpm))
    return asyncio.run(plan_job(job, options))


def last_run(out: Path) -> dict:
    runs = sorted((out / "_runs").glob("*.json"))
    return json.loads(runs[-1].read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rpm", type=float, default=120.0, help="client --rpm, and the emulator's limit")
    parser.add_argument("--latency", type=float, default=3.0, help="emulator latency per request (s)")
    parser.add_argument("--segment-s", type=float, default=300.0)
    parser.add_argument("--segment-format", default="mp3")
    parser.add_argument("--long-hours", type=float, default=2.0)
    parser.add_argument("--skip-long", action="store_true")
    parser.add_argument("--skip-folder", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gembatch-bench-audio-"))
    folder = work / "recordings"
    folder.mkdir()
    made = time.monotonic()
    for i in range(0 if args.skip_folder else args.files):
        make_mp3(folder / f"episode{i:02d}.mp3", args.minutes * 60, 220 + 55 * i)
    print(
        f"made {args.files} x {args.minutes:g} min MP3s (44.1 kHz stereo 128 kbps) in {time.monotonic() - made:.1f} s"
    )

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {KEY_ENV: KEY}
    common = ["--segment-s", str(args.segment_s), "--segment-format", args.segment_format, "--rpm", str(args.rpm)]
    with emulator(env, "--latency", str(args.latency), "--rpm", str(int(args.rpm))) as emu:
        base_url = emu.base_url
        out = work / "out"
        folder_run = None
        if not args.skip_folder:
            plan = dry_run(folder, out, args)
            _, wall, rss, cpu = transcribe(folder, out, base_url, env, common)
            folder_run = (plan, last_run(out), wall, rss, cpu)
        long = []
        if not args.skip_long:
            # The same command on a 6-minute file first: the process's own size, to compare with.
            for hours in (0.1, args.long_hours):
                long_file = work / f"long-{hours:g}" / "recording.mp3"
                long_file.parent.mkdir()
                make_mp3(long_file, hours * 3600, 300)
                long_out = work / f"long-out-{hours:g}"
                _, long_wall, long_rss, long_cpu = transcribe(long_file, long_out, base_url, env, common)
                long.append((hours, long_file, long_rss, long_cpu, last_run(long_out)))

    load = os.getloadavg()
    print(f"machine load          {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (1/5/15 min) on {os.cpu_count()} CPUs")
    if folder_run is not None:
        print_folder(args, *folder_run)
    for hours, path, long_rss, long_cpu, long_run in long:
        print(
            f"{hours:g} h file: {path.stat().st_size / 1e6:.0f} MB mp3, {long_run['requests']['sent']} segments, "
            f"{long_run['duration_s']:.1f} s, {long_cpu:.0f} CPU s, {long_run['status']}, "
            f"peak RSS {long_rss / 1024:,.0f} MiB"
        )
    if long:
        print(f"(2 h of 16 kHz mono PCM alone would be {args.long_hours * 3600 * 32_000 / 2**20:,.0f} MiB)")
    shutil.rmtree(work, ignore_errors=True)


def print_folder(args: argparse.Namespace, plan: dict, run: dict, wall: float, rss: int, cpu: float) -> None:
    est = plan["estimate"]
    audio_h = est["audio_seconds"] / 3600
    run_s = run["duration_s"]
    print(f"folder                {args.files} files, {audio_h:.2f} h of audio, {est['requests']} requests planned")
    print(f"run                   {run['status']}  counts {run['counts']}  requests {run['requests']['sent']}")
    print(f"wall time             {run_s:.1f} s (flow run)  {wall:.1f} s (whole command)")
    print(
        f"throughput            {audio_h / (run_s / 3600):,.0f} audio hours per wall hour at --rpm {args.rpm:g}, "
        f"latency {args.latency:g} s"
    )
    print(f"rpm floor             {est['requests'] / args.rpm * 60:.1f} s  (requests / rpm)")
    reported = run["tokens"]["prompt"]
    print(
        f"tokens: dry run       {est['input_tokens']:,}  reported {reported:,}  "
        f"({100 * (est['input_tokens'] / reported - 1):+.2f}%)"
    )
    print(f"cost: dry run         {est['input_cost_usd']}  reported {run['cost']['estimated_usd']}")
    print(f"CPU                   {cpu:.1f} s  = {cpu / audio_h:,.0f} CPU s per audio hour (decode, resample, encode)")
    print(f"peak RSS              {rss / 1024:,.0f} MiB  (the gembatch transcribe process)")


if __name__ == "__main__":
    main()
