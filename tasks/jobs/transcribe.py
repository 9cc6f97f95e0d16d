"""The transcription job: a recording of any length and common format becomes one row.

A WAV or MP3 file no longer than ``segment_s`` and within the inline limit is sent as it is, one
request, as before. Any other recording (flac, ogg/opus, m4a/aac, the audio track of webm/mp4, anything
longer) is decoded as a stream and cut into segments (see
tasks/jobs/audio.py), each sent as its own request through the engine's limiter, retries and outage
breaker (:func:`tasks.engine.send.send_rows.send_part`). The row's transcript is the segments' texts in order,
and ``segments`` lists each one's times and text.

Every answered segment of a long recording is recorded at once in ``OUTPUT/_segments/<row content
hash>/<index>.parquet``: a killed run's rerun decodes the file again but sends only the segments not
recorded there. The folder of a row is removed once the row is in the output.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import posixpath
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from tasks.defaults import APIS, DEFAULT_SEGMENT_FORMAT, DEFAULT_SEGMENT_S, MAX_INLINE_BYTES, SEGMENT_FORMATS
from tasks.engine.job import Item, Outcome, Prepared, Reply, RowFailure, RowInvalid, result_schema
from tasks.jobs.audio import (
    SEGMENT_CODECS,
    AudioError,
    probe,
)
from tasks.jobs.embed import estimate_text_tokens
from tasks.jobs.media import (
    audio_duration_s,
    file_sha256,
    file_size,
    read_head,
    read_media,
    resolve_path,
    sniff_audio_format,
)
from tasks.jobs.media_access import MediaPolicy, MediaRefused
from tasks.jobs.transcribe_requests import send_chat, send_transcriptions
from tasks.jobs.transcript_segments import (
    AUDIO_TOKENS_PER_SECOND,
    SEGMENT_TYPE,
    SEGMENTS_DIR,
    SegmentRef,
    SegmentSend,
    SegmentStore,
    TranscriptResult,
    invalid_row,
    measure_recording,
    silent_message,
    stitch,
    tidy_segments,
    transcript_arrays,
    transcripts_from_table,
    whole_outcome,
)
from tasks.provider.client import Connection
from tasks.redact import redact_text, redact_url

__all__ = [
    "APIS",
    "DEFAULT_SEGMENT_S",
    "DEFAULT_TRANSCRIBE_PROMPT",
    "DEFAULT_TRANSCRIPTIONS_MODEL",
    "MAX_INLINE_BYTES",
    "SEGMENTS_DIR",
    "SEGMENT_TYPE",
    "TranscribeJob",
    "TranscriptResult",
    "audio_tokens",
    "stitch",
]

DEFAULT_TRANSCRIBE_PROMPT = "Transcribe this audio verbatim."
DEFAULT_TRANSCRIPTIONS_MODEL = "whisper-1"
UNKNOWN_DURATION_BYTES_PER_S = 16_000  # a rough bitrate for formats whose duration isn't read here
# Sent as they are when short enough: the formats both Gemini and OpenAI take inline. Anything else
# (aac, ogg/opus, flac, aiff, m4a, webm…) is decoded and sent as segments of --segment-format, since
# GEMINI.md marks the others unconfirmed through the OpenAI-compatible endpoint and OpenAI refuses them.
WHOLE_FORMATS = ("wav", "mp3")
# Encoded segments decoded ahead of their answer, across the run: bounds memory (64 five-minute MP3
# segments are ~80 MB) whatever the number of recordings in flight.
MAX_SEGMENTS_ON_HAND = 64
# Recordings being decoded at once (each holds an open file and a decoder).
MAX_RECORDINGS_DECODING = 8
# Bump when the way segments are cut or encoded changes: recorded segments then no longer match.
SEGMENTER_VERSION = 1


@dataclass(frozen=True, slots=True)
class AudioRef:
    """What :meth:`TranscribeJob.send_in_parts` needs: where to re-read the audio, what it was when
    planned, and whether it goes as it is (``whole``) or in segments."""

    path: str
    sha256: str
    format: str | None
    duration_s: float | None
    whole: bool
    segments: int  # expected (from the header's duration)


def audio_tokens(size_bytes: int, duration_s: float | None) -> int:
    seconds = duration_s if duration_s is not None else size_bytes / UNKNOWN_DURATION_BYTES_PER_S
    return max(1, math.ceil(seconds * AUDIO_TOKENS_PER_SECOND))


def request_bytes(size_bytes: int, api: str) -> int:
    """Bytes the audio takes in the request: base64 in a chat body, raw in a multipart upload."""
    return 4 * math.ceil(size_bytes / 3) if api == "chat" else size_bytes


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


@dataclass(frozen=True, kw_only=True)
class TranscribeJob:
    model: str
    audio_col: str = "audio"
    prompt: str | None = None
    api: str = "chat"
    max_inline_bytes: int = MAX_INLINE_BYTES
    base_dir: str | None = None
    segment_s: float = DEFAULT_SEGMENT_S
    segment_format: str = DEFAULT_SEGMENT_FORMAT
    # Where audio cells may point (default: under base_dir; anywhere but http(s) without one).
    media: MediaPolicy | None = None

    name = "transcribe"
    max_items_per_request = 1
    progress_unit = "audio min"
    audio_input = True  # prompt tokens are billed at the model's audio price (GEMINI.md)

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"--api must be one of {', '.join(APIS)}, got {self.api!r}")
        if self.max_inline_bytes < 1:
            raise ValueError(f"the inline size limit must be at least 1 byte, got {self.max_inline_bytes}")
        if self.segment_format not in SEGMENT_FORMATS:
            formats = ", ".join(SEGMENT_FORMATS)
            raise ValueError(f"--segment-format must be one of {formats}, got {self.segment_format!r}")
        if not 1 <= self.segment_s <= 9 * 3600:
            raise ValueError(f"--segment-s must be within 1-32400 seconds, got {self.segment_s:g}")
        codec = SEGMENT_CODECS[self.segment_format]
        if self.media is None:
            default = MediaPolicy.under((self.base_dir,)) if self.base_dir else MediaPolicy()
            object.__setattr__(self, "media", default)

        # Cuts fall before each boundary, so a segment is at most segment_s (the last one a 20 ms
        # window more): allow 2 % and a container header.
        def largest(seconds: float) -> int:
            return request_bytes(math.ceil(seconds * 1.02 * codec.bytes_per_s) + 4096, self.api)

        if largest(self.segment_s) > self.max_inline_bytes:
            fits = int(self.segment_s)
            while fits > 1 and largest(fits) > self.max_inline_bytes:
                fits -= 1
            raise ValueError(
                f"--segment-s {self.segment_s:g} makes {self.segment_format} segments of up to "
                f"{_mb(largest(self.segment_s))} in the "
                f"request, over --max-inline-bytes ({_mb(self.max_inline_bytes)}): use --segment-s {fits} or less"
            )

    @property
    def input_columns(self) -> tuple[str, ...]:
        return (self.audio_col,)

    @property
    def string_columns(self) -> tuple[str, ...]:
        return (self.audio_col,)

    @property
    def streams(self) -> bool:
        """--stream: the chat route's replies may come as streams; the transcriptions route's don't."""
        return self.api == "chat"

    @property
    def effective_prompt(self) -> str | None:
        """Chat needs an instruction; for Whisper-style servers a prompt is only a style hint, so none by default."""
        if self.api == "chat":
            return self.prompt or DEFAULT_TRANSCRIBE_PROMPT
        return self.prompt or None

    def parameters(self) -> dict[str, Any]:
        return {
            "audio_col": self.audio_col,
            "api": self.api,
            "prompt": self.effective_prompt,
            "max_inline_bytes": self.max_inline_bytes,
            "base_dir": self.base_dir,
            "segment_s": self.segment_s,
            "segment_format": self.segment_format,
            **self.media.describe(),
        }

    # -- planning ---------------------------------------------------------------------------------
    def prepare(self, payload: dict[str, Any]) -> Prepared:
        value = payload[self.audio_col]
        if value is None or not str(value).strip():
            raise RowInvalid(f"column {self.audio_col!r} is empty: give an audio file path or URL")
        policy = self.media
        try:
            path = policy.check(resolve_path(str(value), self.base_dir), kind="audio", value=value)
        except MediaRefused as exc:
            raise RowInvalid(str(exc)) from None
        size = _guard(path, value, lambda p: file_size(p, policy))
        head = _guard(path, value, lambda p: read_head(p, policy=policy))
        if size is None:
            size = len(head) if len(head) < 64 else None
        if size == 0 or not head:
            raise RowInvalid(f"{path} is empty (0 bytes): nothing to transcribe; remove it or record it again")
        try:
            info = probe(path, policy)
        except MediaRefused as exc:
            raise RowInvalid(str(exc)) from None
        except AudioError as exc:
            raise RowInvalid(
                f"{path} {exc}: it is corrupt or not audio; convert it (e.g. ffmpeg -i IN OUT.mp3) or fix the path"
            ) from None
        except OSError as exc:
            raise RowInvalid(f"can't read audio {path}: {exc}") from None
        fmt = sniff_audio_format(head)
        duration = info.duration_s
        whole = (
            fmt in WHOLE_FORMATS
            and size is not None
            and request_bytes(size, self.api) <= self.max_inline_bytes
            and duration is not None
            and duration <= self.segment_s
        )
        if whole:
            # As before: the header's own duration for WAV and MP3 (the Xing frame count).
            duration = audio_duration_s(_guard(path, value, lambda p: read_media(p, policy).data), fmt) or duration
        sha256 = _guard(path, value, lambda p: file_sha256(p, policy))
        prompt = self.effective_prompt
        prompt_tokens = estimate_text_tokens(prompt) if prompt else 0
        fields: dict[str, Any] = {"job": "transcribe", "model": self.model, "api": self.api, "prompt": prompt}
        if whole:
            fields["format"] = fmt
            segments = 1
            tokens = audio_tokens(size or 0, duration) + prompt_tokens
        else:
            fields |= {"segment_s": float(self.segment_s), "segment_format": self.segment_format}
            fields["segmenter"] = SEGMENTER_VERSION
            seconds = duration if duration is not None else (size or 0) / UNKNOWN_DURATION_BYTES_PER_S
            segments = max(1, math.ceil(seconds / self.segment_s))
            tokens = audio_tokens(size or 0, seconds) + segments * prompt_tokens
        fields["audio_sha256"] = sha256
        ref = AudioRef(path, sha256, fmt, duration, whole, segments)
        return Prepared(fields=fields, tokens=tokens, data=ref)

    def fits_one_line(self, prepared: Prepared) -> bool:
        """Batch mode: a recording sent whole is one batch line; a segmented one is sent live."""
        return self.api == "chat" and isinstance(prepared.data, AudioRef) and prepared.data.whole

    def requests_for(self, prepared: Prepared) -> int:
        """Requests a row will take (a dry run's count)."""
        return prepared.data.segments

    def measure(self, prepared: Prepared) -> tuple[str, float]:
        """What a dry run adds up besides tokens: seconds of audio (from the headers)."""
        return "audio_seconds", prepared.data.duration_s or 0.0

    # -- sending ----------------------------------------------------------------------------------
    async def send_in_parts(
        self, ctx: Any, item: Item, send_part: Callable[[Any, Item], Awaitable[Outcome | None]]
    ) -> Outcome | None:
        """The whole row: its recording checked (decoded: not silent, not corrupt), then sent whole
        or segment by segment; the row's Outcome, or None if the run stopped before it was done."""
        ref: AudioRef = item.prepared.data
        shared = ctx.on_hand.kept.setdefault(
            "transcribe",
            {
                "decoding": asyncio.Semaphore(MAX_RECORDINGS_DECODING),
                "on_hand": asyncio.Semaphore(MAX_SEGMENTS_ON_HAND),
            },
        )
        if ref.whole:
            return await self._send_whole(ctx, item, send_part, shared)
        return await self._send_segments(ctx, item, send_part, shared)

    async def _send_whole(self, ctx: Any, item: Item, send_part: Callable, shared: dict) -> Outcome | None:
        ref: AudioRef = item.prepared.data
        async with shared["decoding"]:
            measured = await self._measure_whole(ref)
        if isinstance(measured, Outcome):
            return measured
        outcome = await send_part(ctx, item)
        if outcome is None or not outcome.ok:
            return outcome
        ctx.progress.add_units(measured.end_s)
        return whole_outcome(ref, measured, outcome)

    async def finish_line(self, item: Item, outcome: Outcome) -> Outcome:
        """Batch mode: a recording answered as one batch line gets what a live whole send gives it (the
        decoded duration, one segment); a silent or corrupt one is an error row as live."""
        measured = await self._measure_whole(item.prepared.data)
        return measured if isinstance(measured, Outcome) else whole_outcome(item.prepared.data, measured, outcome)

    async def _measure_whole(self, ref: AudioRef) -> Any:
        """The recording decoded once (not silent, not corrupt), or the error row it makes."""
        try:
            measured = await asyncio.to_thread(measure_recording, ref.path, self.segment_s, self.media)
        except MediaRefused as exc:
            return invalid_row(str(exc))
        except (AudioError, OSError) as exc:
            return invalid_row(f"{ref.path} {exc}: it is corrupt; re-encode it (e.g. ffmpeg -i IN OUT.mp3)")
        if measured.silent:
            return invalid_row(silent_message(ref.path, measured.end_s))
        return measured

    async def _send_segments(self, ctx: Any, item: Item, send_part: Callable, shared: dict) -> Outcome | None:
        store = SegmentStore(ctx.output.store.fs, f"{ctx.output.store.root}/{SEGMENTS_DIR}/{item.content_hash}")
        segments = SegmentSend(self, ctx, item, send_part, shared["on_hand"], store)
        return await segments.run(shared["decoding"])

    async def send(self, conn: Connection, items: list[Item]) -> Reply:
        (item,) = items
        ref = item.prepared.data
        if isinstance(ref, SegmentRef):
            data, fmt = ref.audio, ref.format
            stem = f"{posixpath.splitext(ref.path.rsplit('/', 1)[-1])[0] or 'audio'}-{ref.index:05d}"
            where = f"segment {ref.index} of {ref.path}"
        else:
            data = await asyncio.to_thread(_reread, ref, self.media)
            if data is None:
                message = f"{ref.path} changed or vanished during the run: run again to transcribe the current file"
                return Reply(results=[RowFailure("invalid_input", message)])
            fmt = ref.format
            stem = posixpath.splitext(ref.path.rsplit("/", 1)[-1])[0] or "audio"
            where = ref.path
        if self.api == "transcriptions":
            return await send_transcriptions(conn, self.model, self.effective_prompt, where, f"{stem}.{fmt}", data)
        segment = isinstance(ref, SegmentRef)
        return await send_chat(conn, self.model, self.effective_prompt, where, data, fmt, segment=segment)

    # -- output -----------------------------------------------------------------------------------
    def output_schema(self, id_col: str, id_type: pa.DataType) -> pa.Schema:
        return result_schema(
            id_col,
            id_type,
            [
                pa.field("transcript", pa.string()),
                pa.field("duration_s", pa.float64()),
                pa.field("segments", SEGMENT_TYPE),
            ],
        )

    def result_arrays(self, results: list[Any]) -> dict[str, pa.Array]:
        return transcript_arrays(results)

    def results_from_table(self, table: pa.Table) -> dict[str, Any]:
        return transcripts_from_table(table)

    def tidy_output(self, store: Any, index: Any) -> int:
        """Remove the recorded segments of rows now in the output; returns the folders removed."""
        return tidy_segments(store, index)


def _guard(path: str, value: Any, read: Callable[[str], Any]) -> Any:
    try:
        return read(path)
    except MediaRefused as exc:
        raise RowInvalid(str(exc)) from None
    except FileNotFoundError:
        shown = redact_url(path) if str(value) == path else f"{redact_url(path)} (from {redact_url(str(value))!r})"
        raise RowInvalid(f"audio file not found: {shown}; relative paths resolve against the input's folder") from None
    except (OSError, ValueError, ImportError) as exc:
        raise RowInvalid(f"can't read audio {redact_url(path)}: {redact_text(str(exc))}") from None


def _reread(ref: AudioRef, policy: MediaPolicy | None = None) -> bytes | None:
    try:
        data = read_media(ref.path, policy).data
    except (OSError, ValueError):
        return None
    return data if hashlib.sha256(data).hexdigest() == ref.sha256 else None
