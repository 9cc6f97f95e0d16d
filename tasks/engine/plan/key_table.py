"""Sorted flat arrays of fixed-width keys in 16 partitions, 10 bytes a row: the error rows' table and key sets.

:class:`KeyTable` keeps the top 32 bits of the hash key and the id tag in one uint64 (:func:`pack`)
and the location in a uint16 (the keys: :mod:`tasks.engine.plan.keys`): numpy arrays sorted by that
uint64, split into 16 partitions by its top bits. New rows arrive as small sorted runs that merge with
their neighbours of similar size (a log-structured merge): adding stays cheap, a merge never copies
more than one partition, and a table holds at most a few runs per partition. Lookups are vectorised: a
chunk's keys are answered with ``np.searchsorted`` per run.

Memory: 10 bytes a row (10 million rows: 100 MB; 14 with the whole 64-bit key before), against ~100+
bytes a row for Python sets of ints.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from tasks.engine.plan.keys import LOCATIONS, hash_keys, id_tags

__all__ = ["KeyTable", "member", "pack"]

PARTITION_BITS = 4
PARTITIONS = 1 << PARTITION_BITS

_HIGH = np.uint64(0xFFFF_FFFF_0000_0000)


def member(ascending: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each value: is it in the sorted array?"""
    if not len(ascending):
        return np.zeros(len(values), bool)
    at = np.minimum(np.searchsorted(ascending, values), len(ascending) - 1)
    return ascending[at] == values


def pack(keys: np.ndarray, tags: np.ndarray) -> np.ndarray:
    """One uint64 a row: the hash key's top 32 bits, then the id tag's 32."""
    return (np.asarray(keys, np.uint64) & _HIGH) | np.asarray(tags, np.uint32).astype(np.uint64)


class _Run:
    """One sorted run: values ascending, locations aligned with them (None: values only)."""

    __slots__ = ("keys", "locs")

    def __init__(self, keys: np.ndarray, locs: np.ndarray | None) -> None:
        self.keys, self.locs = keys, locs

    @classmethod
    def sorted_from(cls, keys: np.ndarray, locs: np.ndarray | None) -> _Run:
        if locs is None:
            return cls(np.sort(keys), None)
        order = np.argsort(keys, kind="stable")
        return cls(keys[order], locs[order])

    @classmethod
    def merge(cls, runs: list[_Run]) -> _Run:
        keys = np.concatenate([r.keys for r in runs])
        if runs[0].locs is None:
            return cls.sorted_from(keys, None)
        return cls.sorted_from(keys, np.concatenate([r.locs for r in runs]))

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + (self.locs.nbytes if self.locs is not None else 0)


class KeyTable:
    """Rows known by (hash key, id tag, location) in 10 bytes: sorted arrays in 16 partitions.

    With ``payload`` (the done-key index) a row is one uint64, the top 32 bits of its hash key then
    its 32-bit id tag (:func:`pack`), and a uint16 location. Sorted, that answers both questions the
    engine asks: "is this (id, content) done?" (:meth:`has_pairs`: the whole uint64 matches) and "is
    this content stored under some id?" (:meth:`has_keys`, :meth:`locate`: the top half matches).
    The first is a 64-bit match, as exact as the engine needs (a false one: ~N·M/2⁶⁴, 5·10⁻⁶ rows
    for 10M new rows against 10M stored). The second is a 32-bit prefix: it may say yes for a content
    that isn't stored (~N·M/2³² times), so its users confirm by the full content hash in the part it
    points to (``process_chunk`` sends what isn't there).

    Without ``payload`` it is a set of plain 64-bit keys, 8 bytes each (ids seen, contents planned).

    ``in`` takes a hash key (``int``) or a :func:`pair_key` tuple.
    """

    def __init__(self, *, payload: bool = True) -> None:
        self.payload = payload
        self._parts: list[list[_Run]] = [[] for _ in range(PARTITIONS)]
        self._rows = 0

    # -- adding -------------------------------------------------------------------------------------
    def add(
        self, keys: np.ndarray, tags: np.ndarray | None = None, locs: np.ndarray | int = 0, *, merge: bool = True
    ) -> None:
        """``merge=False``: keep the new runs apart until :meth:`compact` (a scan adds thousands of parts,
        then compacts: one sort per partition instead of a merge cascade)."""
        keys = np.asarray(keys, np.uint64)
        n = len(keys)
        if n == 0:
            return
        if self.payload:
            keys = pack(keys, np.zeros(n, np.uint32) if tags is None else tags)
            if np.ndim(locs) == 0:
                locs = np.full(n, int(locs) % LOCATIONS, np.uint16)
            else:
                locs = (np.asarray(locs, np.int64) % LOCATIONS).astype(np.uint16)
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        locs = locs[order] if self.payload else None
        bounds = np.searchsorted(keys >> np.uint64(64 - PARTITION_BITS), np.arange(PARTITIONS + 1))
        for p in range(PARTITIONS):
            lo, hi = bounds[p], bounds[p + 1]
            if lo == hi:
                continue
            runs = self._parts[p]
            runs.append(_Run(keys[lo:hi].copy(), None if locs is None else locs[lo:hi].copy()))
            # Binary-counter merging: runs shrink at least twofold down the list, so a partition holds
            # O(log n) runs and every row is merged O(log n) times.
            while merge and len(runs) > 1 and len(runs[-2]) <= 2 * len(runs[-1]):
                last = runs.pop()
                runs[-1] = _Run.merge([runs[-1], last])
        self._rows += n

    def add_hashes(self, content_hashes: Iterable[str], row_ids: Iterable[Any], loc: int = 0) -> None:
        hashes = list(content_hashes)
        self.add(hash_keys(hashes), id_tags(list(row_ids)), loc)

    def compact(self) -> None:
        """One run per partition: the fastest lookups (done after a scan, which adds no more)."""
        for p, runs in enumerate(self._parts):
            if len(runs) > 1:
                self._parts[p] = [_Run.merge(runs)]

    def repeated(self) -> np.ndarray:
        """Values added more than once (sorted, each once)."""
        self.compact()
        found = []
        for runs in self._parts:
            for run in runs:
                k = run.keys
                same = k[1:] == k[:-1]
                if same.any():
                    found.append(np.unique(k[1:][same]))
        return np.concatenate(found) if found else np.empty(0, np.uint64)

    def clear(self) -> None:
        self._parts = [[] for _ in range(PARTITIONS)]
        self._rows = 0

    # -- asking -------------------------------------------------------------------------------------
    def has_keys(self, keys: np.ndarray) -> np.ndarray:
        """For each key: is it in the table? With ``payload``: may a row have this content (its hash
        key's top 32 bits)? A yes is confirmed by the content hash where it matters."""
        return self.locate(keys) >= 0

    def has_pairs(self, keys: np.ndarray, tags: np.ndarray) -> np.ndarray:
        """For each (hash key, id tag): does a row have both?"""
        return self._exact(pack(keys, tags))

    def locate(self, keys: np.ndarray) -> np.ndarray:
        """For each key the location of one row that has it (int64; -1: none). Without ``payload``
        the location is 0."""
        keys = np.asarray(keys, np.uint64)
        where = np.full(len(keys), -1, np.int64)
        if not self.payload:
            where[self._exact(keys)] = 0
            return where
        high = keys & _HIGH
        for pos, run in self._candidates(high):
            q = high[pos]
            at = np.searchsorted(run.keys, q)
            inside = at < len(run)
            inside[inside] = (run.keys[at[inside]] & _HIGH) == q[inside]
            sub = where[pos]
            take = inside & (sub < 0)
            sub[take] = run.locs[at[take]]
            where[pos] = sub
        return where

    def _exact(self, values: np.ndarray) -> np.ndarray:
        found = np.zeros(len(values), bool)
        for pos, run in self._candidates(values):
            q = values[pos]
            at = np.searchsorted(run.keys, q)
            inside = at < len(run)
            inside[inside] = run.keys[at[inside]] == q[inside]
            found[pos] |= inside
        return found

    def __contains__(self, item: int | tuple[int, int]) -> bool:
        if isinstance(item, tuple):
            key, tag = item
            return bool(self.has_pairs(np.array([key], np.uint64), np.array([tag], np.uint32))[0])
        return bool(self.has_keys(np.array([item], np.uint64))[0])

    def __len__(self) -> int:
        return self._rows

    @property
    def nbytes(self) -> int:
        return sum(run.nbytes for runs in self._parts for run in runs)

    @property
    def runs(self) -> int:
        return sum(len(runs) for runs in self._parts)

    def _candidates(self, values: np.ndarray):
        """(positions in ``values``, run) for every run of every partition those values fall in; the
        positions in ascending order of value (searchsorted walks each run forward)."""
        if len(values) == 0 or self._rows == 0:
            return
        order = np.argsort(values)
        bounds = np.searchsorted(values[order] >> np.uint64(64 - PARTITION_BITS), np.arange(PARTITIONS + 1))
        for p in range(PARTITIONS):
            lo, hi = bounds[p], bounds[p + 1]
            if lo == hi or not self._parts[p]:
                continue
            pos = order[lo:hi]
            for run in self._parts[p]:
                yield pos, run
