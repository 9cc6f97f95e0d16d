"""One row's text column sent as the user message under a system prompt, one chat completion per row.

What ``extract`` (answer as ``response_format`` json_schema, :mod:`tasks.jobs.extract`) and ``extract
--via tools`` (answer as a function call, :mod:`tasks.jobs.tools`) share: the row check, what goes into
the content hash, the request, and the reply's usage. A job says only what its request adds
(:meth:`TextChatJob.request_options`), what of it decides the answer (:meth:`TextChatJob.hashed_fields`)
and how a reply becomes its result (:meth:`TextChatJob._parse`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from openai.types.chat import ChatCompletion

from tasks.engine.job import Item, Prepared, Reply, RowInvalid
from tasks.engine.plan.hashing import non_blank
from tasks.errors import ConfigError
from tasks.jobs.chat import create_chat
from tasks.jobs.embed import estimate_text_tokens
from tasks.provider.catalog import family_of
from tasks.provider.client import Connection

__all__ = ["REASONING_EFFORTS", "TextChatJob", "check_reasoning_effort", "check_sampling"]

REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")


def check_reasoning_effort(value: str | None, model: str | None = None) -> None:
    """Refuse, before any request, a value the model's family doesn't take (tasks/provider/catalog.py):
    Gemini 3 can't turn thinking off ("none"); gemini-4-argon takes low, medium or high only."""
    if value is None:
        return
    if value not in REASONING_EFFORTS:
        raise ConfigError(f"--reasoning-effort {value!r}: use one of {', '.join(REASONING_EFFORTS)}")
    family = family_of(model) if model else None
    if family is not None and family.reasoning_efforts is not None and value not in family.reasoning_efforts:
        raise ConfigError(
            f"--reasoning-effort {value!r} is not one {model} takes ({family.name} models take "
            f"{', '.join(family.reasoning_efforts)}): pick one of those, or drop the option"
        )


def check_sampling(model: str, **options: float | None) -> None:
    """Refuse sampling options (temperature, top_p, top_k) the model's family has deprecated: nothing is
    sent with them. ``options``: name -> value as given (None: not given)."""
    family = family_of(model)
    for name, value in options.items():
        if value is not None and name in family.deprecated_options:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{flag} is deprecated for {model} ({family.name} models; Gemini API changelog "
                f"{family.deprecated_since}): drop {flag}, or pick a model that still takes it (e.g. "
                "gemini-2.5-flash-lite); nothing was sent"
            )


@dataclass(frozen=True, kw_only=True)
class TextChatJob:
    model: str
    text_col: str = "text"
    prompt: str | None = None  # the system prompt; None: the job's default (system_prompt)
    reasoning_effort: str | None = None
    # The JSON-schema dialect sent (schemas.dialects): "gemini" fits the default provider and the emulator.
    schema_dialect: str = "gemini"

    name = "extract"
    # prepare()'s fields are the same for every row but this one, the text as-is: see tasks/engine/plan/hashing.py.
    hash_text_field = "text"
    max_items_per_request = 1
    streams = True  # --stream (tasks/jobs/chat.py)
    # A run's first request goes alone (tasks.engine.run): a schema or a response format the provider
    # refuses for every row costs one request.
    first_request_alone = True

    system_prompt: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_reasoning_effort(self.reasoning_effort, self.model)

    @property
    def input_columns(self) -> tuple[str, ...]:
        return (self.text_col,)

    @property
    def string_columns(self) -> tuple[str, ...]:
        return (self.text_col,)

    def hashed_fields(self) -> dict[str, Any]:
        """What the job's request adds that decides the answer (its schema's or functions' hash)."""
        raise NotImplementedError

    def request_options(self) -> dict[str, Any]:
        """What the job adds to ``chat.completions.create`` (``response_format``, or ``tools``)."""
        raise NotImplementedError

    def _parse(self, completion: ChatCompletion) -> Any:
        """The reply as the job's result, or a :class:`~tasks.engine.job.RowFailure` saying why not."""
        raise NotImplementedError

    def surely_valid(self, texts: pa.Array) -> np.ndarray:
        """Rows :meth:`prepare` accepts (not null, not blank), all at once."""
        return non_blank(texts)

    def prepare(self, payload: dict[str, Any]) -> Prepared:
        text = payload[self.text_col]
        if text is None:
            raise RowInvalid(f"column {self.text_col!r} is null: nothing to extract from")
        if not text.strip():
            raise RowInvalid(f"column {self.text_col!r} is empty: nothing to extract from")
        fields = {
            "job": self.name,
            "model": self.model,
            **self.hashed_fields(),
            "prompt": self.system_prompt,
            "reasoning_effort": self.reasoning_effort,
            "text": text,
        }
        return Prepared(fields=fields, tokens=estimate_text_tokens(self.system_prompt + text), data=text)

    async def send(self, conn: Connection, items: list[Item]) -> Reply:
        (item,) = items
        extra = {"reasoning_effort": self.reasoning_effort} if self.reasoning_effort is not None else {}
        answer = await create_chat(
            conn,
            model=self.model,
            messages=[
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": item.prepared.data},
            ],
            **self.request_options(),
            **extra,
        )
        return answer.reply(self._parse(answer.completion))
