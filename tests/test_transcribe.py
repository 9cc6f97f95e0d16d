"""`gembatch transcribe` end to end against the emulator over real HTTP, reading the Parquet back."""

from __future__ import annotations

import asyncio
import math
import shutil
import struct
import wave
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from conftest import REPO, TEST_KEY_ENV, assert_balanced, read_errors, read_output

from emulator.fakes import fake_transcript
from flows import commands
from flows.options import command_job
from tasks.engine.run import RunOptions, run_job
from tasks.jobs.audio import SEGMENT_CODECS, iter_segments
from tasks.jobs.media import base_dir_of, sniff_audio_format
from tasks.jobs.transcribe import MAX_INLINE_BYTES, TranscribeJob, audio_tokens
from tasks.provider.client import ProviderSettings

MODEL = "gemini-3.8-flash"
AUDIO = REPO / "data" / "audio"
SAMPLES = ("tone.wav", "chirp.wav", "speech.wav", "speech.mp3")
LIMIT = 100_000  # bytes in the request: every sample fits as base64, long.wav doesn't
SEGMENT_S = 10.0  # 10 s MP3 segments fit in LIMIT


def run_transcribe(emu, input: Path | str, output: Path, *, chunk_size: int = 50, **job_kw) -> dict:
    job_kw.setdefault("model", MODEL)
    job = TranscribeJob(base_dir=base_dir_of(str(input)), **job_kw)
    options = RunOptions(
        input=str(input),
        output=str(output),
        provider=ProviderSettings(provider="local", base_url=emu.base_url, api_key_env=TEST_KEY_ENV, timeout_s=5),
        chunk_size=chunk_size,
    )
    return asyncio.run(run_job(job, options))


def write_list(path: Path, rows: list[tuple[int, str]]) -> Path:
    table = pa.table({"id": pa.array([r[0] for r in rows], pa.int64()), "audio": [r[1] for r in rows]})
    pcsv.write_csv(table, path)
    return path


def expected(path: Path, model: str = MODEL) -> str:
    data = path.read_bytes()
    return fake_transcript(data, sniff_audio_format(data), model)


def expected_segmented(path: Path, model: str = MODEL) -> str:
    """What a file sent in MP3 segments gets: each segment's transcript, in order."""
    segments = iter_segments(str(path), SEGMENT_S, SEGMENT_CODECS["mp3"])
    return " ".join(fake_transcript(s.audio, "mp3", model) for s in segments)


def wav_seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


@pytest.fixture
def recordings(tmp_path, monkeypatch) -> Path:
    """The sample clips, a few bad files and a list that names them relatively."""
    folder = tmp_path / "recordings"
    (folder / "clips").mkdir(parents=True)
    for name in SAMPLES:
        shutil.copy(AUDIO / name, folder / "clips" / name)
    with wave.open(str(folder / "clips" / "long.wav"), "wb") as w:  # 5 s at 8 kHz: 80 KB, 107 KB as base64
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"".join(struct.pack("<h", int(9000 * math.sin(i / 5))) for i in range(40_000)))
    (folder / "clips" / "notes.wav").write_text("meeting notes, not a recording\n" * 10)
    (folder / "clips" / "clip.mp3").write_bytes(b"GIF89a" + bytes(200))  # a picture with an audio name
    rows = [(i, f"clips/{name}") for i, name in enumerate(SAMPLES, start=1)]
    rows += [(5, "clips/missing.wav"), (6, "clips/notes.wav"), (7, "clips/clip.mp3"), (8, "clips/long.wav")]
    write_list(folder / "list.csv", rows)
    monkeypatch.chdir(tmp_path)  # relative paths must resolve against the list's folder, not here
    return folder


def test_every_clip_gets_its_transcript_and_bad_files_become_error_rows(emulator, recordings, tmp_path):
    doc = run_transcribe(
        emulator, recordings / "list.csv", tmp_path / "out", max_inline_bytes=LIMIT, chunk_size=3, segment_s=SEGMENT_S
    )

    out = read_output(tmp_path / "out")
    files = {i: recordings / "clips" / name for i, name in enumerate(SAMPLES, start=1)}
    files[8] = recordings / "clips" / "long.wav"
    assert sorted(out["id"].to_list()) == sorted(files)
    for row in out.iter_rows(named=True):
        path = files[row["id"]]
        if row["id"] == 8:  # over the inline limit: decoded and sent as one MP3 segment
            assert row["transcript"] == expected_segmented(path) and "(mp3, " in row["transcript"]
            assert row["segments"] == [{"start_s": 0.0, "end_s": 5.0, "text": row["transcript"]}]
            continue
        assert row["transcript"] == expected(path), f"id {row['id']}"
        assert row["segments"][0]["text"] == row["transcript"] and row["segments"][0]["start_s"] == 0.0
        if path.suffix == ".wav":
            assert row["duration_s"] == pytest.approx(wav_seconds(path))
    by_id = {row["id"]: row for row in out.iter_rows(named=True)}
    assert "(wav, " in by_id[1]["transcript"] and "(mp3, " in by_id[4]["transcript"]
    assert by_id[1]["duration_s"] == 1.0 and by_id[2]["duration_s"] == 2.0
    assert by_id[4]["duration_s"] == pytest.approx(3.024)  # lame's Xing header: 84 frames of 576 at 16 kHz
    assert set(out["model"]) == {MODEL}

    schema = pq.read_schema(next((tmp_path / "out").glob("part-*.parquet")))
    assert schema.field("id").type == pa.int64()
    assert schema.field("transcript").type == pa.string()
    assert schema.field("duration_s").type == pa.float64()
    assert schema.field("content_hash").type == pa.string()
    assert schema.field("model").type == pa.string()

    errors = {row["id"]: row for row in read_errors(tmp_path / "out").iter_rows(named=True)}
    assert sorted(errors) == [5, 6, 7]
    assert {e["error_type"] for e in errors.values()} == {"invalid_input"}
    assert "not found" in errors[5]["error_message"]
    for i, name in ((5, "missing.wav"), (6, "notes.wav"), (7, "clip.mp3")):
        assert str(recordings / "clips" / name) in errors[i]["error_message"]
    assert "is not a recording FFmpeg can read (Invalid data found" in errors[6]["error_message"]
    assert "is not a recording FFmpeg can read" in errors[7]["error_message"]
    assert "it is corrupt or not audio" in errors[7]["error_message"]

    assert doc["status"] == "completed with errors"  # the bad files' rows are in _errors/
    assert_balanced(doc)
    assert doc["counts"]["succeeded"] == 5 and doc["counts"]["failed"] == 3
    assert emulator.stats["by_route"]["chat/completions"] == 5
    # The emulator counts 32 tokens per second of audio, as the estimate does.
    assert doc["tokens"]["prompt"] == emulator.stats["prompt_tokens"] > 32 * 6


def test_rerun_sends_nothing(emulator, recordings, tmp_path):
    kw = {"max_inline_bytes": LIMIT, "segment_s": SEGMENT_S}
    run_transcribe(emulator, recordings / "list.csv", tmp_path / "out", **kw)
    emulator.reset_stats()

    doc = run_transcribe(emulator, recordings / "list.csv", tmp_path / "out", **kw)
    assert emulator.stats["by_route"]["chat/completions"] == 0 and doc["requests"]["sent"] == 0
    assert doc["counts"]["skipped_done"] == 5 and doc["counts"]["failed"] == 3
    assert_balanced(doc)

    doc = run_transcribe(emulator, recordings / "list.csv", tmp_path / "out")  # the default 20 MB limit
    assert emulator.stats["by_route"]["chat/completions"] == 1, "only long.wav, now sent whole"
    out = read_output(tmp_path / "out")
    row = out.filter(out["id"] == 8).row(0, named=True)
    assert row["transcript"] == expected(recordings / "clips" / "long.wav") and row["duration_s"] == 5.0


def test_the_transcriptions_api_for_openai_style_servers(emulator, recordings, tmp_path):
    params = {"input": str(recordings / "list.csv"), "output": "", "provider": "openai", "api": "transcriptions"}
    # A multipart upload carries the raw bytes (no base64): long.wav is 80,044 of them.
    params |= {"audio_col": "audio", "prompt": None, "max_inline_bytes": 70_000, "segment_s": SEGMENT_S}
    job = command_job(commands.transcribe, **params).job
    assert job.model == "whisper-1" and job.base_dir == str(recordings)
    options = RunOptions(
        input=params["input"],
        output=str(tmp_path / "out"),
        provider=ProviderSettings(provider="local", base_url=emulator.base_url, api_key_env=TEST_KEY_ENV, timeout_s=5),
    )

    doc = asyncio.run(run_job(job, options))
    assert doc["counts"]["succeeded"] == 5 and doc["counts"]["failed"] == 3
    assert emulator.stats["by_route"]["audio/transcriptions"] == 5
    assert emulator.stats["by_route"]["chat/completions"] == 0
    out = read_output(tmp_path / "out")
    for row in out.iter_rows(named=True):
        if row["id"] == 8:  # 80,044 bytes, over 70,000: one MP3 segment
            assert row["transcript"] == expected_segmented(recordings / "clips" / "long.wav", "whisper-1")
            continue
        assert row["transcript"] == expected(recordings / "clips" / SAMPLES[row["id"] - 1], "whisper-1")
    assert set(out["model"]) == {"whisper-1"}
    assert sorted(read_errors(tmp_path / "out")["id"]) == [5, 6, 7]


def test_the_sample_list_resolves_from_another_working_directory(emulator, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = {"input": str(REPO / "data" / "audio.csv"), "output": "", "provider": "gemini", "api": "chat"}
    params |= {"audio_col": "audio", "prompt": None, "max_inline_bytes": MAX_INLINE_BYTES}
    job = command_job(commands.transcribe, **params).job
    assert job.model == "gemini-3.8-flash" and job.max_inline_bytes == 20 * 1024 * 1024

    doc = run_transcribe(emulator, REPO / "data" / "audio.csv", tmp_path / "out")
    assert doc["counts"]["succeeded"] == 4 and doc["counts"]["failed"] == 0
    for row in read_output(tmp_path / "out").iter_rows(named=True):
        assert row["transcript"] == expected(AUDIO / SAMPLES[row["id"] - 1])


def test_format_sniffing_and_the_token_estimate():
    assert sniff_audio_format(b"FORM\x00\x00\x00\x10AIFFCOMM") == "aiff"
    assert sniff_audio_format(b"fLaC\x00\x00") == "flac"
    assert sniff_audio_format(b"OggS\x00\x02") == "ogg"
    assert sniff_audio_format(b"\xff\xf1\x50\x80") == "aac"
    assert sniff_audio_format(b"\xff\xfb\x90\x64") == "mp3"
    assert sniff_audio_format(b"ID3\x04\x00") == "mp3"
    assert sniff_audio_format(b"GIF89a") is None
    assert audio_tokens(16_000, 2.0) == 64
    assert audio_tokens(16_000, None) == 32, "unknown duration: about 16 KB a second"
