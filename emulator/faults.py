"""Injected faults: markers in a request's text, random faults by rate, broken answers, a gateway's canned answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from urllib.parse import unquote

from emulator.config import FAULT_KINDS, PREFIXES, ROUTES, EmulatorConfig
from emulator.errors import TransportFault, deadline, internal, invalid, openai_error, overloaded
from emulator.state import ServerState
from emulator.wire import Request, Response, head

MARKER_KINDS: tuple[str, ...] = ("400", "500", "503", "504", "garbage", "hang", "truncate", "drop", "badjson")
BAD_JSON_REPLY = '{"oops": '
_MARKER_PREFIX = "[[emulator:"

Write = Callable[[asyncio.StreamWriter, Response], Awaitable[None]]


def marker(texts: list[str]) -> str | None:
    for text in texts:
        if _MARKER_PREFIX in text:
            for kind in MARKER_KINDS:
                if f"{_MARKER_PREFIX}{kind}]]" in text:
                    return kind
    return None


def check_markers(state: ServerState, texts: list[str]) -> None:
    """Raise what a marker in ``texts`` asks for (an API error, or a TransportFault)."""
    kind = marker(texts)
    if kind is None or kind == "badjson":  # a 200 whose content is broken: see _chat
        return
    if kind == "400":
        state.bump("faults", sub="marker:400")
        raise invalid("Request contains an invalid argument: the input holds the marker [[emulator:400]].")
    if kind in ("500", "503", "504"):
        state.bump("faults", sub=f"marker:{kind}")
        raise {"500": internal, "503": overloaded, "504": deadline}[kind]()
    raise TransportFault(kind)


def pick_fault(state: ServerState, cfg: EmulatorConfig) -> str | None:
    """A random fault by the configured rates, or None."""
    r = state.rng.random()
    acc = 0.0
    for kind in FAULT_KINDS:
        acc += getattr(cfg, f"fault_rate_{kind}")
        if r < acc:
            return kind
    if r < acc + cfg.retry_after_429_rate:  # drawn from the same number: seeded runs stay the same
        return "429"
    return None


async def transport_fault(
    kind: str, writer: asyncio.StreamWriter, keep_alive: bool, cfg: EmulatorConfig, write: Write
) -> bool:
    """Answer with fault ``kind``; whether the connection stays open."""
    if kind == "500":
        await write(writer, internal().response())
        return keep_alive
    if kind == "503":
        await write(writer, overloaded().response())
        return keep_alive
    if kind == "garbage":
        resp = Response(200, b"<html>oops</html>", cfg.garbage_content_type)
        await write(writer, resp)
        return keep_alive
    if kind == "garbage-json":
        body = b"<!DOCTYPE html><html>oops</html>"
        await write(writer, Response(200, body, "application/json"))
        return keep_alive
    if kind == "hang":
        await asyncio.sleep(cfg.hang_seconds)
        return False
    if kind == "truncate":
        body = json.dumps(
            {"id": "emulator-truncated", "object": "chat.completion", "choices": [], "padding": "x" * 256}
        ).encode()
        writer.write(head(200, "application/json", len(body), True, {}))
        writer.write(body[: len(body) // 2])
        await writer.drain()
        return False
    return False  # drop: the caller closes the socket without a byte written


def route_key(path: str) -> str | None:
    """The route a path is on, as EmulatorConfig.route_answers names it."""
    path = unquote(path).split("?", 1)[0]
    if path.startswith(("/upload/v1beta/files", "/download/v1beta/")):
        return "files"
    for prefix in PREFIXES:
        if path.startswith(prefix):
            rest = path[len(prefix) :].strip("/")
            for route in (*ROUTES, "files", "batches"):
                if rest == route or rest.startswith(route + "/"):
                    return route
    return None


def canned(state: ServerState, req: Request, cfg: EmulatorConfig) -> Response | None:
    """A gateway's own answer: a canned one for the route, or LiteLLM's 400 for a refused parameter."""
    if not cfg.route_answers and not cfg.refuse_params:
        return None
    route = route_key(req.path)
    answer = cfg.route_answers.get(route) if route else None
    if answer is not None:
        with state.lock:
            seen = state.route_hits[route] = state.route_hits.get(route, 0) + 1
        if seen > answer.after and (answer.times is None or seen <= answer.after + answer.times):
            state.bump("faults", sub=f"canned:{route}")
            return answer.response()
    if cfg.refuse_params and req.method == "POST" and req.body[:1] == b"{":
        try:
            body = json.loads(req.body)
        except ValueError:
            return None
        for param in cfg.refuse_params:
            if isinstance(body, dict) and param in body:
                model = str(body.get("model", ""))
                message = (
                    f"litellm.UnsupportedParamsError: Setting `{param}` is not supported by openai, {model}. To "
                    "drop it from the call, set `litellm.drop_params = True`.\n\nLiteLLM: model group "
                    f"'{model}' failed with the error above. No fallback was attempted."
                )
                state.bump("faults", sub=f"refused:{param}")
                return openai_error(400, message, "400")
    return None
