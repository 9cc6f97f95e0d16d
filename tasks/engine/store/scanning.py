"""The scan: every part's keys read into the done-key index, parts other runs add, the output's key cache."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.engine.memory import release_free_memory
from tasks.engine.plan.done import DoneIndex, NewParts
from tasks.engine.plan.keys import LOCATIONS, exact_id_keys, hash_keys, pair_keys
from tasks.engine.plan.part_keys import PartKeys
from tasks.engine.store.error_rows import error_keys
from tasks.engine.store.keycache import INDEX_DIR, KEYS_FILE, KeyCache, KeyCacheWriter
from tasks.engine.store.part_files import BATCH_ROWS, PartFolder, name

log = logging.getLogger("gembatch.index")

__all__ = ["part_keys", "read_new_parts", "refresh_key_cache", "scan"]

SCAN_THREADS = 2
SCAN_FILES_AHEAD = 8


def scan(
    folder: PartFolder,
    id_col: str,
    *,
    live_runs: Collection[str] = (),
    since_ns: int | None = None,
    keep_keys: bool = True,
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
    index = DoneIndex(part_keys=PartKeys(lambda path: part_keys(folder, path, id_col)))

    def theirs(path: str) -> bool:
        if not live_runs and since_ns is None:
            return False
        meta = folder.metadata(path)
        return meta.get("run_id") in live_runs or (
            since_ns is not None and int(meta.get("written_at_ns", 0)) >= since_ns
        )

    with ThreadPoolExecutor(max_workers=SCAN_THREADS, thread_name_prefix="gembatch-scan") as pool:
        _load_results(pool, folder, id_col, index, keep_keys=keep_keys)
        _load_errors(pool, folder, id_col, index, theirs)
    index.errors.compact()
    index.auto_errors.compact()
    release_free_memory()
    return index


def _load_results(
    pool: ThreadPoolExecutor, folder: PartFolder, id_col: str, index: DoneIndex, *, keep_keys: bool
) -> None:
    """Every result part's keys into ``index.results``, a few parts handed to its loader together."""
    loader = index.results.loader()
    pending: list[tuple[np.ndarray, int]] = []  # parts' keys handed to the loader together
    pending_rows = 0

    def load() -> None:
        loader.add(
            np.concatenate([keys for keys, _ in pending]),
            np.concatenate([np.full(len(keys), loc % LOCATIONS, np.uint16) for keys, loc in pending]),
        )
        pending.clear()

    try:
        for path, keys, pairs in _all_part_keys(pool, folder, id_col, index, write=keep_keys):
            pending.append((keys, index.part_ordinal(path)))
            pending_rows += len(keys)
            if pending_rows >= BATCH_ROWS:
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


def _load_errors(
    pool: ThreadPoolExecutor, folder: PartFolder, id_col: str, index: DoneIndex, theirs: Callable[[str], bool]
) -> None:
    """Every errors part's keys into ``index.errors`` (and ``auto_errors``), or ``fresh_errors`` for
    the parts of runs at work (``theirs``)."""
    for path, batches in _ahead(pool, folder.error_files(), lambda p: error_keys(folder, p, id_col)):
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


def _all_part_keys(
    pool: ThreadPoolExecutor,
    folder: PartFolder,
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
    listed = folder.part_stamps(folder.root)
    cache = KeyCache.open(folder.fs, folder.join(INDEX_DIR, KEYS_FILE), id_col)
    writer = None
    if (
        write
        and listed
        and (cache is None or len(cache) != len(listed) or not all(cache.knows(name(p), s) for p, s in listed))
    ):
        try:
            writer = KeyCacheWriter(folder.fs, folder.join(INDEX_DIR), id_col)
        except OSError as exc:
            _cache_not_written(exc)
    if writer is None and only_to_write:
        if cache is not None:
            cache.close()
        return

    def read(item: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
        path, stamp = item
        found = cache.keys(name(path), stamp) if cache is not None else None
        return found if found is not None else part_keys(folder, path, id_col)

    try:
        for (path, stamp), (contents, pairs) in _ahead(pool, listed, read):
            if writer is not None:
                try:
                    writer.add(name(path), stamp, contents, pairs)
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


def refresh_key_cache(folder: PartFolder, id_col: str) -> None:
    """Bring the output's key cache up to date with its parts (at the end of a run that wrote or
    rewrote parts): the next run's scan then reads one file instead of every part."""
    try:
        with ThreadPoolExecutor(max_workers=SCAN_THREADS, thread_name_prefix="gembatch-scan") as pool:
            for _ in _all_part_keys(pool, folder, id_col, only_to_write=True):
                pass
    except (OSError, pa.ArrowException) as exc:  # the run's work is done: this only costs the next scan time
        _cache_not_written(exc)


def read_new_parts(folder: PartFolder, known: set[str], id_col: str, *, run_id: str | None = None) -> NewParts:
    """The (hash key, id tag) rows of the parts not in ``known``: what other runs wrote since this
    run's scan. Runs on a worker thread; the caller adds them to its index (:meth:`NewParts.add_to`).
    ``run_id``: the caller's, whose result parts are left out (one just written may not be in
    ``known`` yet, and its index learns only some of its own results)."""
    new = NewParts()
    for path in folder.result_files():
        if path not in known and (run_id is None or folder.metadata(path).get("run_id") != run_id):
            new.results.append((path, [part_keys(folder, path, id_col)[0]]))
    for path in folder.error_files():
        if path not in known:
            new.errors.append((path, [(keys, tags) for keys, tags, _ in error_keys(folder, path, id_col)]))
    return new


def part_keys(folder: PartFolder, path: str, id_col: str) -> tuple[np.ndarray, np.ndarray]:
    """A result part's rows as (hash keys, :func:`pair_keys`), each sorted: what confirms a match of
    the index."""
    with folder.fs.open(path, "rb") as f:
        table = pq.ParquetFile(f).read(columns=[id_col, "content_hash"])
    contents = hash_keys(table.column("content_hash"))
    pairs = pair_keys(contents, exact_id_keys(table.column(id_col)))
    contents.sort()
    pairs.sort()
    return contents, pairs


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


def _cache_not_written(exc: BaseException) -> None:
    log.warning("the output's key cache (_index/) was not written (%s): the next run reads the parts again", exc)
