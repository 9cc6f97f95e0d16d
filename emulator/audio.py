"""POST audio/transcriptions: a multipart upload answered with a transcript."""

from __future__ import annotations

from emulator import fakes
from emulator.bodies import multipart
from emulator.config import EmulatorConfig
from emulator.errors import invalid, json_response, model_not_found
from emulator.faults import check_markers
from emulator.parts import audio_tokens
from emulator.state import ServerState
from emulator.wire import Request, Response


async def handle(state: ServerState, req: Request, _arg: str, cfg: EmulatorConfig) -> Response:
    fields = multipart(req)
    model_field = fields.get("model")
    if model_field is None:
        raise invalid("model is required.")
    model = model_field[0].decode("utf-8", "replace").strip().removeprefix("models/")
    if not cfg.serves(model) or model in fakes.EMBEDDING_MODELS:
        raise model_not_found(model, "generateContent")
    file_field = fields.get("file")
    if file_field is None or not file_field[0]:
        raise invalid("file is required.")
    audio, filename, part_type = file_field
    fmt = ""
    if filename and "." in filename:
        fmt = filename.rsplit(".", 1)[1].lower()
    elif part_type and "/" in part_type:
        fmt = part_type.split("/", 1)[1].lower().removeprefix("x-")
    fmt = {"wave": "wav", "mpeg": "mp3", "mpga": "mp3"}.get(fmt, fmt) or "wav"
    prompt = fields["prompt"][0].decode("utf-8", "replace") if "prompt" in fields else ""
    check_markers(state, [prompt] if prompt else [])
    tokens = audio_tokens(audio, fmt) + (fakes.count_tokens(prompt) if prompt else 0)
    state.limiter.check(model, tokens, cfg)
    text = fakes.fake_transcript(audio, fmt, cfg.answered_by(model))
    state.bump("prompt_tokens", tokens)
    rf = fields["response_format"][0].decode().strip() if "response_format" in fields else "json"
    if rf == "text":
        return Response(200, text.encode(), "text/plain; charset=utf-8")
    return json_response({"text": text})
