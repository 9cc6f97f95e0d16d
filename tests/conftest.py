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
def prefect_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A Prefect API for tests that need one. In one process: Prefect's test harness (a temporary server
    and database). Under pytest-xdist: one temporary server shared by every worker of the run, started by
    the first worker that needs it and stopped by the controller at the end (pytest_unconfigure) — each
    start costs 15-25 s of CPU. Tests find their own flow runs by id, so sharing one server is safe."""
    if not hasattr(request.config, "workerinput"):
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=60):
            yield
        return

    import prefect.context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = _shared_prefect_server(tmp_path_factory.getbasetemp().parent)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        # As the harness does: code in a context copied before this one sees the server too.
        with prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
            yield
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)  # before the worker exits, while the server still answers


SHARED_SERVER = "shared-prefect-server"


def _shared_prefect_server(run_dir: Path) -> str:
    """The URL of the run's shared Prefect API server, started here if no worker has started it yet."""
    import fcntl
    import json
    import subprocess
    import time
    import urllib.request

    import prefect
    from servers import free_port

    folder = run_dir / SHARED_SERVER
    folder.mkdir(exist_ok=True)
    info = folder / "server.json"
    with (folder / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker starts it; the others wait, then read its URL
        if info.exists():
            return json.loads(info.read_text())["url"]
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env |= {
            "PREFECT_HOME": str(folder / "home"),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{folder / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",  # what Prefect's temporary server sets: no services
            "PREFECT__SERVER_FINAL": "1",
        }
        with (folder / "server.log").open("w") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                 "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
                 "--log-level", "error", "--lifespan", "on"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}/api"
        # Written before it is healthy: the controller stops it whatever happens next.
        info.write_text(json.dumps({"url": url, "pid": server.pid}))
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (folder / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return url
            except OSError:
                pass
            assert time.monotonic() < deadline, "the shared Prefect server did not answer in 90 s"
            time.sleep(0.2)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The controller of an xdist run stops the shared Prefect server, if a worker started one."""
    import json
    import signal
    import time

    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None:
        return
    info = factory.getbasetemp() / SHARED_SERVER / "server.json"
    if not info.exists():
        return
    pid = json.loads(info.read_text())["pid"]
    info.unlink()
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):  # up to 10 s, then for good
            time.sleep(0.1)
            if _gone(pid):
                return
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _gone(pid: int) -> bool:
    """No such process, or only its exit status is left (the worker that started it has exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def hurry_batches(emu: Emulator, seconds: float = 0.0) -> None:
    """From now on every batch of ``emu``, running or new, finishes within ``seconds`` (as if its simulated
    time had been set so when it was created): for a test whose batches had to be running at a moment
    (a kill, a second run's start) and need not run on after it."""
    import time

    emu.configure(batch_seconds=seconds)
    time.sleep(0.5)  # a create request already in the server holds the settings it arrived with
    now = time.time()
    for batch in list(emu.batches.batches.values()):
        batch.simulation.seconds = min(batch.simulation.seconds, now - batch.created + seconds)


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


def interrupt_after_first_part(argv: list[str], env: dict[str, str], cwd: Path, out: Path) -> None:
    """Start `gembatch` (``argv``) as a process of its own and press Ctrl-C once its first part file is in
    ``out``: it must exit 130 (interrupted, resumable)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(
        argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, output.decode(errors="replace")
