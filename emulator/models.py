"""GET models and models/{id}: the served models, under Gemini's or OpenAI's names."""

from __future__ import annotations

from emulator.config import EmulatorConfig
from emulator.errors import ApiError, json_response
from emulator.state import ServerState
from emulator.wire import Request, Response


async def handle(_state: ServerState, _req: Request, arg: str, cfg: EmulatorConfig) -> Response:
    if not arg:
        data = [
            {"id": f"{cfg.model_id_prefix}{m}", "object": "model", "created": 0, "owned_by": "gembatch-emulator"}
            for m in cfg.models
            if m not in cfg.retired
        ]
        return json_response({"object": "list", "data": data})
    if not cfg.serves(arg.removeprefix("models/")):
        raise ApiError(404, "NOT_FOUND", f"Model {arg} is not found for API version v1beta.")
    return json_response({"id": arg, "object": "model", "created": 0, "owned_by": "gembatch-emulator"})
