"""Other gateways' own error bodies (OpenRouter, vLLM, Portkey, Kong, Cloudflare AI Gateway), as
emulator/gateways.py keeps them, each read the way its kind asks: a refused parameter stops the run
naming it, a missing batch route sends everything live (--mode auto), a rejected key stops the run
after its first answer, a 429 is retried. Real HTTP: the emulator answers them on its routes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TEST_KEY, TEST_KEY_ENV, read_errors, read_output

from emulator import Emulator, EmulatorConfig
from emulator.gateways import GATEWAY_ANSWERS, gateway_answer
from flows.cli import run_cli

ROWS = 3


@pytest.fixture(scope="module")
def server():
    with Emulator(EmulatorConfig(api_key=TEST_KEY)) as emu:
        yield emu


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("in") / "texts.csv"
    path.write_text("id,text\n" + "".join(f"{i},passage number {i}\n" for i in range(ROWS)))
    return path


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMBATCH_RETRY_DELAY_S", "0.001")


def embed(server, texts: Path, out: Path, capsys, *extra: str, flavour: str = "/v1beta/openai/") -> tuple[int, str]:
    base = server.base_url.replace("/v1beta/openai/", flavour)
    argv = ["embed", str(texts), "--output", str(out), "--base-url", base, "--api-key-env", TEST_KEY_ENV,
            "--model", "gemini-embedding-001", "--no-progress", "--rate-window", "0.02", *extra]  # fmt: skip
    capsys.readouterr()
    code = run_cli(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, " ".join(err.split())


def document(out: Path) -> dict:
    return json.loads(max((out / "_runs").glob("*.json")).read_text())


def test_every_gateway_answer_is_a_json_body_with_its_source():
    for name, answer in GATEWAY_ANSWERS.items():
        assert answer.source and answer.status >= 400, name
        assert json.loads(answer.canned().message) == answer.body


@pytest.mark.parametrize("name", ["openrouter/param_refused", "vllm/param_refused", "portkey/param_refused"])
def test_a_refused_dimensions_stops_the_run_naming_it(name, server, texts, tmp_path, capsys):
    out = tmp_path / "out"
    server.configure(route_answers={"embeddings": gateway_answer(name)})
    try:
        code, err = embed(server, texts, out, capsys, "--dimensions", "256")
    finally:
        server.configure(route_answers={})
    assert code == 3, err
    assert "refused the parameter 'dimensions'" in err and "rerun without --dimensions" in err, err
    doc = document(out)
    assert doc["status"] == "failed: parameter refused"
    assert read_errors(out).is_empty() and read_output(out).is_empty()


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("openrouter/auth", "No auth credentials found"),
        ("kong/auth", "No API key found in request"),
        ("cloudflare/auth", "Unauthorized (code 2009)"),
    ],
)
def test_a_rejected_key_stops_the_run_after_its_first_answer(name, said, server, texts, tmp_path, capsys):
    out = tmp_path / "out"
    server.configure(route_answers={"embeddings": gateway_answer(name)})
    try:
        code, err = embed(server, texts, out, capsys)
    finally:
        server.configure(route_answers={})
    assert code == 3, err
    assert said in err, err
    assert document(out)["status"] == "failed: auth"
    assert read_errors(out).is_empty() and read_output(out).is_empty()


@pytest.mark.parametrize("name", ["openrouter/rate_limited", "kong/rate_limited"])
def test_a_gateway_429_is_retried(name, server, texts, tmp_path, capsys):
    out = tmp_path / "out"
    server.configure(route_answers={"embeddings": gateway_answer(name, times=2)})
    try:
        code, err = embed(server, texts, out, capsys)
    finally:
        server.configure(route_answers={})
    assert code == 0, err
    doc = document(out)
    assert doc["requests"]["rate_limited_429"] == 2
    assert sorted(read_output(out)["id"].to_list()) == list(range(ROWS))


@pytest.mark.parametrize("name", ["kong/route_missing", "vllm/route_missing"])
@pytest.mark.parametrize("route", ["files", "batches"])
def test_a_missing_batch_route_sends_every_row_live(name, route, server, texts, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    server.configure(route_answers={route: gateway_answer(name)})
    try:
        code, err = embed(server, texts, out, capsys, "--mode", "auto", "--auto-min-requests", "1",
                          "--batch-poll", "0.05", flavour="/v1/")  # fmt: skip
    finally:
        server.configure(route_answers={})
    assert code == 0, err
    assert any("sending every row live instead" in r.getMessage() for r in caplog.records), caplog.text
    assert sorted(read_output(out)["id"].to_list()) == list(range(ROWS))
    assert document(out)["status"] == "completed"
