"""The output's result rows in 4 bytes each, in levels of 65,536 partitions: which parts may hold a content."""

from __future__ import annotations

import tempfile

import numpy as np

from tasks.engine.plan.keys import LOCATIONS

__all__ = ["ContentLoader", "ContentTable"]

FP_PARTITION_BITS = 16
FP_PARTITIONS = 1 << FP_PARTITION_BITS
FP_LEVEL_ROWS = 1 << 18  # levels merge up to this size: a merge never holds more than ~6 MB at once
FP_MAX_LEVELS = 8  # past this many levels, all are rebuilt into one (ContentTable._consolidate)
_LOW16 = np.uint32(0xFFFF)


class _Level:
    """Rows sorted by (partition, fingerprint, location): ``entries[offsets[p]:offsets[p + 1]]`` are
    partition ``p``'s, each ``fingerprint << 16 | location`` (uint32), ascending."""

    __slots__ = ("offsets", "entries")

    def __init__(self, offsets: np.ndarray, entries: np.ndarray) -> None:
        self.offsets, self.entries = offsets, entries

    @classmethod
    def build(cls, keys: np.ndarray, locs: np.ndarray) -> _Level:
        composite = (keys >> np.uint64(32)) << np.uint64(16) | locs.astype(np.uint64)
        composite.sort()  # in place: partition (16 bits), fingerprint (16), location (16)
        offsets = np.searchsorted(composite >> np.uint64(32), np.arange(FP_PARTITIONS + 1, dtype=np.uint64))
        return cls(offsets.astype(np.int64), (composite & np.uint64(0xFFFF_FFFF)).astype(np.uint32))

    @classmethod
    def merge(cls, levels: list[_Level]) -> _Level:
        parts = [np.repeat(np.arange(FP_PARTITIONS, dtype=np.uint64), np.diff(lv.offsets)) for lv in levels]
        composite = np.concatenate([p << np.uint64(32) | lv.entries for p, lv in zip(parts, levels)])
        composite.sort()
        offsets = np.searchsorted(composite >> np.uint64(32), np.arange(FP_PARTITIONS + 1, dtype=np.uint64))
        return cls(offsets.astype(np.int64), (composite & np.uint64(0xFFFF_FFFF)).astype(np.uint32))

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.entries.nbytes

    def matches(self, partitions: np.ndarray, fingerprints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query positions, locations) of every row whose partition and fingerprint equal a query's."""
        entries = self.entries
        lo, hi = self.offsets[partitions], self.offsets[partitions + 1]
        fingerprints = fingerprints.astype(np.uint32)
        first = _lower_bound(entries, lo, hi, fingerprints << np.uint32(16))
        # The rows of a fingerprint follow its lower bound: step over them (a query matches 0 or 1 row
        # but for a 32-bit collision or one content in several parts: a step or two, not a second search).
        counts = np.zeros(len(first), np.int64)
        at, rows = first, np.arange(len(first))
        while len(rows):
            keep = at < hi[rows]
            rows, at = rows[keep], at[keep]
            keep = (entries[at] >> np.uint32(16)) == fingerprints[rows]
            rows, at = rows[keep], at[keep] + 1
            counts[rows] += 1
        total = int(counts.sum())
        if total == 0:
            return np.empty(0, np.intp), np.empty(0, np.int64)
        queries = np.repeat(np.arange(len(partitions)), counts)
        starts = np.repeat(first - np.cumsum(counts) + counts, counts)
        positions = starts + np.arange(total)
        return queries, (self.entries[positions] & _LOW16).astype(np.int64)


def _lower_bound(entries: np.ndarray, lo: np.ndarray, hi: np.ndarray, target: np.ndarray) -> np.ndarray:
    """For each query, the first position in ``entries[lo:hi]`` (sorted) whose value is >= target:
    a binary search run for all queries at once (partitions are short: a few steps)."""
    lo, hi = lo.copy(), hi.copy()
    last = len(entries) - 1
    while True:
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) >> 1
        below = entries[np.minimum(mid, last)] < target
        lo = np.where(active & below, mid + 1, lo)
        hi = np.where(active & ~below, mid, hi)


class ContentTable:
    """The output's result rows in 4 bytes each: which parts may hold a content.

    Rows are split into 65,536 partitions by the top 16 bits of their hash key (a table of offsets);
    a row keeps the next 16 bits (its fingerprint) and its location (part ordinal mod 65,536), in one
    uint32 sorted within its partition. A query says, for each hash key, the locations of the rows
    whose 32-bit prefix matches: the parts that may hold that content. It holds no id: whether a row
    is done (this id, this content) is confirmed in those parts (``DoneIndex.pairs_done``), as is a
    content found under another id (``process_chunk`` reads the stored result from its part). A prefix
    match for a content that isn't there costs a read of one small part and nothing else.

    Rows arrive in levels: the scan loads the output as one level (:class:`ContentLoader`), a run adds
    its chunks' results as small levels that merge with their neighbours up to ``FP_LEVEL_ROWS`` rows
    (a log-structured merge); past ``FP_MAX_LEVELS`` levels all are rebuilt into one through a
    temporary file. Each level has its own 512 KiB offset table.
    Levels are never changed once built: a lookup on a worker thread reads a consistent snapshot
    while the event loop adds rows.
    """

    def __init__(self) -> None:
        self._levels: list[_Level] = []
        self._rows = 0

    def add(self, keys: np.ndarray, locs: np.ndarray | int = 0, *, merge: bool = True) -> None:
        keys = np.asarray(keys, np.uint64)
        n = len(keys)
        if n == 0:
            return
        if np.ndim(locs) == 0:
            locs = np.full(n, int(locs) % LOCATIONS, np.uint16)
        else:
            locs = (np.asarray(locs, np.int64) % LOCATIONS).astype(np.uint16)
        levels = [*self._levels, _Level.build(keys, locs)]
        while (
            merge
            and len(levels) > 1
            and len(levels[-2]) <= 2 * len(levels[-1])
            and len(levels[-2]) + len(levels[-1]) <= FP_LEVEL_ROWS
        ):
            last = levels.pop()
            levels[-1] = _Level.merge([levels[-1], last])
        self._levels = levels  # one assignment: readers on other threads see the old or the new list
        self._rows += n
        if len(levels) > FP_MAX_LEVELS:
            del levels  # no reference here may keep the old levels alive while the new one is built
            self._consolidate()

    def _consolidate(self) -> None:
        """Rebuild the newer levels into one (all of them once they hold half as many rows as the
        oldest: each row is rebuilt O(log n) times), through a temporary file: the levels are let go
        before the new one is built, so memory never holds both."""
        levels = self._levels
        first = 1 if sum(map(len, levels[1:])) < len(levels[0]) // 2 else 0
        loader = ContentLoader(self)
        try:
            for level in levels[first:]:
                loader.add_level(level)
            kept = levels[:first]
            self._levels = kept  # the others are freed here (a reader's snapshot keeps its own)
            del levels, level
            self._levels = [*kept, loader.build()]
        finally:
            loader.close()

    def candidates(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in ``keys``, locations): every stored row whose 32-bit prefix matches a key."""
        keys = np.asarray(keys, np.uint64)
        levels = self._levels
        if not levels or len(keys) == 0:
            return np.empty(0, np.intp), np.empty(0, np.int64)
        partitions = (keys >> np.uint64(64 - FP_PARTITION_BITS)).astype(np.int64)
        fingerprints = ((keys >> np.uint64(32)) & np.uint64(0xFFFF)).astype(np.uint32)
        found = [level.matches(partitions, fingerprints) for level in levels]
        return np.concatenate([q for q, _ in found]), np.concatenate([loc for _, loc in found])

    def has_keys(self, keys: np.ndarray) -> np.ndarray:
        """For each key: may a row have this content? (32-bit prefix; confirm in the part.)"""
        out = np.zeros(len(keys), bool)
        out[self.candidates(keys)[0]] = True
        return out

    def locate(self, keys: np.ndarray) -> np.ndarray:
        """For each key the location of one row whose prefix matches (int64; -1: none)."""
        where = np.full(len(keys), -1, np.int64)
        queries, locs = self.candidates(keys)
        where[queries[::-1]] = locs[::-1]  # the first match of each query wins
        return where

    def loader(self) -> ContentLoader:
        """A bulk load (the scan): rows spill to a temporary file, then land in one level."""
        return ContentLoader(self)

    def clear(self) -> None:
        self._levels = []
        self._rows = 0

    def __contains__(self, key: int) -> bool:
        return bool(self.has_keys(np.array([key], np.uint64))[0])

    def __len__(self) -> int:
        return self._rows

    @property
    def nbytes(self) -> int:
        return sum(level.nbytes for level in self._levels)

    @property
    def levels(self) -> int:
        return len(self._levels)


class ContentLoader:
    """Loads many rows into a :class:`ContentTable` as one level, holding no more than the level itself:
    rows are written to a temporary file (8 bytes each) while their partitions are counted; then each
    lands at its place in the level's array, block by block, and each partition is sorted. (Levels
    merged in memory would hold the inputs and the result at once: twice the memory.)"""

    BLOCK_ROWS = 1 << 18  # ~10 MB of temporaries while a block lands

    def __init__(self, table: ContentTable) -> None:
        self.table = table
        self._file = tempfile.TemporaryFile(prefix="gembatch-index-")
        self._counts = np.zeros(FP_PARTITIONS, np.int64)
        self._rows = 0

    def add(self, keys: np.ndarray, locs: np.ndarray) -> None:
        keys = np.asarray(keys, np.uint64)
        if len(keys) == 0:
            return
        composite = (keys >> np.uint64(32)) << np.uint64(16) | (np.asarray(locs, np.int64) % LOCATIONS).astype(
            np.uint64
        )
        self._counts += np.bincount(
            (keys >> np.uint64(64 - FP_PARTITION_BITS)).astype(np.int64), minlength=FP_PARTITIONS
        )
        self._file.write(composite.tobytes())
        self._rows += len(keys)

    def add_level(self, level: _Level) -> None:
        """Every row of a level (a few thousand partitions at a time: small temporaries)."""
        counts = np.diff(level.offsets)
        for lo in range(0, FP_PARTITIONS, 4096):
            hi = lo + 4096
            a, b = int(level.offsets[lo]), int(level.offsets[hi])
            if a == b:
                continue
            partitions = np.repeat(np.arange(lo, hi, dtype=np.uint64), counts[lo:hi])
            self._file.write((partitions << np.uint64(32) | level.entries[a:b]).tobytes())
        self._counts += counts
        self._rows += len(level)

    def close(self) -> None:
        self._file.close()

    def finish(self) -> None:
        try:
            if self._rows:
                self.table._levels = [*self.table._levels, self.build()]
                self.table._rows += self._rows
        finally:
            self._file.close()

    def build(self) -> _Level:
        offsets = np.zeros(FP_PARTITIONS + 1, np.int64)
        np.cumsum(self._counts, out=offsets[1:])
        entries = np.empty(self._rows, np.uint32)
        fill = offsets[:-1].copy()
        self._file.seek(0)
        while True:
            block = np.frombuffer(self._file.read(8 * self.BLOCK_ROWS), np.uint64).copy()
            if not len(block):
                break
            block.sort()
            partitions = (block >> np.uint64(32)).astype(np.int64)
            counts = np.bincount(partitions, minlength=FP_PARTITIONS)
            firsts = np.cumsum(counts) - counts
            entries[fill[partitions] + np.arange(len(block)) - firsts[partitions]] = block & np.uint64(0xFFFF_FFFF)
            fill += counts
            del block, partitions
        # Each block left a sorted run in every partition: sort the partitions (short: ~N/65,536 rows).
        bounds = offsets.tolist()
        for p in np.flatnonzero(self._counts > 1).tolist():
            entries[bounds[p] : bounds[p + 1]].sort()
        return _Level(offsets, entries)
