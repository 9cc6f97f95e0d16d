"""The done-key index: what the output holds, with the parts a row may be in, and parts other runs add."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.engine.plan.content_table import ContentTable
from tasks.engine.plan.key_table import KeyTable, member
from tasks.engine.plan.keys import LOCATIONS, exact_id_keys, pair_keys
from tasks.engine.plan.part_keys import PartKeys

PROBE_ROWS = 8  # rows of a chunk whose parts are asked first (DoneIndex.pairs_done)


@dataclass
class DoneIndex:
    """What the output already holds, as fixed-width keys (see :mod:`tasks.engine.plan.keys`).

    ``results`` has one entry per result row, 4 bytes: a 32-bit prefix of its content hash and the
    ordinal of its part (a :class:`ContentTable`). It names the parts that may hold a content; whether
    a row is done (this id, this content) or its content is stored under another id is confirmed by
    reading those parts (:meth:`pairs_done`, :meth:`contents_stored`), a few small files a chunk.
    ``errors`` has the rows of ``_errors/`` (10 bytes each, answered in memory: failed rows are few).
    Another kind of key set is one more field, filled in :meth:`OutputStore.scan` and tested in
    ``engine.chunk_statuses``.
    """

    results: ContentTable = field(default_factory=ContentTable)
    errors: KeyTable = field(default_factory=KeyTable)
    parts: list[str] = field(default_factory=list)  # result part paths by ordinal (location mod 2**16)
    # Of ``errors``, the rows that failed on transient errors only: a plain rerun sends them again.
    auto_errors: KeyTable = field(default_factory=KeyTable)
    result_rows: int = 0
    cached_parts: int = 0  # result parts whose keys came from the output's key cache (OUTPUT/_index/)
    error_rows: int = 0
    error_parts: set[str] = field(default_factory=set)  # the _errors/ parts read into ``errors``
    # Rows another run recorded in _errors/ while this run ran (see OutputStore.read_new_parts): this
    # run doesn't send them again, not even with --retry-errors; the next run decides.
    fresh_errors: KeyTable = field(default_factory=KeyTable)
    # The parts' keys, read from the output to confirm a match (a done row: a 16 KB read).
    part_keys: PartKeys = field(default_factory=PartKeys, repr=False)

    @property
    def errored_pairs(self) -> KeyTable:
        return self.errors

    def part_ordinal(self, path: str) -> int:
        """The location number of a result part (a new part gets the next one)."""
        self.parts.append(path)
        return len(self.parts) - 1

    def parts_at(self, location: int) -> list[str]:
        return self.parts[int(location) % LOCATIONS :: LOCATIONS]

    def parts_holding(self, keys: np.ndarray) -> list[str]:
        """The result parts that may hold these hash keys (every part with a matching location)."""
        _, locations = self.results.candidates(keys)
        return sorted({p for loc in np.unique(locations).tolist() for p in self.parts_at(loc)})

    def pairs_done(self, keys: np.ndarray, ids: pa.Array | pa.ChunkedArray | list[Any]) -> np.ndarray:
        """For each row (hash key, id): does the output hold a result of this content for this id?

        The table names the parts that may hold the content; those parts' (id, content_hash) columns
        say for sure. Safe on a worker thread while the event loop adds rows (it reads a snapshot)."""
        keys = np.asarray(keys, np.uint64)
        n = len(keys)
        done = np.zeros(n, bool)
        if n == 0 or not len(self.results):
            return done
        if not isinstance(ids, (pa.Array, pa.ChunkedArray)):
            ids = pa.array(list(ids))
        wanted = pair_keys(keys, exact_id_keys(ids))
        # The rows of a chunk mostly sit together in one or two parts (an output is written in its input's
        # order): find those parts from a few rows, confirm every row there, and ask the table only for
        # the rows not found (rows to send, or done in other parts). A pair found in a part is the same
        # answer the table's way gives: this part holds this id with this content.
        seen: set[str] = set()
        if n > PROBE_ROWS:
            _, locations = self.results.candidates(keys[np.linspace(0, n - 1, PROBE_ROWS).astype(np.intp)])
            for loc in np.unique(locations).tolist():
                for path in self.parts_at(loc):
                    seen.add(path)
                    done |= member(self.part_keys.pairs(path), wanted)
        rest = np.flatnonzero(~done)
        if not len(rest):
            return done
        queries, locations = self.results.candidates(keys[rest])
        for loc, at in _by_location(queries, locations).items():
            rows = rest[at]
            for path in self.parts_at(loc):
                if path not in seen:
                    done[rows] |= member(self.part_keys.pairs(path), wanted[rows])
        return done

    def contents_stored(self, keys: np.ndarray) -> np.ndarray:
        """For each hash key (the first 64 bits of a content hash): does some result row have it?"""
        keys = np.asarray(keys, np.uint64)
        found = np.zeros(len(keys), bool)
        queries, locations = self.results.candidates(keys)
        for loc, at in _by_location(queries, locations).items():
            for path in self.parts_at(loc):
                contents, _pairs = self.part_keys.keys(path)
                found[at] |= member(contents, keys[at])
        return found

    def nbytes(self) -> int:
        return self.results.nbytes + self.errors.nbytes

    def clear(self) -> None:
        """Free the tables (the run is over; compaction wants the memory)."""
        self.results.clear()
        self.errors.clear()
        self.fresh_errors.clear()
        self.part_keys.clear()


def _by_location(queries: np.ndarray, locations: np.ndarray) -> dict[int, np.ndarray]:
    """The query positions matched at each location."""
    out: dict[int, np.ndarray] = {}
    if not len(queries):
        return out
    order = np.argsort(locations, kind="stable")
    locs, qs = locations[order], queries[order]
    cuts = np.flatnonzero(np.diff(locs)) + 1
    for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(locs)]):
        out[int(locs[lo])] = qs[lo:hi]  # a position twice is harmless: its answers agree
    return out


@dataclass
class NewParts:
    """Parts another run wrote while this one ran: (path, [hash keys, …]) each result part,
    (path, [(hash keys, id tags), …]) each errors part."""

    results: list[tuple[str, list[np.ndarray]]] = field(default_factory=list)
    errors: list[tuple[str, list[tuple[np.ndarray, np.ndarray]]]] = field(default_factory=list)

    def add_to(self, index: DoneIndex) -> int:
        """Add to the index (on the event loop: the index is not shared with threads); rows added."""
        rows = 0
        for path, batches in self.results:
            if path in index.parts:
                continue
            loc = index.part_ordinal(path)
            for keys in batches:
                index.results.add(keys, loc)
                rows += len(keys)
        for path, batches in self.errors:
            if path in index.error_parts:
                continue
            index.error_parts.add(path)
            for keys, tags in batches:
                index.fresh_errors.add(keys, tags)
                rows += len(keys)
        return rows


class KnownParts:
    """The parts a run has read or written: what :meth:`OutputStore.read_new_parts` needn't read. It
    follows the index's parts and the run's written parts (results, errors), lists that only grow: only
    their new ends are added on each call."""

    def __init__(self, index: DoneIndex, *written: list[str]) -> None:
        self._index = index
        self._sources = (index.parts, *written)
        self._known: set[str] = set()
        self._seen = [0] * len(self._sources)

    def __call__(self) -> set[str]:
        for i, source in enumerate(self._sources):
            self._known.update(source[self._seen[i] :])
            self._seen[i] = len(source)
        self._known.update(self._index.error_parts)
        return self._known
