"""The transcription job: a recording of any length and common format becomes one row.

A WAV or MP3 file no longer than ``segment_s`` and within the inline limit is sent as it is, one
request, as before. Any other recording (flac, ogg/opus, m4a/aac, the audio track of webm/mp4, anything
longer) is decoded as a stream and cut into segments (see
tasks/jobs/audio.py), each sent as its own request through the engine's limiter, retries and outage
breaker (:func:`tasks.engine.send.chunk.send_part`). The row's transcript is the segments' texts in order,
and ``segments`` lists each one's times and text.

Every answered segment of a long recording is recorded at once in ``OUTPUT/_segments/<row content
hash>/<index>.parquet``: a killed run's rerun decodes the file again but sends only the segments not
recorded there. The folder of a row is removed once the row is in the output.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import posixpath
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from openai.types.audio import Transcription

from tasks.defaults import APIS, DEFAULT_SEGMENT_FORMAT, DEFAULT_SEGMENT_S, MAX_INLINE_BYTES, SEGMENT_FORMATS
from tasks.engine.job import Item, Outcome, Prepared, Reply, RowFailure, RowInvalid, unexpected_reply
from tasks.engine.plan.keys import hash_keys
from tasks.jobs.audio import (
    SEGMENT_CODECS,
    SILENCE_DBFS,
    SILENCE_PEAK,
    AudioError,
    Segment,
    iter_segments,
    probe,
)
from tasks.jobs.caption import reply_text
from tasks.jobs.chat import create_chat
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
AUDIO_TOKENS_PER_SECOND = 32  # GEMINI.md
UNKNOWN_DURATION_BYTES_PER_S = 16_000  # a rough bitrate for formats whose duration isn't read here
SEGMENTS_DIR = "_segments"
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
SEGMENT_TYPE = pa.list_(
    pa.struct([pa.field("start_s", pa.float64()), pa.field("end_s", pa.float64()), pa.field("text", pa.string())])
)


@dataclass(frozen=True, slots=True)
class SegmentText:
    start_s: float
    end_s: float
    text: str


@dataclass(frozen=True, slots=True)
class TranscriptResult:
    transcript: str
    duration_s: float | None
    segments: list[SegmentText] | None = None


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


@dataclass(frozen=True, slots=True)
class SegmentRef:
    """One encoded segment of a recording, ready to send."""

    path: str
    index: int
    format: str
    audio: bytes = field(repr=False)


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
        shared = ctx.shared.setdefault(
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
        ctx.on_units(measured.end_s)
        return _whole_outcome(ref, measured, outcome)

    async def finish_line(self, item: Item, outcome: Outcome) -> Outcome:
        """Batch mode: a recording answered as one batch line gets what a live whole send gives it (the
        decoded duration, one segment); a silent or corrupt one is an error row as live."""
        measured = await self._measure_whole(item.prepared.data)
        return measured if isinstance(measured, Outcome) else _whole_outcome(item.prepared.data, measured, outcome)

    async def _measure_whole(self, ref: AudioRef) -> Any:
        """The recording decoded once (not silent, not corrupt), or the error row it makes."""
        try:
            measured = await asyncio.to_thread(_measure, ref.path, self.segment_s, self.media)
        except MediaRefused as exc:
            return _invalid(str(exc))
        except (AudioError, OSError) as exc:
            return _invalid(f"{ref.path} {exc}: it is corrupt; re-encode it (e.g. ffmpeg -i IN OUT.mp3)")
        if measured.silent:
            return _invalid(_silent_message(ref.path, measured.end_s))
        return measured

    async def _send_segments(self, ctx: Any, item: Item, send_part: Callable, shared: dict) -> Outcome | None:
        ref: AudioRef = item.prepared.data
        store = SegmentStore(ctx.store.fs, f"{ctx.store.root}/{SEGMENTS_DIR}/{item.content_hash}")
        recorded = await asyncio.to_thread(store.load)
        codec = SEGMENT_CODECS[self.segment_format]
        texts: dict[int, SegmentText] = {}
        outcomes: dict[int, Outcome | None] = {}
        times: dict[int, tuple[float, float]] = {}
        tasks: set[asyncio.Task] = set()
        on_hand: asyncio.Semaphore = shared["on_hand"]
        broken: str | None = None
        finished = False
        last_end = 0.0

        async def one(segment: Segment, part: Item) -> None:
            try:
                outcome = await send_part(ctx, part)
            finally:
                on_hand.release()
            outcomes[segment.index] = outcome
            if outcome is not None and outcome.ok:
                text = SegmentText(segment.start_s, segment.end_s, outcome.result.transcript)
                texts[segment.index] = text
                await asyncio.to_thread(store.record, segment.index, text)
                ctx.on_units(segment.seconds)

        try:
            async with shared["decoding"]:
                try:
                    changed = await asyncio.to_thread(file_sha256, ref.path, self.media)
                except (MediaRefused, OSError) as exc:
                    return _invalid(f"can't read audio {redact_url(ref.path)} again: {redact_text(str(exc))}")
                if changed != ref.sha256:
                    message = f"{ref.path} changed during the run: run again to transcribe the current file"
                    return _invalid(message)
                segments = _segments_of(ref.path, self.segment_s, codec, recorded, self.media)
                try:
                    while not ctx.stop_event.is_set():
                        await on_hand.acquire()
                        try:
                            segment = await asyncio.to_thread(next, segments, None)
                        except BaseException:
                            on_hand.release()
                            raise
                        if segment is None:
                            on_hand.release()
                            finished = True
                            break
                        times[segment.index] = (segment.start_s, segment.end_s)
                        last_end = segment.end_s
                        known = recorded.get(segment.index)
                        if known is not None and (known.start_s, known.end_s) == (segment.start_s, segment.end_s):
                            texts[segment.index] = known
                            on_hand.release()
                            ctx.on_units(segment.seconds)
                            continue
                        if segment.audio is None:  # silence: nothing to send
                            texts[segment.index] = SegmentText(segment.start_s, segment.end_s, "")
                            on_hand.release()
                            ctx.on_units(segment.seconds)
                            continue
                        tokens = math.ceil(segment.seconds * AUDIO_TOKENS_PER_SECOND)
                        if self.effective_prompt:
                            tokens += estimate_text_tokens(self.effective_prompt)
                        data = SegmentRef(ref.path, segment.index, codec.format, segment.audio)
                        key = f"{item.content_hash}:{segment.index}"
                        part = Item(item.position, item.row_id, key, Prepared({}, tokens, data))
                        task = asyncio.create_task(one(segment, part))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                except AudioError as exc:
                    broken = f"{ref.path} {exc}: it is corrupt from there on; re-encode it (e.g. ffmpeg -i IN OUT.mp3)"
                except MediaRefused as exc:
                    broken = str(exc)
                except OSError as exc:
                    broken = f"can't read audio {ref.path}: {exc}"
                finally:
                    await asyncio.to_thread(_close, segments)
            if tasks:
                await asyncio.gather(*list(tasks))
        finally:
            for task in list(tasks):
                task.cancel()
        attempts = max((o.attempts for o in outcomes.values() if o is not None), default=0)
        if broken is not None:
            return _invalid(broken, attempts)
        for index in sorted(outcomes):
            outcome = outcomes[index]
            if outcome is None:
                return None  # the run is stopping: the answered segments are recorded
            if not outcome.ok:
                start, end = times[index]
                return Outcome(
                    error_type=outcome.error_type,
                    error_message=f"segment {index} ({start:.1f}-{end:.1f} s) of {ref.path}: {outcome.error_message}",
                    attempts=attempts,
                    raw_reply=outcome.raw_reply,
                    retry_auto=outcome.retry_auto,
                )
        if not finished or len(texts) < len(times):
            return None  # the run is stopping: the answered segments are recorded
        ordered = [texts[i] for i in sorted(times)]
        if not outcomes and not any(i in recorded for i in times):
            return _invalid(_silent_message(ref.path, last_end))
        result = TranscriptResult(transcript=stitch(ordered), duration_s=last_end, segments=ordered)
        # The segments' models (one, unless the provider rerouted the model in the middle of a recording).
        served = sorted({o.served_model for o in outcomes.values() if o is not None and o.served_model})
        return Outcome(result=result, attempts=max(attempts, 1), served_model=",".join(served) or None)

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
            return await self._send_transcriptions(conn, where, f"{stem}.{fmt}", data)
        return await self._send_chat(conn, where, data, fmt, segment=isinstance(ref, SegmentRef))

    async def _send_chat(self, conn: Connection, where: str, data: bytes, fmt: str, *, segment: bool) -> Reply:
        audio = {"data": base64.b64encode(data).decode(), "format": fmt}
        answer = await create_chat(
            conn,
            model=self.model,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": self.effective_prompt},
                        {"type": "input_audio", "input_audio": audio},
                    ],
                }
            ],
        )
        response = answer.completion
        text = reply_text(response)
        result: Any
        reason = response.choices[0].finish_reason
        if text or (segment and reason == "stop"):
            # A segment of a recording may hold no speech (music, a pause above the silence level):
            # an empty answer that ended normally is its transcript.
            result = TranscriptResult(transcript=text or "", duration_s=None)
        else:
            message = f"the model returned no transcript for {where} (finish_reason={reason})"
            result = RowFailure("empty_reply", message)
        return answer.reply(result)

    async def _send_transcriptions(self, conn: Connection, where: str, filename: str, data: bytes) -> Reply:
        # The server reads the format from the file name: name it by what the bytes are.
        extra = {"prompt": self.effective_prompt} if self.effective_prompt else {}
        response = await conn.client.audio.transcriptions.create(model=self.model, file=(filename, data), **extra)
        if not isinstance(response, Transcription):
            raise unexpected_reply(response, "a transcription")
        text = response.text.strip() if response.text else ""
        result: Any = TranscriptResult(transcript=text, duration_s=None)
        if not text:
            result = RowFailure("empty_reply", f"the server returned an empty transcript for {where}")
        # This route reports no token usage (Whisper bills by the minute): none is recorded.
        return Reply(results=[result])

    # -- output -----------------------------------------------------------------------------------
    def output_schema(self, id_col: str, id_type: pa.DataType) -> pa.Schema:
        return pa.schema(
            [
                pa.field(id_col, id_type),
                pa.field("transcript", pa.string()),
                pa.field("duration_s", pa.float64()),
                pa.field("segments", SEGMENT_TYPE),
                pa.field("content_hash", pa.string()),
                pa.field("model", pa.string()),
                # The model the reply named (a reroute shows here); null where the reply named none.
                pa.field("served_model", pa.string()),
            ]
        )

    def result_arrays(self, results: list[Any]) -> dict[str, pa.Array]:
        segments = [None if r.segments is None else [_segment_dict(x) for x in r.segments] for r in results]
        return {
            "transcript": pa.array([r.transcript for r in results], pa.string()),
            "duration_s": pa.array([r.duration_s for r in results], pa.float64()),
            "segments": pa.array(segments, SEGMENT_TYPE),
        }

    def results_from_table(self, table: pa.Table) -> dict[str, Any]:
        names = ("content_hash", "transcript", "duration_s")
        columns = [table.column(c).to_pylist() for c in names]
        segments = table.column("segments").to_pylist() if "segments" in table.column_names else [None] * len(table)
        return {
            h: TranscriptResult(
                transcript=t,
                duration_s=d,
                segments=None if s is None else [SegmentText(x["start_s"], x["end_s"], x["text"]) for x in s],
            )
            for h, t, d, s in zip(*columns, segments)
        }

    def tidy_output(self, store: Any, index: Any) -> int:
        """Remove the recorded segments of rows now in the output; returns the folders removed."""
        folder = f"{store.root}/{SEGMENTS_DIR}"
        if not store.fs.exists(folder):
            return 0
        rows = [p.rstrip("/") for p in store.fs.ls(folder, detail=False)]
        names = [p.rsplit("/", 1)[-1] for p in rows]
        if not names:
            return 0
        done = index.contents_stored(hash_keys(names))
        removed = 0
        for path, is_done in zip(rows, done.tolist()):
            if is_done:
                store.fs.rm(path, recursive=True)
                removed += 1
        if removed == len(rows):
            store.fs.rm(folder, recursive=True)
        return removed


def _segment_dict(segment: SegmentText) -> dict[str, Any]:
    return {"start_s": segment.start_s, "end_s": segment.end_s, "text": segment.text}


def stitch(segments: list[SegmentText]) -> str:
    """A row's transcript: the segments' texts in order, one space between (silent ones left out)."""
    return " ".join(s.text.strip() for s in segments if s.text.strip())


class SegmentStore:
    """The answered segments of one recording: one small Parquet file each, written atomically."""

    def __init__(self, fs: Any, folder: str) -> None:
        self.fs = fs
        self.folder = folder

    def load(self) -> dict[int, SegmentText]:
        if not self.fs.exists(self.folder):
            return {}
        found: dict[int, SegmentText] = {}
        for path in self.fs.ls(self.folder, detail=False):
            if not path.endswith(".parquet") or path.rsplit("/", 1)[-1].startswith("."):
                continue
            try:
                with self.fs.open(path, "rb") as f:
                    row = pq.read_table(f).to_pylist()[0]
            except (OSError, pa.ArrowException, IndexError):
                continue  # unreadable: the segment is sent again
            found[int(row["index"])] = SegmentText(row["start_s"], row["end_s"], row["text"])
        return found

    def record(self, index: int, segment: SegmentText) -> None:
        table = pa.table(
            {
                "index": pa.array([index], pa.int32()),
                "start_s": pa.array([segment.start_s], pa.float64()),
                "end_s": pa.array([segment.end_s], pa.float64()),
                "text": pa.array([segment.text], pa.string()),
            }
        )
        self.fs.makedirs(self.folder, exist_ok=True)
        tmp = f"{self.folder}/.tmp-{uuid.uuid4().hex}.inprogress"
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        self.fs.mv(tmp, f"{self.folder}/{index:05d}.parquet")


@dataclass(frozen=True, slots=True)
class _Measured:
    end_s: float
    silent: bool


def _measure(path: str, segment_s: float, policy: MediaPolicy | None = None) -> _Measured:
    """Decode a recording (nothing encoded): its decoded length, and whether it is all silence."""
    end, silent = 0.0, True
    for segment in iter_segments(path, max(segment_s, 1.0), None, policy=policy):
        end = segment.end_s
        silent = silent and segment.peak < SILENCE_PEAK
    return _Measured(end, silent)


def _segments_of(
    path: str, segment_s: float, codec: Any, recorded: dict[int, SegmentText], policy: MediaPolicy | None = None
) -> Iterator[Segment]:
    """The recording's segments, encoded except those already recorded (their times are checked)."""
    skip = {i: (s.start_s, s.end_s) for i, s in recorded.items()}
    return iter_segments(path, segment_s, codec, skip=skip, policy=policy)


def _close(segments: Iterator[Segment]) -> None:
    """Close the decoder (and its file); a cancelled run may leave a decode step still running."""
    try:
        segments.close()
    except ValueError:  # "generator already executing": it ends with the thread, the file with it
        pass


def _silent_message(path: str, seconds: float) -> str:
    return (
        f"{path} is silent: no sound above {SILENCE_DBFS:g} dBFS in its {seconds:.1f} s, nothing to transcribe; "
        "check the recording (muted microphone, wrong track)"
    )


def _whole_outcome(ref: AudioRef, measured: Any, outcome: Outcome) -> Outcome:
    text = outcome.result.transcript
    segment = SegmentText(0.0, measured.end_s, text)
    result = TranscriptResult(transcript=text, duration_s=ref.duration_s or measured.end_s, segments=[segment])
    return Outcome(result=result, attempts=outcome.attempts, served_model=outcome.served_model)


def _invalid(message: str, attempts: int = 0) -> Outcome:
    return Outcome(error_type="invalid_input", error_message=message, attempts=attempts)


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
