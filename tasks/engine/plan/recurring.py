"""The contents that recur in an input: the only results of its own that a run needs to remember.

A run reuses a result of its own when a later row has the same content (same text, same job
parameters). Adding every row it sends to the in-memory index costs 4 bytes a row (40 MB for a
10-million-row first run) for the few contents that come back. So a first run hashes its input once
beforehand (column at once, :mod:`tasks.engine.plan.hashing`: ~1.5 µs a row), spills the 64-bit hash keys
into bucket files on local disk by their top bits, sorts each bucket and keeps the keys seen more than
once: the run then adds to its index only results whose content is among them. Memory: one bucket
(1/64 of the keys, 8 bytes each) and the recurring keys themselves.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from tasks.engine.job import Job
from tasks.engine.plan.hashing import HashProcesses
from tasks.engine.plan.input import InputSource
from tasks.engine.plan.rows import _template_of, prepare_chunk

__all__ = ["recurring_contents", "PREPASS_CHUNK_ROWS"]

BUCKET_BITS = 6  # 64 bucket files
PREPASS_CHUNK_ROWS = 16384


def recurring_contents(
    job: Job, source: InputSource, id_col: str, total_rows: int, processes: HashProcesses | None = None
) -> np.ndarray | None:
    """The sorted unique hash keys of the contents that occur more than once in the first
    ``total_rows`` rows of the input; None for a job whose rows are not hashed a column at once
    (its run remembers every result, as before)."""
    if _template_of(job) is None:
        return None
    buckets = 1 << BUCKET_BITS
    shift = np.uint64(64 - BUCKET_BITS)
    columns = list(dict.fromkeys([id_col, *job.input_columns]))
    rows = 0
    with tempfile.TemporaryDirectory(prefix="gembatch-recurring-") as folder:
        files = [open(os.path.join(folder, f"{b:02x}"), "wb") for b in range(buckets)]
        try:
            for chunk in source.iter_chunks(columns, PREPASS_CHUNK_ROWS, string_columns=job.string_columns):
                if rows >= total_rows:
                    break
                chunk = chunk.slice(0, total_rows - rows)
                rows += chunk.num_rows
                keys = prepare_chunk(job, chunk, processes).keys
                keys.sort()
                cuts = np.searchsorted(keys >> shift, np.arange(buckets + 1, dtype=np.uint64))
                for b in np.flatnonzero(np.diff(cuts)).tolist():
                    files[b].write(keys[cuts[b] : cuts[b + 1]].tobytes())
        finally:
            for f in files:
                f.close()
        found = []
        for b in range(buckets):
            keys = np.fromfile(os.path.join(folder, f"{b:02x}"), np.uint64)
            keys.sort()
            again = keys[1:][keys[1:] == keys[:-1]]
            if len(again):
                found.append(np.unique(again))
    return np.concatenate(found) if found else np.empty(0, np.uint64)
