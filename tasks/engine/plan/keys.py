"""The fixed-width keys a row is known by in the done-key index: stable across processes, a column at a time.

Every output row is known by three fixed-width numbers:

* its **hash key**: the first 64 bits of its ``content_hash`` (sha256, so already uniformly random);
* its **id tag**: 32 bits of a stable hash of its id (polars' hash of the id normalised to int64,
  string or binary: the same in every process, unlike Python's ``hash`` of a str);
* its **location**: the ordinal of the part file that holds it (16 bits, modulo 65,536), so that a
  result shared with a new row is read from that part alone, not from the whole output.

The index is rebuilt from the part files at the start of every run (``OutputStore.scan``); what the
scan reads of each part is kept with the output (:mod:`tasks.engine.store.keycache`), so the keys must
be stable across processes (tests check it). The tables that hold them are
:mod:`tasks.engine.plan.key_table` and :mod:`tasks.engine.plan.content_table`.

"Is this (id, content) done?" is a 64-bit match: a false one is expected ~N·M/2⁶⁴ times (5·10⁻⁶
rows for 10 million rows against 10 million stored). "Is this content stored?" is a 32-bit match,
confirmed by the content hash itself before a stored result is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "LOCATIONS",
    "exact_id_keys",
    "hash_key",
    "hash_keys",
    "id_keys",
    "id_tag",
    "id_tags",
    "pair_key",
    "pair_keys",
]

LOCATIONS = 1 << 16  # a row's location is its part's ordinal modulo this

_HEX = np.zeros(256, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i
_NIBBLE_WEIGHTS = (np.uint64(1) << np.arange(60, -1, -4, dtype=np.uint64)).astype(np.uint64)


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
