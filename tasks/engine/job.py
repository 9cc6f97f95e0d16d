"""What a job is to the engine: the `Job` protocol and the values a row passes through (item, reply, outcome)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from tasks.provider.client import Connection

# What an error row keeps of a reply that could not be used: enough to see what came back, never
# megabytes (a base64 image, a runaway completion).
MAX_RAW_REPLY_CHARS = 4000


class Job(Protocol):
    """What one kind of work needs from the engine. Implementations live in ``tasks/<job>.py``."""

    name: str
    model: str
    input_columns: tuple[str, ...]
    string_columns: tuple[str, ...]
    max_items_per_request: int

    def prepare(self, payload: dict[str, Any]) -> Prepared:
        """What will be sent for one row, or :class:`RowInvalid`. Runs in a worker thread (it may read
        files); keep it light: heavy request bodies are built in :meth:`send`. A job whose ``prepare``
        spends its time outside the GIL (reading and hashing files) may set ``prepare_workers`` > 1:
        a chunk's rows are then prepared on that many threads."""
        ...

    async def send(self, conn: Connection, items: list[Item]) -> Reply:
        """One request for ``items``; raises what the SDK raises."""

    def output_schema(self, id_col: str, id_type: pa.DataType) -> pa.Schema: ...

    def result_arrays(self, results: list[Any]) -> dict[str, pa.Array]:
        """Typed output columns (besides id, content_hash, model) for results in row order.

        One output row per result, unless the job defines ``rows_per_result(result) -> int`` (image
        generation with n > 1): then the arrays hold that many rows for each result, in order.
        """

    def results_from_table(self, table: pa.Table) -> dict[str, Any]:
        """content_hash → result, read back from output rows (to share with an identical row)."""

    def parameters(self) -> dict[str, Any]: ...

    # Optional, for text jobs whose hashed fields are the same for every row but one, the text column
    # as-is (see tasks/engine/plan/hashing.py): a chunk is then hashed a column at once and rows are
    # prepared only when they are sent.
    #
    #   hash_text_field: str                                    # that field's name in prepare()'s fields
    #   def surely_valid(self, texts: pa.Array) -> np.ndarray:  # rows prepare() accepts for sure (bool);
    #                                                           # the others take the per-row path


class RowInvalid(Exception):
    """The row can't be sent (empty text, missing file…); the message says why and what to do."""


@dataclass(slots=True)
class Prepared:
    """``fields`` is everything that decides the answer (hashed into content_hash); ``data`` is what
    :meth:`Job.send` needs to build the request."""

    fields: dict[str, Any]
    tokens: int
    data: Any = None


@dataclass(slots=True)
class RowFailure:
    """A reply arrived but one row's part of it is unusable (not JSON, fails validation)."""

    kind: str
    message: str
    raw_reply: str | None = None
    # False: asking again would pay again for what was already made (an image that could not be
    # downloaded): the row goes to _errors/ at once.
    ask_again: bool = True


@dataclass(slots=True)
class Item:
    position: int
    row_id: Any
    content_hash: str
    prepared: Prepared

    @property
    def tokens(self) -> int:
        return self.prepared.tokens


@dataclass(slots=True)
class Reply:
    results: list[Any]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    images: int = 0  # images generated (and billed) by this request
    first_token_s: float | None = None  # a streamed reply: seconds from sending to its first token
    # The model the reply says answered (its ``model`` field); None: the reply doesn't say.
    served_model: str | None = None


@dataclass(slots=True)
class Outcome:
    """What happened to one unique content: a result, or an error, or nothing (not attempted)."""

    result: Any = None
    error_type: str | None = None
    error_message: str | None = None
    attempts: int = 0
    raw_reply: str | None = None
    # True: the row failed only because transient errors used up its attempts; the next plain run
    # sends it again. False: it failed for itself (kept out until --retry-errors).
    retry_auto: bool = False
    # The model the reply named (the output's served_model column); None: the reply didn't say.
    served_model: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None


class BadReply(Exception):
    """A reply that arrived (HTTP 200) but can't be used: wrong shape, missing items, an image that
    isn't one. Like a :class:`RowFailure` for every row of the request, it is asked once more
    (``RetryPolicy.max_row_failure_attempts``), then kept in ``_errors/`` with ``raw_reply`` (cut to
    ``MAX_RAW_REPLY_CHARS``): a second request is cheap, eight paid generations are not.

    ``transport=True``: the body wasn't JSON at all (an HTML page from a proxy, which the SDK hands
    back as a str): a transport fault, retried like a 5xx.
    """

    def __init__(self, message: str, *, raw_reply: str | None = None, transport: bool = False) -> None:
        super().__init__(message)
        self.raw_reply = raw_reply
        self.transport = transport


def unexpected_reply(response: object, what: str) -> BadReply:
    """The SDK handed back something other than ``what``: a str is a body that was not JSON."""
    text = str(response)
    return BadReply(f"the reply was not {what}: {text[:200]!r}", raw_reply=text, transport=isinstance(response, str))


def result_schema(
    id_col: str, id_type: pa.DataType, columns: Iterable[pa.Field], *, served_model: bool = True
) -> pa.Schema:
    """A job's output schema: the id, the job's own ``columns``, the content hash and the model; and, for
    jobs whose replies name a model, ``served_model`` (the model the reply named: a reroute shows there;
    null where the reply named none)."""
    tail = [pa.field("content_hash", pa.string()), pa.field("model", pa.string())]
    if served_model:
        tail.append(pa.field("served_model", pa.string()))
    return pa.schema([pa.field(id_col, id_type), *columns, *tail])
