"""Reading an images reply: each image's bytes (base64, a data: URL or a download), its format, and the
reply as an error row keeps it."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
from typing import Any
from urllib.parse import urlsplit

import httpx2
from openai.types import ImagesResponse
from PIL import Image

from tasks.engine.job import BadReply
from tasks.provider.client import Connection

# Pillow's name of a format we keep -> (the image_format value, the file extension).
IMAGE_FORMATS: dict[str, tuple[str, str]] = {"PNG": ("png", "png"), "JPEG": ("jpeg", "jpg"), "WEBP": ("webp", "webp")}
# How much of each base64 string an error row keeps of an unusable reply.
RAW_B64_CHARS = 120
# An image a reply points at by URL: the largest file downloaded, and the tries.
MAX_IMAGE_BYTES = 64 * 1024 * 1024
DOWNLOAD_ATTEMPTS = 4
DOWNLOAD_BACKOFF_S = 0.5


class ImageNotFetched(Exception):
    """An image the reply points at (``url``) could not be downloaded."""


async def image_bytes(entry: Any, k: int, conn: Connection) -> bytes:
    """The bytes of one image of a reply: its ``b64_json``, or else the file its ``url`` names
    (servers that answer URLs by default, once response_format had to be left out)."""
    b64 = getattr(entry, "b64_json", None)
    if b64:
        try:
            return base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadReply(f"image {k} of the reply was not valid base64: {exc}") from None
    url = getattr(entry, "url", None)
    if not url:
        raise BadReply(f"image {k} of the reply had no b64_json data and no url")
    if url.startswith("data:"):
        _, _, data = url.partition(",")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadReply(f"image {k} of the reply was a data: URL that is not valid base64: {exc}") from None
    return await download_image(url, k, timeout=conn.client.timeout)


async def download_image(url: str, k: int, *, timeout: Any, attempts: int = DOWNLOAD_ATTEMPTS) -> bytes:
    """GET an image URL (never with the API key: the URL may be anyone's storage), with the request
    timeout, retries for 5xx/429/broken connections, and at most MAX_IMAGE_BYTES."""
    shown = redact_url(url)
    if not url.startswith(("http://", "https://")):
        raise ImageNotFetched(f"image {k} of the reply is at {shown}, which is not an http(s) URL")
    problem = ""
    for attempt in range(1, attempts + 1):
        try:
            async with httpx2.AsyncClient(timeout=timeout, follow_redirects=True) as http:
                async with http.stream("GET", url) as response:
                    if response.status_code >= 400:
                        problem = f"HTTP {response.status_code}"
                        if response.status_code < 500 and response.status_code != 429:
                            break
                    else:
                        blob = bytearray()
                        async for block in response.aiter_bytes():
                            blob += block
                            if len(blob) > MAX_IMAGE_BYTES:
                                raise ImageNotFetched(
                                    f"image {k} of the reply at {shown} is larger than {MAX_IMAGE_BYTES} bytes: "
                                    "not downloaded"
                                )
                        return bytes(blob)
        except (httpx2.TransportError, httpx2.StreamError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if attempt < attempts:
            await asyncio.sleep(DOWNLOAD_BACKOFF_S * 2 ** (attempt - 1))
    raise ImageNotFetched(
        f"image {k} of the reply could not be downloaded from {shown} ({problem}); it was made and paid for, so "
        "it is not asked for again: rerun with --retry-errors to make it anew"
    )


def redact_url(url: str) -> str:
    """A URL as messages show it: no user:password, no query string (signed URLs carry tokens there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")


def read_image(blob: bytes, k: int) -> tuple[bytes, str]:
    """The image's bytes and format (png, jpeg or webp); :class:`BadReply` for anything else."""
    if not blob:
        raise BadReply(f"image {k} of the reply had no data")
    try:
        with Image.open(io.BytesIO(blob)) as image:
            found = image.format or "unknown"
            image.load()  # a truncated or corrupt file fails here, not in the user's viewer
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadReply(
            f"image {k} of the reply is not a PNG, JPEG or WebP image Pillow can read ({exc}); "
            f"it starts with {blob[:40]!r}"
        ) from None
    if found not in IMAGE_FORMATS:
        raise BadReply(f"image {k} of the reply is {found}, not PNG, JPEG or WebP")
    return blob, IMAGE_FORMATS[found][0]


def raw_reply(response: ImagesResponse) -> str:
    """What came back, for the error row: the reply's JSON with each base64 string cut short."""
    try:
        body = response.model_dump(mode="json", exclude_none=True)
    except Exception:  # noqa: BLE001 - a reply too odd to dump is still described
        return str(response)[:2000]
    for entry in body.get("data") or []:
        b64 = entry.get("b64_json") if isinstance(entry, dict) else None
        if isinstance(b64, str) and len(b64) > RAW_B64_CHARS:
            entry["b64_json"] = f"{b64[:RAW_B64_CHARS]}… [{len(b64)} base64 characters in all]"
    return json.dumps(body, ensure_ascii=False)
