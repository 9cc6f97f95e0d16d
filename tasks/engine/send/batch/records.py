"""What a batch run keeps in ``OUTPUT/_batches/``: a record per request file, and the rows each line answers.

``<name>.json`` (the record: provider, endpoint, state, file and batch ids, counts; never the key),
``<name>.rows.parquet`` (custom_id, item, content_hash, id, input_row, and the job's prepared item for
the first row of each item: what the job's ``send`` needs to parse the line's result), and on a local
disk the request file ``<name>.requests.jsonl`` until it is submitted and the downloads until they are
written. Everything is streamed: a request file and its rows grow on disk, never in memory.
"""

from __future__ import annotations

import json
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.engine.job import Item

__all__ = ["BATCHES_DIR", "Book", "FileCounts", "LineRows", "RequestFile", "read_records", "read_rows", "request_line"]

BATCHES_DIR = "_batches"
# Record states (ours; the provider's status is kept beside them).
PREPARED, UPLOADED, SUBMITTED, WRITTEN = "prepared", "uploaded", "submitted", "written"
LOST = "lost"  # the provider answered 404 for it: its rows are sent again
# Rows buffered before they go to the rows file.
WRITE_ROWS = 2000


# -- records ----------------------------------------------------------------------------------------------


def read_records(store: Any) -> list[dict[str, Any]]:
    """Every batch record of an output folder, oldest first."""
    folder = f"{store.root}/{BATCHES_DIR}"
    if not store.fs.exists(folder):
        return []
    records = []
    for path in sorted(store.fs.ls(folder, detail=False)):
        if path.endswith(".json") and not path.rsplit("/", 1)[-1].startswith("."):
            with store.fs.open(path, "r") as f:
                records.append(json.load(f))
    return records


class Book:
    """The records in OUTPUT/_batches/: one ``<name>.json`` per request file, its rows beside it."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.fs = store.fs
        self.folder = f"{store.root}/{BATCHES_DIR}"
        self.fs.makedirs(self.folder, exist_ok=True)
        local = type(self.fs).__name__ == "LocalFileSystem"
        # Request files and downloads: beside the records on a local disk, else in a local scratch folder.
        self.scratch = Path(self.folder) if local else Path(tempfile.mkdtemp(prefix="gembatch-batches-"))

    def save(self, record: dict[str, Any]) -> None:
        path = f"{self.folder}/{record['name']}.json"
        tmp = f"{self.folder}/.tmp-{record['name']}.json"
        with self.fs.open(tmp, "w") as f:
            json.dump(record, f, indent=2)
        self.fs.mv(tmp, path)

    def read(self, name: str) -> dict[str, Any] | None:
        """The record as saved now (None: removed)."""
        try:
            with self.fs.open(f"{self.folder}/{name}.json", "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def names(self) -> list[str]:
        """The names of the records saved now (a record being written is a ``.tmp-`` file until renamed)."""
        if not self.fs.exists(self.folder):
            return []
        found = []
        for path in self.fs.ls(self.folder, detail=False):
            base = path.rsplit("/", 1)[-1]
            if base.endswith(".json") and not base.startswith("."):
                found.append(base[: -len(".json")])
        return sorted(found)

    def rows_path(self, name: str) -> str:
        return f"{self.folder}/{name}.rows.parquet"

    def remove(self, record: dict[str, Any], *, keep_record: bool = False) -> None:
        for path in (
            self.rows_path(record["name"]),
            *([] if keep_record else [f"{self.folder}/{record['name']}.json"]),
        ):
            if self.fs.exists(path):
                self.fs.rm(path)
        for suffix in (".requests.jsonl", ".output.jsonl", ".errors.jsonl"):
            (self.scratch / f"{record['name']}{suffix}").unlink(missing_ok=True)

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.store)


# -- one request file being built ---------------------------------------------------------------------


@dataclass
class FileCounts:
    """What a request file holds so far: lines, embedding inputs, bytes, rows answered, estimated tokens."""

    lines: int = 0
    inputs: int = 0
    bytes: int = 0
    rows: int = 0
    tokens: int = 0


class RequestFile:
    """A JSONL request file and its rows file, written as lines are added (never held in memory)."""

    def __init__(self, book: Book, name: str, id_type: pa.DataType) -> None:
        self.name = name
        self.path = book.scratch / f"{name}.requests.jsonl"
        self.rows_path = book.rows_path(name)
        self._fh = self.path.open("wb")
        self._rows_fh = book.fs.open(self.rows_path, "wb")
        self._schema = pa.schema(
            [
                ("custom_id", pa.string()),
                ("item", pa.int32()),
                ("content_hash", pa.string()),
                ("id", id_type),
                ("input_row", pa.int64()),
                ("prepared", pa.binary()),
            ]
        )
        self._writer = pq.ParquetWriter(self._rows_fh, self._schema, compression="zstd")
        self._buffer: dict[str, list[Any]] = {n: [] for n in self._schema.names}
        self.counts = FileCounts()
        self.hashes: list[str] = []  # content hashes of the items (for the in-flight key table)
        # content hash -> (custom_id, item index): a later row of the same content joins that item.
        self.where: dict[str, tuple[str, int]] = {}
        self.claims: set[str] = set()  # the chunk claims held for the rows of this file (until submitted)

    def fits(self, inputs: int, size: int, policy: Any, endpoint: str) -> bool:
        """Room for one more line under ``policy`` (a BatchPolicy): requests, bytes, embedding inputs."""
        counts = self.counts
        if counts.lines == 0:
            return True
        if counts.lines + 1 > policy.max_lines or counts.bytes + size > policy.max_bytes:
            return False
        return not (endpoint.endswith("embeddings") and counts.inputs + inputs > policy.max_inputs)

    def add_line(self, line: bytes, items: list[Item], rows: list[tuple[int, Any, int]], custom_id: str) -> None:
        """``rows``: (item index, row id, input row) of every row the line answers."""
        self._fh.write(line)
        counts = self.counts
        counts.lines += 1
        counts.inputs += len(items)
        counts.bytes += len(line)
        counts.tokens += sum(item.tokens for item in items)
        firsts: set[int] = set()
        for item_index, row_id, input_row in rows:
            item = items[item_index]
            first = item_index not in firsts
            firsts.add(item_index)
            prepared = pickle.dumps(item.prepared, protocol=5) if first else None
            self._buffer_row(custom_id, item_index, item.content_hash, row_id, input_row, prepared)
        for index, item in enumerate(items):
            self.where[item.content_hash] = (custom_id, index)
        self.hashes.extend(item.content_hash for item in items)
        counts.rows += len(rows)
        if len(self._buffer["custom_id"]) >= WRITE_ROWS:
            self._flush()

    def join(self, content_hash: str, members: list[tuple[Any, int]]) -> bool:
        """Rows whose content an earlier line of this file already asks for: recorded under that line."""
        if content_hash not in self.where:
            return False
        custom_id, index = self.where[content_hash]
        for row_id, input_row in members:
            self._buffer_row(custom_id, index, content_hash, row_id, input_row, None)
        self.counts.rows += len(members)
        return True

    def _buffer_row(self, *values: Any) -> None:
        """One row of the rows file (custom_id, item, content_hash, id, input_row, prepared), buffered."""
        for name, value in zip(self._schema.names, values, strict=True):
            self._buffer[name].append(value)

    def _flush(self) -> None:
        if self._buffer["custom_id"]:
            self._writer.write_table(pa.table(self._buffer, schema=self._schema))
            self._buffer = {n: [] for n in self._schema.names}

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._rows_fh.close()
        self._fh.close()

    def discard(self, book: Book) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
        if book.fs.exists(self.rows_path):
            book.fs.rm(self.rows_path)


class LineRows:
    """custom_id → (items, rows) of a rows file: the line's items in request order, and every row it answers."""

    def __init__(self, table: pa.Table) -> None:
        self._lines: dict[str, tuple[list[Item], list[tuple[int, Any, int]]]] = {}
        cols = {n: table.column(n).to_pylist() for n in ("custom_id", "item", "content_hash", "id", "input_row")}
        prepared = table.column("prepared")
        for i, custom_id in enumerate(cols["custom_id"]):
            entry = self._lines.setdefault(custom_id, ([], []))
            item_index = cols["item"][i]
            if item_index == len(entry[0]):
                raw = prepared[i].as_py()
                entry[0].append(Item(i, cols["id"][i], cols["content_hash"][i], pickle.loads(raw)))
            entry[1].append((item_index, cols["id"][i], cols["input_row"][i]))

    def get(self, custom_id: str) -> tuple[list[Item], list[tuple[int, Any, int]]] | None:
        return self._lines.get(custom_id)

    def __len__(self) -> int:
        return len(self._lines)


def read_rows(book: Book, name: str) -> pa.Table:
    with book.fs.open(book.rows_path(name), "rb") as f:
        return pq.read_table(f)


def request_line(custom_id: str, endpoint: str, body: dict[str, Any]) -> bytes:
    line = {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body}
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def remove_scratch(book: Book) -> None:
    if book.scratch != Path(book.folder):
        shutil.rmtree(book.scratch, ignore_errors=True)
