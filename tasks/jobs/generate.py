"""The text-generation job: a prompt template over each row's columns, one chat completion per row.

The rendered template is the user message exactly as it is (nothing added: ``--system`` is the place
for instructions). The content hash covers the rendered messages and every parameter that shapes the
answer (model, temperature, max_tokens, reasoning_effort, n), so a rerun skips what is done and a new
parameter sends again. A reply cut by the token limit (``finish_reason: length``) is kept, flagged
``truncated``; with ``n`` > 1 each completion is its own output row (``choice`` 0…n-1).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from tasks.engine.job import Item, Prepared, Reply, RowFailure, RowInvalid, result_schema
from tasks.errors import ConfigError
from tasks.jobs.chat import create_chat, thinking_tokens
from tasks.jobs.embed import estimate_text_tokens
from tasks.jobs.text_chat import check_reasoning_effort, check_sampling
from tasks.provider.client import Connection

__all__ = ["GenerateJob", "GeneratedText", "MAX_N", "template_columns"]

MAX_N = 8  # Gemini's candidate count allows 1-8
RESERVED_COLUMNS = (
    "text",
    "choice",
    "finish_reason",
    "truncated",
    "prompt_tokens",
    "completion_tokens",
    "thinking_tokens",
    "content_hash",
    "model",
)


def template_columns(template: str, *, what: str = "--prompt") -> tuple[str, ...]:
    """The columns ``template`` names, in order of first use; a ConfigError for a template that can't
    be rendered from named columns (``{}``, ``{0}``, an unclosed brace)."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(
            f"{what} {template!r} is not a valid template ({exc}); write a literal brace as {{{{ or }}}}"
        ) from None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        column = name.split(".", 1)[0].split("[", 1)[0]
        if not column or column.isdigit():
            raise ConfigError(
                f"{what} {template!r}: {{{name}}} names no column; write the column's name in the braces, "
                "e.g. 'Summarise in one line: {text}'"
            )
        if column != name:
            raise ConfigError(
                f"{what} {template!r}: {{{name}}} reaches inside column {column!r}; only whole columns are "
                f"rendered, write {{{column}}}"
            )
        if column not in names:
            names.append(column)
    if not names:
        raise ConfigError(
            f"{what} {template!r} names no column, so every row would send the same prompt; put the column "
            "to use in braces, e.g. 'Summarise in one line: {text}'"
        )
    return tuple(names)


@dataclass(frozen=True, slots=True)
class GeneratedText:
    text: str | None
    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class GeneratedRow:
    """One request's answer: its completions and the usage the provider reported for them together."""

    choices: tuple[GeneratedText, ...]
    prompt_tokens: int | None
    completion_tokens: int | None
    thinking_tokens: int | None


@dataclass(frozen=True, kw_only=True)
class GenerateJob:
    model: str
    prompt: str
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    reasoning_effort: str | None = None
    n: int = 1
    # The input's id column: a template may name it, but it is read with its own type, not as text.
    id_col: str = "id"

    name = "generate"
    max_items_per_request = 1
    streams = True  # --stream: replies may come as streams (tasks/jobs/chat.py)

    columns: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_reasoning_effort(self.reasoning_effort, self.model)
        check_sampling(self.model, temperature=self.temperature)
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise ConfigError(f"--temperature {self.temperature:g}: use a value from 0 to 2")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"--max-tokens {self.max_tokens}: use a positive number of tokens")
        if not 1 <= self.n <= MAX_N:
            raise ConfigError(f"--n {self.n}: ask for 1 to {MAX_N} completions per row")
        if self.system is not None and not self.system.strip():
            raise ConfigError("--system is empty: write the instruction, or drop the option")
        object.__setattr__(self, "columns", template_columns(self.prompt))

    @property
    def input_columns(self) -> tuple[str, ...]:
        return self.columns

    @property
    def max_output_tokens(self) -> int | None:
        """The most output one request can cost (--max-tokens for each of --n answers): for --dry-run."""
        return None if self.max_tokens is None else self.max_tokens * self.n

    @property
    def string_columns(self) -> tuple[str, ...]:
        return tuple(c for c in self.columns if c != self.id_col)

    def check_input_columns(self, path: str, have: list[str]) -> None:
        """The template's columns are all in the input: else one error naming them and what there is."""
        missing = [c for c in self.columns if c not in have]
        if missing:
            raise ConfigError(
                f"--prompt {self.prompt!r} uses column {', '.join(repr(c) for c in missing)}, which input {path} "
                f"does not have; its columns are: {', '.join(have)}. Fix the name in the template's braces."
            )

    def _settings(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "reasoning_effort": self.reasoning_effort,
            "n": self.n,
        }

    def parameters(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "system": self.system, "columns": list(self.columns), **self._settings()}

    def prepare(self, payload: dict[str, Any]) -> Prepared:
        for column in self.columns:
            if payload[column] is None:
                raise RowInvalid(
                    f"column {column!r} is null, and --prompt uses it: fill it in the input, or leave the row out"
                )
        rendered = self.prompt.format_map(payload)
        if not rendered.strip():
            raise RowInvalid(f"the prompt rendered from column(s) {', '.join(self.columns)} is empty: nothing to send")
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        messages.append({"role": "user", "content": rendered})
        fields = {"job": self.name, "model": self.model, "messages": messages, **self._settings()}
        tokens = estimate_text_tokens((self.system or "") + rendered)
        return Prepared(fields=fields, tokens=tokens, data=messages)

    async def send(self, conn: Connection, items: list[Item]) -> Reply:
        (item,) = items
        extra: dict[str, Any] = {k: v for k, v in self._settings().items() if v is not None and k != "n"}
        if self.n != 1:
            extra["n"] = self.n
        answer = await create_chat(conn, model=self.model, messages=item.prepared.data, **extra)
        return answer.reply(self._parse(answer.completion))

    def _parse(self, response: Any) -> GeneratedRow | RowFailure:
        if len(response.choices) != self.n:
            return RowFailure(
                "invalid_reply", f"the reply had {len(response.choices)} choice(s) for --n {self.n}", raw_reply=None
            )
        choices = []
        for choice in sorted(response.choices, key=lambda c: c.index):
            content = choice.message.content
            if content is None and choice.finish_reason != "length":
                refusal = getattr(choice.message, "refusal", None)
                why = f"refused: {refusal}" if refusal else f"finish_reason {choice.finish_reason!r}"
                return RowFailure("invalid_reply", f"choice {choice.index} had no text ({why})", raw_reply=refusal)
            choices.append(GeneratedText(content, choice.finish_reason))
        usage = response.usage
        return GeneratedRow(
            choices=tuple(choices),
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            thinking_tokens=thinking_tokens(response),
        )

    def rows_per_result(self, result: GeneratedRow) -> int:
        return len(result.choices)

    def output_schema(self, id_col: str, id_type: pa.DataType) -> pa.Schema:
        return result_schema(
            id_col,
            id_type,
            [
                pa.field("text", pa.string()),
                pa.field("choice", pa.int32()),
                pa.field("finish_reason", pa.string()),
                pa.field("truncated", pa.bool_()),
                pa.field("prompt_tokens", pa.int64()),
                pa.field("completion_tokens", pa.int64()),
                pa.field("thinking_tokens", pa.int64()),
            ],
        )

    def result_arrays(self, results: list[GeneratedRow]) -> dict[str, pa.Array]:
        rows = [(r, k, c) for r in results for k, c in enumerate(r.choices)]
        return {
            "text": pa.array([c.text for _, _, c in rows], pa.string()),
            "choice": pa.array([k for _, k, _ in rows], pa.int32()),
            "finish_reason": pa.array([c.finish_reason for _, _, c in rows], pa.string()),
            "truncated": pa.array([c.finish_reason == "length" for _, _, c in rows], pa.bool_()),
            "prompt_tokens": pa.array([r.prompt_tokens for r, _, _ in rows], pa.int64()),
            "completion_tokens": pa.array([r.completion_tokens for r, _, _ in rows], pa.int64()),
            "thinking_tokens": pa.array([r.thinking_tokens for r, _, _ in rows], pa.int64()),
        }

    def results_from_table(self, table: pa.Table) -> dict[str, Any]:
        if table.num_rows == 0:
            return {}
        names = ("content_hash", "choice", "text", "finish_reason", "prompt_tokens", "completion_tokens")
        columns = [table.column(c).to_pylist() for c in (*names, "thinking_tokens")]
        grouped: dict[str, dict[int, tuple[Any, ...]]] = {}
        for h, k, *rest in zip(*columns):
            grouped.setdefault(h, {}).setdefault(k, tuple(rest))
        found = {}
        for h, by_choice in grouped.items():
            if sorted(by_choice) != list(range(self.n)):
                continue  # not every completion stored: send again
            rows = [by_choice[k] for k in range(self.n)]
            _, _, prompt, completion, thinking = rows[0]
            found[h] = GeneratedRow(tuple(GeneratedText(t, f) for t, f, *_ in rows), prompt, completion, thinking)
        return found
