"""An output folder's part files: listing them, writing one atomically, reading the metadata it carries."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.engine.store.keycache import part_stamp

__all__ = ["BATCH_ROWS", "ERRORS_DIR", "META_KEY", "TMP_PREFIX", "PartFolder", "name", "write_in_thread"]

ERRORS_DIR = "_errors"
TMP_PREFIX = ".tmp-"
META_KEY = b"gembatch"
BATCH_ROWS = 65536  # rows of a part read at a time

T = TypeVar("T")


async def write_in_thread(write: Callable[..., T], *args: Any) -> T:
    """``write(*args)`` in a thread, waited for to its end even when the caller is cancelled meanwhile.

    A cancelled ``asyncio.to_thread`` leaves its thread running: a part write cut off by Ctrl-C would
    still land, and count its rows as succeeded, after the run had ended and counted them as not
    attempted. Here a cancellation waits for the write (a part is seconds at most), then goes on."""
    landing = asyncio.ensure_future(asyncio.to_thread(write, *args))
    try:
        return await asyncio.shield(landing)
    except asyncio.CancelledError:
        while not landing.done():
            try:
                await asyncio.shield(landing)
            except asyncio.CancelledError:
                continue
            except Exception:  # noqa: BLE001 - the write's own error goes with the cancellation, below
                break
        if not landing.cancelled():
            landing.exception()  # retrieved: a failed write is not "never retrieved" as well
        raise


class PartFolder:
    """The part files of an output folder (``root`` on ``fs``): results at the top, failed rows in
    ``_errors/``. Every part carries its write time and run in its schema metadata (``META_KEY``)."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")

    def result_files(self) -> list[str]:
        return self.parts(self.root)

    def error_files(self) -> list[str]:
        return self.parts(self.join(ERRORS_DIR))

    def part_stamps(self, folder: str) -> list[tuple[str, str]]:
        """(path, :func:`part_stamp`) of the parts in a folder, sorted by path: one listing."""
        if not self.fs.exists(folder):
            return []
        return sorted(
            (info["name"], part_stamp(info))
            for info in self.fs.ls(folder, detail=True)
            if name(info["name"]).startswith("part-") and info["name"].endswith(".parquet")
        )

    def parts(self, folder: str) -> list[str]:
        return [path for path, _ in self.part_stamps(folder)]

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def write_atomic(self, table: pa.Table, final: str, meta: dict[str, Any]) -> None:
        folder = final.rsplit("/", 1)[0]
        tmp = f"{folder}/{TMP_PREFIX}{uuid.uuid4().hex}.inprogress"
        schema_meta = dict(table.schema.metadata or {})
        schema_meta[META_KEY] = json.dumps(meta).encode()
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(table.replace_schema_metadata(schema_meta), f, compression="zstd")
        self.fs.mv(tmp, final)

    def metadata(self, path: str) -> dict[str, Any]:
        schema_meta = pq.read_schema(path, filesystem=self.fs).metadata or {}
        raw = schema_meta.get(META_KEY)
        return json.loads(raw) if raw else {}

    def written_at(self, path: str) -> int:
        return int(self.metadata(path).get("written_at_ns", 0))

    def row_count(self, path: str) -> int:
        return pq.ParquetFile(path, filesystem=self.fs).metadata.num_rows


def name(path: str) -> str:
    """A path's last part (the file's name)."""
    return path.rsplit("/", 1)[-1]
