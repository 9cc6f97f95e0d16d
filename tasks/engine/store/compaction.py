"""Superseding: only the newest record of each id stays in the output, found without loading the output."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.engine.plan.key_table import KeyTable
from tasks.engine.plan.keys import exact_id_keys
from tasks.engine.store.part_files import BATCH_ROWS, PartFolder

__all__ = ["COMPACT_BYTES", "compact", "drop_rows"]

COMPACT_BYTES = 32 << 20  # ids held at once while superseding


def compact(folder: PartFolder, id_col: str, *, max_bytes: int = COMPACT_BYTES) -> int:
    """Keep only the newest record of each id across results and errors; return rows removed.

    Never loads the output: parts are visited newest first, reading only their id column, while
    a key table of the ids seen in newer parts (8 bytes an id) names the stale rows. Past
    ``max_bytes`` of ids the key space is split and the parts are read once per slice, so the
    table never holds more than ``max_bytes`` (a 10M-row output: 3 slices). Parts with stale rows
    are rewritten at the end. Integer ids are keyed exactly; other ids by a 64-bit hash. Rows of
    one id written in the same part (image generation with n > 1) stand or fall together.
    """
    dated = sorted(
        ((folder.written_at(path), path) for path in (*folder.result_files(), *folder.error_files())),
        key=lambda wp: -wp[0],
    )
    rows = sum(folder.row_count(path) for _, path in dated)
    slices = max(1, -(-rows * 8 // max_bytes))
    stale: dict[str, list[np.ndarray]] = {}
    for part in range(slices):
        newer = KeyTable(payload=False)
        for _written, group in itertools.groupby(dated, key=lambda wp: wp[0]):
            # Parts written at the same instant don't supersede each other: their ids join ``newer``
            # together, after all of them were checked.
            seen = []
            for _, path in group:
                first = 0
                for ids in _id_batches(folder, path, id_col):
                    keys = exact_id_keys(ids)
                    mine = np.flatnonzero(keys % np.uint64(slices) == part) if slices > 1 else None
                    if mine is not None:
                        keys = keys[mine]
                    hit = np.flatnonzero(newer.has_keys(keys))
                    if len(hit):
                        stale.setdefault(path, []).append((mine[hit] if mine is not None else hit) + first)
                    first += len(ids)
                    seen.append(keys)
            for keys in seen:
                newer.add(keys)
        newer.clear()
    return sum(drop_rows(folder, path, np.unique(np.concatenate(found))) for path, found in stale.items())


def drop_rows(folder: PartFolder, path: str, rows: np.ndarray) -> int:
    """Rewrite a part without these rows (remove it when none is left); returns the rows dropped."""
    table = pq.read_table(path, filesystem=folder.fs)
    keep = np.ones(table.num_rows, bool)
    keep[rows] = False
    if not keep.any():
        folder.fs.rm(path)
    else:
        folder.write_atomic(table.filter(pa.array(keep)), path, folder.metadata(path))
    return len(rows)


def _id_batches(folder: PartFolder, path: str, id_col: str) -> Iterator[pa.Array]:
    parquet = pq.ParquetFile(path, filesystem=folder.fs)
    for batch in parquet.iter_batches(columns=[id_col], batch_size=BATCH_ROWS):
        yield batch.column(0)
