"""Never a traceback: every job and mode driven through the failures servers and gateways answer.

Each case injects one answer on one route of the emulator (EmulatorConfig.route_answers: a status with
an OpenAI-style JSON body, a plain-text body, an nginx HTML page, or an empty 200), runs the `gembatch`
command in this process (``flows.cli.run_cli``, the same entry as the installed command, stderr
captured as the user sees it), and checks: no "Traceback" on stderr, an exit code from the README's
table, one short error paragraph when the run did not complete, and an output that the same command
resumes once the server answers again.

Back-off is cut to milliseconds with GEMBATCH_RETRY_DELAY_S, so a 5xx costs its eight attempts in
well under a second.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pyarrow.csv as pcsv
import pytest
from conftest import REPO, TEST_KEY, TEST_KEY_ENV, gembatch, read_errors, read_output

from emulator import CannedAnswer, Emulator, EmulatorConfig
from flows.cli import run_cli

EXIT_CODES = {0, 2, 3, 4}  # README: completed, problem before any work, stopped/failed run, failed rows
ROWS = 3

# (status, body kind): every answer a server, a gateway or a load balancer gives.
FAILURES: dict[str, tuple[int, str]] = {
    **{str(code): (code, "json") for code in (400, 401, 403, 404, 405, 413, 415, 422, 429, 500, 501, 503)},
    "502-text": (502, "text"),
    "502-html": (502, "html"),
    "400-html": (400, "html"),
    "empty-200": (200, "empty"),
}

JOBS: dict[str, tuple[str, list[str]]] = {
    # name: (route, the command's own arguments; INPUT and OUTPUT are filled in)
    "embed": ("embeddings", ["embed", "{texts}", "--model", "gemini-embedding-001"]),
    "extract": (
        "chat/completions",
        ["extract", "{texts}", "--schema", "schemas.examples:Invoice", "--model", "gemini-3.8-flash"],
    ),
    "caption": ("chat/completions", ["caption", "{images}", "--model", "gemini-3.8-flash"]),
    "transcribe": ("chat/completions", ["transcribe", "{audio}", "--model", "gemini-3.8-flash"]),
    "transcribe-api": (
        "audio/transcriptions",
        ["transcribe", "{audio}", "--api", "transcriptions", "--model", "whisper-1"],
    ),
    "images": ("images/generations", ["images", "{prompts}", "--model", "gemini-nano-banana-2.1"]),
    "generate": ("chat/completions", ["generate", "{texts}", "--prompt", "Say: {text}", "--model", "gemini-3.8-flash"]),
    "generate-stream": (
        "chat/completions",
        ["generate", "{texts}", "--prompt", "Say: {text}", "--model", "gemini-3.8-flash", "--stream"],
    ),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    texts = root / "texts.csv"
    lines = [f'{i},"Invoice {i}: 3 pens at 2.50 EUR, total {i * 7}.50"\n' for i in range(ROWS)]
    texts.write_text("id,text\n" + "".join(lines))
    prompts = root / "prompts.csv"
    prompts.write_text("id,prompt\n" + "".join(f"{i},a lighthouse number {i}\n" for i in range(ROWS)))
    for name in ("images", "audio"):
        table = pcsv.read_csv(REPO / "data" / f"{name}.csv")
        shutil.copytree(REPO / "data" / name, root / name)
        pcsv.write_csv(table.slice(0, min(ROWS, table.num_rows)), root / f"{name}.csv")
    return {"texts": texts, "prompts": prompts, "images": root / "images.csv", "audio": root / "audio.csv"}


@pytest.fixture(scope="module")
def server():
    with Emulator(EmulatorConfig(api_key=TEST_KEY)) as emu:
        yield emu


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMBATCH_RETRY_DELAY_S", "0.001")
    monkeypatch.delenv("GEMBATCH_DEBUG", raising=False)


def command(job: str, inputs: dict[str, Path], out: Path, base_url: str, *extra: str) -> list[str]:
    _, args = JOBS[job]
    filled = [a.format(**{k: str(v) for k, v in inputs.items()}) if a.startswith("{") else a for a in args]
    # A rate window of 0.02 s: after persistent 429s the limiter paces at its floor per window, not per minute.
    common = ["--base-url", base_url, "--api-key-env", TEST_KEY_ENV, "--no-progress", "--rate-window", "0.02"]
    return [*filled, "--output", str(out), *common, *extra]


def assert_one_paragraph(code: int, err: str) -> None:
    assert "Traceback" not in err, err
    assert code in EXIT_CODES, (code, err)
    if code:
        # What the user reads: an error or a status line, a paragraph (the summary table goes to stdout).
        said = [line for line in err.splitlines() if line.strip() and not line.startswith("note: no Prefect API")]
        assert said, "a failed command must say why"
        assert len(" ".join(said)) < 2500, err


def assert_resumes(argv: list[str], out: Path, capsys: pytest.CaptureFixture[str], *, rows: int) -> None:
    code, err = gembatch([*argv, "--retry-errors"], capsys)
    assert code == 0 and "Traceback" not in err, err
    table = read_output(out)
    assert table.height >= rows and table["id"].n_unique() == rows, table
    assert read_errors(out).is_empty() or code == 0


def _live_cases() -> list:
    """Every job × every failure. The default run takes a quarter of them, chosen so that each failure
    meets at least one job and each job at least four failures; the rest are marked slow (CI runs them)."""
    cases = []
    for j, job in enumerate(JOBS):
        for f, failure in enumerate(FAILURES):
            marks = () if (j + f) % 4 == 0 else (pytest.mark.slow,)
            cases.append(pytest.param(job, failure, marks=marks, id=f"{job}-{failure}"))
    return cases


@pytest.mark.parametrize(("job", "failure"), _live_cases())
def test_every_job_live_through_every_failure(job, failure, server, inputs, tmp_path, capsys):
    route, _ = JOBS[job]
    status, body = FAILURES[failure]
    out = tmp_path / "out"
    argv = command(job, inputs, out, server.base_url)
    server.configure(route_answers={route: CannedAnswer(status=status, body=body, message=f"gateway says {status}")})
    try:
        code, err = gembatch(argv, capsys)
    finally:
        server.configure(route_answers={})
    assert_one_paragraph(code, err)
    if status in (401, 403, 404, 405, 501):
        # The run's problem, not the rows': stopped after the first answer, nothing in _errors/.
        assert code == 3 and read_errors(out).is_empty(), err
    rows = ROWS if job != "transcribe" else min(ROWS, 3)
    assert_resumes(argv, out, capsys, rows=_rows_of(job, inputs, rows))


def _rows_of(job: str, inputs: dict[str, Path], default: int) -> int:
    source = {"caption": "images", "transcribe": "audio", "transcribe-api": "audio"}.get(job)
    return pcsv.read_csv(inputs[source]).num_rows if source else default


@pytest.mark.parametrize(
    "failure", [pytest.param(f, marks=() if f in ("401", "404", "502-html") else (pytest.mark.slow,)) for f in FAILURES]
)
def test_the_model_check_through_every_failure(failure, server, inputs, tmp_path, capsys):
    """GET models/{id} (and the model list) answering each failure: the command ends before any work
    (exit 2) with one paragraph, or, for a server without those routes, runs on."""
    status, body = FAILURES[failure]
    out = tmp_path / "out"
    argv = command("embed", inputs, out, server.base_url)
    server.configure(route_answers={"models": CannedAnswer(status=status, body=body, message=f"gateway says {status}")})
    try:
        code, err = gembatch(argv, capsys)
    finally:
        server.configure(route_answers={})
    assert_one_paragraph(code, err)
    assert code in (0, 2), err
    if code == 2:
        assert not list(out.glob("part-*.parquet"))
    assert_resumes(argv, out, capsys, rows=ROWS)


BATCH_JOBS = ("embed", "generate")


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("route", ["files", "batches"])
@pytest.mark.parametrize("mode", ["batch", "auto"])
def test_batch_and_auto_on_a_server_whose_batch_routes_fail(
    mode, route, failure, server, inputs, tmp_path, capsys, caplog
):
    """--mode batch stops before any row is marked as sent, naming the route and --mode live; --mode
    auto sends everything live with one warning line. Nothing is paid twice."""
    status, body = FAILURES[failure]
    job = BATCH_JOBS[list(FAILURES).index(failure) % 2]  # each failure meets one of the two routes
    out = tmp_path / "out"
    # /v1/: the OpenAI flavour of the files and batches routes, as gateways offer them.
    base = server.base_url.replace("/v1beta/openai/", "/v1/")
    argv = command(job, inputs, out, base, "--mode", mode, "--auto-min-requests", "1", "--batch-poll", "0.05")
    server.configure(route_answers={route: CannedAnswer(status=status, body=body, message="files_settings is not set")})
    before = server.stats["by_route"]
    try:
        code, err = gembatch(argv, capsys)
    finally:
        server.configure(route_answers={})
    assert_one_paragraph(code, err)
    sent = server.stats["by_route"]
    if mode == "batch":
        assert code == 3, err
        assert "--mode live" in err, err
        assert read_output(out).is_empty() and read_errors(out).is_empty()
        assert not list(out.glob("_batches/*.json"))  # no batch record left: nothing was sent
    else:
        assert code == 0, err
        # One warning line (pytest holds the log records that a plain run prints on stderr).
        warned = [r for r in caplog.records if "sending every row live instead" in r.getMessage()]
        assert len(warned) == 1 and "Traceback" not in caplog.text, caplog.text
        assert read_output(out)["id"].n_unique() == ROWS
        route_sent = "embeddings" if job == "embed" else "chat/completions"
        # Paid once: each row went live exactly once (embed: one request for all three rows).
        assert sent[route_sent] - before[route_sent] == (1 if job == "embed" else ROWS)
        return
    assert_resumes(argv[: argv.index("--mode")] + argv[argv.index("--auto-min-requests") :], out, capsys, rows=ROWS)


@pytest.mark.parametrize("job", list(JOBS))
def test_connection_refused_mid_run(job, inputs, tmp_path, capsys):
    """The server goes away after its first answers: the run ends in a status, never a traceback, and the
    same command finishes the rows once the server is back (on the same port)."""
    emu = Emulator(EmulatorConfig(api_key=TEST_KEY, latency_seconds=0.05)).start()
    port = emu.port
    out = tmp_path / "out"
    one_by_one = ["--max-concurrency", "1", *(["--batch-size", "1"] if job == "embed" else [])]
    argv = command(job, inputs, out, emu.base_url, *one_by_one)

    def stop_after_first_answers() -> None:
        deadline = time.monotonic() + 20
        route = JOBS[job][0]
        while emu.stats["by_route"].get(route, 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        emu.stop()

    stopper = threading.Thread(target=stop_after_first_answers, daemon=True)
    stopper.start()
    code, err = gembatch(argv, capsys)
    stopper.join()
    assert_one_paragraph(code, err)
    back = Emulator(EmulatorConfig(api_key=TEST_KEY), port=port).start()
    try:
        assert_resumes(argv, out, capsys, rows=_rows_of(job, inputs, ROWS))
    finally:
        back.stop()


def test_an_unexpected_error_is_one_paragraph_and_debug_shows_the_traceback(monkeypatch, capsys):
    """A bug (not a server's answer) still ends in one paragraph and exit 3; GEMBATCH_DEBUG=1 re-raises."""
    from flows import cli

    def broken(**_: object) -> None:
        raise RuntimeError("something inside broke")

    app = cli.typer.Typer()
    app.command("boom")(broken)
    monkeypatch.setattr(cli, "app", app)
    code, err = gembatch(["boom"], capsys)
    assert code == 3 and "Traceback" not in err
    assert "unexpected RuntimeError: something inside broke" in err and "GEMBATCH_DEBUG=1" in err
    monkeypatch.setenv("GEMBATCH_DEBUG", "1")
    with pytest.raises(RuntimeError):
        run_cli(["boom"])


@pytest.mark.parametrize("failure", ["404", "500", "502-html", "empty-200"])
@pytest.mark.parametrize("mode", ["batch", "auto"])
def test_google_files_api_failing_under_the_gemini_flavour(mode, failure, server, inputs, tmp_path, capsys):
    """Gemini's batches take their files through Google's own upload route (/upload/v1beta/files)."""
    status, body = FAILURES[failure]
    out = tmp_path / "out"
    argv = command("embed", inputs, out, server.base_url, "--mode", mode, "--auto-min-requests", "1")
    server.configure(route_answers={"files": CannedAnswer(status=status, body=body)})
    try:
        code, err = gembatch(argv, capsys)
    finally:
        server.configure(route_answers={})
    assert_one_paragraph(code, err)
    if mode == "batch":
        assert code == 3 and "--mode live" in err, err
        assert read_output(out).is_empty() and not list(out.glob("_batches/*.json"))
    else:
        assert code == 0 and read_output(out)["id"].n_unique() == ROWS, err
