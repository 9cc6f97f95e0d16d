"""Files named in an input column: where they are, their bytes, and what kind of media they hold.

Formats are sniffed from the first bytes, never trusted from the name: a text file called ``x.wav``
must fail here with a clear message, not at the provider with a 400.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import struct
import wave
from dataclasses import dataclass
from io import BytesIO
from typing import IO

import fsspec

from tasks.jobs.media_access import MediaPolicy, scheme_of

__all__ = [
    "IMAGE_MIMES",
    "AUDIO_FORMATS",
    "MediaFile",
    "base_dir_of",
    "resolve_path",
    "read_media",
    "file_size",
    "sniff_image_mime",
    "sniff_audio_format",
    "audio_duration_s",
    "extension",
    "file_sha256",
    "read_head",
    "AUDIO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "FOLDER_EXTENSIONS",
    "folder_extensions",
    "open_media",
]

# What Gemini's chat endpoint accepts inline (see GEMINI.md: routes).
IMAGE_MIMES = ("image/png", "image/jpeg", "image/webp", "image/heic", "image/heif")
AUDIO_FORMATS = ("wav", "mp3", "aiff", "aac", "ogg", "flac")

# What a folder or glob input takes by name (a glob takes every match): recordings and videos for
# transcribe (their audio track), pictures for caption.
AUDIO_EXTENSIONS = (
    "wav", "mp3", "m4a", "aac", "ogg", "oga", "opus", "flac", "webm", "mp4", "m4v", "mov", "mkv", "mka",
    "aiff", "aif", "wma", "amr", "3gp",
)  # fmt: skip
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif", "avif", "heic", "heif")  # what images_io reads
FOLDER_EXTENSIONS = {"transcribe": AUDIO_EXTENSIONS, "caption": IMAGE_EXTENSIONS}
HASH_BLOCK_BYTES = 4 << 20

_ANYWHERE = MediaPolicy()  # no policy given: any path or URL but http(s) (code that checked the cell itself)

_HEIC_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis"}
_HEIF_BRANDS = {b"mif1", b"msf1", b"heif"}


@dataclass(frozen=True, slots=True)
class MediaFile:
    """A file's resolved location, its bytes and their sha256."""

    path: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _has_protocol(path: str) -> bool:
    return "://" in path or path.startswith("file:")


def base_dir_of(input_path: str) -> str:
    """The folder of the input table, against which relative paths in it resolve (URLs too)."""
    if _has_protocol(input_path):
        return input_path.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(input_path))


def resolve_path(value: str, base_dir: str | None) -> str:
    """``value`` as written in the column, made absolute against ``base_dir`` when it is relative."""
    value = value.strip()
    if _has_protocol(value) or base_dir is None:
        return value
    value = os.path.expanduser(value)
    if _has_protocol(base_dir):
        return value if value.startswith("/") else posixpath.join(base_dir, value)
    return os.path.normpath(os.path.join(base_dir, value))


def open_media(path: str, policy: MediaPolicy | None = None) -> IO[bytes]:
    """A binary file for ``path``, opened the way ``policy`` allows (http(s) only through it)."""
    return (policy or _ANYWHERE).open(path)


def file_size(path: str, policy: MediaPolicy | None = None) -> int | None:
    """Size in bytes without reading the file; None when the filesystem doesn't say."""
    if scheme_of(path) in ("http", "https"):
        with open_media(path, policy) as f:
            return f.seek(0, os.SEEK_END)
    fs, fs_path = fsspec.core.url_to_fs(path)
    size = fs.size(fs_path)
    return None if size is None else int(size)


def read_media(path: str, policy: MediaPolicy | None = None) -> MediaFile:
    """The whole file. Raises FileNotFoundError, IsADirectoryError or OSError like ``open`` does, and
    :class:`~tasks.jobs.media_access.MediaRefused` for a URL ``policy`` refuses or can't fetch."""
    with open_media(path, policy) as f:
        return MediaFile(path=path, data=f.read())


def folder_extensions(job: object) -> tuple[str, ...] | None:
    """The extensions a folder input gives ``job`` (None: the job reads tables only)."""
    return FOLDER_EXTENSIONS.get(getattr(job, "name", ""))


def read_head(path: str, n: int = 64, policy: MediaPolicy | None = None) -> bytes:
    """The first ``n`` bytes of a file (raises like :func:`read_media`)."""
    with open_media(path, policy) as f:
        return f.read(n)


def file_sha256(path: str, policy: MediaPolicy | None = None) -> str:
    """sha256 of a file's bytes, read in blocks (a two-hour recording is never held whole)."""
    digest = hashlib.sha256()
    with open_media(path, policy) as f:
        while block := f.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def extension(path: str) -> str:
    return posixpath.splitext(path.rsplit("/", 1)[-1])[1].lower().lstrip(".")


def sniff_image_mime(head: bytes) -> str | None:
    """MIME type of a PNG, JPEG, WebP, HEIC or HEIF file from its first bytes; None for anything else."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp":
        (box_size,) = struct.unpack(">I", head[:4]) if len(head) >= 4 else (0,)
        brands = [head[8:12]] + [head[i : i + 4] for i in range(16, min(box_size, len(head)), 4)]
        if any(b in _HEIC_BRANDS for b in brands):
            return "image/heic"
        if any(b in _HEIF_BRANDS for b in brands):
            return "image/heif"
    return None


def sniff_audio_format(head: bytes) -> str | None:
    """One of :data:`AUDIO_FORMATS` from a file's first bytes; None for anything else."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head.startswith(b"fLaC"):
        return "flac"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"ID3"):
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        layer = (head[1] >> 1) & 0b11
        if layer == 0b00 and head[1] & 0xF0 == 0xF0:
            return "aac"  # ADTS: sync 0xFFF, layer bits always 00
        if layer == 0b01:
            return "mp3"  # MPEG audio layer III
    return None


def audio_duration_s(data: bytes, fmt: str) -> float | None:
    """Seconds of audio when cheap to know (WAV header, MP3 frame headers); None otherwise."""
    if fmt == "wav":
        try:
            with wave.open(BytesIO(data)) as w:
                rate = w.getframerate()
                return w.getnframes() / rate if rate else None
        except (wave.Error, EOFError, struct.error):
            return None  # e.g. float or compressed WAV: the stdlib reads PCM only
    if fmt == "mp3":
        return _mp3_duration_s(data)
    return None


_MP3_BITRATES_KBPS = {
    # (MPEG-1?, layer III): index 1..14
    True: (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    False: (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MP3_SAMPLE_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _mp3_duration_s(data: bytes) -> float | None:
    """From the first frame: the Xing/Info frame count (VBR encoders write it), else size / bitrate."""
    start = 0
    if data.startswith(b"ID3") and len(data) >= 10:
        size = (data[6] << 21) | (data[7] << 14) | (data[8] << 7) | data[9]
        start = 10 + size + (10 if data[5] & 0x10 else 0)
    while start + 4 <= len(data) and not (data[start] == 0xFF and data[start + 1] & 0xE0 == 0xE0):
        start += 1
        if start > 64 * 1024:
            return None
    if start + 4 > len(data):
        return None
    b1, b2, b3 = data[start + 1], data[start + 2], data[start + 3]
    version, layer = (b1 >> 3) & 0b11, (b1 >> 1) & 0b11
    bitrate_index, rate_index = b2 >> 4, (b2 >> 2) & 0b11
    if version == 1 or layer != 0b01 or not 1 <= bitrate_index <= 14 or rate_index == 3:
        return None
    mpeg1 = version == 3
    sample_rate = _MP3_SAMPLE_RATES[version][rate_index]
    samples_per_frame = 1152 if mpeg1 else 576
    mono = (b3 >> 6) == 0b11
    side_info = (17 if mono else 32) if mpeg1 else (9 if mono else 17)
    tag = start + 4 + side_info
    if data[tag : tag + 4] in (b"Xing", b"Info") and len(data) >= tag + 12:
        (flags,) = struct.unpack(">I", data[tag + 4 : tag + 8])
        if flags & 0x1:
            (frames,) = struct.unpack(">I", data[tag + 8 : tag + 12])
            return frames * samples_per_frame / sample_rate
    bitrate = _MP3_BITRATES_KBPS[mpeg1][bitrate_index - 1] * 1000
    end = len(data) - (128 if data[-128:-125] == b"TAG" else 0)  # ID3v1 tag
    return (end - start) * 8 / bitrate
