"""The content of chat messages: text parts, inline images (data: URLs), inline audio, and its tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from emulator import fakes
from emulator.bodies import decode_b64
from emulator.errors import invalid

IMAGE_TOKENS = 258
IMAGE_MIMES = ("image/png", "image/jpeg", "image/webp", "image/heic", "image/heif", "image/gif")
AUDIO_FORMATS = ("wav", "mp3", "aiff", "aac", "ogg", "flac", "m4a", "webm", "mpeg", "mpga", "opus")
AUDIO_TOKENS_PER_SECOND = 32


@dataclass
class MessageContent:
    """What a request's messages hold: every text, the last user message's texts, images and audio."""

    texts: list[str] = field(default_factory=list)
    last_user: list[str] = field(default_factory=list)
    images: list[tuple[bytes, str]] = field(default_factory=list)
    audios: list[tuple[bytes, str]] = field(default_factory=list)

    def tokens(self) -> int:
        """The prompt tokens it costs: its texts, a fixed count per image, audio by its length."""
        tokens = sum(fakes.count_tokens(t) for t in self.texts)
        tokens += IMAGE_TOKENS * len(self.images)
        return tokens + sum(audio_tokens(data, fmt) for data, fmt in self.audios)


def read_messages(messages: list[Any]) -> MessageContent:
    content = MessageContent()
    for m_idx, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise invalid(f"messages[{m_idx}]: must be an object.")
        msg_texts = _texts_of(msg.get("content"), m_idx, content)
        content.texts.extend(msg_texts)
        if msg.get("role") == "user":
            content.last_user = msg_texts
    return content


def _texts_of(value: Any, m_idx: int, content: MessageContent) -> list[str]:
    """The texts of one message's content; its images and audio go to ``content``."""
    if isinstance(value, str):
        return [value]
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid(f"messages[{m_idx}].content: must be a string or a list of parts.")
    texts: list[str] = []
    for p_idx, part in enumerate(value):
        where = f"messages[{m_idx}].content[{p_idx}]"
        ptype = part.get("type") if isinstance(part, dict) else None
        if ptype == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid(f"{where}.text: must be a string.")
            texts.append(text)
        elif ptype == "image_url":
            content.images.append(image_part(part, where))
        elif ptype == "input_audio":
            content.audios.append(audio_part(part, where))
        else:
            raise invalid(f"{where}: unsupported content part type {ptype!r}.")
    return texts


def image_part(part: dict[str, Any], where: str) -> tuple[bytes, str]:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url.startswith("data:"):
        raise invalid(f"{where}.image_url: only inline data: URLs are supported (data:<mime>;base64,...).")
    header, sep, data = url[5:].partition(",")
    mime, _, encoding = header.partition(";")
    if not sep or encoding.lower() != "base64":
        raise invalid(f"{where}.image_url: malformed data URL; expected data:<mime>;base64,<data>.")
    mime = mime.lower()
    if mime not in IMAGE_MIMES:
        raise invalid(f"{where}.image_url: unsupported MIME type {mime!r}.")
    return decode_b64(data, f"{where}.image_url"), mime


def audio_part(part: dict[str, Any], where: str) -> tuple[bytes, str]:
    spec = part.get("input_audio")
    if not isinstance(spec, dict):
        raise invalid(f"{where}.input_audio: must be an object with data and format.")
    fmt = str(spec.get("format", "")).lower()
    if fmt not in AUDIO_FORMATS:
        raise invalid(f"{where}.input_audio.format: unsupported audio format {fmt!r}.")
    return decode_b64(spec.get("data"), f"{where}.input_audio.data"), fmt


def audio_tokens(audio: bytes, fmt: str) -> int:
    seconds = fakes.audio_seconds(audio, fmt)
    if seconds is None:
        seconds = len(audio) / 16000
    return math.ceil(seconds * AUDIO_TOKENS_PER_SECOND)


# ---------------------------------------------------------------------------------------------
# the server
