"""The captioning job: one chat completion per image, the image inline as a data URL."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pyarrow as pa
from openai.types.chat import ChatCompletion
from PIL import Image

from tasks.defaults import DEFAULT_CAPTION_PROMPT, DEFAULT_MAX_SIDE
from tasks.engine.chunk import BadReply, Item, Prepared, Reply, RowFailure, RowInvalid, unexpected_reply
from tasks.jobs.chat import create_chat
from tasks.jobs.embed import estimate_text_tokens
from tasks.jobs.media import read_media, resolve_path, sniff_image_mime
from tasks.provider.client import Connection

__all__ = [
    "CaptionJob",
    "CaptionResult",
    "DEFAULT_CAPTION_PROMPT",
    "DEFAULT_MAX_SIDE",
    "downscale",
    "image_tokens",
]

JPEG_QUALITY = 90
# Gemini: 258 tokens for an image up to 384 px on both sides, else 258 per 768×768 tile.
TOKENS_PER_TILE = 258
SMALL_IMAGE_SIDE = 384
TILE_SIDE = 768
# Pillow decodes these without plugins; HEIC/HEIF are sent as they are (size unknown here).
_DECODABLE = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
# UnidentifiedImageError is an OSError; Pillow raises SyntaxError for some broken headers.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


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
    width: int | None
    height: int | None


def image_tokens(width: int | None, height: int | None) -> int:
    if width is None or height is None:
        return TOKENS_PER_TILE * 4  # unknown size: budget a few tiles rather than one
    if width <= SMALL_IMAGE_SIDE and height <= SMALL_IMAGE_SIDE:
        return TOKENS_PER_TILE
    return TOKENS_PER_TILE * math.ceil(width / TILE_SIDE) * math.ceil(height / TILE_SIDE)


def scaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def downscale(data: bytes, mime: str, max_side: int) -> bytes:
    """The image as sent: unchanged when it fits in ``max_side``, else resized in its own format."""
    fmt = _DECODABLE.get(mime)
    if fmt is None:
        return data
    with Image.open(BytesIO(data)) as img:
        size = scaled_size(img.width, img.height, max_side)
        if size == img.size:
            return data
        exif = img.info.get("exif")
        resized = img.resize(size, Image.Resampling.LANCZOS)
    if fmt == "JPEG" and resized.mode not in ("RGB", "L", "CMYK"):
        resized = resized.convert("RGB")
    out = BytesIO()
    options: dict[str, Any] = {"exif": exif} if exif else {}
    if fmt in ("JPEG", "WEBP"):
        options["quality"] = JPEG_QUALITY
    resized.save(out, format=fmt, **options)
    return out.getvalue()


@dataclass(frozen=True, kw_only=True)
class CaptionJob:
    model: str
    image_col: str = "image"
    prompt: str = DEFAULT_CAPTION_PROMPT
    max_side: int = DEFAULT_MAX_SIDE
    base_dir: str | None = None

    name = "caption"
    max_items_per_request = 1
    streams = True  # --stream (tasks/jobs/chat.py)

    def __post_init__(self) -> None:
        if self.max_side < 1:
            raise ValueError(f"--max-side must be at least 1, got {self.max_side}")
        if not self.prompt.strip():
            raise ValueError("--prompt must not be empty")

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
        }

    def prepare(self, payload: dict[str, Any]) -> Prepared:
        value = payload[self.image_col]
        if value is None or not str(value).strip():
            raise RowInvalid(f"column {self.image_col!r} is empty: give an image path or URL")
        path = resolve_path(str(value), self.base_dir)
        data = _read(path, value)
        mime = sniff_image_mime(data[:64])
        if mime is None:
            raise RowInvalid(
                f"{path} is not a PNG, JPEG, WebP, HEIC or HEIF image (first bytes {data[:8]!r}): "
                "convert it to one of these or fix the path"
            )
        width = height = None
        if mime in _DECODABLE:
            try:
                with Image.open(BytesIO(data)) as img:
                    width, height = img.size
                    img.verify()
            except _DECODE_ERRORS as exc:
                raise RowInvalid(f"{path} looks like {mime} but can't be decoded ({exc}): it is corrupt") from None
        sha256 = hashlib.sha256(data).hexdigest()
        fields = {"job": "caption", "model": self.model, "prompt": self.prompt, "max_side": self.max_side}
        fields["image_sha256"] = sha256
        sent = scaled_size(width, height, self.max_side) if width and height else (None, None)
        tokens = image_tokens(*sent) + estimate_text_tokens(self.prompt)
        return Prepared(fields=fields, tokens=tokens, data=ImageRef(path, sha256, mime, width, height))

    async def send(self, conn: Connection, items: list[Item]) -> Reply:
        (item,) = items
        ref: ImageRef = item.prepared.data
        try:
            data = await asyncio.to_thread(self._image_as_sent, ref)
        except RowInvalid as exc:
            return Reply(results=[RowFailure("invalid_input", str(exc))])
        url = f"data:{ref.mime};base64,{base64.b64encode(data).decode()}"
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
        usage = response.usage
        result: Any
        if caption:
            result = CaptionResult(caption=caption, width=ref.width, height=ref.height)
        else:
            reason = response.choices[0].finish_reason
            result = RowFailure("empty_reply", f"the model returned no caption for {ref.path} (finish_reason={reason})")
        return Reply(
            results=[result],
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            total_tokens=usage.total_tokens if usage else 0,
            first_token_s=answer.first_token_s,
        )

    def _image_as_sent(self, ref: ImageRef) -> bytes:
        data = _read(ref.path, ref.path)
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise RowInvalid(f"{ref.path} changed during the run: run again to caption the new version")
        try:
            return downscale(data, ref.mime, self.max_side)
        except _DECODE_ERRORS as exc:
            raise RowInvalid(f"{ref.path} can't be decoded to downscale it ({exc}): the file is corrupt") from None

    def output_schema(self, id_col: str, id_type: pa.DataType) -> pa.Schema:
        return pa.schema(
            [
                pa.field(id_col, id_type),
                pa.field("caption", pa.string()),
                pa.field("image_width", pa.int32()),
                pa.field("image_height", pa.int32()),
                pa.field("content_hash", pa.string()),
                pa.field("model", pa.string()),
            ]
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


def _read(path: str, value: Any) -> bytes:
    try:
        return read_media(path).data
    except FileNotFoundError:
        shown = path if str(value) == path else f"{path} (from {str(value)!r})"
        raise RowInvalid(f"image file not found: {shown}; relative paths resolve against the input's folder") from None
    except (OSError, ValueError) as exc:
        raise RowInvalid(f"can't read image {path}: {exc}") from None
