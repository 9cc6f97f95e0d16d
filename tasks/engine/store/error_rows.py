"""Rows that failed for good (``OUTPUT/_errors/``): which a rerun sends again, read as keys, written redacted."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.engine.plan.keys import hash_keys, id_tags
from tasks.engine.store.part_files import BATCH_ROWS, PartFolder
from tasks.redact import redact_text

__all__ = ["RETRY_AUTO", "RETRY_ON_REQUEST", "error_keys", "redacted_messages"]

# The `retry` column of _errors/: which failed rows the next plain run sends again.
RETRY_AUTO = "auto"  # transient errors (5xx, timeouts, broken connections, 429s) used up the attempts
RETRY_ON_REQUEST = "on_request"  # the row failed for itself (a 400 for it, an unusable reply): --retry-errors
# Error files written before the `retry` column: these error types were transient.
LEGACY_AUTO_ERROR_TYPES = ("transient", "rate_limited")


def error_keys(folder: PartFolder, path: str, id_col: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(hash keys, id tags, retried automatically?) of an errors part, a batch at a time."""
    return [(hash_keys(hashes), id_tags(ids), auto) for ids, hashes, auto in _error_batches(folder, path, id_col)]


def _error_batches(folder: PartFolder, path: str, id_col: str) -> Iterator[tuple[pa.Array, pa.Array, np.ndarray]]:
    """(ids, hashes, retried automatically?) of an errors part; files older than the `retry`
    column say it through their error_type."""
    parquet = pq.ParquetFile(path, filesystem=folder.fs)
    names = parquet.schema_arrow.names
    column = "retry" if "retry" in names else "error_type" if "error_type" in names else None
    for batch in parquet.iter_batches(
        columns=[id_col, "content_hash", *([column] if column else [])], batch_size=BATCH_ROWS
    ):
        ids, hashes = batch.column(0), batch.column(1)
        if column == "retry":
            auto = [v == RETRY_AUTO for v in batch.column(2).to_pylist()]
        elif column == "error_type":
            auto = [v in LEGACY_AUTO_ERROR_TYPES for v in batch.column(2).to_pylist()]
        else:
            auto = [False] * len(ids)
        yield ids, hashes, np.array(auto, dtype=bool)


def redacted_messages(table: pa.Table) -> pa.Table:
    """Error rows as written: no URL credentials in a message or a kept reply, whatever produced it (a
    gateway's answer quoting the request URL, a media cell holding a presigned link)."""
    for name in ("error_message", "raw_reply"):
        if name not in table.column_names:
            continue
        column = table.column(name)
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            continue
        redacted = pa.array([None if m is None else redact_text(m) for m in column.to_pylist()], column.type)
        table = table.set_column(table.column_names.index(name), name, redacted)
    return table
