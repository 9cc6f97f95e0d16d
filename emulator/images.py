"""POST images/generations: Gemini's image models under /v1beta/openai/, OpenAI's under /v1/; images served by URL."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from typing import Any
from urllib.parse import unquote

from emulator import fakes
from emulator.bodies import model_of, parse_json
from emulator.catalog import GEMINI_IMAGE_MODELS, OPENAI_IMAGE_MODELS
from emulator.config import IMAGE_FORMATS, EmulatorConfig
from emulator.errors import invalid, json_response, model_not_found, openai_error
from emulator.faults import check_markers
from emulator.state import ServerState
from emulator.wire import Request, Response

# Images answered by URL are served here (no key: like a storage bucket's signed link).
SERVED_IMAGES_PATH = "/_emulator/images/"


async def handle(state: ServerState, req: Request, _arg: str, cfg: EmulatorConfig) -> Response:
    body = parse_json(req)
    model = model_of(body)
    openai_path = unquote(req.path).startswith("/v1/")
    if openai_path:
        if not cfg.serves(model) or model not in OPENAI_IMAGE_MODELS:
            return openai_error(
                404, f"The model `{model}` does not exist or you do not have access to it.", "model_not_found"
            )
        max_n, sizes = OPENAI_IMAGE_MODELS[model]
        if body.get("size") is not None and body["size"] not in sizes:
            return openai_error(
                400,
                f"Invalid value: '{body['size']}'. Supported values are: {', '.join(repr(s) for s in sizes)}.",
                "invalid_value",
                "size",
            )
    else:
        if not cfg.serves(model) or model not in GEMINI_IMAGE_MODELS:
            raise model_not_found(model, "predict")
        max_n = GEMINI_IMAGE_MODELS[model]
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise invalid("prompt: a non-empty string is required.")
    n = body.get("n") or 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_n:
        message = f"n: must be an integer between 1 and {max_n} for {model}, got {n!r}."
        if openai_path:
            return openai_error(400, message, "invalid_value", "n")
        raise invalid(message)
    width, height = _size(body)
    served_url = "response_format" not in body and cfg.default_image_response == "url"
    response_format = body.get("response_format") or cfg.default_image_response
    if response_format not in ("b64_json", "url"):
        raise invalid(f"response_format: must be 'b64_json' or 'url', got {response_format!r}.")
    check_markers(state, [prompt])
    state.limiter.check(model, fakes.count_tokens(prompt), cfg)

    loop = asyncio.get_running_loop()
    data = []
    for k in range(n):
        seed = prompt if k == 0 else f"{prompt}#{k}"
        # zlib releases the GIL, so big images don't stall other connections.
        image = await loop.run_in_executor(None, fakes.fake_image, seed, width, height, cfg.image_format)
        b64 = base64.b64encode(image).decode()
        item = {"revised_prompt": f"[emulator] {prompt}"}
        if served_url:
            name = f"{next(state.ids)}-{hashlib.sha256(image).hexdigest()[:16]}.{cfg.image_format}"
            state.images_served[name] = (image, IMAGE_FORMATS[cfg.image_format])
            item["url"] = f"{state.origin}{SERVED_IMAGES_PATH}{name}"
        elif response_format == "url":
            item["url"] = f"data:{IMAGE_FORMATS[cfg.image_format]};base64,{b64}"
        else:
            item["b64_json"] = b64
        data.append(item)
    state.bump("images", n)
    state.bump("prompt_tokens", fakes.count_tokens(prompt))
    return json_response({"created": int(time.time()), "data": data})


def _size(body: dict[str, Any]) -> tuple[int, int]:
    """The requested WIDTHxHEIGHT (1024x1024 unless given)."""
    size = body.get("size") or "1024x1024"
    if size == "auto":
        size = "1024x1024"
    try:
        w_s, h_s = str(size).lower().split("x")
        width, height = int(w_s), int(h_s)
    except ValueError:
        raise invalid(f"size: expected WIDTHxHEIGHT, got {size!r}.") from None
    if not (1 <= width <= 4096 and 1 <= height <= 4096):
        raise invalid(f"size: {size!r} is out of range.")
    return width, height


def served_image(state: ServerState, path: str) -> Response:
    """An image answered earlier by URL (no key: like a storage bucket's signed link)."""
    found = state.images_served.get(path.rsplit("/", 1)[-1])
    if found is None:
        return Response(404, b"not found", content_type="text/plain")
    blob, mime = found
    return Response(200, blob, content_type=mime)
