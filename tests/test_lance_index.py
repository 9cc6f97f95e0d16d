"""The vector index that `--index` builds serves queries: LanceDB's own search agrees with brute force.

The table holds what `gembatch embed` writes from the emulator (its vectors, value for value), made with
LanceDB directly so that the test spends its time on the index, not on 100,000 requests.
"""

from __future__ import annotations

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from emulator.fakes import fake_embeddings
from tasks.sinks.lance import INDEX_MIN_ROWS, INDEX_TYPE, REINDEX_SHARE, refresh_index

MODEL = "gemini-embedding-001"
DIMS = 64
ROWS = 100_000


def vectors(start: int, stop: int) -> np.ndarray:
    return np.concatenate(
        [
            fake_embeddings([f"row {i}" for i in range(s, min(stop, s + 10_000))], MODEL, DIMS)
            for s in range(start, stop, 10_000)
        ]
    )


def rows(start: int, stop: int) -> pa.Table:
    v = vectors(start, stop)
    return pa.table(
        {"id": np.arange(start, stop), "embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), DIMS)}
    )


@pytest.mark.slow  # 100,000 vectors and an index build: a measurement, run in CI's slow tier
def test_the_index_agrees_with_brute_force_on_a_100k_row_table(tmp_path):
    table = lancedb.connect(str(tmp_path)).create_table("docs", data=rows(0, ROWS - 1))
    assert refresh_index(table)["status"].startswith("not needed"), "below 100,000 rows: no index"
    table.add(rows(ROWS - 1, ROWS))
    assert refresh_index(table) | {"unindexed_rows_before": 0} == {
        "status": "built",
        "column": "embedding",
        "type": INDEX_TYPE,
        "distance": "cosine",
        "unindexed_rows_before": 0,
    }
    assert table.index_stats("embedding_idx").num_indexed_rows == ROWS

    all_vectors = vectors(0, ROWS)
    unit = all_vectors / np.linalg.norm(all_vectors, axis=1, keepdims=True)
    queries = fake_embeddings([f"query {i}" for i in range(100)], MODEL, DIMS)
    recalls = []
    for q in queries:
        exact = set(np.argsort(-(unit @ (q / np.linalg.norm(q))))[:10].tolist())
        found = table.search(q).limit(10).to_arrow().column("id").to_pylist()
        assert len(found) == 10
        recalls.append(len(exact & set(found)) / 10)
    print(f"recall@10 over 100 queries: mean {np.mean(recalls):.3f}, min {min(recalls):.1f}")
    assert np.mean(recalls) >= 0.95

    # New rows below REINDEX_SHARE of the table are searched beside the index; past it, the index is rebuilt.
    few = int(ROWS * REINDEX_SHARE) // 2
    table.add(rows(ROWS, ROWS + few))
    assert refresh_index(table)["status"] == "current"
    enough = int(ROWS * REINDEX_SHARE / (1 - REINDEX_SHARE)) + 1  # 10% of the table, the new rows included
    table.add(rows(ROWS + few, ROWS + enough))
    rebuilt = refresh_index(table)
    assert rebuilt["status"] == "rebuilt" and rebuilt["unindexed_rows_before"] == enough
    assert table.index_stats("embedding_idx").num_unindexed_rows == 0
    assert INDEX_MIN_ROWS == ROWS
