"""Long recordings in segments, any format, a folder as input: against the emulator over real HTTP.

Every recording here is made by the test with PyAV (tone bursts with a quiet gap before each minute
mark, at 8 kHz and a low bitrate so that even 70 minutes encode in seconds); nothing is committed.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, TEST_KEY, TEST_KEY_ENV, assert_balanced, read_errors, read_output

from emulator.fakes import fake_caption, fake_transcript
from tasks.engine.dry_run import plan_job
from tasks.engine.run import RunOptions, run_job
from tasks.errors import InputError
from tasks.jobs.audio import SAMPLE_RATE, SEGMENT_CODECS, cut_points, iter_segments, probe, quiet_cut
from tasks.jobs.caption import CaptionJob
from tasks.jobs.transcribe import SEGMENT_TYPE, SEGMENTS_DIR, TranscribeJob
from tasks.provider.client import ProviderSettings

MODEL = "gemini-3.8-flash"
# A quiet gap ends every 59.904 s (at 8 kHz a whole number of MP3 and AAC frames: 52 × 9216 samples)…
GAP_EVERY_S = 52 * 9216 / 8000
GAP_S = 3.0  # …and lasts this long
# (container format, codec) by extension
FORMATS = {
    "wav": ("wav", "pcm_s16le"),
    "mp3": ("mp3", "libmp3lame"),
    "m4a": ("ipod", "aac"),
    "ogg": ("ogg", "libopus"),
    "flac": ("flac", "flac"),
    "webm": ("webm", "libopus"),
}


def make_recording(path: Path, seconds: float, *, tone_hz: float = 440.0, loud: float = 0.3, rate: int = 8000) -> Path:
    """A tone with a ``GAP_S`` quiet gap at the end of every ``GAP_EVERY_S``, in the suffix's format.

    A long one is one period encoded once and its packets muxed again and again with later
    timestamps: 70 minutes take a second to make instead of a minute of encoding."""
    fmt, codec = FORMATS[path.suffix.lstrip(".")]
    path.parent.mkdir(parents=True, exist_ok=True)
    period = round(GAP_EVERY_S * rate)
    total = round(seconds * rate)
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        if codec in ("libmp3lame", "aac", "libopus"):
            stream.bit_rate = 16_000
        t = np.arange(min(total, period)) / rate
        x = loud * np.sin(2 * np.pi * tone_hz * t)
        x[t > GAP_EVERY_S - GAP_S] = 0.0
        frame = av.AudioFrame.from_ndarray((x * 32767).astype(np.int16).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        packets = [*stream.encode(frame), *stream.encode(None)]
        if total <= period:
            for packet in packets:
                container.mux(packet)
            return path
        size = stream.codec_context.frame_size
        assert period % size == 0, (period, size)
        kept = [bytes(p) for p in packets[: period // size]]
        for copy in range(math.ceil(total / period)):
            for i, data in enumerate(kept):
                packet = av.Packet(data)
                packet.pts = packet.dts = copy * period + i * size
                packet.duration = size
                packet.time_base = Fraction(1, rate)
                packet.stream = stream
                container.mux(packet)
    return path


def options_for(emu, input: str, output: Path, **kw) -> RunOptions:
    provider = ProviderSettings(provider="local", base_url=emu.base_url, api_key_env=TEST_KEY_ENV, timeout_s=30)
    return RunOptions(input=input, output=str(output), provider=provider, **kw)


def expected_stitch(path: Path, segment_s: float, fmt: str, model: str = MODEL) -> tuple[str, list]:
    """The transcript the emulator's answers make, segment by segment (its answer is a function of the
    bytes it got), and the segments' (start, end) times."""
    segments = list(iter_segments(str(path), segment_s, SEGMENT_CODECS[fmt]))
    text = " ".join(fake_transcript(s.audio, fmt, model) for s in segments if s.audio is not None)
    return text, [(s.start_s, s.end_s) for s in segments]


@pytest.fixture(scope="session")
def long_recordings(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("long")
    make_recording(folder / "talk.mp3", 45 * 60)
    make_recording(folder / "lecture.m4a", 70 * 60, tone_hz=330)
    return folder


# -- cutting -----------------------------------------------------------------------------------------
def test_a_cut_falls_in_the_quietest_window_before_the_boundary():
    rng = np.random.default_rng(1)
    samples = (rng.standard_normal(10_000) * 8000).astype(np.int16)
    samples[9_000:9_100] = 0  # the quiet moment, within the 1,000 samples searched
    samples[5_000:5_500] = 0  # quieter and longer, but too early
    cut = quiet_cut(samples, 9_800, 1_000, 20)
    assert 9_000 <= cut < 9_100
    assert quiet_cut(np.full(100, 5000, np.int16), 100, 40, 20) in (90, 70), "a tie takes the latest window"

    blocks = [samples[i : i + 777] for i in range(0, len(samples), 777)] * 5  # 50,000 samples
    pieces = list(cut_points(iter(blocks), 1.0, rate=10_000))
    starts = [first for first, _ in pieces]
    assert starts[0] == 0 and sum(len(p) for _, p in pieces) == 50_000
    for (first, piece), nxt in zip(pieces, starts[1:] + [50_000]):
        assert first + len(piece) == nxt, "no gap, no overlap"
        assert len(piece) <= 10_000 + 200


# -- long recordings ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_45_minute_mp3_and_a_70_minute_m4a_become_one_row_each(emulator, long_recordings, tmp_path):
    job = TranscribeJob(model=MODEL, segment_s=300, segment_format="wav")
    out = tmp_path / "out"
    plan = asyncio.run(plan_job(job, options_for(emulator, str(long_recordings), out, dry_run=True)))
    est = plan["estimate"]
    durations = {name: probe(str(long_recordings / name)).duration_s for name in ("talk.mp3", "lecture.m4a")}
    assert durations["talk.mp3"] >= 45 * 60 and durations["lecture.m4a"] >= 70 * 60
    assert plan["counts"]["input_rows"] == 2 and est["requests"] == sum(math.ceil(d / 300) for d in durations.values())
    assert est["audio_seconds"] == pytest.approx(sum(durations.values()), abs=0.01), "read from the headers"
    assert emulator.stats["requests"] == 0

    doc = asyncio.run(run_job(job, options_for(emulator, str(long_recordings), out)))
    assert doc["status"] == "completed", doc["message"]
    assert_balanced(doc)
    sent = doc["requests"]["sent"]
    assert doc["counts"]["succeeded"] == 2 and emulator.stats["by_route"]["chat/completions"] == sent
    # The dry run's token estimate is what the emulator counted (32 a second of WAV, plus the prompt).
    assert doc["tokens"]["prompt"] == emulator.stats["prompt_tokens"]
    assert abs(est["input_tokens"] - doc["tokens"]["prompt"]) <= 0.001 * doc["tokens"]["prompt"]

    out_table = pq.read_table(out)
    assert out_table.schema.field("segments").type == SEGMENT_TYPE
    rows = {r["id"]: r for r in out_table.to_pylist()}
    assert sorted(rows) == ["lecture.m4a", "talk.mp3"], "id = the path relative to the folder"
    counts = []
    for name in ("talk.mp3", "lecture.m4a"):
        row = rows[name]
        text, times = expected_stitch(long_recordings / name, 300, "wav")
        assert row["transcript"] == text
        segments = row["segments"]
        assert [(s["start_s"], s["end_s"]) for s in segments] == times
        counts.append(len(segments))
        assert len(segments) >= math.ceil(durations[name] / 300)
        assert segments[0]["start_s"] == 0.0
        for a, b in zip(segments, segments[1:]):
            assert a["end_s"] == b["start_s"], "no gap between segments"
            assert 300 - 5 <= a["end_s"] - a["start_s"] <= 300
            # each cut is in the quiet gap before a minute mark (codec delays shift it < 0.2 s)
            assert GAP_EVERY_S - GAP_S - 0.2 <= a["end_s"] % GAP_EVERY_S <= GAP_EVERY_S - 0.01 + 0.2
        assert segments[-1]["end_s"] == pytest.approx(durations[name], abs=0.2) == row["duration_s"]
        assert " ".join(s["text"] for s in segments) == text
    assert sum(counts) == sent
    assert not (out / SEGMENTS_DIR).exists(), "recorded segments are removed once their rows are written"


def test_a_killed_run_resends_only_the_missing_segments(emulator, tmp_path):
    recording = make_recording(tmp_path / "in" / "meeting.mp3", 12 * 60)
    out = tmp_path / "out"
    emulator.configure(latency_seconds=0.3)
    cmd = [sys.executable, "-m", "flows.cli", "transcribe", str(recording), "--output", str(out)]
    cmd += ["--base-url", emulator.base_url, "--api-key-env", TEST_KEY_ENV, "--model", MODEL, "--no-progress"]
    cmd += ["--segment-s", "20", "--segment-format", "wav", "--rpm", "300"]  # 36-48 segments, 5 a second
    text, times = expected_stitch(recording, 20, "wav")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {TEST_KEY_ENV: TEST_KEY}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    recorded = lambda: sorted((out / SEGMENTS_DIR).glob("*/*.parquet")) if (out / SEGMENTS_DIR).exists() else []  # noqa: E731
    deadline = time.monotonic() + 90
    while len(recorded()) < 8 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = len(recorded())
    assert 8 <= kept < len(times), kept
    assert not list(out.glob("part-*.parquet")), "killed halfway: the row is not written yet"

    time.sleep(0.5)  # what the killed run left in flight finishes at the emulator
    emulator.reset_stats()
    emulator.configure(latency_seconds=0.0)
    job = TranscribeJob(model=MODEL, segment_s=20, segment_format="wav")
    doc = asyncio.run(run_job(job, options_for(emulator, str(recording), out)))
    assert doc["status"] == "completed", doc["message"]
    assert emulator.stats["by_route"]["chat/completions"] == len(times) - kept, "only the missing segments are sent"
    (row,) = read_output(out).iter_rows(named=True)
    assert row["id"] == "meeting.mp3" and row["transcript"] == text
    assert [(s["start_s"], s["end_s"]) for s in row["segments"]] == times
    assert not (out / SEGMENTS_DIR).exists()


# -- a folder of everything --------------------------------------------------------------------------
@pytest.mark.slow
def test_a_folder_of_200_mixed_files_accounts_for_every_file(emulator, tmp_path):
    folder = tmp_path / "recordings"
    good: list[str] = []
    for i in range(192):
        ext = list(FORMATS)[i % 6]
        name = f"{'day1' if i < 96 else 'day2/calls'}/clip{i:03d}.{ext}"
        make_recording(folder / name, 1.0 + (i % 3) * 0.5, tone_hz=200 + 7 * i)
        good.append(name)
    bad = {
        "day1/noise.mp3": "is not a recording FFmpeg can read",
        "day1/notes.wav": "is not a recording FFmpeg can read",
        "day2/empty.ogg": "is empty (0 bytes)",
        "day2/empty.flac": "is empty (0 bytes)",
        "day2/cut.m4a": "is not a recording FFmpeg can read",
        "day2/picture.webm": "has no audio track (it holds only video)",
        "quiet.wav": "is silent: no sound above -60 dBFS in its 2.0 s",
        "quiet.m4a": "is silent: no sound above -60 dBFS",
    }
    rng = np.random.default_rng(3)
    (folder / "day1/noise.mp3").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (folder / "day1/notes.wav").write_text("minutes of the meeting\n" * 40)
    (folder / "day2/empty.ogg").write_bytes(b"")
    (folder / "day2/empty.flac").write_bytes(b"")
    whole_m4a = make_recording(tmp_path / "full.m4a", 2.0)
    (folder / "day2/cut.m4a").write_bytes(whole_m4a.read_bytes()[:300])  # cut off before the audio
    shutil.copy(REPO / "data" / "images" / "sunset.png", folder / "day2/picture.webm")
    make_recording(folder / "quiet.wav", 2.0, loud=0.0)
    make_recording(folder / "quiet.m4a", 2.0, loud=0.0)
    (folder / "README.txt").write_text("not taken: a folder input takes audio and video extensions only")

    out = tmp_path / "out"
    job = TranscribeJob(model=MODEL)
    doc = asyncio.run(run_job(job, options_for(emulator, str(folder), out, chunk_size=64)))
    assert_balanced(doc)
    assert doc["counts"]["input_rows"] == 200
    assert doc["counts"]["succeeded"] == 192 and doc["counts"]["failed"] == 8

    results = {r["id"]: r for r in read_output(out).iter_rows(named=True)}
    errors = {r["id"]: r for r in read_errors(out).iter_rows(named=True)}
    assert set(results) | set(errors) == set(good) | set(bad) and not set(results) & set(errors)
    assert sorted(errors) == sorted(bad)
    for name, says in bad.items():
        message = errors[name]["error_message"]
        assert str(folder / name) in message and says in message, message
        assert errors[name]["error_type"] == "invalid_input"
    for name in good:
        row, path = results[name], folder / name
        if path.suffix in (".wav", ".mp3"):  # short WAV and MP3 files go as they are
            fmt = path.suffix.lstrip(".")
            assert row["transcript"] == fake_transcript(path.read_bytes(), fmt, MODEL), name
        else:  # the rest is decoded and sent as one MP3 segment
            assert row["transcript"] == expected_stitch(path, 300, "mp3")[0], name
            assert "(mp3, " in row["transcript"]
        assert row["segments"][0]["start_s"] == 0.0
        assert row["segments"][-1]["end_s"] == pytest.approx(probe(str(path)).duration_s, abs=0.1), name
    assert emulator.stats["by_route"]["chat/completions"] == 192


def test_a_glob_over_an_fsspec_url_and_a_folder_of_pictures_for_caption(emulator, tmp_path):
    fs = fsspec.filesystem("memory")
    for i, name in enumerate(("2025/01/a.wav", "2025/02/b.wav", "2025/02/c.flac", "other/d.wav")):
        local = make_recording(tmp_path / f"src{i}.wav", 1.0, tone_hz=300 + 100 * i)
        with fs.open(f"/audio-in/{name}", "wb") as f:
            f.write(local.read_bytes() if name.endswith(".wav") else b"fLaC")
    try:
        out = tmp_path / "out"
        doc = asyncio.run(
            run_job(TranscribeJob(model=MODEL), options_for(emulator, "memory://audio-in/2025/**/*.wav", out))
        )
        assert doc["input"]["format"] == "glob" and doc["counts"]["succeeded"] == 2
        assert sorted(read_output(out)["id"]) == ["01/a.wav", "02/b.wav"], "relative to the glob's fixed folders"
    finally:
        fs.rm("/audio-in", recursive=True)
    with pytest.raises(InputError, match="matches no files"):
        asyncio.run(run_job(TranscribeJob(model=MODEL), options_for(emulator, str(tmp_path / "none/*.mp3"), out)))

    pictures = tmp_path / "pictures"
    (pictures / "trip").mkdir(parents=True)
    shutil.copy(REPO / "data" / "images" / "sunset.png", pictures / "sunset.png")
    shutil.copy(REPO / "data" / "images" / "sunset.png", pictures / "trip" / "again.png")
    (pictures / "list.txt").write_text("not a picture")
    job = CaptionJob(model=MODEL)
    doc = asyncio.run(run_job(job, options_for(emulator, str(pictures), tmp_path / "captions")))
    assert doc["input"]["format"] == "folder" and doc["counts"]["input_rows"] == 2
    rows = {r["id"]: r for r in read_output(tmp_path / "captions").iter_rows(named=True)}
    assert sorted(rows) == ["sunset.png", "trip/again.png"]
    expected = fake_caption((REPO / "data" / "images" / "sunset.png").read_bytes(), "image/png", MODEL, job.prompt)
    assert rows["sunset.png"]["caption"] == expected
    assert doc["counts"]["succeeded"] + doc["counts"]["deduplicated"] == 2, "same picture: sent once"


def test_a_segment_too_big_for_the_inline_limit_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"--segment-s 600 makes wav segments .* use --segment-s 481 or less"):
        TranscribeJob(model=MODEL, segment_s=600, segment_format="wav")
    assert math.isclose(SAMPLE_RATE, 16_000)
    assert pa.types.is_list(SEGMENT_TYPE)


def test_the_progress_bar_counts_audio_minutes_done():
    from tasks.engine.report.progress import ProgressBar
    from tasks.engine.send.context import RunStats

    bar = ProgressBar("transcribe", 3, RunStats(), enabled=True, unit=TranscribeJob.progress_unit)
    try:
        bar.add_units(300.0)
        bar.add_units(45.5)
        assert bar._progress.tasks[0].fields["units"] == "5.8 audio min done"
    finally:
        bar.close()
