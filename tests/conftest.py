"""Test isolation: Prefect's home, the emulator on loopback, and helpers to run jobs and read outputs."""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass

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


@pytest.fixture(autouse=True)
def _prefect_console_on_this_tests_stderr() -> None:
    """Prefect's console log handler keeps the stderr it was made with. When that was an earlier test's
    capture (capsys), it is closed now, and each log line would print a 'Logging error' traceback: point
    the handlers at this test's stderr, as a fresh process would have them."""
    import logging
    import sys

    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):
            console = getattr(handler, "console", None)
            if isinstance(handler, logging.StreamHandler) and console is not None:
                handler.stream = sys.stderr  # not setStream: it flushes the old, closed one
                console.file = sys.stderr


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


@dataclass(frozen=True)
class CliResult:
    """What a `gembatch` command returned and printed (the fields of a finished subprocess)."""

    returncode: int
    stdout: str
    stderr: str


def run_gembatch(argv: list[str], capsys: pytest.CaptureFixture[str]) -> CliResult:
    """`gembatch ARGV` in this process (`flows.cli.run_cli`, what the entry point calls): the same parsing,
    checks, run and exit code as the command, without a new interpreter's Python and Prefect imports
    (about 2.5 s a call). Untracked unless the test sets PREFECT_API_URL. Keep a subprocess where the
    process boundary is the point: signals, the real entry point, what gets imported, the environment."""
    from flows.cli import run_cli

    capsys.readouterr()
    code = run_cli(argv)
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def gembatch(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`gembatch ARGV` in this process: its exit code and what it said on stderr."""
    result = run_gembatch(argv, capsys)
    return result.returncode, result.stderr


EMBED_MODEL = "gemini-embedding-001"  # named: these runs are about resuming and claims, not defaults


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
        "--model",
        EMBED_MODEL,
        *extra,
    ]


def assert_balanced(doc: dict) -> None:
    c = doc["counts"]
    assert c["input_rows"] == (
        c["skipped_done"] + c["deduplicated"] + c["succeeded"] + c["failed"] + c["not_attempted"]
    ), c
