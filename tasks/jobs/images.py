"""The image generation job: one `images.generate` request per prompt, images written beside the table.

Images land in ``OUTPUT/_images/<content_hash>.<ext>`` (``<content_hash>-<k>.<ext>`` when n > 1), each
written under a ``.tmp-`` name and then renamed, so a file with a final name is always complete. The
``_`` keeps Arrow's dataset discovery off them: ``pq.read_table(OUTPUT)`` reads just the table. One
output row per image.

Providers answer PNG, JPEG or WebP (some by default, some when asked): each is kept as it came, under
its own extension, with an ``image_format`` column. A reply whose image Pillow can't read as one of
those three (an SVG, a truncated file, no data) is unusable: the engine asks once more, then keeps it
in ``_errors/`` with what came back (base64 cut short).

Outputs of versions before ``_images/`` keep their ``images/`` folder: its files are still found (a
rerun pays for nothing again) and rows keep pointing at them; new images go to ``_images/``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import fsspec
import openai
import pyarrow as pa
from openai.types import ImagesResponse

from tasks.defaults import DEFAULT_SIZE
from tasks.engine.job import BadReply, Item, Prepared, Reply, RowFailure, RowInvalid, result_schema, unexpected_reply
from tasks.engine.store.output import IMAGES_DIR, LEGACY_IMAGES_DIR, TMP_PREFIX
from tasks.errors import ConfigError
from tasks.jobs.embed import estimate_text_tokens
from tasks.jobs.image_models import MAX_IMAGES_PER_PROMPT, check_image_request
from tasks.jobs.image_replies import IMAGE_FORMATS, ImageNotFetched, image_bytes, raw_reply, read_image
from tasks.provider.client import Connection
from tasks.provider.failures import classify_failure
from tasks.provider.prices import image_price_usd

__all__ = [
    "ImagesJob",
    "GeneratedImage",
    "IMAGES_DIR",
    "LEGACY_IMAGES_DIR",
    "IMAGE_FORMATS",
    "DEFAULT_SIZE",
    "MAX_IMAGES_PER_PROMPT",
    "image_name",
]

_EXTENSIONS = {fmt: ext for fmt, ext in IMAGE_FORMATS.values()}
_FORMAT_OF_EXTENSION = {ext: fmt for fmt, ext in IMAGE_FORMATS.values()}
log = logging.getLogger("gembatch.images")


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """One image of a result; ``path`` is relative to the output folder."""

    path: str
    revised_prompt: str | None
    size_bytes: int
    index: int
    format: str = "png"


def image_name(content_hash: str, k: int, n: int, fmt: str = "png", folder: str = IMAGES_DIR) -> str:
    """The image's path relative to the output folder (``fmt``: png, jpeg or webp)."""
    stem = content_hash if n == 1 else f"{content_hash}-{k}"
    return f"{folder}/{stem}.{_EXTENSIONS[fmt]}"


def _format_of(path: str) -> str:
    return _FORMAT_OF_EXTENSION.get(path.rsplit(".", 1)[-1].lower(), "png")


@dataclass(frozen=True, kw_only=True)
class ImagesJob:
    model: str
    output: str
    prompt_col: str = "prompt"
    size: str = DEFAULT_SIZE
    n: int = 1
    # Sent only when given (gpt-image-1: low, medium, high, auto; dall-e-3: standard, hd).
    quality: str | None = None
    # The provider's images route (tasks.jobs.image_models.GEMINI_ROUTE or OPENAI_ROUTE) when known: a model
    # that route doesn't serve is refused before any request. None: another server, any model.
    route: str | None = None
    # What the run learnt of the server (``no_response_format``: it refuses response_format).
    _seen: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    name = "images"
    max_items_per_request = 1

    def __post_init__(self) -> None:
        problem = check_image_request(self.model, self.size, self.n, self.quality, self.route)
        if problem is not None:
            raise ConfigError(problem)

    @property
    def per_image_usd(self) -> float | None:
        """What one image costs (tasks/provider/prices.py), None if the table doesn't price this model."""
        return image_price_usd(self.model, self.size, self.quality)

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
        params = {"prompt_col": self.prompt_col, "size": self.size, "n": self.n, "images_dir": IMAGES_DIR}
        if self.quality is not None:
            params["quality"] = self.quality
        return params

    def prepare(self, payload: dict[str, Any]) -> Prepared:
        prompt = payload[self.prompt_col]
        if prompt is None:
            raise RowInvalid(f"column {self.prompt_col!r} is null: no prompt to draw from")
        if not prompt.strip():
            raise RowInvalid(f"column {self.prompt_col!r} is empty: no prompt to draw from")
        fields = {"job": "images", "model": self.model, "prompt": prompt, "size": self.size, "n": self.n}
        if self.quality is not None:  # only when asked: hashes of earlier outputs stay the same
            fields["quality"] = self.quality
        return Prepared(fields=fields, tokens=estimate_text_tokens(prompt), data=prompt)

    async def send(self, conn: Connection, items: list[Item]) -> Reply:
        (item,) = items
        # The images may be on disk from a run that died before writing its part: don't pay twice.
        existing = await asyncio.to_thread(self._read_existing, item.content_hash)
        if existing is not None:
            return Reply(results=[existing])
        extra: dict[str, Any] = {}
        if self.quality is not None:
            extra["quality"] = self.quality
        if not self.model.removeprefix("models/").startswith("gpt-image") and not self._seen.get("no_response_format"):
            # GPT image models always answer base64 and take no response_format.
            extra["response_format"] = "b64_json"
        response = await self._generate(conn, item.prepared.data, extra)
        if not isinstance(response, ImagesResponse):
            raise unexpected_reply(response, "an images object")
        data = response.data or []
        try:
            if len(data) != self.n:
                raise BadReply(f"asked for {self.n} images, the reply had {len(data)}")
            blobs = [await image_bytes(entry, k, conn) for k, entry in enumerate(data)]
            images = await asyncio.to_thread(self._decode_and_write, item.content_hash, blobs)
        except ImageNotFetched as exc:
            # The images were made (and paid for): asking again would pay twice. The row fails now.
            unfetched = RowFailure("image_not_downloaded", str(exc), raw_reply(response), ask_again=False)
            return Reply(results=[unfetched], images=len(data))
        except BadReply as exc:
            raise BadReply(str(exc), raw_reply=raw_reply(response)) from None
        result = tuple(
            GeneratedImage(path, entry.revised_prompt, size, k, fmt)
            for k, (entry, (path, size, fmt)) in enumerate(zip(data, images))
        )
        usage = response.usage
        # OpenAI's images replies name no model; a server that adds one is heard (served_model).
        served = getattr(response, "model", None) or None
        if usage is None:
            return Reply(results=[result], images=len(result), served_model=served)
        return Reply(
            served_model=served,
            results=[result],
            prompt_tokens=usage.input_tokens or 0,
            completion_tokens=usage.output_tokens or 0,
            total_tokens=usage.total_tokens or 0,
            images=len(result),
        )

    async def _generate(self, conn: Connection, prompt: str, extra: dict[str, Any]) -> Any:
        """One images.generate request; asked again without response_format if a server refuses it."""
        try:
            return await conn.client.images.generate(model=self.model, prompt=prompt, n=self.n, size=self.size, **extra)
        except openai.APIStatusError as exc:
            failure = classify_failure(exc)
            refused_format = failure.kind == "param_refused" and failure.param == "response_format"
            if not (refused_format and extra.get("response_format")):
                raise
            # gembatch added response_format itself (a gateway such as LiteLLM refuses it for models it
            # doesn't know): ask again without it, and so for the rest of the run. Nothing was made yet.
            if not self._seen.get("no_response_format"):
                log.warning(
                    "%s refused response_format=b64_json for %s (%s): images are asked for without it from now on",
                    conn.host, self.model, conn.redact(failure.message),
                )  # fmt: skip
            self._seen["no_response_format"] = True
            del extra["response_format"]
            return await conn.client.images.generate(model=self.model, prompt=prompt, n=self.n, size=self.size, **extra)

    def _decode_and_write(self, content_hash: str, blobs: list[bytes]) -> list[tuple[str, int, str]]:
        """(path, size, format) of each image, written only once every image of the reply is usable."""
        decoded = [read_image(blob, k) for k, blob in enumerate(blobs)]
        fs, root = self._fs_root
        fs.makedirs(f"{root}/{IMAGES_DIR}", exist_ok=True)
        written = []
        for k, (blob, fmt) in enumerate(decoded):
            tmp = f"{root}/{IMAGES_DIR}/{TMP_PREFIX}{uuid.uuid4().hex}.inprogress"
            with fs.open(tmp, "wb") as f:
                f.write(blob)
            path = image_name(content_hash, k, self.n, fmt)
            fs.mv(tmp, f"{root}/{path}")
            written.append((path, len(blob), fmt))
        return written

    @cached_property
    def _legacy_folder(self) -> bool:
        """Whether this output has an ``images/`` folder from a version before ``_images/``."""
        fs, root = self._fs_root
        return fs.isdir(f"{root}/{LEGACY_IMAGES_DIR}")

    def _read_existing(self, content_hash: str) -> tuple[GeneratedImage, ...] | None:
        """The images of ``content_hash`` already on disk (a run that died before writing its part),
        in any format we keep; ``images/`` of older versions too."""
        fs, root = self._fs_root
        candidates = [(IMAGES_DIR, fmt) for fmt in _EXTENSIONS]
        if self._legacy_folder:
            candidates.append((LEGACY_IMAGES_DIR, "png"))
        images = []
        for k in range(self.n):
            for folder, fmt in candidates:
                path = image_name(content_hash, k, self.n, fmt, folder)
                try:
                    size = fs.size(f"{root}/{path}")
                except FileNotFoundError:
                    continue
                images.append(GeneratedImage(path, None, int(size), k, fmt))
                break
            else:
                return None
        return tuple(images)

    def rows_per_result(self, result: tuple[GeneratedImage, ...]) -> int:
        return len(result)

    def output_schema(self, id_col: str, id_type: pa.DataType) -> pa.Schema:
        return result_schema(
            id_col,
            id_type,
            [
                pa.field("image_path", pa.string()),
                pa.field("image_format", pa.string()),
                pa.field("revised_prompt", pa.string()),
                pa.field("image_bytes", pa.int64()),
                pa.field("image_index", pa.int32()),
            ],
        )

    def result_arrays(self, results: list[tuple[GeneratedImage, ...]]) -> dict[str, pa.Array]:
        images = [image for result in results for image in result]
        return {
            "image_path": pa.array([i.path for i in images], pa.string()),
            "image_format": pa.array([i.format for i in images], pa.string()),
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
        # Parts written before the image_format column: the extension says (they are all PNGs).
        if "image_format" in table.column_names:
            formats = table.column("image_format").to_pylist()
        else:
            formats = [None] * table.num_rows
        for h, path, revised, size, k, fmt in zip(*columns, sizes, indexes, formats):
            image = GeneratedImage(path, revised, size, k, fmt or _format_of(path))
            grouped.setdefault(h, {}).setdefault(k, image)
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
