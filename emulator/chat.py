"""POST chat/completions: checks a request as Gemini (or OpenAI) would and answers it: ``n`` choices,
``max_tokens`` cut-offs, tool calls, JSON for a schema; streamed replies are emulator/streaming.py's.

Everything here is a deterministic function of the request, so tests can predict each answer:

- choice ``k`` of ``n`` is the plain reply for k = 0 and ``"<reply> [choice k]"`` after;
- ``max_tokens`` cuts a reply at ``4 * max_tokens`` characters with ``finish_reason: "length"``;
- with ``tools``, a forced ``tool_choice`` calls that function; otherwise the first function whose name
  (any case) appears in the last user message is called, else function ``sha256(text) % len(tools)``
  (:func:`chosen_tool`). Arguments are fake JSON for the function's parameters, seeded by the text;
- a streamed reply sends the content in pieces of a few words, then a chunk with the finish reason,
  then (``stream_options.include_usage``) a usage chunk with no choices, then ``data: [DONE]``.

Tool-call faults (markers only): ``[[emulator:badargs]]`` (arguments that are not JSON),
``[[emulator:badtool]]`` (a function that was not offered).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from emulator import fakes, parts, schema_rules, streaming
from emulator.bodies import model_of, parse_json
from emulator.catalog import DEPRECATED_SAMPLING, NEWER_FAMILY_PREFIXES, REASONING_EFFORT_TOKENS, efforts_of
from emulator.config import EmulatorConfig
from emulator.errors import invalid, json_response, model_not_found, openai_error
from emulator.fake_json import fake_json_for_schema
from emulator.faults import BAD_JSON_REPLY, check_markers, marker
from emulator.state import ServerState
from emulator.wire import Request, Response

JSON_SCHEMA_REJECTED = "This model does not support response format `json_schema`."

MAX_N = 8
CHARS_PER_TOKEN = 4
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
    arguments = json.dumps(fake_json_for_schema(parameters, seed=seed, null_rate=null_rate))
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


async def handle(state: ServerState, req: Request, _arg: str, cfg: EmulatorConfig) -> Response:
    body = parse_json(req)
    model = model_of(body)
    if not cfg.serves(model) or model in fakes.EMBEDDING_MODELS:
        raise model_not_found(model, "generateContent")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: must be a non-empty list.")
    answering = cfg.answered_by(model)
    effort = body.get("reasoning_effort")
    _check_options(body, answering, effort)
    schema, json_object = _response_format(body)
    problem = check_request(body)
    if problem is not None:
        raise invalid(problem)
    if schema is not None and cfg.json_schema == "rejected":
        # Groq's answer, whichever path was asked: an OpenAI-style object, no code.
        state.bump("faults", sub="json_schema:rejected")
        return openai_error(400, JSON_SCHEMA_REJECTED, None, "response_format")
    if schema is not None and cfg.json_schema == "ignored":
        state.bump("faults", sub="json_schema:ignored")
        schema = None
        body = {k: v for k, v in body.items() if k != "response_format"}
    refused = schema_rules.refusal(req.path, body)
    if refused is not None:
        fault, resp = refused
        state.bump("faults", sub=fault)
        return resp

    content = parts.read_messages(messages)
    check_markers(state, content.texts)
    prompt_text = "\n".join(content.last_user) if content.last_user else "\n".join(content.texts)
    prompt_tokens = content.tokens()
    state.limiter.check(model, prompt_tokens, cfg)

    reply = _reply(content, answering, prompt_text, schema, json_object, cfg)
    if marker(content.texts) == "badjson":
        state.bump("faults", sub="marker:badjson")
        reply = BAD_JSON_REPLY
    thinking = REASONING_EFFORT_TOKENS.get(effort or "", 0)
    seq = next(state.ids)
    chat_id = "chatcmpl-emu-" + hashlib.sha256(f"{seq}\x00{prompt_text}".encode()).hexdigest()[:24]
    answer = completion(
        body,
        model=answering,
        reply=reply,
        prompt_text=prompt_text,
        texts=content.texts,
        prompt_tokens=prompt_tokens,
        thinking=thinking,
        chat_id=chat_id,
        created=int(time.time()),
        null_rate=cfg.null_rate,
    )
    state.bump("prompt_tokens", prompt_tokens)
    state.bump("completion_tokens", answer["usage"]["completion_tokens"])
    state.bump("thinking_tokens", thinking)
    if body.get("stream"):
        return streaming.response(state, answer, body, content.texts, cfg)
    return json_response(answer)


def _check_options(body: dict[str, Any], answering: str, effort: Any) -> None:
    """reasoning_effort as the answering model takes it; no deprecated sampling options for newer models."""
    efforts = efforts_of(answering)
    if effort is not None and effort not in efforts:
        raise invalid(f"Invalid reasoning_effort: {effort}. Valid values are: {', '.join(efforts)}")
    if answering.startswith(NEWER_FAMILY_PREFIXES):
        for option in DEPRECATED_SAMPLING:
            if body.get(option) is not None:
                raise invalid(f"{option} is deprecated for {answering} and is not accepted.")


def _response_format(body: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
    """The JSON schema the reply must follow (or None), and whether a JSON object is asked for."""
    schema = None
    json_object = False
    response_format = body.get("response_format")
    if response_format is not None:
        rtype = response_format.get("type") if isinstance(response_format, dict) else None
        if rtype == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise invalid("response_format.json_schema.schema: a JSON schema object is required.")
        elif rtype == "json_object":
            json_object = True
        elif rtype != "text":
            raise invalid(f"response_format.type: unsupported value {rtype!r}.")
    return schema, json_object


def _reply(
    content: parts.MessageContent,
    answering: str,
    prompt_text: str,
    schema: dict[str, Any] | None,
    json_object: bool,
    cfg: EmulatorConfig,
) -> str:
    """The reply's text: a caption, a transcript, JSON for a schema, or prose."""
    if content.images:
        data, mime = content.images[-1]
        return fakes.fake_caption(data, mime, answering, prompt_text)
    if content.audios:
        data, fmt = content.audios[-1]
        return fakes.fake_transcript(data, fmt, answering)
    if schema is not None:
        return json.dumps(fake_json_for_schema(schema, seed=prompt_text, null_rate=cfg.null_rate))
    if json_object:
        return json.dumps({"text": fakes.fake_chat_text(answering, prompt_text)})
    return fakes.fake_chat_text(answering, prompt_text)
