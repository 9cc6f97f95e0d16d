"""The parts' keys that confirm a match of the done-key index: the scan's pair keys on disk, the last parts read."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["PairFile", "PartKeys"]

RECENT_PARTS = 8  # parts whose keys PartKeys keeps after confirming a match in them

# A result part's rows as (sorted hash keys, sorted pair keys): OutputStore.part_keys for one output.
ReadKeys = Callable[[str], tuple[np.ndarray, np.ndarray]]


class PartKeys:
    """What a result part holds, as sorted keys: its pair keys from the :class:`PairFile` when the scan
    kept them, else read from the part (``read``); the last few parts read are kept (a chunk often
    ends in the part the next chunk starts in). Parts are never rewritten while a run reads them
    (compaction waits). Safe on worker threads."""

    def __init__(self, read: ReadKeys | None = None) -> None:
        self.read = read
        self.pair_file = PairFile()
        self._recent: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def pairs(self, path: str) -> np.ndarray:
        """A part's sorted :func:`~tasks.engine.plan.keys.pair_keys`."""
        pairs = self.pair_file.get(path)
        return pairs if pairs is not None else self.keys(path)[1]

    def keys(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        """A part's (sorted hash keys, sorted pair keys)."""
        if self.read is None:
            raise RuntimeError("this index was not read from an output folder: it can't confirm a match")
        with self._lock:
            keys = self._recent.get(path)
        if keys is None:
            keys = self.read(path)
            with self._lock:
                self._recent[path] = keys
                while len(self._recent) > RECENT_PARTS:
                    del self._recent[next(iter(self._recent))]
        return keys

    def clear(self) -> None:
        self._recent.clear()
        self.pair_file.close()


class PairFile:
    """The :func:`pair_keys` of each part read by the scan, sorted, in a local temporary file (8 bytes a
    row, on disk: not in memory). What confirms that a row is done is then a read of a few KB instead
    of decoding the part's Parquet again (the rerun of a 10M-row output confirms all 10M rows)."""

    def __init__(self) -> None:
        self._file: Any = None
        self._where: dict[str, tuple[int, int]] = {}
        self._end = 0

    def add(self, path: str, pairs: np.ndarray) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="gembatch-pairs-")
        data = np.asarray(pairs, np.uint64).tobytes()  # sorted by the caller (OutputStore.part_keys)
        os.pwrite(self._file.fileno(), data, self._end)
        self._where[path] = (self._end, len(pairs))
        self._end += len(data)

    def get(self, path: str) -> np.ndarray | None:
        where = self._where.get(path)
        file = self._file
        if where is None or file is None:
            return None
        offset, rows = where
        return np.frombuffer(os.pread(file.fileno(), 8 * rows, offset), np.uint64)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._where, self._end = None, {}, 0
