"""Models that exist today, and pipelines that outlive them: defaults, retired and rerouted models,
outputs that keep their model, user prices, parameters per model family, `gembatch models`.

Real HTTP against the emulator on loopback, real Parquet read back value by value."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import date

import numpy as np
import pytest
from conftest import (
    CORPUS,
    REPO,
    TEST_KEY,
    TEST_KEY_ENV,
    CliResult,
    assert_balanced,
    cli_env,
    read_output,
    run_gembatch,
)

from emulator import Emulator, EmulatorConfig
from emulator.catalog import DEFAULT_MODELS, LEGACY_MODELS
from emulator.fakes import fake_chat_text, fake_embedding
from flows import commands
from flows.common import run_untracked
from flows.options import built_job, command_params
from tasks.errors import ConfigError
from tasks.provider.catalog import DEFAULT_MODELS as DEFAULTS
from tasks.provider.catalog import same_model
from tasks.provider.prices import estimate_cost_usd, load_prices, price_of, use_prices

DATA = REPO / "data"
TODAY = {"embed": "gemini-embedding-2", "chat": "gemini-3.8-flash", "images": "gemini-nano-banana-2.1"}


@pytest.fixture(autouse=True)
def _built_in_prices(monkeypatch):
    monkeypatch.delenv("GEMBATCH_PRICES", raising=False)
    use_prices(None)
    yield
    use_prices(None)


def run(command, emu: Emulator, **values) -> dict:
    """A job as `gembatch JOB` runs it untracked, against ``emu``."""
    parameters = command_params(
        command, base_url=emu.base_url, api_key_env=TEST_KEY_ENV, provider="local", **values
    )
    return asyncio.run(run_untracked(built_job(command.build_job, parameters)))


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> CliResult:
    """`gembatch ARGS` in this process (conftest.run_gembatch), untracked."""
    return run_gembatch(list(args), capsys)


def cli_process(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`gembatch ARGS` in a new process, 250 columns wide: for what a test reads of rich's tables and
    panels (in this process they are drawn 80 wide, for pytest's capture)."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        env=cli_env(COLUMNS="250", **env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def key_args(emu: Emulator) -> list[str]:
    return ["--base-url", emu.base_url, "--api-key-env", TEST_KEY_ENV, "--no-progress"]


def test_the_defaults_are_todays_models_and_the_emulator_serves_them_without_the_retired_ones():
    assert DEFAULTS["gemini"] == TODAY
    assert set(TODAY.values()) <= set(DEFAULT_MODELS)
    assert not set(LEGACY_MODELS) & set(DEFAULT_MODELS)


def test_every_job_runs_without_model_against_a_server_of_todays_models(tmp_path):
    jobs = [
        (commands.embed, {"input": str(DATA / "corpus.parquet"), "limit": 30}, "embed"),
        (commands.extract, {"input": str(DATA / "extract" / "invoices.csv"), "schema_ref": "schemas.examples:Invoice"},
         "chat"),
        (commands.caption, {"input": str(DATA / "images.csv")}, "chat"),
        (commands.transcribe, {"input": str(DATA / "audio.csv")}, "chat"),
        (commands.images, {"input": str(DATA / "prompts.csv"), "size": "256x256"}, "images"),
        (commands.generate, {"input": str(DATA / "generate" / "reviews.csv"), "prompt": "Summarise: {review}"}, "chat"),
    ]  # fmt: skip
    with Emulator(EmulatorConfig(api_key=TEST_KEY, models=DEFAULT_MODELS)) as emu:
        for command, values, kind in jobs:
            out = tmp_path / command.__name__
            doc = run(command, emu, output=str(out), **values)
            assert doc["status"] == "completed", (command.__name__, doc["message"])
            assert doc["provider"]["model"] == TODAY[kind]
            assert doc["parameters"]["model_from"] == "default"
            assert_balanced(doc)
            table = read_output(out)
            assert table.height > 0
            assert set(table["model"].to_list()) == {TODAY[kind]}
            if kind == "chat":
                assert set(table["served_model"].to_list()) == {TODAY[kind]}
        # One images/generations request per prompt (n = 1), each answered with b64_json.
        assert emu.stats["by_route"]["images/generations"] == read_output(tmp_path / "images").height


def test_a_retired_model_stops_the_run_before_any_request_naming_date_and_replacement(emulator, tmp_path, capsys):
    result = cli(capsys, "images", str(DATA / "prompts.csv"), "-o", str(tmp_path / "img"), "--model",
                 "imagen-4.0-generate-001", *key_args(emulator))  # fmt: skip
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "imagen-4.0-generate-001" in message and "shut down on 2026-08-17" in message
    assert "--model gemini-nano-banana-2.1" in message and "Nothing was sent" in message
    stats = emulator.stats
    assert stats["by_route"]["images/generations"] == 0 and stats["images"] == 0
    assert not (tmp_path / "img").exists() or not list((tmp_path / "img").glob("part-*.parquet"))


def test_a_model_retired_under_a_scheduled_output_stops_it_before_sending(tmp_path):
    out = tmp_path / "gen"
    values = {"input": str(DATA / "generate" / "reviews.csv"), "prompt": "Summarise: {review}", "output": str(out)}
    with Emulator(EmulatorConfig(api_key=TEST_KEY, models=(*DEFAULT_MODELS, "gemini-2.5-flash"))) as emu:
        first = run(commands.generate, emu, model="gemini-2.5-flash", **values)
        assert first["status"] == "completed"
        emu.configure(retired=("gemini-2.5-flash",))
        emu.reset_stats()
        # The next scheduled run names no model: it keeps the output's, which is gone now.
        with pytest.raises(ConfigError) as caught:
            run(commands.generate, emu, **values)
        assert emu.stats["by_route"]["chat/completions"] == 0
    message = str(caught.value)
    assert "gemini-2.5-flash" in message and "replacement: gemini-3.8-flash" in message
    assert "--change-model" in message


def test_a_rerouted_embeddings_model_never_writes_a_foreign_vector(emulator, tmp_path, capsys):
    out = tmp_path / "vectors"
    first = run(commands.embed, emulator, input=str(CORPUS), output=str(out), limit=40, chunk_size=20)
    assert first["status"] == "completed"
    emulator.configure(reroutes={"gemini-embedding-2": "gemini-embedding-001"})
    result = cli(capsys, "embed", str(CORPUS), "-o", str(out), "--chunk-size", "20", *key_args(emulator))
    assert result.returncode == 3, result.stderr
    message = " ".join(result.stderr.split())
    assert "stopped: model rerouted" in message
    assert "gemini-embedding-2" in message and "gemini-embedding-001" in message
    assert emulator.stats["by_route"]["embeddings"] >= 1  # the reply that told
    table = read_output(out)
    texts = dict(zip(*_corpus_columns()))
    assert table.height == 40 and set(table["model"].to_list()) == {"gemini-embedding-2"}
    for row_id, vector in zip(table["id"].to_list(), table["embedding"].to_list()):
        np.testing.assert_allclose(np.asarray(vector, np.float32), fake_embedding(texts[row_id], "gemini-embedding-2"))
    runs = [json.loads(p.read_text()) for p in sorted((out / "_runs").glob("*.json"))]
    stopped = [d for d in runs if d["status"] == "stopped: model rerouted"]
    assert len(stopped) == 1 and stopped[0]["served_models"]
    assert_balanced(stopped[0])


def _corpus_columns():
    import pyarrow.parquet as pq

    table = pq.read_table(CORPUS, columns=["id", "text"])
    return table.column("id").to_pylist(), table.column("text").to_pylist()


def test_a_rerouted_chat_model_is_recorded_per_row_and_warned(tmp_path):
    out = tmp_path / "gen"
    config = EmulatorConfig(
        api_key=TEST_KEY,
        models=(*DEFAULT_MODELS, "gemini-3.7-flash"),
        reroutes={"gemini-3.7-flash": "gemini-3.8-flash"},
    )
    with Emulator(config) as emu:
        doc = run(commands.generate, emu, input=str(DATA / "generate" / "reviews.csv"), output=str(out),
                  prompt="Summarise: {review}", model="gemini-3.7-flash")  # fmt: skip
    assert doc["status"] == "completed"
    assert "warning" in doc["message"] and "gemini-3.8-flash" in doc["message"]
    table = read_output(out)
    assert doc["served_models"] == {"gemini-3.8-flash": table.height}
    assert doc["cost"]["rerouted_rows_priced_as"] == "gemini-3.7-flash"
    assert set(table["model"].to_list()) == {"gemini-3.7-flash"}
    assert set(table["served_model"].to_list()) == {"gemini-3.8-flash"}
    assert all(text.startswith("[emulator gemini-3.8-flash]") for text in table["text"].to_list())


def test_an_output_keeps_its_model_and_change_model_moves_it_after_a_dry_run(emulator, tmp_path):
    out = tmp_path / "vectors"
    values = {"input": str(CORPUS), "output": str(out), "limit": 25}
    old = run(commands.embed, emulator, model="gemini-embedding-001", **values)
    assert old["status"] == "completed" and old["counts"]["succeeded"] == 25
    # No --model: the output's model, not today's default; nothing to send again.
    again = run(commands.embed, emulator, **values)
    assert again["provider"]["model"] == "gemini-embedding-001" and again["parameters"]["model_from"] == "output"
    assert again["counts"]["skipped_done"] == 25 and again["requests"]["sent"] == 0
    # Another model only on purpose.
    with pytest.raises(ConfigError, match="--change-model"):
        run(commands.embed, emulator, model="gemini-embedding-2", **values)
    plan = run(commands.embed, emulator, change_model=True, dry_run=True, **values)
    assert plan["model"] == "gemini-embedding-2"
    assert plan["model_change"] == {"from": "gemini-embedding-001", "to": "gemini-embedding-2",
                                    "rows_in_output": 25, "rows_to_resend": 25}  # fmt: skip
    assert plan["estimate"]["input_cost_usd"] == pytest.approx(plan["estimate"]["input_tokens"] * 0.20 / 1e6, abs=1e-6)
    moved = run(commands.embed, emulator, change_model=True, **values)
    assert moved["status"] == "completed" and moved["counts"]["succeeded"] == 25
    table = read_output(out)
    texts = dict(zip(*_corpus_columns()))
    assert table.height == 25 and set(table["model"].to_list()) == {"gemini-embedding-2"}
    for row_id, vector in zip(table["id"].to_list(), table["embedding"].to_list()):
        np.testing.assert_allclose(np.asarray(vector, np.float32), fake_embedding(texts[row_id], "gemini-embedding-2"))
    marker = json.loads((out / "_gembatch.json").read_text())
    assert marker["model"] == "gemini-embedding-2" and marker["previous_models"] == ["gemini-embedding-001"]


def test_a_prices_file_gives_dated_prices_and_the_estimate_uses_the_one_in_force(tmp_path, emulator):
    prices = tmp_path / "prices.toml"
    prices.write_text(
        '[[price]]\nmodel = "gemini-3.8-flash"\ninput = 1.0\noutput = 4.0\nsource = "our contract"\n\n'
        '[[price]]\nmodel = "gemini-3.8-flash"\nsince = 2026-12-01\ninput = 2.0\noutput = 8.0\n\n'
        '[[price]]\nmodel = "gemini-3.8-flash"\nsince = 2027-03-01\ninput = 3.0\noutput = 9.0\n'
    )
    book = load_prices(str(prices))
    assert book.price("gemini-3.8-flash", date(2026, 11, 30)).input == 1.0
    assert book.price("gemini-3.8-flash", date(2026, 12, 6)).input == 2.0
    assert book.price("models/gemini-3.8-flash", date(2027, 3, 1)).output == 9.0
    assert book.price("gemini-3.5-flash-lite", date(2026, 12, 6)).input == 0.30  # built-in kept
    # The built-in table has 3.8 Flash's own change of price on 2027-01-01.
    assert price_of("gemini-3.8-flash", date(2026, 12, 31)).input == 0.75
    assert price_of("gemini-3.8-flash", date(2027, 1, 1)).input == 1.50
    assert estimate_cost_usd("gemini-3.8-flash", prompt_tokens=10**6, total_tokens=2 * 10**6,
                             on=date(2027, 1, 1)) == pytest.approx(1.50 + 7.50)  # fmt: skip
    plan = run(commands.generate, emulator, input=str(DATA / "generate" / "reviews.csv"), output=str(tmp_path / "g"),
               prompt="Summarise: {review}", dry_run=True, prices=str(prices))  # fmt: skip
    tokens = plan["estimate"]["input_tokens"]
    on_today = price_of("gemini-3.8-flash").input  # the file's price in force on the day this test runs
    assert plan["estimate"]["input_cost_usd"] == pytest.approx(tokens * on_today / 1e6, abs=1e-6)
    assert "your prices file" in plan["price"] or "our contract" in plan["price"]
    json_prices = tmp_path / "prices.json"
    json_prices.write_text(json.dumps({"price": [{"model": "x-model", "since": "2027-01-01", "input": 0.5}]}))
    assert load_prices(str(json_prices)).price("x-model", date(2026, 12, 31)) is None
    assert load_prices(str(json_prices)).price("x-model", date(2027, 1, 1)).input == 0.5


def test_a_model_without_a_price_says_how_to_give_one_and_then_can_be_budgeted(tmp_path, emulator, capsys, monkeypatch):
    values = {"input": str(DATA / "generate" / "reviews.csv"), "prompt": "Summarise: {review}",
              "model": "gemini-3.1-flash-lite"}  # fmt: skip
    plan = run(commands.generate, emulator, output=str(tmp_path / "plan"), dry_run=True, **values)
    assert plan["estimate"]["input_cost_usd"] is None
    assert plan["price"].startswith("unknown") and "--prices FILE" in plan["price"]
    result = cli(capsys, "generate", values["input"], "-o", str(tmp_path / "g"), "--prompt", values["prompt"],
                 "--model", values["model"], "--max-cost-usd", "0.0000001", *key_args(emulator))  # fmt: skip
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "--max-cost-usd needs a price for model 'gemini-3.1-flash-lite'" in message
    assert "--prices FILE" in message and "GEMBATCH_PRICES" in message and "tasks/provider/prices.py" not in message
    assert emulator.stats["by_route"]["chat/completions"] == 0
    prices = tmp_path / "p.toml"
    prices.write_text('[[price]]\nmodel = "gemini-3.1-flash-lite"\ninput = 0.10\noutput = 0.40\n')
    args = ["generate", values["input"], "-o", str(tmp_path / "g"), "--prompt", values["prompt"], "--model",
            values["model"], "--max-cost-usd", "1", *key_args(emulator)]  # fmt: skip
    monkeypatch.setenv("GEMBATCH_PRICES", str(prices))
    budgeted = cli(capsys, *args)
    assert budgeted.returncode == 0, budgeted.stderr
    assert read_output(tmp_path / "g").height == 8  # every review


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--temperature", "0.3"], "--temperature is deprecated for gemini-3.8-flash"),
        (["--reasoning-effort", "none"], "--reasoning-effort 'none' is not one gemini-3.8-flash takes"),
        (["--model", "gemini-4-argon", "--reasoning-effort", "minimal"], "low, medium, high"),
    ],
)
def test_options_a_model_family_refuses_stop_the_run_before_sending(emulator, tmp_path, args, said, capsys):
    result = cli(capsys, "generate", str(DATA / "generate" / "reviews.csv"), "-o", str(tmp_path / "g"), "--prompt",
                 "Summarise: {review}", *args, *key_args(emulator))  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert said in " ".join(result.stderr.split())
    assert emulator.stats["requests"] == 0


def test_an_older_family_still_takes_temperature(emulator, tmp_path):
    doc = run(commands.generate, emulator, input=str(DATA / "generate" / "reviews.csv"), output=str(tmp_path / "g"),
              prompt="Summarise: {review}", model="gemini-2.5-flash-lite", temperature=0.3,
              reasoning_effort="none")  # fmt: skip
    assert doc["status"] == "completed"


def test_gembatch_models_marks_the_defaults_with_lifecycle_and_prices(tmp_path):
    config = EmulatorConfig(
        api_key=TEST_KEY,
        models=(*DEFAULT_MODELS, "gemini-embedding-001", "gemini-3.7-flash"),
        reroutes={"gemini-3.7-flash": "gemini-3.8-flash"},
        retired=("gemini-nano-banana-2.1",),
    )
    with Emulator(config) as emu:
        result = cli_process("models", "--base-url", emu.base_url, "--api-key-env", TEST_KEY_ENV)
    assert result.returncode == 0, result.stderr
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 3}
    today = price_of("gemini-3.8-flash").describe()  # $0.75 in / $3.75 out per 1M until 2026-12-31
    assert "* chat" in lines["gemini-3.8-flash"] and today in lines["gemini-3.8-flash"]
    assert "* embed" in lines["gemini-embedding-2"] and "$0.2/1M in" in lines["gemini-embedding-2"]
    assert "deprecated, shuts down 2028-05-14" in lines["gemini-embedding-001"]
    assert "shut down 2026-10-08" in lines["gemini-3.7-flash"] and "answered by" in lines["gemini-3.7-flash"]
    # A default the server doesn't list is shown, and said so.
    assert "* images" in lines["gemini-nano-banana-2.1"] and "NOT LISTED" in lines["gemini-nano-banana-2.1"]
    assert "unknown" in lines["gemini-3.1-flash-lite-image"]


def test_the_emulator_plays_retired_and_rerouted_models_over_http():
    import httpx

    config = EmulatorConfig(
        api_key=TEST_KEY, retired=("gemini-3.5-flash-lite",), reroutes={"gemini-embedding-2": "gemini-embedding-001"}
    )
    with Emulator(config) as emu:
        headers = {"Authorization": f"Bearer {TEST_KEY}"}
        listed = httpx.get(emu.base_url + "models", headers=headers).json()["data"]
        assert "models/gemini-3.5-flash-lite" not in {m["id"] for m in listed}
        gone = httpx.get(emu.base_url + "models/gemini-3.5-flash-lite", headers=headers)
        assert gone.status_code == 404 and gone.json()[0]["error"]["status"] == "NOT_FOUND"
        hi = [{"role": "user", "content": "hi"}]
        chat = httpx.post(
            emu.base_url + "chat/completions", headers=headers, json={"model": "gemini-3.5-flash-lite", "messages": hi}
        )
        assert chat.status_code == 404
        reply = httpx.post(emu.base_url + "embeddings", headers=headers,
                           json={"model": "gemini-embedding-2", "input": ["hello"]}).json()  # fmt: skip
        assert reply["model"] == "gemini-embedding-001"
        np.testing.assert_allclose(reply["data"][0]["embedding"], fake_embedding("hello", "gemini-embedding-001"))
        # The admin route changes both at run time.
        changed = httpx.post(emu.base_url.split("/v1beta")[0] + "/_emulator/config", headers=headers,
                             json={"reroutes": {"gemini-3.8-flash": "gemini-4-argon"}, "retired": []})  # fmt: skip
        assert changed.status_code == 200 and changed.json()["reroutes"] == {"gemini-3.8-flash": "gemini-4-argon"}
        answer = httpx.post(
            emu.base_url + "chat/completions", headers=headers, json={"model": "gemini-3.8-flash", "messages": hi}
        ).json()
        assert answer["model"] == "gemini-4-argon"
        assert answer["choices"][0]["message"]["content"] == fake_chat_text("gemini-4-argon", "hi")


def test_same_model_allows_prefixes_and_version_tails_only():
    assert same_model("gemini-3.8-flash", "models/gemini-3.8-flash")
    assert same_model("gemini-3.8-flash", "gemini-3.8-flash-001")
    assert same_model("gemini-3.8-flash", "gemini-3.8-flash-preview-09-2026")
    assert not same_model("gemini-3.7-flash", "gemini-3.8-flash")
    assert not same_model("gemini-embedding-2", "gemini-embedding-001")
    assert not same_model("gemini-3.8-flash", "gemini-3.8-flash-lite")


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('[[price]]\nmodel = "m"\ninput = -1\n', "'input' must be a number of USD per 1M tokens"),
        ('[[price]]\nmodel = "m"\ninptu = 1\n', "unknown field(s) inptu"),
        ('[[price]]\ninput = 1\n', "'model' is required"),
        ('[[price]]\nmodel = "m"\n', "give 'input' (USD per 1M tokens) or 'per_image'"),
        ('[[price]]\nmodel = "m"\ninput = 1\n[[price]]\nmodel = "m"\ninput = 2\n', "two prices from the same day"),
        ('price = 3\n', "has no [[price]] entries"),
        ("[[price]\n", "is not valid TOML"),
    ],
)
def test_a_wrong_prices_file_is_refused_before_any_work_saying_what_is_wrong(tmp_path, text, said):
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_prices(str(path))
    assert said in str(caught.value)


def test_a_run_records_what_the_catalog_says_of_its_model(tmp_path):
    config = EmulatorConfig(api_key=TEST_KEY, models=(*DEFAULT_MODELS, "gemini-2.5-flash"))
    with Emulator(config) as emu:
        doc = run(commands.embed, emu, input=str(CORPUS), output=str(tmp_path / "e"), limit=5,
                  model="gemini-embedding-001")  # fmt: skip
        current = run(commands.embed, emu, input=str(CORPUS), output=str(tmp_path / "e2"), limit=5)
    assert "shuts down on 2028-05-14" in doc["provider"]["lifecycle"]
    assert "replacement: gemini-embedding-2" in doc["provider"]["lifecycle"]
    assert current["provider"]["lifecycle"] is None


def test_the_emulator_command_takes_retired_and_rerouted_models_and_says_how_to_write_a_reroute():
    result = cli_process("emulator", "--port", "0", "--reroute", "gemini-3.7-flash")
    assert result.returncode == 2
    assert "write OLD=NEW, e.g. gemini-3.7-flash=gemini-3.8-flash" in " ".join(result.stderr.split())
    helped = cli_process("emulator", "--help")
    assert all(flag in helped.stdout for flag in ("--retire", "--reroute", "--legacy-models"))
