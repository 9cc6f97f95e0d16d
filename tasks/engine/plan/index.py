"""The done-key index in flat memory: what the output holds, in a few bytes a row, queried a chunk at a time.

Every output row is known by three fixed-width numbers:

* its **hash key**: the first 64 bits of its ``content_hash`` (sha256, so already uniformly random);
* its **id tag**: 32 bits of a stable hash of its id (polars' hash of the id normalised to int64,
  string or binary: the same in every process, unlike Python's ``hash`` of a str);
* its **location**: the ordinal of the part file that holds it (16 bits, modulo 65,536), so that a
  result shared with a new row is read from that part alone, not from the whole output.

:class:`KeyTable` keeps the top 32 bits of the hash key and the id tag in one uint64 (:func:`pack`)
and the location in a uint16: numpy arrays sorted by that uint64, split into 16 partitions by its top
bits. New rows (the run's own results) arrive as small sorted runs that merge with their neighbours of
similar size (a log-structured merge): adding stays cheap, a merge never copies more than one
partition, and a table holds at most a few runs per partition. Lookups are vectorised: a chunk's keys
are answered with ``np.searchsorted`` per run.

Memory: 10 bytes a row (10 million rows: 100 MB; 14 with the whole 64-bit key before), against ~100+
bytes a row for Python sets of ints. The index is rebuilt from the part files at the start of every
run (``OutputStore.scan``); what the scan reads of each part is kept with the output
(:mod:`tasks.engine.store.keycache`), so the keys must be stable across processes (tests check it).

"Is this (id, content) done?" is a 64-bit match: a false one is expected ~N·M/2⁶⁴ times (5·10⁻⁶
rows for 10 million rows against 10 million stored). "Is this content stored?" is a 32-bit match,
confirmed by the content hash itself before a stored result is used.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "ContentTable",
    "KeyTable",
    "hash_key",
    "hash_keys",
    "exact_id_keys",
    "id_keys",
    "id_tag",
    "id_tags",
    "member",
    "pack",
    "pair_key",
    "pair_keys",
]

PARTITION_BITS = 4
PARTITIONS = 1 << PARTITION_BITS
LOCATIONS = 1 << 16

_HEX = np.zeros(256, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i
_NIBBLE_WEIGHTS = (np.uint64(1) << np.arange(60, -1, -4, dtype=np.uint64)).astype(np.uint64)


# -- keys -------------------------------------------------------------------------------------------


def hash_key(content_hash: str) -> int:
    """A content hash's 64-bit key: its first 16 hex digits (sha256 output is already uniform)."""
    return int(content_hash[:16], 16)


def hash_keys(content_hashes: pa.Array | pa.ChunkedArray | Sequence[str]) -> np.ndarray:
    """The 64-bit keys of many content hashes at once (uint64), without a Python loop over strings."""
    if isinstance(content_hashes, pa.ChunkedArray):
        chunks = content_hashes.chunks
        if not chunks:
            return np.empty(0, np.uint64)
        return np.concatenate([hash_keys(c) for c in chunks])
    if not isinstance(content_hashes, pa.Array):
        hashes = list(content_hashes)
        if not hashes:
            return np.empty(0, np.uint64)
        joined = "".join(hashes)
        if len(joined) == 64 * len(hashes) and max(map(len, hashes)) == 64:  # hence all 64 long
            # sha256 hex digests, side by side: one buffer, no Arrow conversion.
            digits = _HEX[np.frombuffer(joined.encode("ascii", "replace"), np.uint8).reshape(-1, 64)[:, :16]]
            packed = (digits[:, 0::2] << 4) | digits[:, 1::2]  # (n, 8) bytes, most significant first
            return np.ascontiguousarray(packed).view(">u8").ravel().astype(np.uint64)
        content_hashes = pa.array(hashes, pa.string())
    array = content_hashes
    n = len(array)
    if n == 0:
        return np.empty(0, np.uint64)
    if pa.types.is_large_string(array.type) or pa.types.is_string_view(array.type):
        array = array.cast(pa.string())
    if not array.null_count:
        offsets = np.frombuffer(array.buffers()[1], np.int32, count=n + 1, offset=array.offset * 4)
        first = int(offsets[0])
        if int(offsets[-1]) - first == 64 * n and bool(np.all(np.diff(offsets) == 64)):
            # sha256 hex digests side by side (every content_hash column): the first 16 digits of each
            # row, decoded by bytes.fromhex in one call (~10x the digit arithmetic below).
            rows = np.frombuffer(array.buffers()[2], np.uint8, count=64 * n, offset=first).reshape(n, 64)
            try:
                return np.frombuffer(bytes.fromhex(rows[:, :16].tobytes().decode("ascii")), ">u8").astype(np.uint64)
            except (ValueError, UnicodeDecodeError):
                pass  # not all hex digits: the general path below
    if array.null_count or pc.min(pc.utf8_length(array)).as_py() < 16:
        return np.array([hash_key(h) if h else 0 for h in array.to_pylist()], np.uint64)
    offsets = np.frombuffer(array.buffers()[1], np.int32, count=n + 1, offset=array.offset * 4)[:-1]
    data = np.frombuffer(array.buffers()[2], np.uint8)
    digits = _HEX[data[offsets[:, None] + np.arange(16, dtype=np.int32)]].astype(np.uint64)
    return (digits * _NIBBLE_WEIGHTS).sum(axis=1, dtype=np.uint64)


def id_keys(ids: pa.Array | pa.ChunkedArray | Sequence[Any]) -> np.ndarray:
    """A stable 64-bit hash of each id (uint64). Integer ids of any width hash alike, as do string
    and large_string ids, so an input re-saved with other types still matches its output."""
    if not isinstance(ids, (pa.Array, pa.ChunkedArray)):
        ids = pa.array(list(ids))
    id_type = ids.type
    if pa.types.is_dictionary(id_type):
        ids = ids.cast(id_type.value_type)
        id_type = ids.type
    if pa.types.is_integer(id_type) and id_type != pa.int64():
        ids = ids.cast(pa.int64(), safe=False)
    elif pa.types.is_large_string(id_type) or pa.types.is_string_view(id_type):
        ids = ids.cast(pa.string())
    elif pa.types.is_large_binary(id_type) or pa.types.is_binary_view(id_type):
        ids = ids.cast(pa.binary())
    if len(ids) == 0:
        return np.empty(0, np.uint64)
    return pl.Series(ids).hash(seed=0x6765_6D62).to_numpy().astype(np.uint64, copy=False)


def exact_id_keys(ids: pa.Array | pa.ChunkedArray | Sequence[Any]) -> np.ndarray:
    """64-bit keys of ids that are equal exactly when the ids are, for integer ids (their value);
    other ids get :func:`id_keys` (64-bit hashes: check a match against the values where it matters)."""
    if isinstance(ids, (pa.Array, pa.ChunkedArray)) and pa.types.is_integer(ids.type) and ids.null_count == 0:
        values = ids.cast(pa.int64(), safe=False)
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
        return _mix64(values.to_numpy(zero_copy_only=False).view(np.uint64))
    return id_keys(ids)


def _mix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: a bijection, so distinct ids stay distinct, and spread evenly
    over the partitions (consecutive ids would all land in the first)."""
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return x


def id_tags(ids: pa.Array | pa.ChunkedArray | Sequence[Any]) -> np.ndarray:
    """32-bit id tags (uint32): the top half of :func:`id_keys`."""
    return (id_keys(ids) >> np.uint64(32)).astype(np.uint32)


def id_tag(row_id: Any) -> int:
    return int(id_tags([row_id])[0])


_PAIR_SALT = np.uint64(0x9E37_79B9_7F4A_7C15)


def pair_keys(content_keys: np.ndarray, exact_ids: np.ndarray) -> np.ndarray:
    """One 64-bit key per (content, id): a hash key and an :func:`exact_id_keys` key mixed."""
    return np.asarray(content_keys, np.uint64) ^ _mix64(np.asarray(exact_ids, np.uint64) ^ _PAIR_SALT)


def pair_key(row_id: Any, content_hash: str) -> tuple[int, int]:
    """The key of one (id, content_hash) pair, as :class:`KeyTable` tests it with ``in``: stable across
    processes. For many rows use :func:`hash_keys` and :func:`id_tags`: they are vectorised."""
    return hash_key(content_hash), id_tag(row_id)


# -- the table --------------------------------------------------------------------------------------

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


# -- the result rows' table: 4 bytes a row ----------------------------------------------------------

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
