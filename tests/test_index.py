"""The done-key index in flat memory: fixed-width keys, stable across processes, vectorised
lookups, streaming id check and superseding, and a rerun that starts no task for a finished chunk."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, TEST_KEY_ENV, assert_balanced, read_errors, read_output, write_corpus

from tasks.engine.plan.content_table import FP_LEVEL_ROWS, FP_MAX_LEVELS, FP_PARTITIONS, ContentTable
from tasks.engine.plan.input import InputSource, check_ids
from tasks.engine.plan.key_table import KeyTable
from tasks.engine.plan.keys import exact_id_keys, hash_key, hash_keys, id_tags, pair_key
from tasks.engine.plan.rows import content_hash, content_hashes, prepare_chunk
from tasks.engine.run import RunOptions, run_job
from tasks.engine.send.chunk import process_chunk
from tasks.engine.store.output import OutputStore
from tasks.errors import InputError
from tasks.jobs.embed import EmbedJob
from tasks.provider.client import ProviderSettings

MODEL = "gemini-embedding-001"


def sha(i: object) -> str:
    return hashlib.sha256(repr(i).encode()).hexdigest()


def run_embed(emu, src, out, **kw):
    job = EmbedJob(model=MODEL, dimensions=8, batch_size=kw.pop("batch_size", 100))
    runner = kw.pop("chunk_runner", process_chunk)
    options = RunOptions(
        input=str(src),
        output=str(out),
        provider=ProviderSettings(provider="local", base_url=emu.base_url, api_key_env=TEST_KEY_ENV, timeout_s=5),
        chunk_size=kw.pop("chunk_size", 50),
        **kw,
    )
    return asyncio.run(run_job(job, options, chunk_runner=runner))


# -- keys and tables ------------------------------------------------------------------------------


def test_hash_keys_are_the_first_64_bits_of_the_content_hash_from_lists_and_arrow():
    hashes = [sha(i) for i in range(5000)]
    keys = hash_keys(hashes)
    assert keys.dtype == np.uint64
    assert keys.tolist() == [int(h[:16], 16) for h in hashes] == [hash_key(h) for h in hashes]
    array = pa.array(hashes)
    assert (hash_keys(array) == keys).all()
    assert (hash_keys(array.slice(17, 100)) == keys[17:117]).all()
    assert (hash_keys(pa.chunked_array([array.slice(0, 10), array.slice(10)])) == keys).all()
    assert (hash_keys(array.cast(pa.large_string())) == keys).all()


def test_key_table_answers_like_python_sets_with_duplicated_contents_and_many_runs():
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 2**64, 30_000, dtype=np.uint64)
    keys[1000:1100] = keys[:100]  # the same content under other ids (a deduplicated row)
    tags = rng.integers(0, 2**32, 30_000, dtype=np.uint32)
    table = KeyTable()
    for lo in range(0, 20_000, 500):  # many small adds: runs merge as they grow
        table.add(keys[lo : lo + 500], tags[lo : lo + 500], lo // 500)
    assert len(table) == 20_000 and table.runs <= 16 * 16
    pairs = set(zip(keys[:20_000].tolist(), tags[:20_000].tolist()))
    known = set(keys[:20_000].tolist())
    q_keys = np.concatenate([keys, keys[:500]])
    q_tags = np.concatenate([tags, rng.integers(0, 2**32, 500, dtype=np.uint32)])
    expected = [(k, t) in pairs for k, t in zip(q_keys.tolist(), q_tags.tolist())]
    assert table.has_pairs(q_keys, q_tags).tolist() == expected
    # Contents are matched on the hash key's top 32 bits (confirmed by the content hash by the engine).
    known_high = {k >> 32 for k in known}
    assert table.has_keys(q_keys).tolist() == [k >> 32 in known_high for k in q_keys.tolist()]
    assert all(k in known for k in keys[:20_000].tolist())
    where = table.locate(keys[[0, 499, 500, 19_999, 25_000]])
    # keys[0] is also row 1000's content (part 2): either part holds it.
    assert where.tolist()[1:] == [0, 1, 39, -1] and where[0] in (0, 2)
    table.compact()
    assert table.runs <= 16
    assert table.has_pairs(q_keys, q_tags).tolist() == expected
    assert (int(keys[5]), int(tags[5])) in table and int(keys[5]) in table
    assert (int(keys[5]), int(tags[5]) ^ 1) not in table and int(keys[25_000]) not in table


def test_content_table_names_every_part_a_prefix_matches_from_levels_and_a_bulk_load():
    rng = np.random.default_rng(11)
    keys = rng.integers(0, 2**64, 120_000, dtype=np.uint64)
    keys[7000:7300] = keys[:300]  # the same content in other parts (rows deduplicated or superseded)
    keys[9000:9010] = keys[5]
    locs = np.arange(len(keys)) // 1000
    expected: dict[int, set[int]] = {}
    for k, loc in zip(keys.tolist(), locs.tolist()):
        expected.setdefault(k >> 32, set()).add(loc)
    grown = ContentTable()
    for lo in range(0, len(keys), 1000):  # a run's chunks, one level each, merging as they grow
        grown.add(keys[lo : lo + 1000], lo // 1000)
    bulk = ContentTable()
    loader = bulk.loader()
    for lo in range(0, len(keys), 7000):
        loader.add(keys[lo : lo + 7000], locs[lo : lo + 7000])
    loader.finish()
    assert bulk.levels == 1 and 1 < grown.levels <= 8 and len(bulk) == len(grown) == len(keys)
    queries = np.concatenate([keys[::97], rng.integers(0, 2**64, 3000, dtype=np.uint64), keys[:1] | np.uint64(7)])
    for table in (grown, bulk):
        positions, found = table.candidates(queries)
        got: dict[int, set[int]] = {}
        for pos, loc in zip(positions.tolist(), found.tolist()):
            got.setdefault(pos, set()).add(loc)
        for pos, key in enumerate(queries.tolist()):
            assert got.get(pos, set()) == expected.get(key >> 32, set()), pos
        assert table.has_keys(queries).tolist() == [(k >> 32) in expected for k in queries.tolist()]


def test_a_content_table_grown_past_its_level_limit_is_rebuilt_into_one_level_and_still_answers():
    rng = np.random.default_rng(5)
    keys = rng.integers(0, 2**64, 9 * FP_LEVEL_ROWS + 12_345, dtype=np.uint64)
    keys[-100:] = keys[:100]  # the same contents again, at other locations
    locs = (np.arange(len(keys)) // 2000) % 65536
    table = ContentTable()
    step = FP_LEVEL_ROWS // 2
    for lo in range(0, len(keys), step):
        table.add(keys[lo : lo + step], locs[lo : lo + step])
        assert table.levels <= FP_MAX_LEVELS
    assert len(table) == len(keys) and table.nbytes <= 4 * len(keys) + table.levels * 8 * (FP_PARTITIONS + 1)
    order = np.argsort(keys >> np.uint64(32), kind="stable")
    prefixes = (keys >> np.uint64(32))[order]
    queries = np.concatenate([keys[:: len(keys) // 500], keys[-100:], rng.integers(0, 2**64, 500, dtype=np.uint64)])
    positions, found = table.candidates(queries)
    for pos, key in enumerate(queries.tolist()):
        lo, hi = np.searchsorted(prefixes, [key >> 32, (key >> 32) + 1])
        assert sorted(found[positions == pos].tolist()) == sorted(locs[order[lo:hi]].tolist()), pos


def test_index_memory_per_row_is_fixed_width():
    rows = 100_000
    table = ContentTable()
    loader = table.loader()
    for lo in range(0, rows, 2000):
        loader.add(hash_keys([sha(i) for i in range(lo, lo + 2000)]), np.full(2000, lo // 2000))
    loader.finish()
    # 2 (the hash key's bits 32-47) + 2 (part) bytes a row, and one table of 65,537 offsets;
    # Python sets of ints held ~100+ bytes a row.
    assert table.nbytes == 4 * rows + 8 * (FP_PARTITIONS + 1)
    seen = KeyTable(payload=False)
    seen.add(exact_id_keys(pa.array(range(rows))))
    assert seen.nbytes / rows <= 8.5


def test_a_scanned_output_is_held_in_4_bytes_a_row_and_matches_are_confirmed_in_the_parts(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.prepare()
    for lo in range(0, 60_000, 20_000):
        ids = [f"doc-{i}" for i in range(lo, lo + 20_000)]
        table = pa.table({"id": ids, "content_hash": [sha(i) for i in ids], "model": ["m"] * len(ids)})
        store.write_part(table, errors=False, run_id="r", id_col="id")
    index = store.scan("id")
    assert index.result_rows == 60_000
    assert index.nbytes() == 4 * 60_000 + 8 * (FP_PARTITIONS + 1)
    ids = [f"doc-{i}" for i in range(59_990, 60_010)]
    keys = hash_keys([sha(i) for i in ids])
    assert index.pairs_done(keys, pa.array(ids)).tolist() == [True] * 10 + [False] * 10
    # The same contents under other ids: stored, not done.
    others = pa.array([f"other-{i}" for i in range(20)])
    assert index.pairs_done(keys, others).tolist() == [False] * 20
    assert index.contents_stored(keys).tolist() == [True] * 10 + [False] * 10
    (holding,) = index.parts_holding(keys[:1])
    assert "doc-59990" in pq.read_table(holding).column("id").to_pylist()


SCAN_IN_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from tasks.engine.store.output import OutputStore
from tasks.engine.plan.keys import pair_key
index = OutputStore(sys.argv[2]).scan("id")
levels = [[lv.offsets.tolist(), lv.entries.tolist()] for lv in index.results._levels]
print(json.dumps({"levels": levels, "pair": list(pair_key("doc-7", "ab" * 32))}))
"""


def test_keys_are_stable_across_processes_with_other_hash_seeds(tmp_path):
    """Python's hash() of a str changes with every process: the index's keys must not."""
    out = tmp_path / "out"
    store = OutputStore(str(out))
    store.prepare()
    ids = [f"doc-{i}" for i in range(300)]
    store.write_part(
        pa.table({"id": ids, "content_hash": [sha(i) for i in ids]}), errors=False, run_id="r", id_col="id"
    )
    answers = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        child = subprocess.run(
            [sys.executable, "-c", SCAN_IN_CHILD, str(REPO), str(out)], env=env, capture_output=True, text=True
        )
        assert child.returncode == 0, child.stderr
        answers.append(json.loads(child.stdout))
    index = store.scan("id")
    here = [[lv.offsets.tolist(), lv.entries.tolist()] for lv in index.results._levels]
    assert answers[0]["levels"] == answers[1]["levels"] == here
    assert answers[0]["pair"] == answers[1]["pair"] == list(pair_key("doc-7", "ab" * 32))
    # Integer ids hash alike whatever their width; strings alike as string or large_string.
    assert (id_tags(pa.array([1, 2, 3], pa.int32())) == id_tags(pa.array([1, 2, 3], pa.int64()))).all()
    assert (id_tags(pa.array(["a", "b"])) == id_tags(pa.array(["a", "b"], pa.large_string()))).all()
    assert (exact_id_keys(pa.array([1, 2], pa.int32())) == exact_id_keys(pa.array([1, 2], pa.int64()))).all()


def test_content_hashes_match_content_hash_byte_for_byte():
    rows = [{"job": "embed", "model": "m", "dimensions": 64, "input": f'text "{i}" é\n\u2028 \\'} for i in range(300)]
    rows[3] = {"invalid": {"text": None}, "job": "embed", "model": "m"}
    rows[4]["dimensions"] = True  # True == 1 but encodes otherwise
    rows[5]["dimensions"] = 64.0
    rows[6]["input"] = None
    rows[7]["extra"] = [1, {"b": 2, "a": 1}]
    rows[8]["input"] = b"bytes"  # default=str
    several = [
        {"job": "x", "n": i % 3, "opts": {"b": [1, 2], "a": float("nan")}, "prompt": f"p{i}", "size": "1x1"}
        for i in range(50)
    ]
    for batch in (rows, several, rows[:3], [{"b": 1, "a": "z"}, {"a": 1}] * 3):
        assert content_hashes(batch) == [content_hash(f) for f in batch]
    reference = json.dumps(rows[0], sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    assert content_hashes(rows)[0] == hashlib.sha256(reference.encode()).hexdigest()


# -- the id check ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["int", "str"])
def test_id_check_streams_and_still_names_duplicates(tmp_path, kind):
    n = 30_000
    ids = list(range(n)) if kind == "int" else [f"id-{i}" for i in range(n)]
    ids[20_000], ids[29_999] = ids[5], ids[7]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ids, "text": ["t"] * n}), path)
    source = InputSource.open(str(path))
    with pytest.raises(
        InputError, match=r"2 duplicated id\(s\), e.g. .*5'? at data rows 6, 20001; .*7'? at data rows 8, 30000"
    ):
        check_ids(source, "id", limit=None, chunk_size=4096)
    assert check_ids(source, "id", limit=20_000, chunk_size=4096) == 20_000  # the duplicates lie past the limit


def test_id_check_in_slices_of_the_key_space_and_for_ids_that_only_grow(tmp_path):
    n = 30_000
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": pa.array(range(n), pa.int64()), "text": ["t"] * n}), path, row_group_size=7000)
    source = InputSource.open(str(path))
    assert check_ids(source, "id", limit=None, chunk_size=4096, max_bytes=1024) == n  # growing: nothing kept
    # Growing until the last row repeats an earlier id: the key table takes over, here 30 slices of it.
    ids = [*range(n - 1), 5]
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "text": ["t"] * n}), path, row_group_size=7000)
    with pytest.raises(InputError, match=r"1 duplicated id\(s\), e.g. 5 at data rows 6, 30000"):
        check_ids(InputSource.open(str(path)), "id", limit=None, chunk_size=4096, max_bytes=8 * 1000)
    strings = [f"id-{i}" for i in range(n)]
    strings[12_345] = strings[29_000]
    pq.write_table(pa.table({"id": strings, "text": ["t"] * n}), path)
    with pytest.raises(InputError, match=r"'id-29000' at data rows 12346, 29001"):
        check_ids(InputSource.open(str(path)), "id", limit=None, chunk_size=4096, max_bytes=8 * 1000)


# -- superseding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_bytes", [32 << 20, 256])  # 256 bytes of ids: the key space read in 7 slices
def test_superseding_across_parts_keeps_the_newest_record_and_rewrites_only_stale_parts(tmp_path, max_bytes):
    store = OutputStore(str(tmp_path / "out"))
    store.prepare()

    def part(ids, tag, errors=False):
        table = {
            "id": pa.array(ids, pa.int64()),
            "content_hash": [sha((i, tag)) for i in ids],
            "value": [tag] * len(ids),
        }
        path = store.write_part(pa.table(table), errors=errors, run_id=tag, id_col="id")
        time.sleep(0.002)
        return path

    old = part(list(range(0, 100)), "old")
    untouched = part(list(range(100, 200)), "untouched")
    part([5, 300, 1000], "failed", errors=True)
    newer = part([5, 6, 7, 7], "newer")  # id 7 twice in one part (n images): they stand together
    fixed = part([300], "fixed")
    before = os.path.getmtime(untouched)

    assert store.compact("id", max_bytes=max_bytes) == 2 + 1 + 1 + 1  # 5, 6, 7 from old; 5 and 300 from failed
    out, errors = read_output(tmp_path / "out"), read_errors(tmp_path / "out")
    latest = dict(zip(out["id"].to_list(), out["value"].to_list()))
    assert latest[5] == latest[6] == latest[7] == "newer" and latest[300] == "fixed" and latest[0] == "old"
    assert out.height == 201 + 1 and sorted(out["id"].to_list()).count(7) == 2
    assert errors["id"].to_list() == [1000]  # an error stands while no result came after it
    assert os.path.getmtime(untouched) == before  # a part without stale rows is not rewritten
    assert {old, newer, fixed} <= {str(p) for p in (tmp_path / "out").glob("part-*")}
    assert store.compact("id", max_bytes=max_bytes) == 0


def test_superseding_and_reuse_at_the_engine_read_only_the_parts_they_need(emulator, tmp_path, monkeypatch):
    ids = list(range(400))
    texts = [f"passage {i} of the corpus" for i in ids]
    src = write_corpus(tmp_path / "in.parquet", ids, texts)
    out = tmp_path / "out"
    run_embed(emulator, src, out)
    parts = len(list(out.glob("part-*")))
    assert parts == 8

    files_read = []
    original = OutputStore.read_results_for

    def spy(self, hashes, id_col, *, files=None):
        files_read.append(files)
        return original(self, hashes, id_col, files=files)

    monkeypatch.setattr(OutputStore, "read_results_for", spy)
    texts[17] = "passage 17, rewritten"
    write_corpus(src, [*ids, 400], [*texts, texts[123]])  # id 400 shares its text with id 123
    emulator.reset_stats()
    doc = run_embed(emulator, src, out)
    assert emulator.stats["embedding_inputs"] == 1
    assert doc["counts"]["deduplicated"] == 1 and doc["output"]["superseded_rows_removed"] == 1
    assert_balanced(doc)
    assert len(files_read) == 1 and len(files_read[0]) == 1  # the one part that holds id 123's vector
    result = read_output(out)
    assert result.height == 401 and result["id"].n_unique() == 401
    by_id = dict(zip(result["id"].to_list(), result["embedding"].to_list()))
    assert by_id[400] == by_id[123]


def test_a_rerun_starts_no_chunk_task_and_a_first_run_skips_compaction(emulator, tmp_path, monkeypatch):
    src = write_corpus(tmp_path / "in.parquet", list(range(300)), [f"row {i}" for i in range(300)])
    calls = []

    async def counting(ctx, chunk, index, first_row):
        calls.append(index)
        return await process_chunk(ctx, chunk, index, first_row)

    compactions = []
    original = OutputStore.compact
    monkeypatch.setattr(OutputStore, "compact", lambda self, id_col: compactions.append(1) or original(self, id_col))
    doc = run_embed(emulator, src, tmp_path / "out", chunk_runner=counting)
    assert sorted(calls) == list(range(6)) and compactions == []  # ids are unique: nothing to supersede
    calls.clear()
    doc = run_embed(emulator, src, tmp_path / "out", chunk_runner=counting)
    assert calls == [] and doc["counts"]["skipped_done"] == 300 and doc["requests"]["sent"] == 0
    assert_balanced(doc)
    # The first run left its parts' keys in OUTPUT/_index/: the rerun read none of the parts to learn them.
    assert doc["output"]["existing_parts"] == doc["output"]["parts_from_key_cache"] == 6
    # One changed row: one chunk runs (numbered by its place in the input), and compaction runs.
    write_corpus(src, list(range(300)), [f"row {i}" if i != 160 else "changed" for i in range(300)])
    doc = run_embed(emulator, src, tmp_path / "out", chunk_runner=counting)
    assert calls == [3] and compactions == [1] and doc["output"]["superseded_rows_removed"] == 1
    assert doc["output"]["parts_from_key_cache"] == 6
    # That run rewrote a part and wrote one: it brought the cache up to date, and the next run is a pure rerun.
    doc = run_embed(emulator, src, tmp_path / "out", chunk_runner=counting)
    assert calls == [3] and doc["counts"]["skipped_done"] == 300
    assert doc["output"]["existing_parts"] == doc["output"]["parts_from_key_cache"] == 7


def test_done_index_answers_from_the_parts_and_frees_its_tables(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.prepare()
    store.write_part(pa.table({"id": ["x"], "content_hash": ["ab" * 32]}), errors=False, run_id="r", id_col="id")
    index = store.scan("id")
    index.errors.add(hash_keys(["cd" * 32]), id_tags(["y"]))
    keys = hash_keys(["ab" * 32, "ab" * 32, "cd" * 32])
    assert index.pairs_done(keys, ["x", "y", "x"]).tolist() == [True, False, False]
    assert index.contents_stored(keys).tolist() == [True, True, False]
    assert hash_key("ab" * 32) in index.results and pair_key("y", "cd" * 32) in index.errored_pairs
    index.clear()
    assert index.pairs_done(keys, ["x", "y", "x"]).tolist() == [False] * 3 and index.nbytes() == 0


def colliding_texts() -> tuple[str, str]:
    """Two texts whose content hashes (embed, 8 dimensions) share their first 32 bits: a birthday
    search over 300,000 texts, hashed a column at once."""
    job = EmbedJob(model=MODEL, dimensions=8)
    texts = [f"probe {i}" for i in range(300_000)]
    ready = prepare_chunk(job, pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": texts}))
    high = ready.keys >> np.uint64(32)
    order = np.argsort(high, kind="stable")
    same = np.flatnonzero(high[order][1:] == high[order][:-1])
    assert len(same), "no 32-bit collision among 300,000 hashes (expected ~10)"
    a, b = order[same[0]], order[same[0] + 1]
    assert ready.hashes[a] != ready.hashes[b]
    return texts[a], texts[b]


def test_a_content_that_only_looks_stored_is_sent(emulator, tmp_path):
    """Contents are located by 32 bits of their hash: a new text that shares them with a stored one
    must be sent, not given the stored vector (or none)."""
    stored, lookalike = colliding_texts()
    src = write_corpus(tmp_path / "in.parquet", [1], [stored])
    out = tmp_path / "out"
    run_embed(emulator, src, out)
    write_corpus(src, [1, 2], [stored, lookalike])
    emulator.reset_stats()
    doc = run_embed(emulator, src, out)
    assert emulator.stats["embedding_inputs"] == 1
    assert doc["counts"]["succeeded"] == 1 and doc["counts"]["deduplicated"] == 0
    assert doc["counts"]["skipped_done"] == 1
    assert_balanced(doc)
    result = read_output(out).sort("id")
    assert result["id"].to_list() == [1, 2]
    want = [content_hash({"job": "embed", "model": MODEL, "dimensions": 8, "input": t}) for t in (stored, lookalike)]
    assert result["content_hash"].to_list() == want
    vectors = result["embedding"].to_list()
    assert vectors[0] != vectors[1]
