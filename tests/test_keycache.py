"""The output's key cache (OUTPUT/_index/keys.bin): a rescan reads the parts' keys from one
file, gives the same answers as reading the parts, and never trusts an entry that doesn't match the
part as it is now (rewritten, added, removed) or a file that doesn't check out."""

from __future__ import annotations

import hashlib
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.engine.plan.keys import hash_keys
from tasks.engine.store.keycache import INDEX_DIR, KEYS_FILE
from tasks.engine.store.output import OutputStore


def sha(i: object) -> str:
    return hashlib.sha256(repr(i).encode()).hexdigest()


def write_parts(store: OutputStore, ranges, *, tag="v1") -> list[str]:
    paths = []
    for lo, hi in ranges:
        ids = [f"doc-{i}" for i in range(lo, hi)]
        table = pa.table({"id": ids, "content_hash": [sha((i, tag)) for i in ids], "value": [tag] * len(ids)})
        paths.append(store.write_part(table, errors=False, run_id=tag, id_col="id"))
        time.sleep(0.002)
    return paths


def answers(index, rows, tag="v1"):
    """(done?, stored?) of doc-<i> with its text of ``tag``, for each i in rows."""
    ids = [f"doc-{i}" for i in rows]
    keys = hash_keys([sha((i, tag)) for i in ids])
    return index.pairs_done(keys, pa.array(ids)).tolist(), index.contents_stored(keys).tolist()


def levels(index):
    return [(lv.offsets.tolist(), lv.entries.tolist()) for lv in index.results._levels]


def test_a_rescan_reads_every_part_from_the_cache_and_answers_alike(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.prepare()
    write_parts(store, [(0, 3000), (3000, 6000), (6000, 6500)])
    first = store.scan("id")
    cache = tmp_path / "out" / INDEX_DIR / KEYS_FILE
    assert first.cached_parts == 0 and cache.exists()
    assert cache.stat().st_size > 16 * 6500  # 16 bytes a row, then the manifest
    second = store.scan("id")
    assert second.cached_parts == 3 and second.result_rows == first.result_rows == 6500
    assert levels(second) == levels(first)
    rows = [0, 1, 2999, 3000, 6499, 6500, 7000]
    assert answers(second, rows) == answers(first, rows) == ([True] * 5 + [False] * 2, [True] * 5 + [False] * 2)
    # An unchanged output leaves the file as it was: a scan that found everything writes nothing.
    before = cache.stat().st_mtime_ns
    assert store.scan("id").cached_parts == 3 and cache.stat().st_mtime_ns == before
    # The output still reads as the clean result table.
    assert pq.read_table(tmp_path / "out").num_rows == 6500


def test_a_rewritten_added_or_removed_part_is_read_from_the_output_and_the_cache_follows(tmp_path):
    out = tmp_path / "out"
    store = OutputStore(str(out))
    store.prepare()
    a, b, c = write_parts(store, [(0, 1000), (1000, 2000), (2000, 3000)])
    store.scan("id")
    # Compaction rewrites a part in place (same name, fewer rows): its entry no longer matches.
    store._drop_rows(b, np.arange(0, 500))
    write_parts(store, [(3000, 3200)])  # a new part
    (out / a.rsplit("/", 1)[-1]).unlink()  # a part removed
    index = store.scan("id")
    assert index.cached_parts == 1 and index.result_rows == 500 + 1000 + 200
    done, stored = answers(index, [0, 999, 1000, 1499, 1500, 1999, 2000, 3199])
    assert done == [False, False, False, False, True, True, True, True]
    assert stored == done
    # The cache now names the parts as they are: the next scan reads all three from it.
    again = store.scan("id")
    assert again.cached_parts == 3 and answers(again, [0, 1499, 1500, 3199]) == answers(index, [0, 1499, 1500, 3199])
    assert c in again.parts


def test_a_damaged_or_foreign_cache_is_never_trusted(tmp_path):
    out = tmp_path / "out"
    store = OutputStore(str(out))
    store.prepare()
    write_parts(store, [(0, 2000), (2000, 4000)])
    truth = store.scan("id")
    expected = answers(truth, [0, 1999, 2000, 3999, 4000])
    cache = out / INDEX_DIR / KEYS_FILE
    # A flipped byte in the first part's keys: that entry fails its checksum, the part is read instead.
    data = bytearray(cache.read_bytes())
    data[100] ^= 0xFF
    cache.write_bytes(bytes(data))
    index = store.scan("id")
    assert index.cached_parts == 1 and answers(index, [0, 1999, 2000, 3999, 4000]) == expected
    assert levels(index) == levels(truth)
    # Cut short (a torn copy): no trailer, the whole file is ignored and written anew.
    cache.write_bytes(cache.read_bytes()[:-7])
    index = store.scan("id")
    assert index.cached_parts == 0 and answers(index, [0, 1999, 2000, 3999, 4000]) == expected
    assert store.scan("id").cached_parts == 2
    # Keys made for another id column are not these keys.
    two = OutputStore(str(tmp_path / "two"))
    two.prepare()
    table = pa.table({"id": ["x", "z"], "other": ["y", "x"], "content_hash": [sha("x"), sha("z")]})
    two.write_part(table, errors=False, run_id="r", id_col="id")
    assert two.scan("id").cached_parts == 0 and two.scan("id").cached_parts == 1
    by_other = two.scan("other")
    assert by_other.cached_parts == 0
    assert by_other.pairs_done(hash_keys([sha("x"), sha("z")]), pa.array(["y", "z"])).tolist() == [True, False]


def test_a_dry_run_scan_reads_the_cache_but_never_writes_it(tmp_path):
    out = tmp_path / "out"
    store = OutputStore(str(out))
    store.prepare()
    write_parts(store, [(0, 100)])
    index = store.scan("id", keep_keys=False)
    assert index.result_rows == 100 and not (out / INDEX_DIR).exists()
    store.scan("id")
    write_parts(store, [(100, 200)])
    before = (out / INDEX_DIR / KEYS_FILE).read_bytes()
    assert store.scan("id", keep_keys=False).cached_parts == 1
    assert (out / INDEX_DIR / KEYS_FILE).read_bytes() == before


def test_an_output_on_an_fsspec_store_keeps_its_keys_too(tmp_path):
    """memory:// stands for object stores: no rename of an open file, no local paths."""
    store = OutputStore(f"memory://keys-{uuid.uuid4().hex}/out")
    store.prepare()
    write_parts(store, [(0, 500), (500, 1000)])
    first = store.scan("id")
    assert first.cached_parts == 0 and store.fs.exists(f"{store.root}/{INDEX_DIR}/{KEYS_FILE}")
    second = store.scan("id")
    assert second.cached_parts == 2 and levels(second) == levels(first)
    assert answers(second, [0, 999, 1000]) == ([True, True, False], [True, True, False])
