"""The output folder: atomic part files, the scan into the done-key index, superseding, and run metadata files.

Layout (see ARCHITECTURE.md)::

    OUTPUT/part-<chunk-hash>.parquet   results
    OUTPUT/_errors/part-<…>.parquet     rows that failed for good
    OUTPUT/_runs/<run-id>.json          one per run
    OUTPUT/_index/keys.bin              the parts' keys, so that a scan needn't read every part
    OUTPUT/_images/<content_hash>.<ext> generated images (image generation only; images/ before)

Every part file carries its write time in its schema metadata. When one id has several records
(its text changed, or it failed and later succeeded), the newest record wins and the older ones are
removed by :meth:`OutputStore.compact` at the end of every run that wrote something.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.engine.memory import release_free_memory
from tasks.engine.plan.claims import CLAIMS_DIR
from tasks.engine.plan.done import DoneIndex, NewParts
from tasks.engine.plan.key_table import KeyTable
from tasks.engine.plan.keys import LOCATIONS, exact_id_keys, hash_key, hash_keys, id_tags, pair_key, pair_keys
from tasks.engine.plan.part_keys import PartKeys
from tasks.engine.store.keycache import INDEX_DIR, KEYS_FILE, KeyCache, KeyCacheWriter, part_stamp
from tasks.errors import ConfigError
from tasks.redact import redact_data, redact_text
from tasks.sinks.location import staging_folder

log = logging.getLogger("gembatch.index")

__all__ = [
    "OutputStore",
    "pair_key",
    "hash_key",
    "ERRORS_DIR",
    "RUNS_DIR",
    "IMAGES_DIR",
    "RETRY_AUTO",
    "RETRY_ON_REQUEST",
]

SCAN_BATCH_ROWS = 65536
SCAN_THREADS = 2
SCAN_FILES_AHEAD = 8
COMPACT_BYTES = 32 << 20  # ids held at once while superseding

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


class OutputStore:
    def __init__(self, root: str) -> None:
        self.url = root = staging_folder(root)  # a lancedb:// output: the run's folder beside the table
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.root = self.root.rstrip("/")

    # -- layout -----------------------------------------------------------------------------------
    def prepare(self) -> None:
        for sub in ("", ERRORS_DIR, RUNS_DIR):
            self.fs.makedirs(self._join(sub) if sub else self.root, exist_ok=True)

    def remove_temporary(self) -> None:
        """Remove what killed runs left half-written: only while no other run works on the folder
        (its temporary files are about to be renamed)."""
        for folder in (
            self.root,
            self._join(ERRORS_DIR),
            self._join(RUNS_DIR),
            self._join(IMAGES_DIR),
            self._join(LEGACY_IMAGES_DIR),
            self._join(CLAIMS_DIR),
            self._join(INDEX_DIR),
        ):
            if not self.fs.exists(folder):
                continue
            for path in self.fs.ls(folder, detail=False):
                if _name(path).startswith(TMP_PREFIX):
                    self.fs.rm(path)

    def owner(self) -> dict[str, Any] | None:
        """Which job and model made this output (``_gembatch.json``), or None for a new folder."""
        path = self._join(MARKER)
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
        with self.fs.open(self._join(MARKER), "w") as f:
            json.dump(document, f)

    def result_files(self) -> list[str]:
        return self._parts(self.root)

    def result_columns(self) -> list[str] | None:
        """The columns of one result part (its footer only), or None while the output has none."""
        files = self.result_files()
        if not files:
            return None
        with self.fs.open(files[0], "rb") as f:
            return pq.ParquetFile(f).schema_arrow.names

    def error_files(self) -> list[str]:
        return self._parts(self._join(ERRORS_DIR))

    # -- reading ----------------------------------------------------------------------------------
    def scan(
        self, id_col: str, *, live_runs: Collection[str] = (), since_ns: int | None = None, keep_keys: bool = True
    ) -> DoneIndex:
        """Read the (id, content_hash) columns of every part into a :class:`DoneIndex`.

        Parts are read and turned into keys on worker threads, a few files ahead of the table that
        takes them (a 10M-row output is 5,000 parts: opening them one after the other was most of the
        scan); at most ``SCAN_FILES_AHEAD`` parts' keys wait at a time.

        The parts' keys come from the output's key cache where it holds them (``OUTPUT/_index/``, see
        :mod:`tasks.engine.store.keycache`); ``keep_keys=False`` (a dry run) reads it but never writes it.

        ``live_runs``: other runs working on the folder now; ``since_ns``: when this run took its lease.
        The rows they recorded as failed, or that were recorded since, belong to runs at work
        (``fresh_errors``): this run doesn't resend them, not even with --retry-errors."""
        index = DoneIndex(part_keys=PartKeys(lambda path: self.part_keys(path, id_col)))
        loader = index.results.loader()
        pending: list[tuple[np.ndarray, int]] = []  # parts' keys handed to the loader together
        pending_rows = 0

        def theirs(path: str) -> bool:
            if not live_runs and since_ns is None:
                return False
            meta = self._metadata(path)
            return meta.get("run_id") in live_runs or (
                since_ns is not None and int(meta.get("written_at_ns", 0)) >= since_ns
            )

        def load() -> None:
            loader.add(
                np.concatenate([keys for keys, _ in pending]),
                np.concatenate([np.full(len(keys), loc % LOCATIONS, np.uint16) for keys, loc in pending]),
            )
            pending.clear()

        with ThreadPoolExecutor(max_workers=SCAN_THREADS, thread_name_prefix="gembatch-scan") as pool:
            try:
                for path, keys, pairs in self._all_part_keys(pool, id_col, index, write=keep_keys):
                    pending.append((keys, index.part_ordinal(path)))
                    pending_rows += len(keys)
                    if pending_rows >= SCAN_BATCH_ROWS:
                        load()
                        pending_rows = 0
                    index.part_keys.pair_file.add(path, pairs)
                    index.result_rows += len(keys)
                if pending:
                    load()
            except BaseException:
                loader.close()
                raise
            loader.finish()
            for path, batches in _ahead(pool, self.error_files(), lambda p: self._error_keys(p, id_col)):
                index.error_parts.add(path)
                fresh = theirs(path)
                for keys, tags, auto in batches:
                    index.error_rows += len(keys)
                    if fresh:
                        index.fresh_errors.add(keys, tags)
                        continue
                    index.errors.add(keys, tags, merge=False)
                    if auto.any():
                        index.auto_errors.add(keys[auto], tags[auto], merge=False)
        index.errors.compact()
        index.auto_errors.compact()
        release_free_memory()
        return index

    def _all_part_keys(
        self,
        pool: ThreadPoolExecutor,
        id_col: str,
        index: DoneIndex | None = None,
        *,
        write: bool = True,
        only_to_write: bool = False,
    ) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(path, sorted content keys, sorted pair keys) of every result part, in order: from the
        output's key cache (:mod:`tasks.engine.store.keycache`) for a part it holds as it is now, else read
        from the part on ``pool``. When the cache missed a part or names one that is gone, it is
        written anew as the parts go by (a cache that can't be written is logged, not an error).
        ``only_to_write``: nothing when the cache is up to date."""
        listed = self._part_stamps(self.root)
        cache = KeyCache.open(self.fs, self._join(INDEX_DIR, KEYS_FILE), id_col)
        writer = None
        if (
            write
            and listed
            and (cache is None or len(cache) != len(listed) or not all(cache.knows(_name(p), s) for p, s in listed))
        ):
            try:
                writer = KeyCacheWriter(self.fs, self._join(INDEX_DIR), id_col)
            except OSError as exc:
                _cache_not_written(exc)
        if writer is None and only_to_write:
            if cache is not None:
                cache.close()
            return

        def read(item: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
            path, stamp = item
            found = cache.keys(_name(path), stamp) if cache is not None else None
            return found if found is not None else self.part_keys(path, id_col)

        try:
            for (path, stamp), (contents, pairs) in _ahead(pool, listed, read):
                if writer is not None:
                    try:
                        writer.add(_name(path), stamp, contents, pairs)
                    except OSError as exc:
                        _cache_not_written(exc)
                        writer.abort()
                        writer = None
                yield path, contents, pairs
            if writer is not None:
                try:
                    writer.commit()
                except OSError as exc:
                    _cache_not_written(exc)
                    writer.abort()
                writer = None
        finally:
            if writer is not None:
                writer.abort()
            if cache is not None:
                if index is not None:
                    index.cached_parts = cache.hits
                cache.close()

    def refresh_key_cache(self, id_col: str) -> None:
        """Bring the output's key cache up to date with its parts (at the end of a run that wrote or
        rewrote parts): the next run's scan then reads one file instead of every part."""
        try:
            with ThreadPoolExecutor(max_workers=SCAN_THREADS, thread_name_prefix="gembatch-scan") as pool:
                for _ in self._all_part_keys(pool, id_col, only_to_write=True):
                    pass
        except (OSError, pa.ArrowException) as exc:  # the run's work is done: this only costs the next scan time
            _cache_not_written(exc)

    def read_new_parts(self, known: set[str], id_col: str, *, run_id: str | None = None) -> NewParts:
        """The (hash key, id tag) rows of the parts not in ``known``: what other runs wrote since this
        run's scan. Runs on a worker thread; the caller adds them to its index (:meth:`NewParts.add_to`).
        ``run_id``: the caller's, whose result parts are left out (one just written may not be in
        ``known`` yet, and its index learns only some of its own results)."""
        new = NewParts()
        for path in self.result_files():
            if path not in known and (run_id is None or self._metadata(path).get("run_id") != run_id):
                new.results.append((path, self._result_keys(path, id_col)))
        for path in self.error_files():
            if path not in known:
                new.errors.append((path, [(keys, tags) for keys, tags, _ in self._error_keys(path, id_col)]))
        return new

    def _result_keys(self, path: str, id_col: str) -> list[np.ndarray]:
        return [self.part_keys(path, id_col)[0]]

    def part_keys(self, path: str, id_col: str) -> tuple[np.ndarray, np.ndarray]:
        """A result part's rows as (hash keys, :func:`pair_keys`), each sorted: what confirms a match of
        the index."""
        with self.fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read(columns=[id_col, "content_hash"])
        contents = hash_keys(table.column("content_hash"))
        pairs = pair_keys(contents, exact_id_keys(table.column(id_col)))
        contents.sort()
        pairs.sort()
        return contents, pairs

    def _error_keys(self, path: str, id_col: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return [(hash_keys(hashes), id_tags(ids), auto) for ids, hashes, auto in self._error_batches(path, id_col)]

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
            final = f"{self._join(ERRORS_DIR)}/part-{_part_hash(table, id_col)}-{run_id}.parquet"
            table = _redacted_messages(table)
        else:
            final = f"{self.root}/part-{_part_hash(table, id_col)}.parquet"
        meta = {"written_at_ns": time.time_ns(), "run_id": run_id}
        self._write_atomic(table, final, meta)
        return final

    def write_run(self, run_id: str, document: dict[str, Any]) -> str:
        path = self._join(RUNS_DIR, f"{run_id}.json")
        tmp = self._join(RUNS_DIR, f"{TMP_PREFIX}{run_id}.inprogress")
        with self.fs.open(tmp, "w") as f:
            json.dump(redact_data(document), f, indent=2, default=str)
        self.fs.mv(tmp, path)
        return path

    def compact(self, id_col: str, *, max_bytes: int = COMPACT_BYTES) -> int:
        """Keep only the newest record of each id across results and errors; return rows removed.

        Never loads the output: parts are visited newest first, reading only their id column, while
        a key table of the ids seen in newer parts (8 bytes an id) names the stale rows. Past
        ``max_bytes`` of ids the key space is split and the parts are read once per slice, so the
        table never holds more than ``max_bytes`` (a 10M-row output: 3 slices). Parts with stale rows
        are rewritten at the end. Integer ids are keyed exactly; other ids by a 64-bit hash. Rows of
        one id written in the same part (image generation with n > 1) stand or fall together.
        """
        dated = sorted(
            ((self._written_at(path), path) for path in (*self.result_files(), *self.error_files())),
            key=lambda wp: -wp[0],
        )
        rows = sum(self._row_count(path) for _, path in dated)
        slices = max(1, -(-rows * 8 // max_bytes))
        stale: dict[str, list[np.ndarray]] = {}
        for part in range(slices):
            newer = KeyTable(payload=False)
            for _written, group in itertools.groupby(dated, key=lambda wp: wp[0]):
                # Parts written at the same instant don't supersede each other: their ids join ``newer``
                # together, after all of them were checked.
                seen = []
                for _, path in group:
                    first = 0
                    for ids in self._id_batches(path, id_col):
                        keys = exact_id_keys(ids)
                        mine = np.flatnonzero(keys % np.uint64(slices) == part) if slices > 1 else None
                        if mine is not None:
                            keys = keys[mine]
                        hit = np.flatnonzero(newer.has_keys(keys))
                        if len(hit):
                            stale.setdefault(path, []).append((mine[hit] if mine is not None else hit) + first)
                        first += len(ids)
                        seen.append(keys)
                for keys in seen:
                    newer.add(keys)
            newer.clear()
        return sum(self._drop_rows(path, np.unique(np.concatenate(found))) for path, found in stale.items())

    def _row_count(self, path: str) -> int:
        return pq.ParquetFile(path, filesystem=self.fs).metadata.num_rows

    def _drop_rows(self, path: str, rows: np.ndarray) -> int:
        table = pq.read_table(path, filesystem=self.fs)
        keep = np.ones(table.num_rows, bool)
        keep[rows] = False
        if not keep.any():
            self.fs.rm(path)
        else:
            self._write_atomic(table.filter(pa.array(keep)), path, self._metadata(path))
        return len(rows)

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
        for batch in parquet.iter_batches(columns=[id_col, "content_hash"], batch_size=SCAN_BATCH_ROWS):
            yield batch.column(0), batch.column(1)

    def _id_batches(self, path: str, id_col: str):
        parquet = pq.ParquetFile(path, filesystem=self.fs)
        for batch in parquet.iter_batches(columns=[id_col], batch_size=SCAN_BATCH_ROWS):
            yield batch.column(0)

    def _error_batches(self, path: str, id_col: str):
        """(ids, hashes, retried automatically?) of an errors part; files older than the `retry`
        column say it through their error_type."""
        parquet = pq.ParquetFile(path, filesystem=self.fs)
        names = parquet.schema_arrow.names
        column = "retry" if "retry" in names else "error_type" if "error_type" in names else None
        for batch in parquet.iter_batches(
            columns=[id_col, "content_hash", *([column] if column else [])], batch_size=65536
        ):
            ids, hashes = batch.column(0), batch.column(1)
            if column == "retry":
                auto = [v == RETRY_AUTO for v in batch.column(2).to_pylist()]
            elif column == "error_type":
                auto = [v in LEGACY_AUTO_ERROR_TYPES for v in batch.column(2).to_pylist()]
            else:
                auto = [False] * len(ids)
            yield ids, hashes, np.array(auto, dtype=bool)

    def _part_stamps(self, folder: str) -> list[tuple[str, str]]:
        """(path, :func:`part_stamp`) of the parts in a folder, sorted by path: one listing."""
        if not self.fs.exists(folder):
            return []
        return sorted(
            (info["name"], part_stamp(info))
            for info in self.fs.ls(folder, detail=True)
            if _name(info["name"]).startswith("part-") and info["name"].endswith(".parquet")
        )

    def _parts(self, folder: str) -> list[str]:
        return [path for path, _ in self._part_stamps(folder)]

    def _join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])


def _ahead(pool: ThreadPoolExecutor, paths: list[str], read: Callable[[str], Any]) -> Iterator[tuple[str, Any]]:
    """(path, read(path)) in order, reading up to ``SCAN_FILES_AHEAD`` paths ahead on ``pool``."""
    pending: deque[tuple[str, Future]] = deque()
    for path in paths:
        pending.append((path, pool.submit(read, path)))
        if len(pending) >= SCAN_FILES_AHEAD:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _cache_not_written(exc: BaseException) -> None:
    log.warning("the output's key cache (_index/) was not written (%s): the next run reads the parts again", exc)


def _part_hash(table: pa.Table, id_col: str) -> str:
    digest = hashlib.sha256()
    for value in table.column("content_hash").to_pylist():
        digest.update(value.encode())
    for value in table.column(id_col).to_pylist():
        digest.update(repr(value).encode())
    return digest.hexdigest()[:20]


def _redacted_messages(table: pa.Table) -> pa.Table:
    """Error rows as written: no URL credentials in a message or a kept reply, whatever produced it (a
    gateway's answer quoting the request URL, a media cell holding a presigned link)."""
    for name in ("error_message", "raw_reply"):
        if name not in table.column_names:
            continue
        column = table.column(name)
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            continue
        redacted = pa.array([None if m is None else redact_text(m) for m in column.to_pylist()], column.type)
        table = table.set_column(table.column_names.index(name), name, redacted)
    return table
