"""The transcription job: one request per audio file, through chat (``input_audio``) or ``audio.transcriptions``."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from openai.types.audio import Transcription

from tasks.defaults import APIS, MAX_INLINE_BYTES
from tasks.engine.chunk import Item, Prepared, Reply, RowFailure, RowInvalid, unexpected_reply
from tasks.jobs.caption import reply_text
from tasks.jobs.chat import create_chat
from tasks.jobs.embed import estimate_text_tokens
from tasks.jobs.media import AUDIO_FORMATS, audio_duration_s, file_size, read_media, resolve_path, sniff_audio_format
from tasks.provider.client import Connection

__all__ = [
    "APIS",
    "DEFAULT_TRANSCRIBE_PROMPT",
    "DEFAULT_TRANSCRIPTIONS_MODEL",
    "MAX_INLINE_BYTES",
    "TranscribeJob",
    "TranscriptResult",
    "audio_tokens",
]

DEFAULT_TRANSCRIBE_PROMPT = "Transcribe this audio verbatim."
DEFAULT_TRANSCRIPTIONS_MODEL = "whisper-1"
AUDIO_TOKENS_PER_SECOND = 32  # GEMINI.md
UNKNOWN_DURATION_BYTES_PER_S = 16_000  # a rough bitrate for formats whose duration isn't read here


@dataclass(frozen=True, slots=True)
class TranscriptResult:
    transcript: str
    duration_s: float | None


@dataclass(frozen=True, slots=True)
class AudioRef:
    """What :meth:`TranscribeJob.send` needs: where to re-read the audio and what it was when planned."""

    path: str
    sha256: str
    format: str
    duration_s: float | None


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

    name = "transcribe"
    max_items_per_request = 1

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"--api must be one of {', '.join(APIS)}, got {self.api!r}")
        if self.max_inline_bytes < 1:
            raise ValueError(f"the inline size limit must be at least 1 byte, got {self.max_inline_bytes}")

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
        }

    def prepare(self, payload: dict[str, Any]) -> Prepared:
        value = payload[self.audio_col]
        if value is None or not str(value).strip():
            raise RowInvalid(f"column {self.audio_col!r} is empty: give an audio file path or URL")
        path = resolve_path(str(value), self.base_dir)
        size = _guard(path, value, file_size)
        if size is not None:
            self._check_size(path, size)
        data = _guard(path, value, lambda p: read_media(p).data)
        self._check_size(path, len(data))
        fmt = sniff_audio_format(data[:64])
        if fmt is None:
            raise RowInvalid(
                f"{path} is not a {', '.join(AUDIO_FORMATS)} audio file (first bytes {data[:8]!r}): "
                "convert it (e.g. ffmpeg -i IN OUT.mp3) or fix the path"
            )
        duration = audio_duration_s(data, fmt)
        sha256 = hashlib.sha256(data).hexdigest()
        prompt = self.effective_prompt
        fields = {"job": "transcribe", "model": self.model, "api": self.api, "prompt": prompt, "format": fmt}
        fields["audio_sha256"] = sha256
        tokens = audio_tokens(len(data), duration) + (estimate_text_tokens(prompt) if prompt else 0)
        return Prepared(fields=fields, tokens=tokens, data=AudioRef(path, sha256, fmt, duration))

    def _check_size(self, path: str, size: int) -> None:
        sent = request_bytes(size, self.api)
        if sent > self.max_inline_bytes:
            encoded = f" ({_mb(sent)} as base64)" if sent != size else ""
            raise RowInvalid(
                f"{path} is {_mb(size)}{encoded}, over the {_mb(self.max_inline_bytes)} inline request limit "
                f"({size} bytes; limit {self.max_inline_bytes} bytes): split or compress the audio (e.g. to mp3)"
            )

    async def send(self, conn: Connection, items: list[Item]) -> Reply:
        (item,) = items
        ref: AudioRef = item.prepared.data
        data = await asyncio.to_thread(_reread, ref)
        if data is None:
            message = f"{ref.path} changed or vanished during the run: run again to transcribe the current file"
            return Reply(results=[RowFailure("invalid_input", message)])
        if self.api == "transcriptions":
            return await self._send_transcriptions(conn, ref, data)
        return await self._send_chat(conn, ref, data)

    async def _send_chat(self, conn: Connection, ref: AudioRef, data: bytes) -> Reply:
        audio = {"data": base64.b64encode(data).decode(), "format": ref.format}
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
        usage = response.usage
        result: Any
        if text:
            result = TranscriptResult(transcript=text, duration_s=ref.duration_s)
        else:
            reason = response.choices[0].finish_reason
            message = f"the model returned no transcript for {ref.path} (finish_reason={reason})"
            result = RowFailure("empty_reply", message)
        return Reply(
            results=[result],
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            total_tokens=usage.total_tokens if usage else 0,
            first_token_s=answer.first_token_s,
        )

    async def _send_transcriptions(self, conn: Connection, ref: AudioRef, data: bytes) -> Reply:
        # The server reads the format from the file name: name it by what the bytes are.
        stem = posixpath.splitext(ref.path.rsplit("/", 1)[-1])[0] or "audio"
        extra = {"prompt": self.effective_prompt} if self.effective_prompt else {}
        response = await conn.client.audio.transcriptions.create(
            model=self.model, file=(f"{stem}.{ref.format}", data), **extra
        )
        if not isinstance(response, Transcription):
            raise unexpected_reply(response, "a transcription")
        text = response.text.strip() if response.text else ""
        result: Any = TranscriptResult(transcript=text, duration_s=ref.duration_s)
        if not text:
            result = RowFailure("empty_reply", f"the server returned an empty transcript for {ref.path}")
        # This route reports no token usage (Whisper bills by the minute): none is recorded.
        return Reply(results=[result])

    def output_schema(self, id_col: str, id_type: pa.DataType) -> pa.Schema:
        return pa.schema(
            [
                pa.field(id_col, id_type),
                pa.field("transcript", pa.string()),
                pa.field("duration_s", pa.float64()),
                pa.field("content_hash", pa.string()),
                pa.field("model", pa.string()),
            ]
        )

    def result_arrays(self, results: list[Any]) -> dict[str, pa.Array]:
        return {
            "transcript": pa.array([r.transcript for r in results], pa.string()),
            "duration_s": pa.array([r.duration_s for r in results], pa.float64()),
        }

    def results_from_table(self, table: pa.Table) -> dict[str, Any]:
        columns = [table.column(c).to_pylist() for c in ("content_hash", "transcript", "duration_s")]
        return {h: TranscriptResult(transcript=t, duration_s=d) for h, t, d in zip(*columns)}


def _guard(path: str, value: Any, read: Callable[[str], Any]) -> Any:
    try:
        return read(path)
    except FileNotFoundError:
        shown = path if str(value) == path else f"{path} (from {str(value)!r})"
        raise RowInvalid(f"audio file not found: {shown}; relative paths resolve against the input's folder") from None
    except (OSError, ValueError) as exc:
        raise RowInvalid(f"can't read audio {path}: {exc}") from None


def _reread(ref: AudioRef) -> bytes | None:
    try:
        data = read_media(ref.path).data
    except (OSError, ValueError):
        return None
    return data if hashlib.sha256(data).hexdigest() == ref.sha256 else None
