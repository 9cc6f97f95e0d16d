"""Recordings as a stream of segments: decode any common format with PyAV, cut at quiet moments, encode.

A recording is never held whole: its audio track is decoded packet by packet, resampled to mono
16 kHz (what speech models work at: Gemini downsamples audio to 16 kbps, Whisper listens at 16 kHz,
and speech carries nothing a transcript needs above 8 kHz), and cut into segments of about
``segment_s`` seconds. Between two segments only the few seconds after the last cut are kept.

Each cut falls at the quietest 20 ms within the last seconds before the nominal boundary, so a word is
rarely split between two requests. Each segment is encoded to MP3 (32 kbps mono: 4 KB a second, 1.2 MB
for five minutes — an eighth of WAV, and more than the 16 kbps Gemini keeps) or, on request, 16-bit WAV
(lossless, 32 KB a second, no encoder time). Both are accepted inline by Gemini and OpenAI.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from io import BytesIO
from typing import BinaryIO

import av
import numpy as np

from tasks.jobs.media import open_media
from tasks.jobs.media_access import MediaPolicy

__all__ = [
    "SAMPLE_RATE",
    "SEGMENT_CODECS",
    "AudioError",
    "AudioInfo",
    "Segment",
    "SegmentCodec",
    "cut_points",
    "encode",
    "iter_segments",
    "probe",
    "quiet_cut",
]

SAMPLE_RATE = 16_000
QUIET_WINDOW_S = 0.02
QUIET_SEARCH_S = 5.0
# A segment whose loudest sample is below -60 dBFS is silence: not sent (a model asked to transcribe
# silence may invent words), its text is "". A recording that is all silence is an error row.
SILENCE_DBFS = -60.0
SILENCE_PEAK = int(32768 * 10 ** (SILENCE_DBFS / 20))  # 32 in 16-bit samples
DECODE_BLOCK_SAMPLES = 1 << 16


@dataclass(frozen=True, slots=True)
class SegmentCodec:
    """How a segment is encoded for the request: ``bytes_per_s`` bounds its size (before base64)."""

    format: str
    codec: str
    bit_rate: int | None
    bytes_per_s: int


SEGMENT_CODECS = {
    "mp3": SegmentCodec("mp3", "libmp3lame", 32_000, 4_000),
    "wav": SegmentCodec("wav", "pcm_s16le", None, 2 * SAMPLE_RATE),
}


class AudioError(Exception):
    """The file can't be used as a recording; the message says why (the caller adds which file)."""


@dataclass(frozen=True, slots=True)
class AudioInfo:
    """What a file's header says, without decoding its audio."""

    duration_s: float | None
    container: str
    codec: str
    sample_rate: int
    channels: int


@dataclass(frozen=True, slots=True)
class Segment:
    """``start_s``/``end_s`` on the decoded timeline; ``audio`` is None for a silent segment."""

    index: int
    start_s: float
    end_s: float
    audio: bytes | None
    peak: int

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s


def _open_container(f: BinaryIO) -> av.container.InputContainer:
    try:
        return av.open(f, mode="r")
    except av.FFmpegError as exc:
        raise AudioError(f"is not a recording FFmpeg can read ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return text.split(": '", 1)[0] if isinstance(text, str) else str(exc)


def probe(path: str, policy: MediaPolicy | None = None) -> AudioInfo:
    """The audio track's duration and format from the container's header (no decoding)."""
    with open_media(path, policy) as f:
        with _open_container(f) as container:
            if not container.streams.audio:
                kinds = sorted({s.type for s in container.streams})
                held = f" (it holds only {', '.join(kinds)})" if kinds else ""
                raise AudioError(f"has no audio track{held}")
            stream = container.streams.audio[0]
            duration = None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            ctx = stream.codec_context
            return AudioInfo(
                duration_s=duration if duration is None or math.isfinite(duration) else None,
                container=container.format.name,
                codec=ctx.name,
                sample_rate=ctx.sample_rate or 0,
                channels=ctx.channels or 0,
            )


def iter_pcm(path: str, policy: MediaPolicy | None = None) -> Iterator[np.ndarray]:
    """The audio track as mono 16 kHz int16 blocks, decoded as a stream (one packet at a time)."""
    with open_media(path, policy) as f:
        with _open_container(f) as container:
            if not container.streams.audio:
                raise AudioError("has no audio track")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            decoded = 0
            try:
                for packet in container.demux(stream):
                    for frame in packet.decode():
                        for out in resampler.resample(frame):
                            block = out.to_ndarray().reshape(-1)
                            decoded += len(block)
                            yield block
                for out in resampler.resample(None):
                    block = out.to_ndarray().reshape(-1)
                    decoded += len(block)
                    yield block
            except av.FFmpegError as exc:
                raise AudioError(f"can't be decoded after {decoded / SAMPLE_RATE:.1f} s ({_reason(exc)})") from None


def quiet_cut(samples: np.ndarray, nominal: int, search: int, window: int) -> int:
    """Where to cut ``samples`` near ``nominal``: the middle of the quietest ``window`` within the
    ``search`` samples before it (the latest such window on a tie)."""
    lo = max(0, nominal - search)
    count = (nominal - lo) // window
    if count < 1:
        return nominal
    start = nominal - count * window
    region = samples[start:nominal].astype(np.float64).reshape(count, window)
    energy = np.einsum("ij,ij->i", region, region)
    best = count - 1 - int(np.argmin(energy[::-1]))
    return start + best * window + window // 2


def cut_points(
    blocks: Iterator[np.ndarray], segment_s: float, *, rate: int = SAMPLE_RATE
) -> Iterator[tuple[int, np.ndarray]]:
    """(first sample, samples) of each segment of a stream of blocks; only the uncut tail is held."""
    nominal = max(1, round(segment_s * rate))
    search = min(round(QUIET_SEARCH_S * rate), nominal // 4)
    window = max(1, round(QUIET_WINDOW_S * rate))
    pending: list[np.ndarray] = []
    held = 0
    first = 0
    for block in blocks:
        if not len(block):
            continue
        pending.append(block)
        held += len(block)
        while held >= nominal + window:
            buf = np.concatenate(pending)
            cut = quiet_cut(buf, nominal, search, window)
            yield first, buf[:cut]
            first += cut
            rest = buf[cut:]
            pending, held = [rest], len(rest)
    if held:
        yield first, np.concatenate(pending)


def encode(samples: np.ndarray, codec: SegmentCodec, *, rate: int = SAMPLE_RATE) -> bytes:
    """Mono int16 samples as a complete ``codec.format`` file."""
    buf = BytesIO()
    with av.open(buf, mode="w", format=codec.format) as container:
        stream = container.add_stream(codec.codec, rate=rate, layout="mono")
        if codec.bit_rate:
            stream.bit_rate = codec.bit_rate
        for i in range(0, len(samples), DECODE_BLOCK_SAMPLES):
            part = np.ascontiguousarray(samples[i : i + DECODE_BLOCK_SAMPLES], dtype=np.int16)
            frame = av.AudioFrame.from_ndarray(part.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def iter_segments(
    path: str,
    segment_s: float,
    codec: SegmentCodec | None,
    *,
    skip: Mapping[int, tuple[float, float]] | None = None,
    policy: MediaPolicy | None = None,
) -> Iterator[Segment]:
    """The recording at ``path`` as encoded segments; silent ones, those in ``skip`` (index → the
    (start_s, end_s) they must have: segments already answered) and all of them when ``codec`` is None
    are measured only (``audio`` None).

    Raises :class:`AudioError` for a file that can't be decoded or holds no samples.
    """
    index = -1
    for index, (first, samples) in enumerate(cut_points(iter_pcm(path, policy), segment_s)):
        peak = int(np.max(np.abs(samples.astype(np.int32)))) if len(samples) else 0
        start_s, end_s = first / SAMPLE_RATE, (first + len(samples)) / SAMPLE_RATE
        done = skip is not None and skip.get(index) == (start_s, end_s)
        audio = encode(samples, codec) if codec is not None and peak >= SILENCE_PEAK and not done else None
        yield Segment(index, start_s, end_s, audio, peak)
    if index < 0:
        raise AudioError("holds no audio samples (an empty recording)")
