"""Regenerate the sample audio and data/audio.csv: `uv run python data/audio/make_audio.py`.

Tones are synthesised with the stdlib, deterministically. The spoken clip needs `espeak-ng` and its
MP3 copy `lame` (apt-get install -y espeak-ng lame); without them the committed files are kept.
"""

from __future__ import annotations

import csv
import math
import shutil
import struct
import subprocess
import wave
from pathlib import Path

HERE = Path(__file__).resolve().parent
RATE = 8000
SPEECH = "The quick brown fox jumps over the lazy dog."


def write_wav(path: Path, samples: list[float], rate: int = RATE) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<h", round(32767 * 0.6 * s)) for s in samples))


def tone(seconds: float, hz: float) -> list[float]:
    return [math.sin(2 * math.pi * hz * i / RATE) for i in range(round(seconds * RATE))]


def chirp(seconds: float, start_hz: float, end_hz: float) -> list[float]:
    n = round(seconds * RATE)
    k = (end_hz - start_hz) / seconds
    return [math.sin(2 * math.pi * (start_hz * t + k * t * t / 2)) for t in (i / RATE for i in range(n))]


def halve_rate(path: Path) -> None:
    """espeak-ng writes 22,050 Hz; every other sample is plenty for speech and keeps the file small."""
    with wave.open(str(path), "rb") as w:
        params, frames = w.getparams(), w.readframes(w.getnframes())
    width = params.sampwidth * params.nchannels
    kept = b"".join(frames[i : i + width] for i in range(0, len(frames), 2 * width))
    with wave.open(str(path), "wb") as w:
        w.setparams(params._replace(framerate=params.framerate // 2, nframes=0))
        w.writeframes(kept)


def main() -> None:
    write_wav(HERE / "tone.wav", tone(1.0, 440.0))
    write_wav(HERE / "chirp.wav", chirp(2.0, 200.0, 2000.0))
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-s", "170", "-w", str(HERE / "speech.wav"), SPEECH], check=True)
        halve_rate(HERE / "speech.wav")
        if shutil.which("lame"):
            mp3_options = ["--quiet", "-m", "m", "-b", "32", "--resample", "16"]
            subprocess.run(["lame", *mp3_options, str(HERE / "speech.wav"), str(HERE / "speech.mp3")], check=True)
    names = ["tone.wav", "chirp.wav", "speech.wav", "speech.mp3"]
    with open(HERE.parent / "audio.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "audio"])
        writer.writerows([i, f"audio/{name}"] for i, name in enumerate(names, start=1) if (HERE / name).exists())


if __name__ == "__main__":
    main()
