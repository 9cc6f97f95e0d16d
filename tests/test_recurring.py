"""A first run remembers only the results of contents that recur in its input (tasks/engine/plan/recurring.py)."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pyarrow as pa
from conftest import TEST_KEY_ENV, assert_balanced, read_output, write_corpus

from tasks.engine.plan.input import InputSource
from tasks.engine.plan.recurring import PREPASS_CHUNK_ROWS, recurring_contents
from tasks.engine.plan.rows import prepare_chunk
from tasks.engine.run import RunOptions, run_job
from tasks.engine.send.chunk import process_chunk
from tasks.jobs.embed import EmbedJob
from tasks.provider.client import ProviderSettings

MODEL = "gemini-embedding-001"


def test_recurring_contents_are_the_keys_seen_more_than_once_across_pre_pass_chunks(tmp_path):
    rows = 2 * PREPASS_CHUNK_ROWS + 500
    texts = [f"passage {i}" for i in range(rows)]
    # Recurring across pre-pass chunks, within one, three times, and a null row (hashed the per-row way).
    for dst, src in [(rows - 1, 3), (PREPASS_CHUNK_ROWS + 7, 5), (40, 41), (rows - 2, 3)]:
        texts[dst] = texts[src]
    texts[100] = None
    src = write_corpus(tmp_path / "in.parquet", list(range(rows)), texts)
    job = EmbedJob(model=MODEL, dimensions=8)
    keys = prepare_chunk(job, pa.table({"id": pa.array(range(rows), pa.int64()), "text": texts})).keys
    expected = sorted(k for k, n in Counter(keys.tolist()).items() if n > 1)
    assert len(expected) == 3

    found = recurring_contents(job, InputSource.open(str(src)), "id", rows)
    assert found.dtype == np.uint64 and found.tolist() == expected
    # Only the first rows count (--limit): row rows-1 and rows-2 repeat row 3, beyond the limit.
    found = recurring_contents(job, InputSource.open(str(src)), "id", PREPASS_CHUNK_ROWS + 100)
    assert found.tolist() == sorted({int(keys[5]), int(keys[40])})


def test_a_first_run_learns_only_the_recurring_contents_and_still_reuses_them(emulator, tmp_path):
    ids = list(range(400))
    texts = [f"passage {i} of the corpus" for i in ids]
    texts[390] = texts[10]  # recurs 7 chunks later
    texts[391] = texts[11]
    src = write_corpus(tmp_path / "in.parquet", ids, texts)
    learnt: list[int] = []

    async def watching(ctx, chunk, index, first_row):
        report = await process_chunk(ctx, chunk, index, first_row)
        learnt.append(len(ctx.output.index.results))
        return report

    options = RunOptions(
        input=str(src),
        output=str(tmp_path / "out"),
        provider=ProviderSettings(provider="local", base_url=emulator.base_url, api_key_env=TEST_KEY_ENV, timeout_s=5),
        chunk_size=50,
    )
    emulator.reset_stats()
    doc = asyncio.run(run_job(EmbedJob(model=MODEL, dimensions=8), options, chunk_runner=watching))
    assert emulator.stats["embedding_inputs"] == 398
    assert doc["counts"]["succeeded"] == 398 and doc["counts"]["deduplicated"] == 2
    assert_balanced(doc)
    assert max(learnt) == 2  # of 398 results sent, the index held the two that come back
    result = read_output(tmp_path / "out")
    assert result.height == 400 and result["id"].n_unique() == 400
    by_id = dict(zip(result["id"].to_list(), result["embedding"].to_list()))
    assert by_id[390] == by_id[10] and by_id[391] == by_id[11] and by_id[10] != by_id[11]

    # The rerun (the output holds every row) skips the pre-pass and sends nothing.
    emulator.reset_stats()
    doc = asyncio.run(run_job(EmbedJob(model=MODEL, dimensions=8), options, chunk_runner=watching))
    assert emulator.stats["embedding_inputs"] == 0 and doc["counts"]["skipped_done"] == 400
