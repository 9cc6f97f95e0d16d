"""One chat completion request, plain or streamed: what every chat-based job sends through.

With ``--stream`` (``Connection.stream``) the reply comes as server-sent events and is put back
together here into the same :class:`ChatCompletion` a plain request returns, so a job parses both
alike. The official SDK raises nothing when a stream just stops, so this module checks: a stream that
ends before every choice has its finish reason, breaks off, stalls longer than ``--idle-timeout``
between two chunks, or carries a chunk that is not JSON is a failed attempt (a transport-like
:class:`BadReply`, retried by the engine like a 5xx), never a result. Usage comes from the final
usage chunk (``stream_options.include_usage``).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import openai
from openai._models import construct_type
from openai.types.chat import ChatCompletion

from tasks.engine.job import BadReply, Reply, unexpected_reply
from tasks.provider.client import Connection

__all__ = ["ChatAnswer", "create_chat", "thinking_tokens"]


@dataclass(slots=True)
class ChatAnswer:
    completion: ChatCompletion
    first_token_s: float | None = None  # streamed replies only

    @property
    def usage(self) -> tuple[int, int, int]:
        usage = self.completion.usage
        return (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) if usage else (0, 0, 0)

    def reply(self, result: Any) -> Reply:
        """The engine's reply for one row whose result (or failure) was parsed from this answer."""
        prompt, completion, total = self.usage
        return Reply(
            results=[result],
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=total,
            first_token_s=self.first_token_s,
            served_model=self.completion.model or None,
        )


def thinking_tokens(completion: ChatCompletion) -> int | None:
    """Thinking tokens as reported (``completion_tokens_details.reasoning_tokens``), else what the total
    holds beyond prompt and completion (Gemini leaves them out of completion_tokens); None: no usage."""
    usage = completion.usage
    if usage is None:
        return None
    details = usage.completion_tokens_details
    if details is not None and details.reasoning_tokens is not None:
        return details.reasoning_tokens
    return max(0, usage.total_tokens - usage.prompt_tokens - usage.completion_tokens)


async def create_chat(conn: Connection, **request: Any) -> ChatAnswer:
    """``chat.completions.create(**request)``, streamed when the connection says so."""
    if not conn.stream:
        response = await conn.client.chat.completions.create(**request)
        if not isinstance(response, ChatCompletion):
            raise unexpected_reply(response, "a chat completion")
        if not response.choices:
            raise BadReply("the reply had no choices")
        return ChatAnswer(response)
    return await _streamed(conn, request)


async def _streamed(conn: Connection, request: dict[str, Any]) -> ChatAnswer:
    sent = time.monotonic()
    stream = await conn.client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    if not hasattr(stream, "__aiter__"):
        raise unexpected_reply(stream, "a stream of chat completion chunks")
    assembly = _Assembly()
    first_token_s: float | None = None
    iterator = stream.__aiter__()
    try:
        while True:
            # The first chunk may wait for the model to think (bounded by --timeout, the read timeout);
            # after it, a gap longer than --idle-timeout is a stalled stream.
            try:
                if assembly.chunks:
                    chunk = await asyncio.wait_for(iterator.__anext__(), conn.idle_timeout_s)
                else:
                    chunk = await iterator.__anext__()
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise BadReply(
                    f"the stream stalled: no chunk for {conn.idle_timeout_s:g}s (--idle-timeout) after "
                    f"{assembly.describe()}",
                    transport=True,
                ) from None
            except json.JSONDecodeError as exc:
                raise BadReply(
                    f"the stream carried a malformed chunk after {assembly.describe()}: not JSON ({exc.msg} at "
                    f"char {exc.pos})",
                    transport=True,
                ) from None
            except (openai.APIConnectionError, openai.APITimeoutError) as exc:
                cause = exc.__cause__ or exc.__context__ or exc
                raise BadReply(
                    f"the stream broke off after {assembly.describe()}: {type(cause).__name__}: {cause}",
                    transport=True,
                ) from None
            except openai.APIError as exc:  # an error event inside the stream
                raise BadReply(
                    f"the stream carried an error after {assembly.describe()}: {exc}", transport=True
                ) from None
            if assembly.add(chunk) and first_token_s is None:
                first_token_s = time.monotonic() - sent
    finally:
        await stream.close()
    return ChatAnswer(assembly.completion(), first_token_s)


class _Assembly:
    """Chunks of one streamed reply put back together, choice by choice."""

    def __init__(self) -> None:
        self.chunks = 0
        self.chars = 0
        self.head: dict[str, Any] = {}
        self.usage: dict[str, Any] | None = None
        self.choices: dict[int, dict[str, Any]] = {}

    def describe(self) -> str:
        return f"{self.chunks} chunk(s), {self.chars} character(s) of content"

    def add(self, chunk: Any) -> bool:
        """Take one chunk; True when it carried content (text or a tool call)."""
        self.chunks += 1
        if not self.head:
            self.head = {"id": chunk.id, "created": chunk.created, "model": chunk.model}
        if getattr(chunk, "usage", None) is not None:
            self.usage = chunk.usage.model_dump()
        carried = False
        for choice in chunk.choices or []:
            state = self.choices.setdefault(
                choice.index, {"content": None, "refusal": None, "tool_calls": {}, "finish_reason": None}
            )
            delta = choice.delta
            if delta is not None:
                if delta.content:
                    state["content"] = (state["content"] or "") + delta.content
                    self.chars += len(delta.content)
                    carried = True
                if getattr(delta, "refusal", None):
                    state["refusal"] = (state["refusal"] or "") + delta.refusal
                for call in delta.tool_calls or []:
                    slot = state["tool_calls"].setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                    if call.id:
                        slot["id"] = call.id
                    if call.function is not None:
                        slot["name"] += call.function.name or ""
                        slot["arguments"] += call.function.arguments or ""
                        self.chars += len(call.function.arguments or "")
                    carried = True
            if choice.finish_reason is not None:
                state["finish_reason"] = choice.finish_reason
        return carried

    def completion(self) -> ChatCompletion:
        unfinished = [k for k, state in self.choices.items() if state["finish_reason"] is None]
        if not self.choices or unfinished:
            which = "no choice at all" if not self.choices else f"choice {unfinished[0]} has no finish reason"
            raise BadReply(
                f"the stream ended early ({which}) after {self.describe()}: an incomplete answer is not kept",
                transport=True,
            )
        choices = []
        for k in sorted(self.choices):
            state = self.choices[k]
            message: dict[str, Any] = {"role": "assistant", "content": state["content"], "refusal": state["refusal"]}
            if state["tool_calls"]:
                message["tool_calls"] = [
                    {"id": c["id"] or f"call_{k}_{i}", "type": "function",
                     "function": {"name": c["name"], "arguments": c["arguments"]}}
                    for i, c in sorted(state["tool_calls"].items())
                ]  # fmt: skip
            choices.append({"index": k, "message": message, "finish_reason": state["finish_reason"]})
        document = {**self.head, "object": "chat.completion", "choices": choices, "usage": self.usage}
        # Built the way the SDK builds a plain reply (loosely: a finish reason it doesn't list is kept),
        # so a streamed and a plain answer parse alike.
        return construct_type(type_=ChatCompletion, value=document)
