"""Deterministic, clearly synthetic answers for the emulator.

Everything here is a pure function of its arguments, so tests can compute the exact value the
emulator will send back.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Sequence

import numpy as np

EMBEDDING_MODELS: dict[str, int] = {
    "gemini-embedding-2": 3072,
    "gemini-embedding-001": 3072,
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
}
EMBEDDING_MAX_INPUT_TOKENS = 2048  # gemini-embedding-001's, and any model's not in the table below
# Tokens per input where a model takes more (gemini-embedding-2: about 8,192; OpenAI's: 8,191).
EMBEDDING_INPUT_TOKENS: dict[str, int] = {
    "gemini-embedding-2": 8192,
    "text-embedding-3-small": 8191,
    "text-embedding-3-large": 8191,
}


def embedding_max_tokens(model: str) -> int:
    return EMBEDDING_INPUT_TOKENS.get(model, EMBEDDING_MAX_INPUT_TOKENS)


WORDS = (
    "amber",
    "basalt",
    "cobalt",
    "delta",
    "ember",
    "fjord",
    "garnet",
    "harbor",
    "indigo",
    "juniper",
    "kelp",
    "lumen",
    "maple",
    "nebula",
    "onyx",
    "pebble",
    "quartz",
    "ripple",
    "saffron",
    "tundra",
    "umber",
    "velvet",
    "willow",
    "xenon",
    "yarrow",
    "zephyr",
)


def count_tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


def _sha_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# embeddings


def embedding_dims(model: str) -> int:
    try:
        return EMBEDDING_MODELS[model]
    except KeyError:
        raise ValueError(f"unknown embedding model: {model!r}") from None


def fake_embeddings(texts: Sequence[str], model: str, dimensions: int | None = None) -> np.ndarray:
    """Vectorised form of `fake_embedding`: one float32 row per text, bit-identical to it."""
    full = embedding_dims(model)
    if dimensions is not None and not 1 <= dimensions <= full:
        raise ValueError(f"dimensions must be in 1..{full} for {model}, got {dimensions}")
    n = len(texts)
    if n == 0:
        return np.zeros((0, dimensions or full), dtype=np.float32)
    size = 4 * full
    buf = b"".join(hashlib.shake_256(f"{model}\x00{t}".encode()).digest(size) for t in texts)
    u = np.frombuffer(buf, dtype="<u4").reshape(n, full)
    if dimensions is not None and dimensions < full:
        u = u[:, :dimensions]
    # u * 2**-31 - 1 equals (u / 2**32) * 2 - 1 exactly in float64, with one temporary instead of three.
    v = u * (2.0**-31)
    v -= 1.0
    if dimensions is not None and dimensions < full:
        # Gemini normalises only its full-size output; truncated vectors come back as they are.
        return v.astype(np.float32)
    # The norm is a per-row reduction, so a row's value never depends on the rest of its batch.
    v /= np.sqrt(np.sum(v * v, axis=1, keepdims=True))
    return v.astype(np.float32)


def fake_embedding(text: str, model: str, dimensions: int | None = None) -> np.ndarray:
    return fake_embeddings([text], model, dimensions)[0]


# ---------------------------------------------------------------------------------------------
# chat, captions, transcripts


def fake_chat_text(model: str, prompt_text: str) -> str:
    sha8 = _sha_hex(f"{model}\x00{prompt_text}".encode())[:8]
    return f"[emulator {model}] reply #{sha8}: {prompt_text[:60]}"


def image_size(image_bytes: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG or GIF header; None when unknown or malformed."""
    b = image_bytes
    if b[:8] == b"\x89PNG\r\n\x1a\n" and len(b) >= 24 and b[12:16] == b"IHDR":
        w, h = struct.unpack(">II", b[16:24])
        return w, h
    if b[:6] in (b"GIF87a", b"GIF89a") and len(b) >= 10:
        w, h = struct.unpack("<HH", b[6:10])
        return w, h
    if b[:2] == b"\xff\xd8":
        return _jpeg_size(b)
    return None


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(b: bytes) -> tuple[int, int] | None:
    i = 2
    n = len(b)
    while i + 4 <= n:
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        (seg_len,) = struct.unpack(">H", b[i + 2 : i + 4])
        if marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", b[i + 5 : i + 9])
            return w, h
        i += 2 + seg_len
    return None


def fake_caption(image_bytes: bytes, mime: str, model: str, prompt: str = "") -> str:
    """Names the bytes (hash, size) and, when they decode, what the pixels show (:func:`image_pixels`)."""
    sha12 = _sha_hex(image_bytes)[:12]
    size = image_size(image_bytes)
    dims = f"{size[0]}x{size[1]}, " if size else ""
    pixels = image_pixels(image_bytes)
    seen = f"; {pixels}" if pixels else ""
    return f"[emulator {model}] synthetic caption #{sha12} of a {mime} image ({dims}{len(image_bytes)} bytes{seen})"


# Where image_pixels samples: the centres of the corner cells of a 3 × 3 grid, clear of edge effects.
PIXEL_SAMPLES = {"tl": (1 / 6, 1 / 6), "tr": (5 / 6, 1 / 6), "bl": (1 / 6, 5 / 6), "br": (5 / 6, 5 / 6)}


def image_pixels(image_bytes: bytes) -> str | None:
    """What a model would see, as text: ``"RGB 60x40 tl #ff0000 tr #00ff00 bl #0000ff br #ffff00 mean
    #7f7f3f"`` — the mode and size as decoded (the first frame; ``frames N`` when animated), four
    samples and the mean colour through Pillow's plain RGB conversion (16-bit values are clipped,
    alpha dropped, as a careless receiver would). None when Pillow can't decode the bytes."""
    from io import BytesIO

    from PIL import Image, ImageStat

    try:
        with Image.open(BytesIO(image_bytes)) as img:
            mode, (width, height) = img.mode, img.size
            frames = getattr(img, "n_frames", 1)
            if img.format == "JPEG" and min(width, height) >= 512:
                img.draft(None, (width // 8, height // 8))  # DCT scaling: the samples are block means
            rgb = img.convert("RGB")
    except Exception:  # noqa: BLE001 - anything Pillow can't read is simply not described
        return None
    w, h = rgb.size
    samples = " ".join(
        f"{name} #{bytes(rgb.getpixel((min(w - 1, int(fx * w)), min(h - 1, int(fy * h))))).hex()}"
        for name, (fx, fy) in PIXEL_SAMPLES.items()
    )
    mean = bytes(round(v) for v in ImageStat.Stat(rgb).mean).hex()
    animated = f" frames {frames}" if frames > 1 else ""
    return f"{mode} {width}x{height}{animated} {samples} mean #{mean}"


def fake_transcript(audio_bytes: bytes, fmt: str, model: str) -> str:
    sha12 = _sha_hex(audio_bytes)[:12]
    return f"[emulator {model}] synthetic transcript #{sha12} ({fmt}, {len(audio_bytes)} bytes)"


def audio_seconds(audio_bytes: bytes, fmt: str | None = None) -> float | None:
    """Duration from a WAV (RIFF) header, else from the container as FFmpeg reads it (MP3 frames, Ogg,
    FLAC…); None when neither can tell."""
    b = audio_bytes
    if len(b) < 12 or b[:4] != b"RIFF" or b[8:12] != b"WAVE":
        return _container_seconds(b)
    i = 12
    byte_rate = 0
    while i + 8 <= len(b):
        cid = b[i : i + 4]
        (size,) = struct.unpack("<I", b[i + 4 : i + 8])
        body = i + 8
        if cid == b"fmt " and size >= 16 and body + 16 <= len(b):
            byte_rate = struct.unpack("<I", b[body + 8 : body + 12])[0]
        elif cid == b"data":
            if not byte_rate:
                return None
            # Streaming writers leave the size at 0 or 0xFFFFFFFF; trust the bytes we have instead.
            avail = len(b) - body
            data_len = avail if size in (0, 0xFFFFFFFF) else min(size, avail)
            return data_len / byte_rate
        i = body + size + (size & 1)
    return None


def _container_seconds(data: bytes) -> float | None:
    import io

    try:
        import av

        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            return container.duration / av.time_base if container.duration else None
    except Exception:  # noqa: BLE001 - anything FFmpeg can't read has no known duration
        return None


# ---------------------------------------------------------------------------------------------
# images


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def fake_png(prompt: str, width: int, height: int) -> bytes:
    """A valid RGB PNG: a vertical gradient between two colours derived from the prompt."""
    if width < 1 or height < 1:
        raise ValueError("width and height must be positive")
    d = hashlib.sha256(prompt.encode()).digest()
    c0 = np.array(list(d[0:3]), dtype=np.float64)
    c1 = np.array(list(d[3:6]), dtype=np.float64)
    t = np.linspace(0.0, 1.0, height) if height > 1 else np.zeros(1)
    colours = np.rint(c0 + (c1 - c0) * t[:, None]).astype(np.uint8)
    raw = b"".join(b"\x00" + bytes(c) * width for c in colours)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw, 6))
        + _png_chunk(b"IEND", b"")
    )


def fake_image(prompt: str, width: int, height: int, fmt: str = "png") -> bytes:
    """The image for ``prompt`` in ``fmt``: png (:func:`fake_png`), jpeg or webp (the same gradient,
    encoded by Pillow), or svg (an XML drawing no raster decoder reads)."""
    if fmt == "png":
        return fake_png(prompt, width, height)
    if fmt == "svg":
        colour = hashlib.sha256(prompt.encode()).hexdigest()[:6]
        text = prompt.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
            f'<rect width="100%" height="100%" fill="#{colour}"/><text x="4" y="16">{text}</text></svg>'
        ).encode()
    if fmt not in ("jpeg", "webp"):
        raise ValueError(f"unknown image format {fmt!r}: use png, jpeg, webp or svg")
    import io

    from PIL import Image

    buf = io.BytesIO()
    with Image.open(io.BytesIO(fake_png(prompt, width, height))) as image:
        image.save(buf, format=fmt.upper(), quality=90)
    return buf.getvalue()
