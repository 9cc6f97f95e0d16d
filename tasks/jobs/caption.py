"""The captioning job: one chat completion per image, the image inline as a data URL."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from openai.types.chat import ChatCompletion

from tasks.defaults import DEFAULT_CAPTION_PROMPT, DEFAULT_MAX_SIDE
from tasks.engine.job import BadReply, Item, Prepared, Reply, RowFailure, RowInvalid, result_schema, unexpected_reply
from tasks.jobs.chat import create_chat
from tasks.jobs.embed import estimate_text_tokens
from tasks.jobs.images_io import (
    IMAGE_WORKERS,
    ImageError,
    image_for_model,
    image_pool,
    image_tokens,
    planned_size,
    probe,
)
from tasks.jobs.media import read_media, resolve_path
from tasks.jobs.media_access import MediaPolicy, MediaRefused
from tasks.provider.client import Connection
from tasks.redact import redact_text, redact_url

__all__ = [
    "CaptionJob",
    "CaptionResult",
    "DEFAULT_CAPTION_PROMPT",
    "DEFAULT_MAX_SIDE",
    "image_tokens",
]


@dataclass(frozen=True, slots=True)
class CaptionResult:
    caption: str
    width: int | None
    height: int | None


@dataclass(frozen=True, slots=True)
class ImageRef:
    """What :meth:`CaptionJob.send` needs: where to re-read the image and what it was when planned."""

    path: str
    sha256: str
    mime: str
    width: int
    height: int


@dataclass(frozen=True, kw_only=True)
class CaptionJob:
    model: str
    image_col: str = "image"
    prompt: str = DEFAULT_CAPTION_PROMPT
    max_side: int = DEFAULT_MAX_SIDE
    base_dir: str | None = None
    # Where image cells may point (default: under base_dir; anywhere but http(s) without one).
    media: MediaPolicy | None = None

    name = "caption"
    max_items_per_request = 1
    streams = True  # --stream (tasks/jobs/chat.py)
    prepare_workers = IMAGE_WORKERS  # prepare reads and hashes each file: one thread per CPU

    def __post_init__(self) -> None:
        if self.max_side < 1:
            raise ValueError(f"--max-side must be at least 1, got {self.max_side}")
        if not self.prompt.strip():
            raise ValueError("--prompt must not be empty")
        if self.media is None:
            default = MediaPolicy.under((self.base_dir,)) if self.base_dir else MediaPolicy()
            object.__setattr__(self, "media", default)

    @property
    def input_columns(self) -> tuple[str, ...]:
        return (self.image_col,)

    @property
    def string_columns(self) -> tuple[str, ...]:
        return (self.image_col,)

    def parameters(self) -> dict[str, Any]:
        return {
            "image_col": self.image_col,
            "prompt": self.prompt,
            "max_side": self.max_side,
            "base_dir": self.base_dir,
            **self.media.describe(),
        }

    def prepare(self, payload: dict[str, Any]) -> Prepared:
        value = payload[self.image_col]
        if value is None or not str(value).strip():
            raise RowInvalid(f"column {self.image_col!r} is empty: give an image path or URL")
        path = _located(self.media, resolve_path(str(value), self.base_dir), value)
        data = _read(path, value, self.media)
        try:
            info = probe(data, path)  # the header only: no pixel is decoded here
        except ImageError as exc:
            raise RowInvalid(str(exc)) from None
        sha256 = hashlib.sha256(data).hexdigest()
        fields = {"job": "caption", "model": self.model, "prompt": self.prompt, "max_side": self.max_side}
        fields["image_sha256"] = sha256
        tokens = image_tokens(*planned_size(info, self.max_side))
        tokens += estimate_text_tokens(self.prompt)
        return Prepared(fields=fields, tokens=tokens, data=ImageRef(path, sha256, info.mime, info.width, info.height))

    async def send(self, conn: Connection, items: list[Item]) -> Reply:
        (item,) = items
        ref: ImageRef = item.prepared.data
        try:
            # On the image workers: at most one full-size decode per CPU, whatever is in flight.
            mime, b64 = await asyncio.get_running_loop().run_in_executor(image_pool(), self._image_as_sent, ref)
        except RowInvalid as exc:
            return Reply(results=[RowFailure("invalid_input", str(exc))])
        url = f"data:{mime};base64,{b64}"
        answer = await create_chat(
            conn,
            model=self.model,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": self.prompt},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ],
        )
        response = answer.completion
        caption = reply_text(response)
        result: Any
        if caption:
            result = CaptionResult(caption=caption, width=ref.width, height=ref.height)
        else:
            reason = response.choices[0].finish_reason
            result = RowFailure("empty_reply", f"the model returned no caption for {ref.path} (finish_reason={reason})")
        return answer.reply(result)

    def _image_as_sent(self, ref: ImageRef) -> tuple[str, str]:
        """The MIME type and base64 text of the image as sent (the bytes themselves are not kept)."""
        data = _read(ref.path, ref.path, self.media)
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise RowInvalid(f"{ref.path} changed during the run: run again to caption the new version")
        try:
            image = image_for_model(data, self.max_side, name=ref.path)
        except ImageError as exc:
            raise RowInvalid(str(exc)) from None
        return image.mime, base64.b64encode(image.data).decode()

    def output_schema(self, id_col: str, id_type: pa.DataType) -> pa.Schema:
        return result_schema(
            id_col,
            id_type,
            [
                pa.field("caption", pa.string()),
                pa.field("image_width", pa.int32()),
                pa.field("image_height", pa.int32()),
            ],
        )

    def result_arrays(self, results: list[Any]) -> dict[str, pa.Array]:
        return {
            "caption": pa.array([r.caption for r in results], pa.string()),
            "image_width": pa.array([r.width for r in results], pa.int32()),
            "image_height": pa.array([r.height for r in results], pa.int32()),
        }

    def results_from_table(self, table: pa.Table) -> dict[str, Any]:
        columns = [table.column(c).to_pylist() for c in ("content_hash", "caption", "image_width", "image_height")]
        return {h: CaptionResult(caption=c, width=w, height=ht) for h, c, w, ht in zip(*columns)}


def reply_text(response: Any) -> str | None:
    """The first choice's text; :class:`BadReply` when the SDK handed back something else."""
    if not isinstance(response, ChatCompletion):
        raise unexpected_reply(response, "a chat completion")
    if not response.choices:
        raise BadReply("the chat completion had no choices")
    content = response.choices[0].message.content
    return content.strip() if content else None


def _located(policy: MediaPolicy, path: str, value: Any) -> str:
    try:
        return policy.check(path, kind="image", value=value)
    except MediaRefused as exc:
        raise RowInvalid(str(exc)) from None


def _read(path: str, value: Any, policy: MediaPolicy) -> bytes:
    try:
        return read_media(path, policy).data
    except MediaRefused as exc:
        raise RowInvalid(str(exc)) from None
    except FileNotFoundError:
        shown = redact_url(path) if str(value) == path else f"{redact_url(path)} (from {redact_url(str(value))!r})"
        raise RowInvalid(f"image file not found: {shown}; relative paths resolve against the input's folder") from None
    except (OSError, ValueError, ImportError) as exc:
        raise RowInvalid(f"can't read image {redact_url(path)}: {redact_text(str(exc))}") from None
