"""The image generation job: one `images.generate` request per prompt, PNGs written beside the table.

Images land in ``OUTPUT/images/<content_hash>.png`` (``<content_hash>-<k>.png`` when n > 1), each
written under a ``.tmp-`` name and then renamed, so a file with a final name is always complete. One
output row per image.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import fsspec
import pyarrow as pa
from openai.types import ImagesResponse

from tasks.client import Connection
from tasks.defaults import DEFAULT_SIZE
from tasks.embed import estimate_text_tokens
from tasks.engine import BadReply, Item, Prepared, Reply, RowInvalid
from tasks.store import TMP_PREFIX

__all__ = ["ImagesJob", "GeneratedImage", "IMAGES_DIR", "DEFAULT_SIZE", "MAX_IMAGES_PER_PROMPT", "image_name"]

IMAGES_DIR = "images"
MAX_IMAGES_PER_PROMPT = 10  # the OpenAI images API's limit for n
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIZE = re.compile(r"([1-9][0-9]*)x([1-9][0-9]*)")


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """One image of a result; ``path`` is relative to the output folder."""

    path: str
    revised_prompt: str | None
    size_bytes: int
    index: int


def image_name(content_hash: str, k: int, n: int) -> str:
    """The image's path relative to the output folder."""
    return f"{IMAGES_DIR}/{content_hash}.png" if n == 1 else f"{IMAGES_DIR}/{content_hash}-{k}.png"


@dataclass(frozen=True, kw_only=True)
class ImagesJob:
    model: str
    output: str
    prompt_col: str = "prompt"
    size: str = DEFAULT_SIZE
    n: int = 1

    name = "images"
    max_items_per_request = 1

    def __post_init__(self) -> None:
        if not isinstance(self.size, str) or not _SIZE.fullmatch(self.size):
            raise ValueError(f"--size must look like WIDTHxHEIGHT in pixels, e.g. 1024x1024; got {self.size!r}")
        if not 1 <= self.n <= MAX_IMAGES_PER_PROMPT:
            raise ValueError(f"--n must be between 1 and {MAX_IMAGES_PER_PROMPT}, got {self.n}")

    @property
    def input_columns(self) -> tuple[str, ...]:
        return (self.prompt_col,)

    @property
    def string_columns(self) -> tuple[str, ...]:
        return (self.prompt_col,)

    @cached_property
    def _fs_root(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, root = fsspec.core.url_to_fs(self.output)
        return fs, root.rstrip("/")

    def parameters(self) -> dict[str, Any]:
        return {"prompt_col": self.prompt_col, "size": self.size, "n": self.n, "images_dir": IMAGES_DIR}

    def prepare(self, payload: dict[str, Any]) -> Prepared:
        prompt = payload[self.prompt_col]
        if prompt is None:
            raise RowInvalid(f"column {self.prompt_col!r} is null: no prompt to draw from")
        if not prompt.strip():
            raise RowInvalid(f"column {self.prompt_col!r} is empty: no prompt to draw from")
        fields = {"job": "images", "model": self.model, "prompt": prompt, "size": self.size, "n": self.n}
        return Prepared(fields=fields, tokens=estimate_text_tokens(prompt), data=prompt)

    async def send(self, conn: Connection, items: list[Item]) -> Reply:
        (item,) = items
        # The images may be on disk from a run that died before writing its part: don't pay twice.
        existing = await asyncio.to_thread(self._read_existing, item.content_hash)
        if existing is not None:
            return Reply(results=[existing])
        response = await conn.client.images.generate(
            model=self.model, prompt=item.prepared.data, n=self.n, size=self.size, response_format="b64_json"
        )
        if not isinstance(response, ImagesResponse):
            raise BadReply(f"the reply was not an images object: {str(response)[:200]!r}")
        data = response.data or []
        if len(data) != self.n:
            raise BadReply(f"asked for {self.n} images, the reply had {len(data)}")
        pngs = [_decode_png(entry.b64_json, k) for k, entry in enumerate(data)]
        sizes = await asyncio.to_thread(self._write_images, item.content_hash, pngs)
        result = tuple(
            GeneratedImage(image_name(item.content_hash, k, self.n), entry.revised_prompt, size, k)
            for k, (entry, size) in enumerate(zip(data, sizes))
        )
        usage = response.usage
        if usage is None:
            return Reply(results=[result])
        return Reply(
            results=[result],
            prompt_tokens=usage.input_tokens or 0,
            completion_tokens=usage.output_tokens or 0,
            total_tokens=usage.total_tokens or 0,
        )

    def _write_images(self, content_hash: str, pngs: list[bytes]) -> list[int]:
        fs, root = self._fs_root
        fs.makedirs(f"{root}/{IMAGES_DIR}", exist_ok=True)
        for k, png in enumerate(pngs):
            tmp = f"{root}/{IMAGES_DIR}/{TMP_PREFIX}{uuid.uuid4().hex}.inprogress"
            with fs.open(tmp, "wb") as f:
                f.write(png)
            fs.mv(tmp, f"{root}/{image_name(content_hash, k, self.n)}")
        return [len(png) for png in pngs]

    def _read_existing(self, content_hash: str) -> tuple[GeneratedImage, ...] | None:
        fs, root = self._fs_root
        images = []
        for k in range(self.n):
            path = image_name(content_hash, k, self.n)
            try:
                size = fs.size(f"{root}/{path}")
            except FileNotFoundError:
                return None
            images.append(GeneratedImage(path, None, int(size), k))
        return tuple(images)

    def rows_per_result(self, result: tuple[GeneratedImage, ...]) -> int:
        return len(result)

    def output_schema(self, id_col: str, id_type: pa.DataType) -> pa.Schema:
        return pa.schema(
            [
                pa.field(id_col, id_type),
                pa.field("image_path", pa.string()),
                pa.field("revised_prompt", pa.string()),
                pa.field("image_bytes", pa.int64()),
                pa.field("image_index", pa.int32()),
                pa.field("content_hash", pa.string()),
                pa.field("model", pa.string()),
            ]
        )

    def result_arrays(self, results: list[tuple[GeneratedImage, ...]]) -> dict[str, pa.Array]:
        images = [image for result in results for image in result]
        return {
            "image_path": pa.array([i.path for i in images], pa.string()),
            "revised_prompt": pa.array([i.revised_prompt for i in images], pa.string()),
            "image_bytes": pa.array([i.size_bytes for i in images], pa.int64()),
            "image_index": pa.array([i.index for i in images], pa.int32()),
        }

    def results_from_table(self, table: pa.Table) -> dict[str, Any]:
        if table.num_rows == 0:
            return {}
        grouped: dict[str, dict[int, GeneratedImage]] = {}
        columns = [table.column(c).to_pylist() for c in ("content_hash", "image_path", "revised_prompt")]
        sizes = table.column("image_bytes").to_pylist()
        indexes = table.column("image_index").to_pylist()
        for h, path, revised, size, k in zip(*columns, sizes, indexes):
            grouped.setdefault(h, {}).setdefault(k, GeneratedImage(path, revised, size, k))
        results: dict[str, Any] = {}
        for h, images in grouped.items():
            if len(images) < self.n:
                # OutputStore.read_results_for hands back one row per content_hash: the other images
                # of that result are the files named after it.
                on_disk = self._read_existing(h)
                if on_disk is None:
                    continue
                images = {**{image.index: image for image in on_disk}, **images}
            results[h] = tuple(images[k] for k in sorted(images))
        return results


def _decode_png(b64: str | None, k: int) -> bytes:
    if not b64:
        raise BadReply(f"image {k} of the reply had no b64_json data")
    try:
        png = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadReply(f"image {k} of the reply was not valid base64: {exc}") from None
    if not png.startswith(PNG_SIGNATURE):
        raise BadReply(f"image {k} of the reply is not a PNG (starts with {png[:8]!r})")
    return png
