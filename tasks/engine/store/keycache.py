"""The scan's keys, kept with the output: ``OUTPUT/_index/keys.bin``.

Every run starts by reading the ``(id, content_hash)`` columns of every result part into its index
(:meth:`tasks.engine.store.output.OutputStore.scan`). For a 10M-row output that is 5,000 Parquet files and
~640 MB of hex digests decoded and hashed again (7.1 s, measured): a fifth of a rerun's time, to learn
what the previous run already knew (from this file: 1.5 s). This file keeps, for each part, what the
scan makes of it (its sorted 64-bit content keys and sorted pair keys, 16 bytes a row); a part is read
from here when its name and stamp (size and modification time, as the filesystem lists them) are the
ones recorded, and from its Parquet file otherwise. A part rewritten by compaction has a new stamp, a
new part has no entry: both are read as before, and the file is written anew with them.

Layout: the parts' keys one after the other (content keys, then pair keys, little-endian uint64), then
a JSON manifest, then a 16-byte trailer (the manifest's length and a magic). Each part's entry holds
its stamp, offset, row count and a CRC-32 of its bytes: a torn or damaged file, another id column or
another key scheme is ignored (the parts are read instead), never trusted. The file is replaced
atomically (temporary name, then rename); two runs writing it at once leave one of the two, each a
true record of the parts it names.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

__all__ = ["INDEX_DIR", "KEYS_FILE", "KeyCache", "KeyCacheWriter", "part_stamp"]

log = logging.getLogger("gembatch.index")

INDEX_DIR = "_index"
KEYS_FILE = "keys.bin"
MAGIC = b"GBKEYS01"
TRAILER = struct.Struct("<Q8s")  # manifest length, magic
TMP_PREFIX = ".tmp-"
# What the keys depend on besides the parts' bytes: the key scheme, and polars' hash of non-integer ids.
KEY_SCHEME = f"content64+pair64 v1; polars {pl.__version__}"


def part_stamp(info: dict[str, Any]) -> str:
    """What says a part is the one the cache saw: its size and modification time (or the store's
    equivalent), as ``fs.ls(detail=True)`` gives them."""
    when = next(
        (
            info[k]
            for k in ("mtime", "LastModified", "updated", "last_modified", "ETag", "etag", "created")
            if info.get(k)
        ),
        "",
    )
    return f"{info.get('size')}:{when}"


@dataclass(frozen=True, slots=True)
class _Entry:
    stamp: str
    offset: int
    rows: int
    crc: int


class KeyCache:
    """The keys file of an output folder, open for reading (:meth:`open`); :meth:`keys` is thread-safe."""

    def __init__(self, file: Any, entries: dict[str, _Entry], data_end: int) -> None:
        self._file = file
        self._entries = entries
        self._data_end = data_end
        self._lock = threading.Lock()
        self.hits = 0

    @classmethod
    def open(cls, fs: Any, path: str, id_col: str) -> KeyCache | None:
        """The cache at ``path``, or None when there is none or it can't be trusted (logged)."""
        try:
            file = fs.open(path, "rb")
        except (FileNotFoundError, OSError):
            return None
        try:
            size = file.seek(0, 2)
            if size < TRAILER.size:
                raise ValueError("shorter than its trailer")
            file.seek(size - TRAILER.size)
            length, magic = TRAILER.unpack(file.read(TRAILER.size))
            if magic != MAGIC or length > size - TRAILER.size:
                raise ValueError("no trailer")
            data_end = size - TRAILER.size - length
            file.seek(data_end)
            manifest = json.loads(file.read(length))
            if manifest.get("scheme") != KEY_SCHEME or manifest.get("id_col") != id_col:
                file.close()
                return None  # written by another version or for another id column: read the parts
            entries = {name: _Entry(*entry) for name, entry in manifest["parts"].items()}
        except (ValueError, KeyError, TypeError, OSError) as exc:
            file.close()
            log.warning("ignoring the output's key cache %s (%s): the parts are read instead", path, exc)
            return None
        return cls(file, entries, data_end)

    def knows(self, name: str, stamp: str) -> bool:
        entry = self._entries.get(name)
        return entry is not None and entry.stamp == stamp

    def keys(self, name: str, stamp: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(sorted content keys, sorted pair keys) of a part, or None: not cached, another stamp, or its
        bytes don't check out."""
        entry = self._entries.get(name)
        if entry is None or entry.stamp != stamp:
            return None
        nbytes = 16 * entry.rows
        if entry.offset + nbytes > self._data_end:
            return None
        with self._lock:
            self._file.seek(entry.offset)
            data = self._file.read(nbytes)
        if len(data) != nbytes or zlib.crc32(data) != entry.crc:
            log.warning("the key cache's entry for %s does not check out: the part is read instead", name)
            return None
        keys = np.frombuffer(data, "<u8").astype(np.uint64, copy=False)
        self.hits += 1
        return keys[: entry.rows], keys[entry.rows :]

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        self._file.close()


class KeyCacheWriter:
    """Writes a new keys file part by part (streamed: memory holds one part's keys), in place at
    :meth:`commit`."""

    def __init__(self, fs: Any, folder: str, id_col: str) -> None:
        self.fs = fs
        self.folder = folder
        self.id_col = id_col
        fs.makedirs(folder, exist_ok=True)
        self._tmp = f"{folder}/{TMP_PREFIX}{uuid.uuid4().hex}.inprogress"
        self._file = fs.open(self._tmp, "wb")
        self._parts: dict[str, list[Any]] = {}
        self._offset = 0

    def add(self, name: str, stamp: str, contents: np.ndarray, pairs: np.ndarray) -> None:
        data = np.asarray(contents, "<u8").tobytes() + np.asarray(pairs, "<u8").tobytes()
        self._file.write(data)
        self._parts[name] = [stamp, self._offset, len(contents), zlib.crc32(data)]
        self._offset += len(data)

    def commit(self) -> None:
        manifest = json.dumps(
            {"scheme": KEY_SCHEME, "id_col": self.id_col, "parts": self._parts}, separators=(",", ":")
        ).encode()
        self._file.write(manifest)
        self._file.write(TRAILER.pack(len(manifest), MAGIC))
        self._file.close()
        self.fs.mv(self._tmp, f"{self.folder}/{KEYS_FILE}")

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            if self.fs.exists(self._tmp):
                self.fs.rm(self._tmp)
