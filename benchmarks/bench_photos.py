"""Benchmark `gembatch caption` of camera-size photos against the emulator in a separate process.

    uv run python benchmarks/bench_photos.py --images 200
    uv run python benchmarks/bench_photos.py --rss-check            # 3 photos, then 1,000: peak RSS
    uv run python benchmarks/bench_photos.py --pools                # decode stage: threads vs processes
    uv run python benchmarks/bench_photos.py --stages               # CPU of each stage of one photo
    uv run python benchmarks/bench_photos.py --repo /work/main      # another checkout (its .venv), read-only

The photos are generated on the fly into a temporary folder (never committed): a few distinct
4000 x 3000 pictures (gradients under camera-like grain, JPEG quality 92, about 5 MB each, like a
12-megapixel camera's), each written many times with a different JPEG comment so that every file has
its own content hash (no row is deduplicated) and the same decoding cost. `gembatch caption` runs as a
real command against `gembatch emulator` in another process, with no client-side limit.

Prints images/s (the flow run's own duration and the whole command), peak RSS of the command, the
machine's load average, and the floor set by JPEG entropy decoding (which no downscale can skip):
the CPU time to decode one photo at 1/8 scale on one core, with each JPEG decoder installed (Pillow's
bundled libjpeg-turbo, simplejpeg's, and libvips's when pyvips is installed).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _common import KEY, KEY_ENV, emulator, only_run, run_measured  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def make_photo(seed: int, width: int, height: int, grain: float, quality: int) -> bytes:
    """A smooth scene (two gradients and a disc) under per-pixel grain: entropy like a camera photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    t = (x / width * 0.7 + y / height * 0.3)[..., None]
    img = c0 + (c1 - c0) * t
    cx, cy, r = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height, height / 4
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < r * r)[..., None]
    img = np.where(disc, 255 - img, img)
    img += rng.normal(0, grain, (height // 2, width // 2, 3)).astype(np.float32).repeat(2, 0).repeat(2, 1)
    img += rng.normal(0, grain / 2, (height, width, 3)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def with_comment(jpeg: bytes, text: str) -> bytes:
    """The same JPEG with a COM segment after SOI: other bytes (and hash), the same pixels."""
    payload = text.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def write_photos(folder: Path, count: int, bases: list[bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["id,image"]
    for i in range(count):
        name = f"photo-{i:05d}.jpg"
        (folder / name).write_bytes(with_comment(bases[i % len(bases)], f"bench photo {i}"))
        lines.append(f"{i},{name}")
    listing = folder / "photos.csv"
    listing.write_text("\n".join(lines) + "\n")
    return listing


def run_caption(python: str, repo: Path, listing: Path, out: Path, base_url: str, env: dict, extra: list[str]):
    cmd = [python, "-m", "flows.cli", "caption", str(listing), "--output", str(out), "--base-url", base_url]
    cmd += ["--api-key-env", KEY_ENV, "--no-progress", *extra]
    load_before = os.getloadavg()[0]
    measured = run_measured(cmd, env, cwd=repo)
    run = only_run(out)
    if run["counts"]["failed"] or run["counts"]["deduplicated"]:
        raise SystemExit(f"unexpected counts {run['counts']}:\n{measured.output}")
    return run, measured.wall_s, measured.peak_rss_mib, measured.cpu_s, (load_before, os.getloadavg()[0])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report(n: int, run: dict, wall: float, rss: float, cpu: float, emu_cpu: float, load, cpus: int) -> None:
    run_s = run["duration_s"]
    per_image = (cpu + emu_cpu) / n
    print(
        f"caption {n:>5} photos  {n / run_s:6.1f} images/s (flow run {run_s:.1f} s; whole command "
        f"{n / wall:.1f}/s, {wall:.1f} s)  peak RSS {rss:,.0f} MiB  load {load[0]:.2f} -> {load[1]:.2f}"
    )
    print(
        f"              CPU per photo: gembatch {1000 * cpu / n:.0f} ms (start-up included) + emulator "
        f"{1000 * emu_cpu / n:.0f} ms -> {cpus / per_image:.1f} images/s if {cpus} cores were ours alone"
    )


def cpu_ms(work, rounds: int = 5) -> float:
    """Best of ``rounds``: CPU time of this thread (a load from other processes inflates wall time more)."""
    best = float("inf")
    for _ in range(rounds):
        started = time.thread_time()
        work()
        best = min(best, time.thread_time() - started)
    return best * 1000


def floors_ms(jpeg: bytes) -> dict[str, float]:
    """Each decoder at 1/8 scale: DCT scaling skips most of the work, Huffman decoding can't be skipped."""

    def pillow() -> None:
        with Image.open(io.BytesIO(jpeg)) as img:
            img.draft("RGB", (img.width // 8, img.height // 8))
            img.load()

    import simplejpeg

    with Image.open(io.BytesIO(jpeg)) as img:
        width, height = img.size
    found = {"Pillow": cpu_ms(pillow)}
    found["simplejpeg"] = cpu_ms(lambda: simplejpeg.decode_jpeg(jpeg, "RGB", min_width=width // 8, min_height=1))
    try:
        import pyvips  # not a dependency: measured when installed (uv run --with pyvips-binary --with pyvips)
    except ImportError:
        return found
    # libvips decodes on its own threads: process CPU time, not this thread's.
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        pyvips.Image.jpegload_buffer(jpeg, shrink=8).numpy()
        best = min(best, time.process_time() - started)
    found["pyvips"] = best * 1000
    return found


def stages(jpeg: bytes, path: Path, max_side: int) -> None:
    """CPU of each stage one photo goes through, on one core (best of 5)."""
    import simplejpeg

    from tasks.jobs.images_io import image_for_model, image_tokens, jpeg_scale, planned_size, probe, scaled_size

    info = probe(jpeg, "photo.jpg")
    m = jpeg_scale(info.width, info.height, max_side)
    sent = image_for_model(jpeg, max_side, name="photo.jpg")
    assert planned_size(info, max_side) == (sent.width, sent.height), "the token estimate's size is the size sent"
    rows: list[tuple[str, float]] = [
        ("read the file (5 MB)", cpu_ms(path.read_bytes)),
        ("sha256", cpu_ms(lambda: hashlib.sha256(jpeg).hexdigest())),
        ("header probe (size, orientation)", cpu_ms(lambda: probe(jpeg, "photo.jpg"))),
    ]

    old = scaled_size(info.width, info.height, max_side)  # the size sent before M/8 scales

    def pillow_draft_and_resize() -> Image.Image:
        with Image.open(io.BytesIO(jpeg)) as img:
            img.draft("RGB", old)  # what Pillow offers: 1/2, 1/4 or 1/8, at least the size asked for
            img.load()
            return img.resize(old, Image.Resampling.BILINEAR, reducing_gap=3.0)

    with Image.open(io.BytesIO(jpeg)) as img:
        img.draft("RGB", old)
        drafted = img.size
    rows.append((f"before: Pillow draft to {drafted[0]}x{drafted[1]} + bilinear to {old[0]}x{old[1]}", 0.0))
    rows.append(("  all of it", cpu_ms(pillow_draft_and_resize)))
    decoded = simplejpeg.decode_jpeg(jpeg, "RGB", min_width=-(-info.width * m // 8), min_height=1)
    rows.append(
        (
            f"now: simplejpeg at {m}/8 -> {decoded.shape[1]}x{decoded.shape[0]}",
            cpu_ms(lambda: simplejpeg.decode_jpeg(jpeg, "RGB", min_width=decoded.shape[1], min_height=1)),
        )
    )
    picture = Image.fromarray(decoded)
    rows.append(("  to a Pillow image", cpu_ms(lambda: Image.fromarray(decoded))))
    for quality in (75, 85, 90):
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=quality)
        rows.append(
            (
                f"  JPEG q{quality} ({len(out.getvalue()) / 1e3:.0f} kB)",
                cpu_ms(lambda q=quality: picture.save(io.BytesIO(), "JPEG", quality=q)),
            )
        )
    rows.append((f"base64 of {len(sent.data) / 1e3:.0f} kB", cpu_ms(lambda: base64.b64encode(sent.data).decode())))
    rows.append(("image_for_model, all of it", cpu_ms(lambda: image_for_model(jpeg, max_side, name="photo.jpg"))))
    print(
        f"--max-side {max_side}: {info.width}x{info.height} is sent at {sent.width}x{sent.height} "
        f"({image_tokens(sent.width, sent.height)} tokens; {len(sent.data) / 1e3:.0f} kB)"
    )
    for label, ms in rows:
        print(f"  {label:<64} {ms:7.1f} ms" if ms else f"  {label}")


def _prepare_one(path: str, max_side: int) -> int:
    from tasks.jobs.images_io import image_for_model

    data = Path(path).read_bytes()
    return len(image_for_model(data, max_side, name=path).data)


def compare_pools(files: list[Path], max_side: int, rounds: int = 2) -> None:
    """The decode stage alone (read, decode, downscale, encode) over the files, per executor kind.

    The kinds take turns, ``rounds`` times, so that a change in the machine's load hits them alike."""
    workers = len(os.sched_getaffinity(0))
    kinds: list[tuple[str, type[Executor], int]] = [
        ("threads", ThreadPoolExecutor, 1),
        ("threads", ThreadPoolExecutor, workers),
        ("threads", ThreadPoolExecutor, workers + 1),
        ("processes", ProcessPoolExecutor, workers),
    ]
    best: dict[str, float] = {}
    for _ in range(rounds):
        for kind, make, n in kinds:
            label = f"{kind} x{n}"
            with make(n) as pool:
                list(pool.map(_prepare_one, [str(files[0])] * n, [max_side] * n))  # warm up
                started = time.perf_counter()
                list(pool.map(_prepare_one, [str(f) for f in files], [max_side] * len(files)))
                rate = len(files) / (time.perf_counter() - started)
            best[label] = max(best.get(label, 0.0), rate)
            print(f"decode stage  {label:<14} {rate:6.1f} images/s  load {os.getloadavg()[0]:.2f}")
    print("best of each:", ", ".join(f"{label} {rate:.1f}/s" for label, rate in best.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--grain", type=float, default=10.0, help="noise level: 10 gives ~5 MB photos")
    parser.add_argument("--quality", type=int, default=92)
    parser.add_argument("--bases", type=int, default=4, help="distinct pictures (each file is one of them)")
    parser.add_argument("--max-side", type=int, default=None, help="passed to gembatch caption when set")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--rss-check", action="store_true", help="3 photos, then 1,000: compare peak RSS")
    parser.add_argument("--pools", action="store_true", help="time the decode stage on threads vs processes")
    parser.add_argument("--stages", action="store_true", help="CPU of each stage of one photo, then stop")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose gembatch runs (read-only)")
    parser.add_argument("--python", default=None, help="default: REPO/.venv/bin/python")
    args = parser.parse_args()

    repo = args.repo.resolve()
    python = args.python or str(repo / ".venv" / "bin" / "python")
    work = Path(tempfile.mkdtemp(prefix="gembatch-photos-"))
    cpus = len(os.sched_getaffinity(0))
    try:
        # In worker processes: the command's peak RSS, as the kernel reports it, starts from this
        # process's own peak (the child is forked from it), which must stay small.
        with ProcessPoolExecutor(cpus) as pool:
            n = args.bases
            bases = list(
                pool.map(
                    make_photo, range(n), [args.width] * n, [args.height] * n, [args.grain] * n, [args.quality] * n
                )
            )
        mean_mb = sum(map(len, bases)) / len(bases) / 1e6
        floors = floors_ms(bases[0])
        floor = min(floors.values())
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"repo {repo}  ({cpus} CPUs, load average {os.getloadavg()[0]:.2f}; this script's peak RSS {own:.0f} MiB)"
        )
        print(f"photos {args.width}x{args.height} JPEG q{args.quality}, {mean_mb:.1f} MB each on average")
        print(
            "entropy-decoding floor (1/8 scale, CPU per photo): "
            + ", ".join(f"{name} {ms:.0f} ms" for name, ms in floors.items())
            + f" -> at most {cpus * 1000 / floor:.0f} images/s on {cpus} cores for decoding alone"
        )
        if args.stages:
            path = work / "photo.jpg"
            path.write_bytes(bases[0])
            stages(bases[0], path, args.max_side or 1536)
            return
        extra = [] if args.max_side is None else ["--max-side", str(args.max_side)]
        if args.chunk_size:
            extra += ["--chunk-size", str(args.chunk_size)]
        if args.pools:
            listing = write_photos(work / "pools", min(args.images, 60), bases)
            compare_pools(sorted(listing.parent.glob("*.jpg")), args.max_side or 1536)
            return
        env = {**os.environ, KEY_ENV: KEY}
        env.pop("VIRTUAL_ENV", None)
        with emulator(env, python=python, cwd=repo) as emu:
            base_url = emu.base_url
            # A run of 1 photo first: its CPU is the command's start-up (imports, the run's set-up), so
            # the CPU per photo beyond start-up follows from the two runs.
            sizes = [3, 1000] if args.rss_check else [1, args.images]
            results = []
            for n in sizes:
                folder = work / f"photos-{n}"
                listing = write_photos(folder, n, bases)
                emu_before = cpu_seconds(emu.process.pid)
                run, wall, rss, cpu, load = run_caption(python, repo, listing, work / f"out-{n}", base_url, env, extra)
                report(n, run, wall, rss, cpu, cpu_seconds(emu.process.pid) - emu_before, load, cpus)
                results.append((rss, cpu))
                shutil.rmtree(folder, ignore_errors=True)
            (rss_small, cpu_small), (rss_big, cpu_big) = results
            if args.rss_check:
                print(f"peak RSS 1,000 photos / 3 photos = {rss_big / rss_small:.2f}  (target <= 1.5)")
            per_photo = (cpu_big - cpu_small) / (sizes[1] - sizes[0])
            print(
                f"gembatch CPU per photo beyond start-up: {1000 * per_photo:.0f} ms (start-up "
                f"{cpu_small - sizes[0] * per_photo:.1f} s) -> {cpus / per_photo:.1f} images/s on {cpus} idle cores "
                "for gembatch alone"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
