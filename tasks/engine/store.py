"""The output folder: atomic part files, the done-key index, superseding, and run metadata files.

Layout (see ARCHITECTURE.md)::

    OUTPUT/part-<chunk-hash>.parquet   results
    OUTPUT/_errors/part-<…>.parquet     rows that failed for good
    OUTPUT/_runs/<run-id>.json          one per run
    OUTPUT/_images/<content_hash>.<ext> generated images (image generation only; images/ before)

Every part file carries its write time in its schema metadata. When one id has several records
(its text changed, or it failed and later succeeded), the newest record wins and the older ones are
removed by :meth:`OutputStore.compact` at the end of every run that wrote something.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from tasks.errors import ConfigError

__all__ = [
    "OutputStore",
    "DoneIndex",
    "pair_key",
    "hash_key",
    "ERRORS_DIR",
    "RUNS_DIR",
    "IMAGES_DIR",
    "RETRY_AUTO",
    "RETRY_ON_REQUEST",
]

ERRORS_DIR = "_errors"
RUNS_DIR = "_runs"
IMAGES_DIR = "_images"  # generated images ("_": Arrow's discovery skips it)
LEGACY_IMAGES_DIR = "images"  # where versions before _images/ put them
MARKER = "_gembatch.json"  # which job and model own the folder; "_" keeps Arrow's discovery off it
TMP_PREFIX = ".tmp-"
META_KEY = b"gembatch"
# The `retry` column of _errors/: which failed rows the next plain run sends again.
RETRY_AUTO = "auto"  # transient errors (5xx, timeouts, broken connections, 429s) used up the attempts
RETRY_ON_REQUEST = "on_request"  # the row failed for itself (a 400 for it, an unusable reply): --retry-errors
# Error files written before the `retry` column: these error types were transient.
LEGACY_AUTO_ERROR_TYPES = ("transient", "rate_limited")


def pair_key(row_id: object, content_hash: str) -> int:
    """In-memory key of an (id, content_hash) pair: a 64-bit hash keeps the index small."""
    return hash((row_id, content_hash))


def hash_key(content_hash: str) -> int:
    # content hashes are hex sha256: their first 16 digits are already uniformly random
    return int(content_hash[:16], 16)


@dataclass
class DoneIndex:
    """What the output already holds, as compact keys."""

    done_pairs: set[int] = field(default_factory=set)
    known_hashes: set[int] = field(default_factory=set)
    errored_pairs: set[int] = field(default_factory=set)
    # Of errored_pairs, those that failed on transient errors only: a plain rerun sends them again.
    auto_retry_pairs: set[int] = field(default_factory=set)
    result_rows: int = 0
    error_rows: int = 0


class OutputStore:
    def __init__(self, root: str) -> None:
        self.url = root
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.root = self.root.rstrip("/")

    # -- layout -----------------------------------------------------------------------------------
    def prepare(self) -> None:
        for sub in ("", ERRORS_DIR, RUNS_DIR):
            self.fs.makedirs(self._join(sub) if sub else self.root, exist_ok=True)
        # A killed run may leave temporary files; they were never renamed, so nothing refers to them.
        for folder in (
            self.root,
            self._join(ERRORS_DIR),
            self._join(RUNS_DIR),
            self._join(IMAGES_DIR),
            self._join(LEGACY_IMAGES_DIR),
        ):
            if not self.fs.exists(folder):
                continue
            for path in self.fs.ls(folder, detail=False):
                if path.rsplit("/", 1)[-1].startswith(TMP_PREFIX):
                    self.fs.rm(path)

    def claim(self, *, job: str, model: str, run_id: str, force: bool) -> None:
        """Refuse a folder that holds another job's or another model's results, unless forced."""
        path = self._join(MARKER)
        if self.fs.exists(path):
            with self.fs.open(path, "r") as f:
                owner = json.load(f)
            if (owner.get("job"), owner.get("model")) != (job, model) and not force:
                raise ConfigError(
                    f"output {self.url} holds {owner.get('job')} results of model {owner.get('model')!r} "
                    f"(first written by run {owner.get('run_id')}); this run is {job} with {model!r}. "
                    "Pick another --output, or pass --force to write into it anyway "
                    "(rows of the same id are then superseded by this run's)."
                )
            if (owner.get("job"), owner.get("model")) == (job, model):
                return
        with self.fs.open(path, "w") as f:
            json.dump({"job": job, "model": model, "run_id": run_id}, f)

    def result_files(self) -> list[str]:
        return self._parts(self.root)

    def error_files(self) -> list[str]:
        return self._parts(self._join(ERRORS_DIR))

    # -- reading ----------------------------------------------------------------------------------
    def scan(self, id_col: str) -> DoneIndex:
        index = DoneIndex()
        for path in self.result_files():
            for ids, hashes in self._id_hash_batches(path, id_col):
                index.done_pairs.update(pair_key(i, h) for i, h in zip(ids, hashes))
                index.known_hashes.update(hash_key(h) for h in hashes)
                index.result_rows += len(hashes)
        for path in self.error_files():
            for ids, hashes, auto in self._error_batches(path, id_col):
                keys = [pair_key(i, h) for i, h in zip(ids, hashes)]
                index.errored_pairs.update(keys)
                index.auto_retry_pairs.update(k for k, a in zip(keys, auto) if a)
                index.error_rows += len(hashes)
        return index

    def read_results_for(self, content_hashes: Iterable[str], id_col: str) -> pa.Table:
        """Result rows already in the output for these hashes: all rows of one id per hash (a
        result may span several rows, e.g. n generated images), for rows that share their content."""
        wanted = sorted(set(content_hashes))
        files = self.result_files()
        if not wanted or not files:
            return pa.table({})
        import polars as pl  # here, not at the top: a refused command should not pay for it

        dataset = pds.dataset(files, format="parquet", filesystem=self.fs)
        table = dataset.to_table(filter=pc.field("content_hash").isin(wanted))
        keys = pl.from_arrow(table.select(["content_hash", id_col])).with_row_index()
        first_id = keys.group_by("content_hash").agg(pl.col(id_col).first().alias("_first"))
        rows = keys.join(first_id, on="content_hash").filter(pl.col(id_col) == pl.col("_first"))["index"]
        return table.take(pa.array(rows.sort().to_list(), pa.int64()))

    # -- writing ----------------------------------------------------------------------------------
    def write_part(self, table: pa.Table, *, errors: bool, run_id: str, id_col: str) -> str:
        """Write one part atomically (temporary name, then rename) and return its path."""
        folder = self._join(ERRORS_DIR) if errors else self.root
        final = f"{folder}/part-{_part_hash(table, id_col)}.parquet"
        meta = {"written_at_ns": time.time_ns(), "run_id": run_id}
        self._write_atomic(table, final, meta)
        return final

    def write_run(self, run_id: str, document: dict[str, Any]) -> str:
        path = self._join(RUNS_DIR, f"{run_id}.json")
        tmp = self._join(RUNS_DIR, f"{TMP_PREFIX}{run_id}.inprogress")
        with self.fs.open(tmp, "w") as f:
            json.dump(document, f, indent=2, default=str)
        self.fs.mv(tmp, path)
        return path

    def compact(self, id_col: str) -> int:
        """Keep only the newest record of each id across results and errors; return rows removed."""
        import polars as pl

        frames = []
        for _kind, paths in (("result", self.result_files()), ("error", self.error_files())):
            for path in paths:
                written = self._written_at(path)
                ids = pq.read_table(path, columns=[id_col], filesystem=self.fs).column(id_col)
                frames.append(
                    pl.DataFrame({"id": pl.from_arrow(ids)})
                    .with_row_index("row")
                    .with_columns(pl.lit(path).alias("path"), pl.lit(written, dtype=pl.Int64).alias("written"))
                )
        if not frames:
            return 0
        records = pl.concat(frames, how="vertical_relaxed")
        # Rows of one id written in the same part (image generation with n > 1) stand or fall together.
        ranked = records.with_columns(pl.col("written").rank("dense", descending=True).over("id").alias("rank"))
        stale = ranked.filter(pl.col("rank") > 1)
        if stale.is_empty():
            return 0
        for (path,), rows in stale.group_by(["path"]):
            drop = pa.array(rows["row"].to_list(), pa.int64())
            table = pq.read_table(path, filesystem=self.fs)
            keep = pc.invert(pc.is_in(pa.array(range(table.num_rows), pa.int64()), value_set=drop))
            remaining = table.filter(keep)
            if remaining.num_rows == 0:
                self.fs.rm(path)
            else:
                self._write_atomic(remaining, path, self._metadata(path))
        return stale.height

    # -- helpers ----------------------------------------------------------------------------------
    def _write_atomic(self, table: pa.Table, final: str, meta: dict[str, Any]) -> None:
        folder = final.rsplit("/", 1)[0]
        tmp = f"{folder}/{TMP_PREFIX}{uuid.uuid4().hex}.inprogress"
        schema_meta = dict(table.schema.metadata or {})
        schema_meta[META_KEY] = json.dumps(meta).encode()
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(table.replace_schema_metadata(schema_meta), f, compression="zstd")
        self.fs.mv(tmp, final)

    def _metadata(self, path: str) -> dict[str, Any]:
        schema_meta = pq.read_schema(path, filesystem=self.fs).metadata or {}
        raw = schema_meta.get(META_KEY)
        return json.loads(raw) if raw else {}

    def _written_at(self, path: str) -> int:
        return int(self._metadata(path).get("written_at_ns", 0))

    def _id_hash_batches(self, path: str, id_col: str):
        parquet = pq.ParquetFile(path, filesystem=self.fs)
        for batch in parquet.iter_batches(columns=[id_col, "content_hash"], batch_size=65536):
            yield batch.column(0).to_pylist(), batch.column(1).to_pylist()

    def _error_batches(self, path: str, id_col: str):
        """(ids, hashes, retried automatically?) of an errors part; files older than the `retry`
        column say it through their error_type."""
        parquet = pq.ParquetFile(path, filesystem=self.fs)
        names = parquet.schema_arrow.names
        column = "retry" if "retry" in names else "error_type" if "error_type" in names else None
        for batch in parquet.iter_batches(
            columns=[id_col, "content_hash", *([column] if column else [])], batch_size=65536
        ):
            ids, hashes = batch.column(0).to_pylist(), batch.column(1).to_pylist()
            if column == "retry":
                auto = [v == RETRY_AUTO for v in batch.column(2).to_pylist()]
            elif column == "error_type":
                auto = [v in LEGACY_AUTO_ERROR_TYPES for v in batch.column(2).to_pylist()]
            else:
                auto = [False] * len(ids)
            yield ids, hashes, auto

    def _parts(self, folder: str) -> list[str]:
        if not self.fs.exists(folder):
            return []
        return sorted(
            p
            for p in self.fs.ls(folder, detail=False)
            if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet")
        )

    def _join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])


def _part_hash(table: pa.Table, id_col: str) -> str:
    digest = hashlib.sha256()
    for value in table.column("content_hash").to_pylist():
        digest.update(value.encode())
    for value in table.column(id_col).to_pylist():
        digest.update(repr(value).encode())
    return digest.hexdigest()[:20]
