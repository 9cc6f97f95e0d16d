"""The one path every image input takes on its way to a model: probe, decode, downscale, encode.

- :func:`probe` reads the header only (``Image.open`` without ``load``): format, size as displayed
  (EXIF orientation applied) — what ``prepare`` and ``--dry-run`` need for the tile-based token estimate.
- :func:`image_for_model` returns the bytes to send. An image the provider takes as it is (PNG, JPEG
  or WebP, within ``max_side``, upright, 8-bit RGB or grey, no transparency, one frame) is sent byte
  for byte. Otherwise it is decoded no larger than needed (JPEG: DCT scaling in the decoder, see
  :func:`jpeg_scale`), its first frame taken, turned upright (``ImageOps.exif_transpose``), brought
  to 8-bit RGB or grey (CMYK through its ICC profile when it has one, 16-bit scaled rather than
  clipped, transparency flattened on white), downscaled and re-encoded.
- Decoding runs on :func:`image_pool`, a thread pool with one worker per CPU this process may use
  (Pillow releases the GIL while it decodes, resizes and encodes), and at most that many full-size
  images are decoded at any moment whoever calls (a semaphore of the same size), so memory does not
  grow with the number of requests in flight.

Transparency is flattened on white rather than kept: a model's vision input has no alpha channel, and
what a provider puts under transparent pixels is unspecified (often the black stored there, which
hides black text on a transparent background). White is what the picture shows on a page.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import simplejpeg
from PIL import Image, ImageCms, ImageOps

from tasks.jobs.media import sniff_image_mime

__all__ = [
    "IMAGE_WORKERS",
    "ImageError",
    "ImageInfo",
    "SentImage",
    "image_for_model",
    "image_pool",
    "image_tokens",
    "jpeg_scale",
    "planned_size",
    "probe",
    "scaled_size",
    "sniff",
]

# Gemini: 258 tokens for an image up to 384 px on both sides, else 258 per 768×768 tile.
TOKENS_PER_TILE = 258
SMALL_IMAGE_SIDE = 384
TILE_SIDE = 768
# 85 rather than 90: a 12-megapixel photo at 1500 x 1125 is 286 kB instead of 420 kB (a third less to
# base64, serialise, upload and have the provider decode; the same 1032 tokens), at no visible loss.
JPEG_QUALITY = 85
WEBP_QUALITY = 90
PNG_COMPRESS_LEVEL = 3  # zlib level: 6 (Pillow's default) costs ~30% more time for a few % of bytes
WEBP_METHOD = 2  # 0 (fast) .. 6 (small); Pillow's default 4 is several times slower at 1.5k px
BACKGROUND = 255  # transparency is flattened on white

IMAGE_WORKERS = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

# Sent as they are when nothing else needs changing (GEMINI.md: png, jpeg, webp, heic, heif inline).
_SENDABLE = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
# What a re-encoded image becomes: its own format when the provider takes it, else JPEG for camera
# formats (lossy already) and PNG for graphics (GIF: palettes, sharp edges).
_OUTPUT = {**_SENDABLE, "image/gif": "PNG", "image/heic": "JPEG", "image/heif": "JPEG", "image/avif": "JPEG"}
_MIME_OF = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_AVIF_BRANDS = {b"avif", b"avis"}
# UnidentifiedImageError is an OSError; Pillow raises SyntaxError for some broken headers.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_PLAIN_MODES = {"RGB", "L"}
# Many cameras and phones append a preview or a second view to their JPEGs (Multi-Picture Format):
# Pillow opens those as MPO, whose first frame is the photo, the frame a JPEG decoder reads first.
_JPEG_FORMATS = {"JPEG", "MPO"}
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_ORIENTATION = 0x0112
# ImageOps.exif_transpose's table: the transposition that turns a picture stored with orientation n upright.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# JPEG decoding scales in the inverse DCT, by M/8 (libjpeg-turbo, through simplejpeg). Measured on a
# 12-megapixel photo (benchmarks/bench_photos.py --stages): 1/8 to 1/2 cost about the same (the entropy
# decoding, which no scale skips, is most of it); 5/8 to 7/8 cost 5-35% more than a full decode (no
# SIMD code for those sizes) but far less than a full decode followed by a resize.
JPEG_SCALES = (1, 2, 3, 4, 5, 6, 7, 8)
# A DCT scale whose result falls short of --max-side by at most this fraction is sent as decoded: the
# resize it saves costs ~25 ms of CPU on a 12-megapixel photo (a third of its decode), for at most 5%
# more pixels per side, and a smaller picture never takes more 768-pixel tiles.
SCALE_SLACK = 0.95

_decoding = threading.BoundedSemaphore(IMAGE_WORKERS)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_heif_registered: bool | None = None


class ImageError(ValueError):
    """An image that can't be sent; the message names the file and says what to do."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the header says: the sniffed MIME type and the size as displayed (upright)."""

    mime: str
    width: int
    height: int
    scalable: bool = False  # a JPEG of 8-bit RGB or grey: decoded at an M/8 scale (jpeg_scale)


@dataclass(frozen=True, slots=True)
class SentImage:
    """The bytes to send, their MIME type and pixel size, and whether they differ from the file's."""

    data: bytes
    mime: str
    width: int
    height: int
    changed: bool


def image_pool() -> ThreadPoolExecutor:
    """The process's image workers: one per CPU, created on first use, shared by every job."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(IMAGE_WORKERS, thread_name_prefix="gembatch-image")
        return _pool


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


def jpeg_scale(width: int, height: int, max_side: int) -> int:
    """M of the M/8 scale a JPEG of this size is decoded at for ``max_side``.

    The largest scale that fits within ``max_side`` when it reaches at least ``SCALE_SLACK`` of it
    (then no resize follows), else the smallest scale that is at least ``max_side`` (then a small
    downscale follows). 4000 × 3000 for 1536 → 3/8 (1500 × 1125, sent as decoded); for 1024 → 2/8
    (1000 × 750); 5472 × 3648 for 1536 → 3/8 (2052 × 1368, then resized to 1536 × 1024).
    """
    longest = max(width, height)
    fitting = [m for m in JPEG_SCALES if _dct_scaled(longest, m) <= max_side]
    if fitting and _dct_scaled(longest, fitting[-1]) >= SCALE_SLACK * max_side:
        return fitting[-1]
    return next((m for m in JPEG_SCALES if _dct_scaled(longest, m) >= max_side), 8)


def _dct_scaled(side: int, m: int) -> int:
    return -(-side * m // 8)  # libjpeg rounds up


def planned_size(info: ImageInfo, max_side: int) -> tuple[int, int]:
    """The size :func:`image_for_model` sends an image of ``info`` at (as displayed)."""
    if not info.scalable or max(info.width, info.height) <= max_side:
        return scaled_size(info.width, info.height, max_side)
    m = jpeg_scale(info.width, info.height, max_side)
    return scaled_size(_dct_scaled(info.width, m), _dct_scaled(info.height, m), max_side)


def sniff(head: bytes) -> str | None:
    """MIME type from the first bytes: PNG, JPEG, WebP, GIF, AVIF, HEIC or HEIF; None for anything else."""
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    # AVIF files list mif1 (a HEIF brand) too, so their own brand is checked first.
    if head[4:8] == b"ftyp" and (head[8:12] in _AVIF_BRANDS or _AVIF_BRANDS & set(_brands(head))):
        return "image/avif"
    return sniff_image_mime(head)


def _brands(head: bytes) -> list[bytes]:
    size = int.from_bytes(head[:4], "big")
    return [head[i : i + 4] for i in range(16, min(size, len(head)), 4)]


def probe(data: bytes, name: str) -> ImageInfo:
    """Format and displayed size from the header; :class:`ImageError` naming ``name`` if unusable."""
    mime = sniff(data[:64])
    if mime is None:
        raise ImageError(
            f"{name} ({_size(data)}) is not a PNG, JPEG, WebP, GIF, AVIF, HEIC or HEIF image: "
            "convert it to one of these or fix the path"
        )
    _require_decoder(mime, name)
    try:
        with Image.open(BytesIO(data)) as img:
            width, height = img.size
            if _orientation(img) in (5, 6, 7, 8):
                width, height = height, width
            scalable = _scalable(img)
            img.verify()
    except Image.DecompressionBombError as exc:
        raise ImageError(_too_large(name, exc)) from None
    except DECODE_ERRORS as exc:
        raise ImageError(f"{name} looks like {mime} but can't be decoded ({exc}): it is corrupt") from None
    return ImageInfo(mime, width, height, scalable)


def _size(data: bytes) -> str:
    """What a message says about a file that is not an image: its size, never its bytes (a path in a
    column may point at any file the worker can read)."""
    return "an empty file" if not data else f"{len(data):,} bytes"


def _scalable(img: Image.Image) -> bool:
    return img.format in _JPEG_FORMATS and img.mode in _PLAIN_MODES


def image_for_model(data: bytes, max_side: int, *, name: str) -> SentImage:
    """``data`` as the model should get it: unchanged when it can be, else decoded, fixed and downscaled."""
    mime = sniff(data[:64])
    if mime is None:
        raise ImageError(f"{name} ({_size(data)}) is not a PNG, JPEG, WebP, GIF, AVIF, HEIC or HEIF image")
    _require_decoder(mime, name)
    try:
        with _decoding, Image.open(BytesIO(data)) as img:
            if _sendable_as_is(img, mime, max_side):
                return SentImage(data, mime, img.width, img.height, changed=False)
            if _scalable(img) and max(img.size) > max_side:
                try:
                    scaled = _decode_jpeg_scaled(img, data, max_side)
                except ValueError:
                    # simplejpeg fails on what libjpeg only warns about (extraneous bytes before a
                    # marker, which some cameras write); Pillow decodes those and refuses truncated files.
                    scaled = None
                if scaled is not None:
                    return _encode(scaled, mime, max_side, img.info.get("icc_profile"))
            return _reencode(img, mime, max_side)
    except Image.DecompressionBombError as exc:
        raise ImageError(_too_large(name, exc)) from None
    except DECODE_ERRORS as exc:
        raise ImageError(f"{name} can't be decoded ({exc}): the file is corrupt or truncated") from None


def _too_large(name: str, exc: Exception) -> str:
    return f"{name} is too large to decode safely ({exc}): downscale it first (or split it)"


def _sendable_as_is(img: Image.Image, mime: str, max_side: int) -> bool:
    if mime not in _SENDABLE or max(img.size) > max_side or getattr(img, "n_frames", 1) > 1:
        return False
    if _orientation(img) not in (None, 1):
        return False
    if "transparency" in img.info:
        return False
    return img.mode in _PLAIN_MODES or (img.mode == "P" and mime == "image/png")


def _decode_jpeg_scaled(img: Image.Image, data: bytes, max_side: int) -> Image.Image:
    """An RGB or grey JPEG decoded at the M/8 scale :func:`jpeg_scale` picks, turned upright.

    simplejpeg (libjpeg-turbo, like Pillow's own decoder) offers every M/8 scale where Pillow's
    ``draft`` offers 1/2, 1/4 and 1/8 only: a 12-megapixel photo comes out at 1500 × 1125 directly
    instead of 2000 × 1500 and a resize (~25 ms of CPU saved, a quarter of the photo's cost).
    """
    m = jpeg_scale(img.width, img.height, max_side)
    size = _dct_scaled(img.width, m), _dct_scaled(img.height, m)
    grey = img.mode == "L"
    pixels = simplejpeg.decode_jpeg(data, "GRAY" if grey else "RGB", min_width=size[0], min_height=size[1])
    if pixels.shape[:2] != (size[1], size[0]):
        raise ValueError(f"decoded at {pixels.shape[1]}x{pixels.shape[0]}, not {size[0]}x{size[1]}")
    decoded = Image.fromarray(pixels[:, :, 0] if grey else pixels)
    turn = _UPRIGHT.get(_orientation(img) or 1)
    return decoded if turn is None else decoded.transpose(turn)


def _reencode(img: Image.Image, mime: str, max_side: int) -> SentImage:
    target = scaled_size(img.width, img.height, max_side)
    if img.format in _JPEG_FORMATS and target != img.size:
        # Decode at 1/2, 1/4 or 1/8 scale when that still leaves at least the target size.
        img.draft(img.mode if img.mode in _PLAIN_MODES else None, target)
    img.load()  # Image.open leaves the first frame current: an animation is sent as its first frame
    # The profile describes the colours of every mode but CMYK, which _eight_bit turns into sRGB.
    icc = img.info.get("icc_profile") if img.mode != "CMYK" else None
    ImageOps.exif_transpose(img, in_place=True)
    return _encode(_flatten(_eight_bit(img)), mime, max_side, icc)


def _encode(img: Image.Image, mime: str, max_side: int, icc: bytes | None) -> SentImage:
    """``img`` (8-bit RGB or grey, upright) downscaled to fit ``max_side`` if needed, then encoded."""
    target = scaled_size(img.width, img.height, max_side)
    if img.size != target:
        # Bilinear after the DCT scaling: BOX costs 7 ms less at 1.5k px but keeps the grain (+50% bytes).
        # reducing_gap: a cheap integer box reduction first when the image is far larger than the target.
        img = img.resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0)
    fmt = _OUTPUT[mime]
    out = BytesIO()
    options: dict[str, Any] = {}
    if icc:
        options["icc_profile"] = icc  # colours stay what they were (e.g. Display P3)
    if fmt == "JPEG":
        options |= {"quality": JPEG_QUALITY}
    elif fmt == "WEBP":
        options |= {"quality": WEBP_QUALITY, "method": WEBP_METHOD}
    else:
        options |= {"compress_level": PNG_COMPRESS_LEVEL}
    img.save(out, format=fmt, **options)
    return SentImage(out.getvalue(), _MIME_OF[fmt], img.width, img.height, changed=True)


def _eight_bit(img: Image.Image) -> Image.Image:
    """RGB, L, RGBA or LA with 8 bits per channel; palettes expanded, CMYK and 16-bit converted."""
    mode = img.mode
    if mode in ("RGB", "L", "RGBA", "LA"):
        return img
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    if mode in _SIXTEEN_BIT:
        # 0..65535 → 0..255 by scaling: convert("L") would clip everything above 255 to white.
        return img.convert("I").point(lambda v: v / 257 + 0.5).convert("L")
    if mode in ("P", "PA"):
        return img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    if mode == "1":
        return img.convert("L")
    if mode in ("La", "RGBa"):
        return img.convert(mode.upper())
    return img.convert("RGBA" if "A" in img.getbands() else "RGB")


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(BytesIO(icc))
            rgb = ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if rgb is not None:
                return rgb
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken profile: the plain conversion below is still a fair picture
    return img.convert("RGB")


def _flatten(img: Image.Image) -> Image.Image:
    if img.mode not in ("RGBA", "LA"):
        return img
    base = Image.new(img.mode[:-1], img.size, (BACKGROUND,) * (len(img.mode) - 1))
    base.paste(img.convert(img.mode[:-1]), mask=img.getchannel("A"))
    return base


def _orientation(img: Image.Image) -> int | None:
    """The EXIF orientation the header gave, without decoding (a PNG's eXIf chunk after its pixels is
    read only by ``load``; exif_transpose still applies it then)."""
    if "exif" not in img.info:
        return None
    try:
        return img.getexif().get(_ORIENTATION)
    except DECODE_ERRORS:
        return None  # unreadable EXIF: the pixels as stored


def _require_decoder(mime: str, name: str) -> None:
    if mime in ("image/heic", "image/heif") and not _heif_available():
        raise ImageError(
            f"{name} is {mime.split('/')[1].upper()}, which needs the pillow-heif package to decode: "
            "`uv add pillow-heif` (or convert the file to JPEG)"
        )


def _heif_available() -> bool:
    global _heif_registered
    if _heif_registered is None:
        try:
            from pillow_heif import register_heif_opener
        except ImportError:
            _heif_registered = False
        else:
            register_heif_opener()
            _heif_registered = True
    return _heif_registered
