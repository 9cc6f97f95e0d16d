"""Chat completion answers beyond one plain message: ``n`` choices, ``max_tokens`` cut-offs, tool calls,
and streamed replies (SSE) with switchable faults. Mounted by :meth:`emulator.server.Emulator._chat`.

Everything here is a deterministic function of the request, so tests can predict each answer:

- choice ``k`` of ``n`` is the plain reply for k = 0 and ``"<reply> [choice k]"`` after;
- ``max_tokens`` cuts a reply at ``4 * max_tokens`` characters with ``finish_reason: "length"``;
- with ``tools``, a forced ``tool_choice`` calls that function; otherwise the first function whose name
  (any case) appears in the last user message is called, else function ``sha256(text) % len(tools)``
  (:func:`chosen_tool`). Arguments are fake JSON for the function's parameters, seeded by the text;
- a streamed reply sends the content in pieces of a few words, then a chunk with the finish reason,
  then (``stream_options.include_usage``) a usage chunk with no choices, then ``data: [DONE]``.

Stream faults (``EmulatorConfig.stream_fault_rate_<kind>``, or the marker ``[[emulator:stream-<kind>]]``
in a message): ``disconnect`` (the connection closes mid-body, without the chunked terminator),
``early_end`` (the body ends cleanly after some content, with no finish reason), ``stall`` (no byte
after the first chunks for ``hang_seconds``), ``malformed`` (a chunk whose data is not JSON).
Tool-call faults (markers only): ``[[emulator:badargs]]`` (arguments that are not JSON),
``[[emulator:badtool]]`` (a function that was not offered).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from typing import Any

from emulator import fakes

__all__ = [
    "STREAM_FAULTS",
    "check_request",
    "choice_text",
    "chosen_tool",
    "completion",
    "pick_stream_fault",
    "stream_events",
    "write_stream",
]

STREAM_FAULTS: tuple[str, ...] = ("disconnect", "early_end", "stall", "malformed")
MAX_N = 8
CHARS_PER_TOKEN = 4
WORDS_PER_PIECE = 4
BAD_ARGUMENTS = '{"oops": '
UNKNOWN_FUNCTION = "not_offered"


def check_request(body: dict[str, Any]) -> str | None:
    """What is wrong with the generation parameters, in Gemini's words; None when they are fine."""
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N):
        return f"n: candidate count must be an integer between 1 and {MAX_N}, got {n!r}."
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 2
    ):
        return f"temperature: must be a number within [0.0, 2.0], got {temperature!r}."
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            return f"{name}: must be a positive integer, got {value!r}."
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not tools:
            return "tools: must be a non-empty list."
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                return f"tools[{i}].function.name: a function name is required."
        names = [tool["function"]["name"] for tool in tools]
        choice = body.get("tool_choice")
        if isinstance(choice, dict):
            forced = (choice.get("function") or {}).get("name")
            if forced not in names:
                return f"tool_choice: function {forced!r} is not among the tools ({', '.join(names)})."
        elif choice is not None and choice not in ("auto", "required", "none"):
            return f"tool_choice: unsupported value {choice!r}."
    return None


def choice_text(reply: str, k: int) -> str:
    return reply if k == 0 else f"{reply} [choice {k}]"


def chosen_tool(tools: list[dict[str, Any]], tool_choice: Any, text: str) -> dict[str, Any]:
    """The function the emulator calls for ``text`` (see the module's docstring)."""
    functions = [tool["function"] for tool in tools]
    if isinstance(tool_choice, dict):
        forced = tool_choice["function"]["name"]
        return next(fn for fn in functions if fn["name"] == forced)
    lowered = text.lower()
    for fn in functions:
        if fn["name"].lower() in lowered:
            return fn
    return functions[int(hashlib.sha256(text.encode()).hexdigest(), 16) % len(functions)]


def _tool_call(body: dict[str, Any], text: str, texts: list[str], k: int, null_rate: float) -> dict[str, Any]:
    fn = chosen_tool(body["tools"], body.get("tool_choice"), text)
    seed = text if k == 0 else f"{text}\x00{k}"
    parameters = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else {"type": "object"}
    arguments = json.dumps(fakes.fake_json_for_schema(parameters, seed=seed, null_rate=null_rate))
    name = fn["name"]
    if any("[[emulator:badargs]]" in t for t in texts):
        arguments = BAD_ARGUMENTS
    if any("[[emulator:badtool]]" in t for t in texts):
        name = UNKNOWN_FUNCTION
    call_id = "call_" + hashlib.sha256(f"{k}\x00{text}".encode()).hexdigest()[:16]
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def completion(
    body: dict[str, Any],
    *,
    model: str,
    reply: str,
    prompt_text: str,
    texts: list[str],
    prompt_tokens: int,
    thinking: int,
    chat_id: str,
    created: int,
    null_rate: float = 0.0,
) -> dict[str, Any]:
    """The ``chat.completion`` object answering ``body`` (``reply`` is the plain answer's text)."""
    n = body.get("n") or 1
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    use_tools = bool(body.get("tools")) and body.get("tool_choice") != "none"
    choices = []
    completion_tokens = 0
    for k in range(n):
        message: dict[str, Any] = {"role": "assistant", "content": None}
        finish = "stop"
        if use_tools:
            call = _tool_call(body, prompt_text, texts, k, null_rate)
            message["tool_calls"] = [call]
            finish = "tool_calls"
            completion_tokens += fakes.count_tokens(call["function"]["arguments"])
        else:
            text = choice_text(reply, k)
            if limit is not None and fakes.count_tokens(text) > limit:
                text, finish = text[: limit * CHARS_PER_TOKEN], "length"
            message["content"] = text
            completion_tokens += fakes.count_tokens(text)
        choices.append({"index": k, "message": message, "finish_reason": finish})
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens + thinking,
    }
    return {
        "id": chat_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    }


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
