"""The output folder: its layout and owner, result and error parts written, run documents, the scan and superseding.

Layout (see ARCHITECTURE.md)::

    OUTPUT/part-<chunk-hash>.parquet   results
    OUTPUT/_errors/part-<…>.parquet     rows that failed for good
    OUTPUT/_runs/<run-id>.json          one per run
    OUTPUT/_index/keys.bin              the parts' keys, so that a scan needn't read every part
    OUTPUT/_images/<content_hash>.<ext> generated images (image generation only; images/ before)

Every part file carries its write time in its schema metadata. When one id has several records
(its text changed, or it failed and later succeeded), the newest record wins and the older ones are
removed by :meth:`OutputStore.compact` at the end of every run that wrote something.

The part files themselves are :mod:`tasks.engine.store.part_files`, the failed rows
:mod:`tasks.engine.store.error_rows`, the scan :mod:`tasks.engine.store.scanning`, superseding
:mod:`tasks.engine.store.compaction`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Collection, Iterable
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.engine.plan.claim_files import CLAIMS_DIR
from tasks.engine.plan.done import DoneIndex, NewParts
from tasks.engine.store import compaction, scanning
from tasks.engine.store.compaction import COMPACT_BYTES
from tasks.engine.store.error_rows import redacted_messages
from tasks.engine.store.keycache import INDEX_DIR
from tasks.engine.store.part_files import ERRORS_DIR, TMP_PREFIX, PartFolder, name
from tasks.errors import ConfigError
from tasks.redact import redact_data
from tasks.sinks.location import staging_folder

__all__ = ["IMAGES_DIR", "LEGACY_IMAGES_DIR", "RUNS_DIR", "TMP_PREFIX", "OutputStore"]

RUNS_DIR = "_runs"
IMAGES_DIR = "_images"  # generated images ("_": Arrow's discovery skips it)
LEGACY_IMAGES_DIR = "images"  # where versions before _images/ put them
MARKER = "_gembatch.json"  # which job and model own the folder; "_" keeps Arrow's discovery off it


class OutputStore(PartFolder):
    """One output folder: its owner, its part files and run documents; the scan, superseding and the
    key cache are in :mod:`tasks.engine.store.scanning` and :mod:`tasks.engine.store.compaction`."""

    def __init__(self, root: str) -> None:
        self.url = root = staging_folder(root)  # a lancedb:// output: the run's folder beside the table
        fs, path = fsspec.core.url_to_fs(root)
        super().__init__(fs, path)

    # -- layout -----------------------------------------------------------------------------------
    def prepare(self) -> None:
        for sub in ("", ERRORS_DIR, RUNS_DIR):
            self.fs.makedirs(self.join(sub) if sub else self.root, exist_ok=True)

    def remove_temporary(self) -> None:
        """Remove what killed runs left half-written: only while no other run works on the folder
        (its temporary files are about to be renamed)."""
        for folder in (
            self.root,
            self.join(ERRORS_DIR),
            self.join(RUNS_DIR),
            self.join(IMAGES_DIR),
            self.join(LEGACY_IMAGES_DIR),
            self.join(CLAIMS_DIR),
            self.join(INDEX_DIR),
        ):
            if not self.fs.exists(folder):
                continue
            for path in self.fs.ls(folder, detail=False):
                if name(path).startswith(TMP_PREFIX):
                    self.fs.rm(path)

    def owner(self) -> dict[str, Any] | None:
        """Which job and model made this output (``_gembatch.json``), or None for a new folder."""
        path = self.join(MARKER)
        try:
            with self.fs.open(path, "r") as f:
                owner = json.load(f)
        except FileNotFoundError:
            return None
        return owner if isinstance(owner, dict) else None

    def check_claim(self, *, job: str, model: str, force: bool, change_model: bool = False) -> dict[str, Any] | None:
        """Refuse a folder that holds another job's or another model's results, unless forced (another
        job: --force; another model of the same job: --change-model, or --force). Returns the owner."""
        owner = self.owner()
        if owner is None:
            return None
        same_job, same_model = owner.get("job") == job, owner.get("model") == model
        if not same_job and not force:
            raise ConfigError(
                f"output {self.url} holds {owner.get('job')} results of model {owner.get('model')!r} "
                f"(first written by run {owner.get('run_id')}); this run is {job} with {model!r}. "
                "Pick another --output, or pass --force to write into it anyway "
                "(rows of the same id are then superseded by this run's)."
            )
        if same_job and not same_model and not (force or change_model):
            raise ConfigError(
                f"output {self.url} was made with model {owner.get('model')!r} (run {owner.get('run_id')}); "
                f"this run asks for {model!r}. A run without --model keeps the output's model. To move the "
                f"output to {model!r} (every row is sent again and its old row superseded), first see what "
                "that re-sends and costs with --change-model --dry-run, then run with --change-model; or "
                "write the new model's results to another --output."
            )
        return owner

    def claim(self, *, job: str, model: str, run_id: str, force: bool, change_model: bool = False) -> None:
        """Check the folder (:meth:`check_claim`) and record this run's job and model as its owner.

        ``change_model``: this run moves the output to ``model`` (--change-model): the folder's model is
        rewritten (the old one kept in ``previous_models``), and its rows of the old model are
        superseded as the run resends them."""
        owner = self.check_claim(job=job, model=model, force=force, change_model=change_model)
        if owner is not None and (owner.get("job"), owner.get("model")) == (job, model):
            return
        document: dict[str, Any] = {"job": job, "model": model, "run_id": run_id}
        if owner is not None and owner.get("job") == job:
            document["previous_models"] = [*owner.get("previous_models", []), owner.get("model")]
        with self.fs.open(self.join(MARKER), "w") as f:
            json.dump(document, f)

    def result_columns(self) -> list[str] | None:
        """The columns of one result part (its footer only), or None while the output has none."""
        files = self.result_files()
        if not files:
            return None
        with self.fs.open(files[0], "rb") as f:
            return pq.ParquetFile(f).schema_arrow.names

    # -- reading ----------------------------------------------------------------------------------
    def scan(
        self, id_col: str, *, live_runs: Collection[str] = (), since_ns: int | None = None, keep_keys: bool = True
    ) -> DoneIndex:
        """The done-key index of this output (:func:`tasks.engine.store.scanning.scan`)."""
        return scanning.scan(self, id_col, live_runs=live_runs, since_ns=since_ns, keep_keys=keep_keys)

    def refresh_key_cache(self, id_col: str) -> None:
        """Bring the output's key cache up to date (:func:`tasks.engine.store.scanning.refresh_key_cache`)."""
        scanning.refresh_key_cache(self, id_col)

    def read_new_parts(self, known: set[str], id_col: str, *, run_id: str | None = None) -> NewParts:
        """What other runs wrote since this run's scan (:func:`tasks.engine.store.scanning.read_new_parts`)."""
        return scanning.read_new_parts(self, known, id_col, run_id=run_id)

    def part_keys(self, path: str, id_col: str) -> tuple[np.ndarray, np.ndarray]:
        """A result part's rows as sorted (hash keys, pair keys) (:func:`tasks.engine.store.scanning.part_keys`)."""
        return scanning.part_keys(self, path, id_col)

    def read_results_for(
        self, content_hashes: Iterable[str], id_col: str, *, files: list[str] | None = None
    ) -> pa.Table:
        """Result rows already in the output for these hashes: all rows of one id per hash (a
        result may span several rows, e.g. n generated images), for rows that share their content.

        ``files``: only these parts (``DoneIndex.parts_holding``); the default reads every part's
        content_hash column, which at corpus scale is the whole output's worth of hashes."""
        wanted = pa.array(sorted(set(content_hashes)), pa.string())
        files = self.result_files() if files is None else [f for f in files if self.fs.exists(f)]
        if not len(wanted) or not files:
            return pa.table({})
        # Part by part, on this thread: no Arrow dataset scan (its thread pools) and no polars (its
        # runtime and allocator threads, ~25 MiB kept for the rest of the run, measured): a false
        # match of the index costs a run one small read, not a working set.
        pieces = []
        for path in files:
            with self.fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f)
                hit = pc.is_in(parquet.read(columns=["content_hash"], use_threads=False).column(0), value_set=wanted)
                if pc.any(hit).as_py():
                    pieces.append(parquet.read(use_threads=False).filter(hit))
        if not pieces:
            return pa.table({})
        table = pa.concat_tables(pieces, promote_options="permissive")
        first_id: dict[str, Any] = {}
        rows = [
            row
            for row, (h, row_id) in enumerate(
                zip(table.column("content_hash").to_pylist(), table.column(id_col).to_pylist())
            )
            if first_id.setdefault(h, row_id) == row_id
        ]
        return table.take(pa.array(rows, pa.int64()))

    # -- writing ----------------------------------------------------------------------------------
    def write_part(self, table: pa.Table, *, errors: bool, run_id: str, id_col: str) -> str:
        """Write one part atomically (temporary name, then rename) and return its path."""
        if errors:
            # Named by run too: a row that fails again in another run is a new record, which a
            # concurrent run must see as new (see read_new_parts); compaction keeps the newest.
            final = f"{self.join(ERRORS_DIR)}/part-{_part_hash(table, id_col)}-{run_id}.parquet"
            table = redacted_messages(table)
        else:
            final = f"{self.root}/part-{_part_hash(table, id_col)}.parquet"
        meta = {"written_at_ns": time.time_ns(), "run_id": run_id}
        self.write_atomic(table, final, meta)
        return final

    def write_run(self, run_id: str, document: dict[str, Any]) -> str:
        path = self.join(RUNS_DIR, f"{run_id}.json")
        tmp = self.join(RUNS_DIR, f"{TMP_PREFIX}{run_id}.inprogress")
        with self.fs.open(tmp, "w") as f:
            json.dump(redact_data(document), f, indent=2, default=str)
        self.fs.mv(tmp, path)
        return path

    def compact(self, id_col: str, *, max_bytes: int = COMPACT_BYTES) -> int:
        """Keep only the newest record of each id; rows removed (:func:`tasks.engine.store.compaction.compact`)."""
        return compaction.compact(self, id_col, max_bytes=max_bytes)

    def _drop_rows(self, path: str, rows: np.ndarray) -> int:
        return compaction.drop_rows(self, path, rows)


def _part_hash(table: pa.Table, id_col: str) -> str:
    digest = hashlib.sha256()
    for value in table.column("content_hash").to_pylist():
        digest.update(value.encode())
    for value in table.column(id_col).to_pylist():
        digest.update(repr(value).encode())
    return digest.hexdigest()[:20]
