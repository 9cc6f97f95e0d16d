"""Rows of a batch run's chunks left to other runs: a chunk's claim was held, or the rows are in their batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from tasks.engine.plan.claims import ClaimBook, Holder
from tasks.engine.plan.key_table import KeyTable
from tasks.engine.plan.keys import hash_keys, id_tags
from tasks.engine.send.batch.records import Book


@dataclass
class Left:
    """Rows of a chunk this run left to another run: the chunk's claim was held (``holder``), or the rows
    are in another live run's batch (``holder`` None). Checked again at the end (BatchRun._finish_left)."""

    first_row: int
    key: str  # the chunk's claim
    positions: np.ndarray  # the rows left, as positions in the chunk
    keys: np.ndarray  # their content keys (to see whether another run's batch still holds them)
    tags: np.ndarray  # their id tags (to see whether a batch this run takes over holds them)
    holder: Holder | None


def leave(
    left: dict[int, Left],
    claims: ClaimBook,
    number: int,
    first_row: int,
    key: str,
    positions: np.ndarray,
    keys: Any,
    holder: Holder | None,
) -> None:
    """Leave rows of chunk ``number`` to the run that holds its claim, or whose batch holds them."""
    earlier = left.get(number)
    if earlier is not None:  # the chunk's other rows were left before in this pass
        positions = np.union1d(earlier.positions, positions)
    left[number] = Left(first_row, key, positions, keys.keys[positions], keys.tags[positions], holder)
    if holder is not None:
        claims.decline(holder, f"chunk {number} (rows from {first_row})", "submitted")


def take_back(left: dict[int, Left], book: Book, name: str) -> None:
    """Rows left to another run that are in its batch ``name``, which this run now polls and writes
    (and counts then): no longer left."""
    rows = book.rows_path(name)
    if not book.fs.exists(rows):
        return
    table = KeyTable()
    with book.fs.open(rows, "rb") as f:
        parquet = pq.ParquetFile(f)
        for batch in parquet.iter_batches(columns=["content_hash", "id"], batch_size=65536):
            table.add(hash_keys(batch.column(0)), id_tags(batch.column(1)))
    for number, one in list(left.items()):
        theirs = table.has_pairs(one.keys, one.tags)
        if theirs.all():
            del left[number]
        elif theirs.any():
            keep = ~theirs
            one.positions, one.keys, one.tags = one.positions[keep], one.keys[keep], one.tags[keep]


def waiting_for(left: dict[int, Left], claims: ClaimBook) -> str:
    """What the run waits for, said in a log line: the runs holding its left chunks, their batches."""
    held: dict[str, tuple[Holder, int]] = {}
    in_batches = 0
    for one in left.values():
        if one.holder is None:
            in_batches += 1
        else:
            holder, n = held.get(one.holder.run_id, (one.holder, 0))
            held[one.holder.run_id] = (holder, n + 1)
    parts = [f"{n} chunk(s) held by {holder.describe()}" for holder, n in held.values()]
    if in_batches:
        parts.append(f"{in_batches} chunk(s) with rows in batches other runs poll")
    ttl = claims.policy.ttl_s
    return (
        "; ".join(parts) + f". When they are written they are counted as skipped; a claim not renewed for "
        f"{ttl:g} s counts as abandoned and this run sends (or polls) what is missing."
    )
