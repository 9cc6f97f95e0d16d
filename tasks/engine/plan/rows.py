"""A chunk's rows prepared: payloads, content hashes, and each row's status against the done-key index."""

from __future__ import annotations

import functools
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.engine.job import Job, Prepared, RowInvalid
from tasks.engine.plan.done import DoneIndex
from tasks.engine.plan.hashing import HashProcesses, TextTemplate, digest_keys, text_template
from tasks.engine.plan.keys import hash_keys, id_tags

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
