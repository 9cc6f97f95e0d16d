"""One shard of an input: the rows whose id hashes to part I of N, the same on every rerun.

``--shards N`` starts N flow runs, one per part (flows/shards.py); each reads the whole input and keeps
only its own rows. The part of a row is its 64-bit id key (``exact_id_keys``: the integer itself mixed,
or a stable hash of any other id) modulo N: the parts are disjoint, cover the input, and do not depend
on the order of the rows or on which machine reads them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.engine.plan.input import InputSource
from tasks.engine.plan.keys import exact_id_keys
from tasks.errors import ConfigError

__all__ = ["Shard", "ShardSource", "shard_mask"]

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Part ``number`` (1-based) of ``count``."""

    number: int
    count: int

    @classmethod
    def parse(cls, spec: str) -> Shard:
        match = _SPEC.match(spec)
        if match is None:
            raise ConfigError(f"--shard {spec!r}: write it as I/N, e.g. 2/4 for the second of four parts")
        number, count = int(match.group(1)), int(match.group(2))
        if not 1 <= number <= count:
            raise ConfigError(f"--shard {spec!r}: I must be within 1..N (here 1..{count})")
        return cls(number, count)

    def __str__(self) -> str:
        return f"{self.number}/{self.count}"


def shard_mask(ids: pa.Array | pa.ChunkedArray, shard: Shard) -> np.ndarray:
    """True for the rows of ``ids`` that belong to ``shard``."""
    keys = exact_id_keys(ids)
    return (keys % np.uint64(shard.count)) == np.uint64(shard.number - 1)


class ShardSource:
    """An :class:`InputSource` that yields only one shard's rows (in chunks of the asked size)."""

    def __init__(self, source: InputSource, shard: Shard, id_col: str) -> None:
        self.source = source
        self.shard = shard
        self.id_col = id_col

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)

    def iter_chunks(
        self, columns: list[str], chunk_size: int, *, string_columns: tuple[str, ...] = ()
    ) -> Iterator[pa.Table]:
        read = columns if self.id_col in columns else [*columns, self.id_col]
        pending: list[pa.Table] = []
        rows = 0
        for table in self.source.iter_chunks(read, chunk_size, string_columns=string_columns):
            mine = table.filter(pa.array(shard_mask(table.column(self.id_col), self.shard)))
            if read != columns:
                mine = mine.select(columns)
            if mine.num_rows:
                pending.append(mine)
                rows += mine.num_rows
            while rows >= chunk_size:
                joined = pa.concat_tables(pending)
                yield joined.slice(0, chunk_size)
                rest = joined.slice(chunk_size)
                pending, rows = ([rest] if rest.num_rows else []), rest.num_rows
        if rows:
            yield pa.concat_tables(pending)
