"""Reading request bodies: JSON objects, multipart forms, base64 data."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from emulator.errors import invalid
from emulator.wire import Request


def multipart(req: Request) -> dict[str, tuple[bytes, str | None, str | None]]:
    """name -> (content, filename, content type)."""
    ctype = req.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise invalid("Expected a multipart/form-data body.")
    boundary = None
    for param in ctype.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise invalid("multipart/form-data body without a boundary.")
    delim = b"--" + boundary.encode("latin-1")
    fields: dict[str, tuple[bytes, str | None, str | None]] = {}
    for part in req.body.split(delim)[1:]:
        if part.startswith(b"--"):
            break
        part = part.removeprefix(b"\r\n")
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        content = content.removesuffix(b"\r\n")
        name = filename = part_type = None
        for hline in head.decode("utf-8", "replace").split("\r\n"):
            hname, _, hvalue = hline.partition(":")
            if hname.strip().lower() == "content-disposition":
                for param in hvalue.split(";")[1:]:
                    key, _, value = param.strip().partition("=")
                    value = value.strip().strip('"')
                    if key.lower() == "name":
                        name = value
                    elif key.lower() == "filename":
                        filename = value
            elif hname.strip().lower() == "content-type":
                part_type = hvalue.strip()
        if name is not None:
            fields[name] = (content, filename, part_type)
    return fields


# ---------------------------------------------------------------------------------------------
# request helpers


def parse_json(req: Request) -> dict[str, Any]:
    try:
        body = json.loads(req.body)
    except (ValueError, UnicodeDecodeError):
        raise invalid("Invalid JSON payload received.") from None
    if not isinstance(body, dict):
        raise invalid("Invalid JSON payload received. Expected an object.")
    return body


def model_of(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model is required.")
    return model.removeprefix("models/")


def decode_b64(data: Any, what: str) -> bytes:
    if not isinstance(data, str):
        raise invalid(f"{what}: expected base64 data.")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{what}: invalid base64 data.") from None
