"""Content hashes a column at once (tasks/engine/plan/hashing.py): the same bytes as the per-row path, so an
output written before is still recognised as done, row for row."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from conftest import TEST_KEY_ENV, assert_balanced, read_output

from schemas.examples import Invoice
from tasks.engine.plan.hashing import HashProcesses, non_blank
from tasks.engine.plan.rows import chunk_payloads, prepare_chunk, prepare_rows, row_hashes
from tasks.engine.run import RunOptions, run_job
from tasks.engine.store.output import OutputStore
from tasks.jobs.embed import EmbedJob
from tasks.jobs.extract import ExtractJob
from tasks.provider.client import ProviderSettings

EMBED_MODEL = "gemini-embedding-001"
CHAT_MODEL = "gemini-3.8-flash"

TRICKY = [
    "plain words",
    'a "quoted" word',
    "back\\slash and \\u0041 that is not an escape",
    "tab\tnewline\ncarriage\rform\x0cbell\x07 nul\x00 unit\x1f",
    "accents é ü ß, 中文, emoji 🎉🧪, RTL שלום",
    "line\u2028separator and paragraph\u2029separator",
    "del \x7f and next-line \x85 and nbsp \xa0 inside words",
    "  padded with spaces  ",
    "\u3000ideographic space first",
    "x",
    "long " * 400,
]
BLANK = ["", " ", "\t\n", "\u3000\u2028", "\x1c\x1d\x1e\x1f", "\x85\xa0"]


def per_row_hashes(job, table: pa.Table) -> list[str]:
    """What every version before the column-at-once path computed: prepare each row, hash its fields."""
    payloads, decoded = chunk_payloads(table, job)
    return row_hashes(job, payloads, prepare_rows(job, payloads, decoded=decoded))


def jobs():
    return [
        EmbedJob(model=EMBED_MODEL),
        EmbedJob(model=EMBED_MODEL, dimensions=64),
        ExtractJob(model=CHAT_MODEL, schema=Invoice),
        ExtractJob(model=CHAT_MODEL, schema=Invoice, prompt='Say "hi"\n', reasoning_effort="low"),
    ]


def test_python_whitespace_is_exactly_what_non_blank_treats_as_blank():
    points = [c for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    chars = [chr(c) for c in points]
    got = non_blank(pa.array(chars, pa.string()))
    want = np.array([not ch.isspace() for ch in chars])
    assert np.array_equal(got, want), [hex(points[i]) for i in np.flatnonzero(got != want)[:10]]


def test_column_hashes_equal_the_per_row_hashes_for_any_text_and_column_type():
    rng = random.Random(7)
    alphabet = [chr(c) for c in (*range(0, 0x80), 0x85, 0xA0, 0xE9, 0x2028, 0x3000, 0x4E2D, 0x1F389)]
    texts = [*TRICKY, *BLANK, None, *("".join(rng.choices(alphabet, k=rng.randint(1, 60))) for _ in range(300))]
    texts.append("y" * (4 * 2048 - 3))  # the longest text embed accepts (2048 tokens at ~4 characters)
    texts.append("y" * (4 * 2048 - 2))  # one character too long: an invalid row
    for job in jobs():
        for kind in (pa.string(), pa.large_string(), pa.binary()):
            values = [t.encode() if t is not None and kind == pa.binary() else t for t in texts]
            table = pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": pa.array(values, kind)})
            ready = prepare_chunk(job, table)
            assert ready.hashes == per_row_hashes(job, table), (job, kind)
            # Only the rows that can't be hashed at once were prepared (blank, null, too long).
            assert sum(p is not None for p in ready.prepared) <= len(BLANK) + 2 + 1
            assert int(ready.invalid.sum()) == sum(p is not None and not hasattr(p, "fields") for p in ready.prepared)


def test_the_hashed_bytes_are_todays_json_formula():
    """Pinned independently of the engine: sha256 of json.dumps(fields, sort_keys=True, compact)."""
    job = EmbedJob(model=EMBED_MODEL, dimensions=64)
    table = pa.table({"id": pa.array(range(len(TRICKY)), pa.int64()), "text": TRICKY})
    want = [
        hashlib.sha256(
            json.dumps(
                {"job": "embed", "model": EMBED_MODEL, "dimensions": 64, "input": text},
                sort_keys=True,
                ensure_ascii=False,
                separators=(",", ":"),
            ).encode()
        ).hexdigest()
        for text in TRICKY
    ]
    assert prepare_chunk(job, table).hashes == want


def options(emu, src: Path, out: Path, chunk_size: int = 7) -> RunOptions:
    return RunOptions(
        input=str(src),
        output=str(out),
        provider=ProviderSettings(provider="local", base_url=emu.base_url, api_key_env=TEST_KEY_ENV, timeout_s=5),
        chunk_size=chunk_size,
    )


def write_old_output(out: Path, job, table: pa.Table, columns: dict[str, pa.Array]) -> None:
    """An output folder as the per-row path left it: its content hashes computed row by row."""
    store = OutputStore(str(out))
    store.prepare()
    store.claim(job=job.name, model=job.model, run_id="old", force=False)
    part = pa.table(
        {
            "id": table.column("id"),
            **columns,
            "content_hash": pa.array(per_row_hashes(job, table), pa.string()),
            "model": pa.array([job.model] * table.num_rows, pa.string()),
        }
    )
    store.write_part(part, errors=False, run_id="old", id_col="id")


def test_an_output_written_by_the_per_row_path_is_fully_skipped(emulator, tmp_path):
    texts = [f"{t} #{i}" for i in range(3) for t in TRICKY]
    table = pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": texts})
    src = tmp_path / "in.csv"  # CSV: the text column arrives as bytes
    pcsv.write_csv(table, src)
    out = tmp_path / "out"
    job = EmbedJob(model=EMBED_MODEL, dimensions=8)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(8 * len(texts), np.float32)), 8)
    write_old_output(out, job, table, {"embedding": vectors})

    doc = asyncio.run(run_job(job, options(emulator, src, out)))
    assert doc["counts"]["skipped_done"] == len(texts) and doc["requests"]["sent"] == 0
    assert emulator.stats["by_route"].get("embeddings", 0) == 0
    assert_balanced(doc)

    # One changed text is sent alone, and supersedes its old row.
    texts[4] = "a changed text"
    pq.write_table(pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": texts}), tmp_path / "in.parquet")
    doc = asyncio.run(run_job(job, options(emulator, tmp_path / "in.parquet", out)))
    assert doc["counts"]["succeeded"] == 1 and doc["counts"]["skipped_done"] == len(texts) - 1
    assert doc["output"]["superseded_rows_removed"] == 1
    result = read_output(out).sort("id")
    assert result.height == len(texts)
    now = pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": texts})
    assert result["content_hash"].to_list() == per_row_hashes(job, now)


def test_an_extract_output_written_by_the_per_row_path_is_fully_skipped(emulator, tmp_path):
    table = pa.table({"id": pa.array(range(len(TRICKY)), pa.int64()), "text": TRICKY})
    src = tmp_path / "in.parquet"
    pq.write_table(table, src)
    out = tmp_path / "out"
    job = ExtractJob(model=CHAT_MODEL, schema=Invoice)
    answer = {
        "invoice_number": "A-1",
        "vendor": "ACME",
        "customer": None,
        "invoice_date": "2024-01-02",
        "due_date": None,
        "currency": "EUR",
        "line_items": [],
        "total": "1.00",
    }
    rows = job.mapping.arrays([job.mapping.row(Invoice.model_validate(answer))] * table.num_rows)
    write_old_output(out, job, table, rows)

    doc = asyncio.run(run_job(job, options(emulator, src, out)))
    assert doc["counts"]["skipped_done"] == len(TRICKY) and doc["requests"]["sent"] == 0
    assert emulator.stats["by_route"].get("chat/completions", 0) == 0


def test_hashing_in_child_processes_gives_the_same_bytes_and_survives_a_dead_child():
    rng = random.Random(11)
    alphabet = [chr(c) for c in (*range(0, 0x80), 0x85, 0xA0, 0xE9, 0x2028, 0x3000, 0x4E2D, 0x1F389)]
    texts = [*TRICKY, *BLANK, None, *("".join(rng.choices(alphabet, k=rng.randint(1, 60))) for _ in range(500))]
    processes = HashProcesses(2)
    try:
        for job in jobs():
            for kind in (pa.string(), pa.large_string(), pa.binary()):
                values = [t.encode() if t is not None and kind == pa.binary() else t for t in texts]
                table = pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": pa.array(values, kind)})
                for part in (table, table.slice(37, 300)):  # a slice: its arrays start at an offset
                    assert prepare_chunk(job, part, processes).hashes == per_row_hashes(job, part), (job, kind)
        assert processes._started == 1  # one thread asked: one child, reused
        (child,) = processes._idle
        child.kill()
        child.wait()
        table = pa.table({"id": pa.array(range(300), pa.int64()), "text": texts[-300:]})
        job = EmbedJob(model=EMBED_MODEL)
        assert prepare_chunk(job, table, processes).hashes == per_row_hashes(job, table)  # hashed here instead
        assert prepare_chunk(job, table, processes).hashes == per_row_hashes(job, table)  # by a new child
        assert processes._started == 2 and len(processes._idle) == 1
    finally:
        processes.close()
    assert processes._idle == [] and child.returncode is not None
