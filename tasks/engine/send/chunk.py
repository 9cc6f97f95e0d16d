"""The engine, written once: plan a chunk, fan out rate-limited requests, write its parts.

A job (see :class:`Job`) says how a row becomes a request and a response becomes typed columns;
everything else — skipping done rows, sharing identical contents, retries, limits, atomic writes,
counts — lives here.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import random
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.engine.plan.hashing import HashProcesses, TextTemplate, digest_keys, text_template
from tasks.engine.plan.index import hash_keys, id_tags, member
from tasks.engine.send.budget import Budget
from tasks.engine.send.limits import AdaptiveLimiter
from tasks.engine.send.outage import OutageBreaker
from tasks.engine.send.timings import Timings
from tasks.engine.store.done import DoneIndex
from tasks.engine.store.output import RETRY_AUTO, RETRY_ON_REQUEST, OutputStore
from tasks.errors import RunStopped
from tasks.provider.catalog import same_model
from tasks.provider.client import Connection, Failure, classify_failure

__all__ = [
    "Job",
    "Item",
    "BadReply",
    "unexpected_reply",
    "Reply",
    "Outcome",
    "Prepared",
    "RowFailure",
    "RowInvalid",
    "RetryPolicy",
    "RunStats",
    "RunContext",
    "ChunkReport",
    "chunk_payloads",
    "chunk_statuses",
    "content_hash",
    "content_hashes",
    "prepare_and_look_up",
    "prepare_chunk",
    "precheck_chunk",
    "process_chunk",
    "row_status",
    "send_part",
]

log = logging.getLogger("gembatch.engine")

# After a stop (daily quota, fatal error) requests already in flight get this long to finish: their
# answers are paid for, so keep them if they come soon; then they are cancelled.
STOP_GRACE_S = 5.0
RETRY_DELAY_ENV = "GEMBATCH_RETRY_DELAY_S"
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


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential back-off with jitter; the server's own delay (Retry-After, retryDelay) wins."""

    max_attempts: int = 8
    max_rate_limited_attempts: int = 30
    # A reply whose row part can't be used (invalid JSON, fails the schema) is asked once more.
    max_row_failure_attempts: int = 2
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The default policy; ``GEMBATCH_RETRY_DELAY_S`` scales its back-off (base delay in seconds,
        the cap 60 times it). For tests and developers who drive failures through the command line."""
        raw = os.environ.get(RETRY_DELAY_ENV, "").strip()
        if not raw:
            return cls()
        try:
            base = float(raw)
        except ValueError:
            raise ValueError(f"{RETRY_DELAY_ENV} must be a number of seconds, got {raw!r}") from None
        if base < 0:
            raise ValueError(f"{RETRY_DELAY_ENV} must be 0 or more, got {raw!r}")
        return cls(base_delay_s=base, max_delay_s=60 * base)

    def delay(self, attempt: int, failure: Failure) -> float:
        if failure.retry_after_s is not None:
            return min(failure.retry_after_s, 3600.0) + random.uniform(0, 1.0)
        backoff = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return random.uniform(backoff / 2, backoff)

    def allows(self, attempts: int, failure: Failure) -> bool:
        limit = self.max_rate_limited_attempts if failure.kind == "rate_limited" else self.max_attempts
        return attempts < limit


@dataclass
class RunStats:
    input_rows: int = 0
    skipped_done: int = 0
    deduplicated: int = 0
    succeeded: int = 0
    failed: int = 0
    not_attempted: int = 0
    # Rows of ``failed`` recorded in _errors/ with retry "auto" (transient errors only).
    failed_retry_auto: int = 0
    requests: int = 0
    items_sent: int = 0
    retries: int = 0
    rate_limited: int = 0
    transient_errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    estimated_tokens: int = 0
    images: int = 0
    parts_written: list[str] = field(default_factory=list)
    error_parts_written: list[str] = field(default_factory=list)
    # Streamed replies: time to first token (tasks/jobs/chat.py).
    first_token: Timings = field(default_factory=Timings)
    # Rows answered by another model than the one asked for, by that model (the provider rerouted it).
    rerouted: dict[str, int] = field(default_factory=dict)

    def rows_accounted(self) -> int:
        return self.skipped_done + self.deduplicated + self.succeeded + self.failed + self.not_attempted


class RunContext:
    """Everything the chunks of one run share. A plain class on purpose: Prefect walks dataclass
    task parameters field by field, and this one holds the done-key index."""

    def __init__(
        self,
        *,
        job: Job,
        conn: Connection,
        limiter: AdaptiveLimiter,
        store: OutputStore,
        index: DoneIndex,
        run_id: str,
        id_col: str,
        retry_errors: bool = False,
        retry: RetryPolicy | None = None,
        on_progress: Callable[[int], None] | None = None,
        budget: Budget | None = None,
        outage: OutageBreaker | None = None,
    ) -> None:
        self.job = job
        self.conn = conn
        self.limiter = limiter
        self.store = store
        self.index = index
        self.run_id = run_id
        self.id_col = id_col
        self.retry_errors = retry_errors
        self.retry = retry or RetryPolicy()
        self.stats = RunStats()
        self.on_progress = on_progress or (lambda rows: None)
        self.inflight: dict[str, asyncio.Future[Outcome | None]] = {}
        # Chunks prepared by the driver (precheck_chunk), by chunk number, until their task runs.
        self.prechecked: dict[int, PreparedChunk] = {}
        self.stop_event = asyncio.Event()
        # Chunks between starting and queueing their requests (the driver waits for them before
        # deciding the limiter is starved of work).
        self.preparing = 0
        self.stopped: RunStopped | None = None
        self.budget: Budget | None = budget
        self.outage = outage or OutageBreaker()
        # For a job that measures its work in something besides rows (audio seconds): see ProgressBar.
        self.on_units: Callable[[float], None] = lambda amount: None
        # What a job keeps for the length of one run (a recording job's bound on segments on hand).
        self.shared: dict[str, Any] = {}
        # Sorted hash keys of the contents that recur in the input (tasks/engine/plan/recurring.py): the
        # only results of this run that the index must learn (a later row may reuse them). None: all.
        self.recurring: np.ndarray | None = None
        # Child processes that hash text columns (a text job's run; see tasks/engine/plan/hashing.py).
        self.hash_processes: HashProcesses | None = None
        # Whether result parts get a served_model column (not in an output made before it existed, so
        # that its parts keep one schema).
        self.served_column = True

    def request_stop(self, reason: RunStopped) -> None:
        if self.stopped is None:
            self.stopped = reason
        self.stop_event.set()
        self.outage.wake()

    def __repr__(self) -> str:
        return f"RunContext(run_id={self.run_id!r}, job={self.job.name!r})"


@dataclass
class ChunkReport:
    index: int
    rows: int
    written: int
    errors: int
    part: str | None = None  # the results part written, if any


_ENCODER = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
_encode_str = json.encoder.encode_basestring  # what the encoder above uses for a str (C when available)
_MISSING = object()


def content_hash(fields: dict[str, Any]) -> str:
    """sha256 of the fields as sorted compact JSON (the same bytes as ``json.dumps(fields,
    sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)``)."""
    return hashlib.sha256(_ENCODER.encode(fields).encode()).hexdigest()


def content_hashes(rows: list[dict[str, Any]]) -> list[str]:
    """:func:`content_hash` of many rows, byte for byte the same, about three times faster.

    The rows of a chunk share their keys and most values (job, model, parameters): those are encoded
    once into a template, and only the values that vary are encoded per row. Rows of another shape,
    and values that are not strings, take the general encoder.
    """
    if len(rows) < 4:
        return [content_hash(f) for f in rows]
    first = rows[0]
    names = sorted(first)
    if not all(type(k) is str for k in names):
        return [content_hash(f) for f in rows]
    width = len(names)
    same_shape = [len(f) == width for f in rows]
    constant: dict[str, bool] = {}
    for name in names:
        v0, t0 = first[name], type(first[name])
        constant[name] = all(
            (v := f.get(name, _MISSING)) is v0 or (type(v) is t0 and v == v0) for f, ok in zip(rows, same_shape) if ok
        )
    varying = [n for n in names if not constant[n]]
    # The template: text between the varying values; constant values encoded once.
    pieces: list[str] = []
    text = "{"
    for i, name in enumerate(names):
        text += ("," if i else "") + _encode_str(name) + ":"
        if constant[name]:
            text += _ENCODER.encode(first[name])
        else:
            pieces.append(text)
            text = ""
    pieces.append(text + "}")
    sha256 = hashlib.sha256
    out: list[str] = []
    if len(varying) == 1:
        (name,) = varying
        head, tail = pieces
        for f, ok in zip(rows, same_shape):
            v = f.get(name, _MISSING) if ok else _MISSING
            if type(v) is str:
                out.append(sha256((head + _encode_str(v) + tail).encode()).hexdigest())
            elif ok and v is not _MISSING:
                out.append(sha256((head + _ENCODER.encode(v) + tail).encode()).hexdigest())
            else:
                out.append(content_hash(f))
        return out
    for f, ok in zip(rows, same_shape):
        if not ok or any(n not in f for n in varying):
            out.append(content_hash(f))
            continue
        parts = [pieces[0]]
        for name, after in zip(varying, pieces[1:]):
            v = f[name]
            parts.append(_encode_str(v) if type(v) is str else _ENCODER.encode(v))
            parts.append(after)
        out.append(sha256("".join(parts).encode()).hexdigest())
    return out


# Where a row's result comes from. NEW: nothing in the output yet; the chunk decides among the rest.
DONE, PREV_ERROR, INVALID, OWN, SAME, PEER, STORED, NEW = range(8)


def row_hashes(job: Job, payloads: list[dict[str, Any]], prepared: list[Prepared | RowInvalid]) -> list[str]:
    """Every row's content hash (an invalid row hashes its payload). Pure: runs on a worker thread."""
    fields = [
        {"invalid": payload, "job": job.name, "model": job.model} if isinstance(prep, RowInvalid) else prep.fields
        for payload, prep in zip(payloads, prepared)
    ]
    return content_hashes(fields)


@dataclass(slots=True)
class ChunkKeys:
    """A chunk's rows as the index sees them: hash keys, statuses, and id tags (for the errors tables)."""

    keys: np.ndarray  # uint64 hash keys
    ids: pa.Array | pa.ChunkedArray | list[Any]
    status: np.ndarray  # int8: DONE, PREV_ERROR, INVALID or NEW
    _tags: np.ndarray | None = None

    @property
    def tags(self) -> np.ndarray:
        """uint32 id tags, computed when first asked (a rerun with no failed rows never does)."""
        if self._tags is None:
            self._tags = id_tags(self.ids)
        return self._tags


def chunk_statuses(
    index: DoneIndex,
    ids: pa.Array | pa.ChunkedArray | list[Any],
    keys: np.ndarray | list[str],
    invalid: np.ndarray,
    *,
    retry_errors: bool,
    done: np.ndarray | None = None,
) -> ChunkKeys:
    """What the output already says of each row of a chunk: DONE, PREV_ERROR, INVALID or NEW.

    ``keys``: the rows' hash keys (``PreparedChunk.keys``), or their content hashes. Vectorised: the
    chunk's keys are looked up in the index at once. Shared by a run and a dry run, so both skip and
    count the same rows. ``done``: :meth:`DoneIndex.pairs_done` of these rows, when a worker thread
    already asked it (it reads the parts the index points to); else it is asked here.
    """
    if not isinstance(keys, np.ndarray):
        keys = hash_keys(keys)
    found = ChunkKeys(keys, ids, np.where(invalid, INVALID, NEW).astype(np.int8))
    status = found.status
    if len(index.errors) and not retry_errors:
        tags = found.tags
        failed_before = index.errors.has_pairs(keys, tags)
        if len(index.auto_errors):
            # Rows that failed on transient errors only are sent again by every plain run.
            failed_before &= ~index.auto_errors.has_pairs(keys, tags)
        status[failed_before] = PREV_ERROR
    if len(index.fresh_errors):
        # Another run tried these rows and failed while this run ran: this run doesn't send them again.
        status[index.fresh_errors.has_pairs(keys, found.tags)] = PREV_ERROR
    if done is None:
        done = index.pairs_done(keys, ids) if len(index.results) else None
    if done is not None:
        status[done] = DONE
    return found


def row_status(
    index: DoneIndex, job: Job, row_id: Any, payload: dict[str, Any], prep: Prepared | RowInvalid, *, retry_errors: bool
) -> tuple[str, int]:
    """One row's content hash and status (see :func:`chunk_statuses`, which does a chunk at once)."""
    (h,) = row_hashes(job, [payload], [prep])
    keys = chunk_statuses(index, [row_id], [h], np.array([isinstance(prep, RowInvalid)]), retry_errors=retry_errors)
    return h, int(keys.status[0])


def chunk_payloads(chunk: pa.Table, job: Job) -> tuple[list[dict[str, Any]], bool]:
    """One dict per row of the job's input columns, and whether the text columns hold only text.

    Text columns read as bytes (CSV) are decoded here at once when they are valid UTF-8; otherwise
    each row decodes its own in :func:`prepare_rows` (and may fail alone)."""
    names = list(job.input_columns)
    columns = []
    decoded = True
    for name in names:
        column = chunk.column(name)
        if name in job.string_columns and (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
            try:
                column = pc.cast(column, pa.string())
            except pa.ArrowInvalid:
                decoded = False
        columns.append(column.to_pylist())
    if len(names) == 1:
        (name,) = names
        return [{name: value} for value in columns[0]], decoded
    return [dict(zip(names, values)) for values in zip(*columns)], decoded


@dataclass(slots=True)
class PreparedChunk:
    """A chunk's rows hashed (on a worker thread), before the index is asked.

    A text job's rows are hashed a column at once (:mod:`tasks.engine.plan.hashing`) and prepared only when
    they are to be sent (:meth:`fill`): a rerun builds no per-row objects for rows already done.
    """

    prepared: list[Prepared | RowInvalid | None]  # None: hashed at once, not prepared yet
    digests: np.ndarray  # (rows, 32) uint8: each row's content hash as sha256 bytes
    invalid: np.ndarray  # bool: the row can't be sent
    done: np.ndarray | None = None  # bool: DoneIndex.pairs_done of the rows, asked on the worker thread

    @property
    def rows(self) -> int:
        return len(self.prepared)

    @property
    def keys(self) -> np.ndarray:
        return digest_keys(self.digests)

    @property
    def hashes(self) -> list[str]:
        """Every row's content hash (hex)."""
        return [d.hex() for d in map(bytes, self.digests)]

    def hex(self, rows: np.ndarray) -> list[str]:
        """Content hashes (hex) of ``rows``; the other rows get ""."""
        out = [""] * self.rows
        for pos in rows.tolist():
            out[pos] = self.digests[pos].tobytes().hex()
        return out

    def fill(self, job: Job, chunk: pa.Table, rows: np.ndarray) -> None:
        """Prepare ``rows`` that were only hashed so far (they are about to be sent)."""
        missing = [pos for pos in rows.tolist() if self.prepared[pos] is None]
        if not missing:
            return
        (column,) = job.input_columns
        texts = _text_column(chunk.column(column).take(pa.array(missing, pa.int64())))
        for pos, text in zip(missing, texts.to_pylist()):
            try:
                self.prepared[pos] = job.prepare({column: text})
            except RowInvalid as exc:  # the job's surely_valid() let through a row prepare() refuses
                raise RuntimeError(f"{type(job).__name__}: row {pos} passed surely_valid() but: {exc}") from None


def _template_of(job: Job) -> TextTemplate | None:
    try:
        return _templates(job)
    except TypeError:  # an unhashable job: derive it each time
        return text_template(job)


@functools.lru_cache(maxsize=16)
def _templates(job: Job) -> TextTemplate | None:
    return text_template(job)


def _text_column(column: pa.ChunkedArray | pa.Array) -> pa.Array | None:
    """One string array (text read as bytes is decoded), or None when it is not all UTF-8."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_string(column.type):
        return column
    t = column.type
    if not any(is_(t) for is_ in (pa.types.is_large_string, pa.types.is_string_view, pa.types.is_binary,
                                  pa.types.is_large_binary, pa.types.is_binary_view)):  # fmt: skip
        return None
    try:
        return pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def prepare_chunk(job: Job, chunk: pa.Table, processes: HashProcesses | None = None) -> PreparedChunk:
    """Hash every row of a chunk, preparing only the rows that can't be hashed at once. Pure: runs on a
    worker thread. ``processes``: the column is hashed in a child process."""
    n = chunk.num_rows
    template = _template_of(job)
    texts = _text_column(chunk.column(template.column)) if template is not None else None
    fast = job.surely_valid(texts) if texts is not None else np.zeros(n, bool)
    prepared: list[Prepared | RowInvalid | None] = [None] * n
    digests = np.empty((n, 32), np.uint8)
    invalid = np.zeros(n, bool)
    slow = np.flatnonzero(~fast)
    if len(slow):
        part = chunk if len(slow) == n else chunk.take(pa.array(slow, pa.int64()))
        payloads, decoded = chunk_payloads(part, job)
        rows = prepare_rows(job, payloads, decoded=decoded)
        hashes = row_hashes(job, payloads, rows)
        digests[slow] = np.frombuffer(bytes.fromhex("".join(hashes)), np.uint8).reshape(-1, 32)
        for pos, prep in zip(slow.tolist(), rows):
            prepared[pos] = prep
            invalid[pos] = isinstance(prep, RowInvalid)
    if len(slow) < n:
        quick = np.flatnonzero(fast)
        digests[quick] = template.digests(texts if len(quick) == n else texts.filter(pa.array(fast)), processes)
        # One row a chunk through the per-row path: the two must agree byte for byte.
        first = int(quick[0])
        expected = content_hash(job.prepare({template.column: texts[first].as_py()}).fields)
        if digests[first].tobytes().hex() != expected:
            raise RuntimeError(f"{type(job).__name__}: the column-at-once content hash differs from prepare()'s")
    return PreparedChunk(prepared, digests, invalid)


def nothing_to_do(status: np.ndarray) -> bool:
    return not bool(np.any((status == NEW) | (status == INVALID)))


def count_skipped(ctx: RunContext, status: np.ndarray) -> None:
    ctx.stats.skipped_done += int(np.count_nonzero(status == DONE))
    ctx.stats.failed += int(np.count_nonzero(status == PREV_ERROR))
    ctx.on_progress(len(status))


def prepare_and_look_up(ctx: RunContext, chunk: pa.Table) -> PreparedChunk:
    """Hash a chunk and ask the output which of its rows are done (reading the parts the index points
    to): the slow half of :func:`chunk_statuses`, on a worker thread."""
    ready = prepare_chunk(ctx.job, chunk, ctx.hash_processes)
    if len(ctx.index.results):
        ready.done = ctx.index.pairs_done(ready.keys, chunk.column(ctx.id_col))
    return ready


async def precheck_chunk(ctx: RunContext, chunk: pa.Table, index: int, ready: PreparedChunk | None = None) -> bool:
    """Prepare a chunk ahead of its task: False if none of its rows needs a request or a write.

    Such a chunk (every row done, or failed before) is counted here and needs no Prefect task: a
    rerun of 10 million rows would otherwise create 5,000 empty task runs, which costs more than the
    check itself. Otherwise the prepared rows wait in ``ctx`` for :func:`process_chunk`. ``ready``:
    :func:`prepare_and_look_up` of the chunk, if the caller had it done ahead.
    """
    if ready is None:
        ready = await asyncio.to_thread(prepare_and_look_up, ctx, chunk)
    keys = chunk_statuses(
        ctx.index, chunk.column(ctx.id_col), ready.keys, ready.invalid, retry_errors=ctx.retry_errors, done=ready.done
    )
    if nothing_to_do(keys.status):
        count_skipped(ctx, keys.status)
        return False
    ctx.prechecked[index] = ready
    return True


async def process_chunk(ctx: RunContext, chunk: pa.Table, index: int, first_row: int) -> ChunkReport:
    """Send what this chunk still needs, then write one results part and at most one errors part."""
    job = ctx.job
    id_array = chunk.column(ctx.id_col)
    n = chunk.num_rows
    ready = ctx.prechecked.pop(index, None)
    if ready is None or ready.rows != n:
        ctx.preparing += 1
        try:
            ready = await asyncio.to_thread(prepare_and_look_up, ctx, chunk)
        finally:
            ctx.preparing -= 1
    # Deciding who owns which content is synchronous: no other chunk runs in between. (Which rows are
    # done was asked on a worker thread: no other chunk of this run writes this chunk's ids.)
    keys = chunk_statuses(
        ctx.index, id_array, ready.keys, ready.invalid, retry_errors=ctx.retry_errors, done=ready.done
    )
    source = keys.status
    if nothing_to_do(source):
        # Nothing to send or write (a rerun's chunk): count and go.
        count_skipped(ctx, source)
        return ChunkReport(index=index, rows=n, written=0, errors=0)
    todo = np.flatnonzero(source == NEW)
    if len(todo) > 0 and any(ready.prepared[pos] is None for pos in todo.tolist()):
        await asyncio.to_thread(ready.fill, job, chunk, todo)
    prepared = ready.prepared
    hashes = ready.hex(np.flatnonzero((source != DONE) & (source != PREV_ERROR)))
    source = source.astype(np.int64)
    invalid = {int(pos): str(prepared[pos]) for pos in np.flatnonzero(source == INVALID)}
    stored_before = ctx.index.results.has_keys(keys.keys[todo])
    ids = id_array.to_pylist()
    own: dict[str, Item] = {}
    peers: dict[str, asyncio.Future[Outcome | None]] = {}
    stored: set[str] = set()
    stored_pos: list[int] = []
    for pos, known in zip(todo.tolist(), stored_before.tolist()):
        h = hashes[pos]
        if h in own:
            source[pos] = SAME
        elif h in ctx.inflight:
            source[pos], peers[h] = PEER, ctx.inflight[h]
        elif known:
            source[pos] = STORED
            if h not in stored:
                stored.add(h)
                stored_pos.append(pos)
        else:
            source[pos] = OWN
            own[h] = Item(pos, ids[pos], h, prepared[pos])
            ctx.inflight[h] = asyncio.get_running_loop().create_future()

    outcomes: dict[str, Outcome | None] = {}
    try:
        if stored:
            found = await asyncio.to_thread(
                _stored_results, ctx, [hashes[p] for p in stored_pos], keys.keys[stored_pos]
            )
            found, served_of = found
            outcomes.update({h: Outcome(result=found[h], served_model=served_of.get(h)) for h in stored if h in found})
            # The index matches 32 bits of a content: one it pointed at that isn't there is sent after all.
            for pos in todo.tolist():
                h = hashes[pos]
                if source[pos] != STORED or h in found:
                    continue
                if h in own:
                    source[pos] = SAME
                elif h in ctx.inflight:
                    source[pos], peers[h] = PEER, ctx.inflight[h]
                else:
                    source[pos] = OWN
                    own[h] = Item(pos, ids[pos], h, prepared[pos])
                    ctx.inflight[h] = asyncio.get_running_loop().create_future()
        await _send_all(ctx, list(own.values()), outcomes)
        for h, future in peers.items():
            outcomes[h] = await future
        id_type = chunk.schema.field(ctx.id_col).type
        report = await asyncio.to_thread(
            _write_chunk, ctx, index, first_row, ids, id_type, hashes, source.tolist(), invalid, outcomes
        )
        added = [item.position for h, item in own.items() if (o := outcomes.get(h)) is not None and o.ok]
        if added and report.part is not None:
            learnt = keys.keys[np.array(added, np.intp)]
            if ctx.recurring is not None:
                learnt = learnt[member(ctx.recurring, learnt)]
            if len(learnt):
                ctx.index.results.add(learnt, ctx.index.part_ordinal(report.part))
    finally:
        for h in own:
            future = ctx.inflight.pop(h)
            if not future.done():
                future.set_result(outcomes.get(h))
    ctx.on_progress(n)
    return report


def _stored_results(
    ctx: RunContext, hashes: list[str], keys: np.ndarray
) -> tuple[dict[str, Any], dict[str, str | None]]:
    """The stored results of these contents (the index matched their first 32 bits). The parts' keys
    confirm the match first: a false one (a run's own results make them common at corpus scale) costs
    a read of the parts' key columns, not of their results."""
    confirmed = ctx.index.contents_stored(keys)
    if not confirmed.any():
        return {}, {}
    wanted = [h for h, ok in zip(hashes, confirmed.tolist()) if ok]
    files = ctx.index.parts_holding(keys[confirmed])
    table = ctx.store.read_results_for(wanted, ctx.id_col, files=files)
    served: dict[str, str | None] = {}
    if "served_model" in table.column_names:  # the stored row's served model goes with its result
        served = dict(zip(table.column("content_hash").to_pylist(), table.column("served_model").to_pylist()))
    return ctx.job.results_from_table(table), served


async def send_part(ctx: RunContext, part: Item) -> Outcome | None:
    """One request of a row that its job sends in several parts (a recording's segments): through the
    same limiter, retries, outage breaker and budget as a row. None: not sent (the run is stopping)."""
    got: dict[str, Outcome | None] = {}
    await _send(ctx, [part], got)
    return got.get(part.content_hash)


async def _send_in_parts(ctx: RunContext, item: Item, outcomes: dict[str, Outcome | None]) -> None:
    outcome = await ctx.job.send_in_parts(ctx, item, send_part)
    if outcome is not None:
        outcomes[item.content_hash] = outcome


async def _send_all(ctx: RunContext, items: list[Item], outcomes: dict[str, Outcome | None]) -> None:
    if hasattr(ctx.job, "send_in_parts"):
        # The job splits each row into requests itself (``send_in_parts(ctx, item, send_part)`` returns
        # the row's Outcome, or None when not attempted), each sent with :func:`send_part`.
        tasks = [asyncio.create_task(_send_in_parts(ctx, item, outcomes)) for item in items]
    else:
        size = ctx.job.max_items_per_request
        batches = [items[i : i + size] for i in range(0, len(items), size)]
        tasks = [asyncio.create_task(_send(ctx, batch, outcomes)) for batch in batches]
    if not tasks:
        return
    stop_wait = asyncio.create_task(ctx.stop_event.wait())
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending | {stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            pending.discard(stop_wait)
            if stop_wait in done and pending:
                _, pending = await asyncio.wait(pending, timeout=STOP_GRACE_S)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                break
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()
    finally:
        stop_wait.cancel()


async def _send(ctx: RunContext, items: list[Item], outcomes: dict[str, Outcome | None], attempts: int = 0) -> None:
    job, stats, limiter = ctx.job, ctx.stats, ctx.limiter
    estimate = sum(item.tokens for item in items)
    while True:
        if ctx.stop_event.is_set():
            return
        # While the provider is down, wait here (one request at a time probes): see tasks/engine/send/outage.py.
        probe = await ctx.outage.admit(ctx.stop_event)
        if ctx.outage.gave_up:
            ctx.request_stop(ctx.outage.stop())
        if ctx.stop_event.is_set():
            return
        attempts += 1
        failure: Failure | None = None
        reply: Reply | None = None
        reservation = 0.0
        if ctx.budget is not None:
            reservation = ctx.budget.reserve(estimate)
            if reservation is None:
                ctx.request_stop(ctx.budget.stop())
                return
        try:
            async with limiter.slot(estimate) as started:
                if ctx.stop_event.is_set():
                    return
                if ctx.outage.holding(probe):  # the provider went down while this waited for its turn
                    limiter.give_back(started)
                    attempts -= 1
                    continue
                stats.requests += 1
                stats.items_sent += len(items)
                stats.estimated_tokens += estimate
                try:
                    reply = await job.send(ctx.conn, items)
                    if len(reply.results) != len(items):
                        raise BadReply(f"the reply had {len(reply.results)} results for {len(items)} inputs")
                except BadReply as exc:
                    if exc.transport:
                        failure = Failure("transient", f"bad reply: {exc}")
                    else:  # it arrived but can't be used: each row of it goes the RowFailure way
                        unusable = RowFailure("bad_reply", f"bad reply: {exc}", exc.raw_reply)
                        reply = Reply([unusable] * len(items), *_usage(reply))
                except Exception as exc:  # noqa: BLE001 - classify_failure re-raises what it doesn't know
                    failure = classify_failure(exc)
        finally:
            if ctx.budget is not None:
                ctx.budget.release(reservation)
                if failure is None and reply is not None:
                    ctx.budget.charge(reply.prompt_tokens, reply.total_tokens, reply.images)
        if failure is None:
            ctx.outage.record_success(started, probe, items[0].content_hash)
            stats.prompt_tokens += reply.prompt_tokens
            stats.completion_tokens += reply.completion_tokens
            stats.total_tokens += reply.total_tokens
            stats.images += reply.images
            if reply.first_token_s is not None:
                stats.first_token.add(reply.first_token_s)
            served = reply.served_model
            if served is not None and not same_model(job.model, served):
                stats.rerouted[served] = stats.rerouted.get(served, 0) + len(items)
                if stats.rerouted[served] == len(items):
                    log.warning(
                        "%s asked for %s, and the reply says %s answered (the provider rerouted the model)",
                        job.name, job.model, served,
                    )  # fmt: skip
                if getattr(job, "stop_on_reroute", False):
                    # Embeddings: one index must not hold vectors of two models. Nothing of this reply
                    # is written; the rows stay to send.
                    await limiter.settle_tokens(estimate, reply.prompt_tokens)
                    ctx.request_stop(rerouted_stop(job, served, ctx.store.url))
                    return
            again: list[Item] = []
            for item, result in zip(items, reply.results):
                if not isinstance(result, RowFailure):
                    outcomes[item.content_hash] = Outcome(result=result, attempts=attempts, served_model=served)
                elif result.ask_again and attempts < ctx.retry.max_row_failure_attempts:
                    again.append(item)
                else:
                    outcomes[item.content_hash] = Outcome(
                        error_type=result.kind,
                        error_message=ctx.conn.redact(result.message),
                        attempts=attempts,
                        raw_reply=_raw_kept(ctx.conn, result.raw_reply),
                    )
            await limiter.settle_tokens(estimate, reply.prompt_tokens)
            if again:
                stats.retries += 1
                await _send(ctx, again, outcomes, attempts)
            return
        if failure.kind == "rate_limited":
            stats.rate_limited += 1
            limiter.on_rate_limited(started, failure.retry_after_s)
        elif failure.kind == "transient":
            stats.transient_errors += 1
        if ctx.outage.record_failure(failure.kind, started, probe, items[0].content_hash):
            # The provider is down: not the rows' fault, so no attempt used and no back-off (the
            # breaker decides when to send again).
            attempts -= 1
            stats.retries += 1
            continue
        if failure.fatal:
            if failure.kind == "daily_quota":
                stats.rate_limited += 1
            ctx.request_stop(failure.stop())
            return
        if failure.retryable and ctx.retry.allows(attempts, failure):
            stats.retries += 1
            try:
                await asyncio.wait_for(ctx.stop_event.wait(), timeout=ctx.retry.delay(attempts, failure))
            except TimeoutError:
                pass
            continue
        if failure.kind == "invalid_request" and len(items) > 1:
            # One bad input fails the whole request: split to find it, so the rest still succeed.
            half = len(items) // 2
            await asyncio.gather(
                _send(ctx, items[:half], outcomes, attempts), _send(ctx, items[half:], outcomes, attempts)
            )
            return
        for item in items:
            outcomes[item.content_hash] = Outcome(
                error_type=failure.kind,
                error_message=ctx.conn.redact(failure.message),
                attempts=attempts,
                retry_auto=failure.retryable,
            )
        return


REROUTED = "stopped: model rerouted"


def rerouted_stop(job: Job, served: str, output: str) -> RunStopped:
    return RunStopped(
        REROUTED,
        f"the provider answered requests for {job.model} with {served} (the reply's model says so): it "
        f"rerouted the model. No vector of {served} was written into {output}, which holds {job.model}'s. "
        f"To keep {job.model}, ask the provider; to move the output to the model that answers, rerun with "
        f"--model {served} --change-model (check the rows and cost with --dry-run first), or write it to "
        "another --output",
    )


def prepare_rows(job: Job, payloads: list[dict[str, Any]], *, decoded: bool = False) -> list[Prepared | RowInvalid]:
    """``decoded``: the text columns hold no bytes (see :func:`chunk_payloads`), skip decoding."""
    prepare, columns = job.prepare, job.string_columns

    def one(payload: dict[str, Any]) -> Prepared | RowInvalid:
        try:
            return prepare(payload if decoded else _as_text(payload, columns))
        except RowInvalid as exc:
            return exc

    workers = min(getattr(job, "prepare_workers", 1), len(payloads))
    if workers <= 1:
        return [one(payload) for payload in payloads]
    # Photos: reading and hashing 5 MB files releases the GIL; one thread would leave a core idle
    # while every row of the chunk is read before its first request goes.
    with ThreadPoolExecutor(workers, thread_name_prefix="gembatch-prepare") as pool:
        return list(pool.map(one, payloads))


def _as_text(payload: dict[str, Any], columns: tuple[str, ...]) -> dict[str, Any]:
    """Text columns may arrive as bytes (CSV is read so; Parquet may store binary): decode per row."""
    for column in columns:
        value = payload.get(column)
        if isinstance(value, bytes):
            try:
                payload[column] = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RowInvalid(
                    f"column {column!r} is not valid UTF-8 text (byte {value[exc.start]:#04x} at offset "
                    f"{exc.start}): save the input as UTF-8, e.g. iconv -f latin1 -t utf-8"
                ) from None
    return payload


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


def _usage(reply: Reply | None) -> tuple[int, int, int]:
    return (reply.prompt_tokens, reply.completion_tokens, reply.total_tokens) if reply is not None else (0, 0, 0)


def _raw_kept(conn: Connection, raw: str | None) -> str | None:
    if raw is None:
        return None
    raw = conn.redact(raw)  # before cutting, so no part of the key survives at the cut
    if len(raw) > MAX_RAW_REPLY_CHARS:
        raw = f"{raw[:MAX_RAW_REPLY_CHARS]}… [cut: {len(raw)} characters in all]"
    return raw


def _write_chunk(
    ctx: RunContext,
    index: int,
    first_row: int,
    ids: list[Any],
    id_type: pa.DataType,
    hashes: list[str],
    source: list[int],
    invalid: dict[int, str],
    outcomes: dict[str, Outcome | None],
) -> ChunkReport:
    job, stats = ctx.job, ctx.stats
    ok_rows: list[int] = []
    ok_results: list[Any] = []
    err_rows: list[tuple[int, str, str, int, str | None]] = []
    auto: set[int] = set()  # positions of error rows the next plain run sends again
    for pos, src in enumerate(source):
        if src == DONE:
            stats.skipped_done += 1
        elif src == PREV_ERROR:
            stats.failed += 1
        elif src == INVALID:
            err_rows.append((pos, "invalid_input", invalid[pos], 0, None))
        else:
            outcome = outcomes.get(hashes[pos])
            if outcome is None:
                stats.not_attempted += 1
            elif not outcome.ok:
                if outcome.retry_auto:
                    auto.add(pos)
                err_rows.append(
                    (
                        pos,
                        outcome.error_type or "error",
                        outcome.error_message or "",
                        outcome.attempts,
                        outcome.raw_reply,
                    )
                )
            else:
                ok_rows.append(pos)
                ok_results.append(outcome.result)
                if src == OWN:
                    stats.succeeded += 1
                else:
                    stats.deduplicated += 1
    stats.failed += len(err_rows)
    stats.failed_retry_auto += len(auto)
    written = 0
    part = None
    if ok_rows:
        rows_per_result = getattr(job, "rows_per_result", None)
        if rows_per_result is not None:
            ok_rows = [p for p, r in zip(ok_rows, ok_results) for _ in range(rows_per_result(r))]
        table = pa.table(
            {
                ctx.id_col: pa.array([ids[p] for p in ok_rows], id_type),
                **job.result_arrays(ok_results),
                "content_hash": pa.array([hashes[p] for p in ok_rows], pa.string()),
                "model": pa.array([job.model] * len(ok_rows), pa.string()),
            }
        )
        if ctx.served_column and not getattr(job, "stop_on_reroute", False):
            served = {p: outcomes[hashes[p]].served_model for p in set(ok_rows) if outcomes.get(hashes[p])}
            table = table.append_column(
                pa.field("served_model", pa.string()), pa.array([served.get(p) for p in ok_rows], pa.string())
            )
        part = ctx.store.write_part(table, errors=False, run_id=ctx.run_id, id_col=ctx.id_col)
        stats.parts_written.append(part)
        written = len(ok_results)
    if err_rows:
        table = pa.table(
            {
                ctx.id_col: pa.array([ids[p] for p, *_ in err_rows], id_type),
                "content_hash": pa.array([hashes[p] for p, *_ in err_rows], pa.string()),
                "error_type": pa.array([e[1] for e in err_rows], pa.string()),
                "error_message": pa.array([e[2] for e in err_rows], pa.string()),
                "attempts": pa.array([e[3] for e in err_rows], pa.int32()),
                "raw_reply": pa.array([e[4] for e in err_rows], pa.string()),
                # "auto": transient errors used up the attempts, the next plain run sends the row
                # again; "on_request": it failed for itself, resent only with --retry-errors.
                "retry": pa.array([RETRY_AUTO if p in auto else RETRY_ON_REQUEST for p, *_ in err_rows], pa.string()),
                "input_row": pa.array([first_row + p for p, *_ in err_rows], pa.int64()),
                "model": pa.array([job.model] * len(err_rows), pa.string()),
                "run_id": pa.array([ctx.run_id] * len(err_rows), pa.string()),
            }
        )
        path = ctx.store.write_part(table, errors=True, run_id=ctx.run_id, id_col=ctx.id_col)
        stats.error_parts_written.append(path)
    return ChunkReport(index=index, rows=len(ids), written=written, errors=len(err_rows), part=part)


ChunkRunner = Callable[[RunContext, pa.Table, int, int], Awaitable[ChunkReport]]
