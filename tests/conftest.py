"""Test isolation: Prefect's home, the emulator on loopback, and helpers to run jobs and read outputs."""

from __future__ import annotations

import os
import sys
import tempfile

# Before Prefect is imported anywhere: its settings (and database) live in a throwaway folder.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="gembatch-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

from pathlib import Path  # noqa: E402

import polars as pl  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from emulator import Emulator, EmulatorConfig  # noqa: E402

TEST_KEY_ENV = "GEMBATCH_TEST_KEY"
TEST_KEY = "test-key-7f3a9c1e5b2d4f6a8c0e"  # a fake key; tests search outputs for it
REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "corpus.parquet"


@pytest.fixture(autouse=True)
def _key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TEST_KEY_ENV, TEST_KEY)


@pytest.fixture
def emulator():
    with Emulator(EmulatorConfig(api_key=TEST_KEY)) as emu:
        yield emu


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def read_output(path: Path) -> pl.DataFrame:
    """The result table as a user reads it: every part file in the folder, nothing under _."""
    files = sorted(path.glob("part-*.parquet"))
    if not files:
        return pl.DataFrame()
    return pl.from_arrow(pa.concat_tables(pq.read_table(f) for f in files))


def read_errors(path: Path) -> pl.DataFrame:
    files = sorted((path / "_errors").glob("*.parquet"))
    if not files:
        return pl.DataFrame()
    return pl.from_arrow(pa.concat_tables(pq.read_table(f) for f in files))


def write_corpus(path: Path, ids: list, texts: list) -> Path:
    table = pa.table({"id": pa.array(ids, pa.int64()), "text": pa.array(texts, pa.string())})
    if path.suffix == ".csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


def cli_env(api_url: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a `gembatch` subprocess: the test key set; tracked in Prefect only with
    ``api_url`` (else untracked, whatever this process's settings say)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env[TEST_KEY_ENV] = TEST_KEY
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    env.update(extra)
    return env


def embed_command(src: Path, out: Path, base_url: str, *extra: str, batch_size: int, chunk_size: int) -> list[str]:
    """`gembatch embed SRC -o OUT` against an emulator as a subprocess's argv: 4 requests in flight, no bar."""
    return [
        sys.executable,
        "-m",
        "flows.cli",
        "embed",
        str(src),
        "--output",
        str(out),
        "--base-url",
        base_url,
        "--api-key-env",
        TEST_KEY_ENV,
        "--batch-size",
        str(batch_size),
        "--chunk-size",
        str(chunk_size),
        "--max-concurrency",
        "4",
        "--no-progress",
        *extra,
    ]


def assert_balanced(doc: dict) -> None:
    c = doc["counts"]
    assert c["input_rows"] == (
        c["skipped_done"] + c["deduplicated"] + c["succeeded"] + c["failed"] + c["not_attempted"]
    ), c
