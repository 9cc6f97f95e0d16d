"""Streamed chat replies (SSE over chunked transfer encoding), with switchable faults.

Stream faults (``EmulatorConfig.stream_fault_rate_<kind>``, or the marker ``[[emulator:stream-<kind>]]``
in a message): ``disconnect`` (the connection closes mid-body, without the chunked terminator),
``early_end`` (the body ends cleanly after some content, with no finish reason), ``stall`` (no byte
after the first chunks for ``hang_seconds``), ``malformed`` (a chunk whose data is not JSON).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable
from typing import Any

from emulator.config import EmulatorConfig
from emulator.state import ServerState
from emulator.wire import Response

STREAM_FAULTS: tuple[str, ...] = ("disconnect", "early_end", "stall", "malformed")
WORDS_PER_PIECE = 4


def response(
    state: ServerState, answer: dict[str, Any], body: dict[str, Any], texts: list[str], cfg: EmulatorConfig
) -> Response:
    """The streamed form of ``answer``: a Response that writes itself."""
    options = body.get("stream_options")
    events = stream_events(answer, isinstance(options, dict) and bool(options.get("include_usage")))
    rates = {kind: getattr(cfg, f"stream_fault_rate_{kind}") for kind in STREAM_FAULTS}
    fault = pick_stream_fault(rates, texts, state.rng)
    if fault is not None:
        state.bump("faults", sub=f"stream:{fault}")

    def write(writer: asyncio.StreamWriter, keep_alive: bool) -> Awaitable[bool]:
        return write_stream(
            writer,
            events,
            fault=fault,
            keep_alive=keep_alive,
            chunk_delay_s=cfg.stream_chunk_delay_seconds,
            stall_s=cfg.hang_seconds,
        )

    return Response(200, b"", "text/event-stream", stream=write)


def pick_stream_fault(rates: dict[str, float], texts: list[str], rng: random.Random) -> str | None:
    """The fault this streamed reply carries: a marker in the messages decides, else the configured rates."""
    for kind in STREAM_FAULTS:
        if any(f"[[emulator:stream-{kind}]]" in t for t in texts):
            return kind
    if not any(rates.values()):
        return None
    r, acc = rng.random(), 0.0
    for kind in STREAM_FAULTS:
        acc += rates.get(kind, 0.0)
        if r < acc:
            return kind
    return None


def _pieces(text: str) -> list[str]:
    words = text.split(" ")
    return [
        " ".join(words[i : i + WORDS_PER_PIECE]) + (" " if i + WORDS_PER_PIECE < len(words) else "")
        for i in range(0, len(words), WORDS_PER_PIECE)
    ] or [""]


def stream_events(answer: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """The chunks of a streamed ``answer`` (a chat.completion object), in order, as OpenAI sends them."""
    base = {key: answer[key] for key in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    events: list[dict[str, Any]] = []
    for choice in answer["choices"]:
        k, message = choice["index"], choice["message"]
        events.append({**base, "choices": [{"index": k, "delta": {"role": "assistant"}, "finish_reason": None}]})
        for call in message.get("tool_calls") or []:
            arguments = call["function"]["arguments"]
            half = len(arguments) // 2
            head = {"index": 0, "id": call["id"], "type": "function"}
            first = head | {"function": {"name": call["function"]["name"], "arguments": arguments[:half]}}
            rest = {"index": 0, "function": {"arguments": arguments[half:]}}
            for delta in (first, rest):
                events.append(
                    {**base, "choices": [{"index": k, "delta": {"tool_calls": [delta]}, "finish_reason": None}]}
                )
        if message.get("content") is not None:
            for piece in _pieces(message["content"]):
                events.append({**base, "choices": [{"index": k, "delta": {"content": piece}, "finish_reason": None}]})
        events.append({**base, "choices": [{"index": k, "delta": {}, "finish_reason": choice["finish_reason"]}]})
    if include_usage:
        events.append({**base, "choices": [], "usage": answer["usage"]})
    return events


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def write_stream(
    writer: asyncio.StreamWriter,
    events: list[dict[str, Any]],
    *,
    fault: str | None,
    keep_alive: bool,
    chunk_delay_s: float,
    stall_s: float,
) -> bool:
    """Write ``events`` as an SSE body in chunked transfer encoding; False when the connection must close."""
    head = [
        "HTTP/1.1 200 OK",
        "Content-Type: text/event-stream",
        "Transfer-Encoding: chunked",
        "Cache-Control: no-cache",
        "Server: gembatch-emulator",
        f"Connection: {'keep-alive' if keep_alive and fault is None else 'close'}",
    ]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    lines = [f"data: {json.dumps(e, separators=(',', ':'))}\n\n".encode() for e in events]
    cut = max(1, len(events) // 2)  # where a fault strikes: after some content has arrived
    if fault is not None:
        lines = lines[:cut]
        if fault == "malformed":
            lines.append(b'data: {"id": "chatcmpl-broken", "choices": [{"delta": \n\n')
    for i, line in enumerate(lines):
        if i and chunk_delay_s > 0:
            await asyncio.sleep(chunk_delay_s)
        writer.write(_chunk(line))
        await writer.drain()
    if fault == "disconnect":
        return False  # closed without the terminating chunk: the body is incomplete
    if fault == "stall":
        await asyncio.sleep(stall_s)
        return False
    writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    await writer.drain()
    return keep_alive and fault is None
