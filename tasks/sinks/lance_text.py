"""The input's text beside a LanceDB table's rows (``--keep-text``), read for the rows a sync applies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from tasks.engine.plan.input import InputSource

__all__ = ["TextColumn"]

READ_ROWS = 1 << 16  # input rows read at a time; only those being applied are kept


@dataclass(frozen=True)
class TextColumn:
    """The texts of the ids a sync applies (``ids[i]`` has ``texts[i]``), as the input holds them now."""

    name: str
    id_col: str
    ids: pa.Array
    texts: pa.Array

    @classmethod
    def read(cls, source: InputSource, id_col: str, name: str, wanted: pa.ChunkedArray) -> TextColumn:
        """Read ``name`` of the input's rows whose id is in ``wanted``: memory follows the rows applied,
        not the corpus."""
        ids: list[pa.Array] = []
        texts: list[pa.Array] = []
        value_set: pa.Array | None = None
        # Read as the run read it (a CSV's text as bytes, not a guessed type); only applied rows are cast.
        for chunk in source.iter_chunks([id_col, name], READ_ROWS, string_columns=(name,)):
            chunk_ids = chunk.column(id_col)
            if value_set is None:
                value_set = wanted.combine_chunks().cast(chunk_ids.type)
            keep = pc.is_in(chunk_ids, value_set=value_set)
            ids.append(chunk_ids.filter(keep).combine_chunks())
            texts.append(chunk.column(name).filter(keep).combine_chunks().cast(pa.string()))
        if not ids:
            return cls(name=name, id_col=id_col, ids=wanted.combine_chunks()[:0], texts=pa.array([], pa.string()))
        return cls(name=name, id_col=id_col, ids=pa.concat_arrays(ids), texts=pa.concat_arrays(texts))

    def take(self, ids: pa.Array) -> pa.Array:
        """The texts of ``ids``, in their order; null for an id the input no longer holds."""
        # Each held id's place among ``ids`` (a batch: small), rather than a lookup table of every held id.
        place = pc.index_in(self.ids, value_set=ids.cast(self.ids.type))
        found = pc.is_valid(place)
        places = pc.filter(place, found).to_numpy(zero_copy_only=False)
        order = np.full(len(ids), -1, dtype=np.int64)
        order[places] = np.arange(len(places))
        return pc.take(pc.filter(self.texts, found), pa.array(order, mask=order < 0))
