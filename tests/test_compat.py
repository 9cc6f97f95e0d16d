"""Any OpenAI-compatible server: what a third-party server does differently, pinned with the
emulator's switches, over real HTTP on loopback.

- no ``GET models/{id}`` (only the list): a job runs; an unknown model is still refused before any work;
- a 503 (or a 429 with Retry-After) on the model check: retried a few times, the run starts;
- 10% OpenAI-style 429s with ``Retry-After`` plus 5% 500 and 5% 503 on every route: every row of every
  job completes with the value the emulator computes for it;
- a 200 whose body is not JSON still gets the long (transport) retry.

Jobs run in-process (``run_job`` called directly), as in test_faults.py, whose inputs and checks are reused.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from conftest import TEST_KEY, TEST_KEY_ENV, assert_balanced, read_errors, read_output, write_corpus
from test_embed import expected_vector
from test_faults import CASES, Case

from tasks.engine.run import RunOptions, run_job
from tasks.engine.send.context import RetryPolicy
from tasks.engine.send.limits import Limits
from tasks.errors import ConfigError
from tasks.jobs.embed import EmbedJob
from tasks.provider.client import ProviderSettings, open_connection
from tasks.provider.model_check import check_model

MODEL = "gemini-embedding-001"
FAST_RETRY = RetryPolicy(base_delay_s=0.01, max_delay_s=0.05)


def settings(emu, stream: bool = False) -> ProviderSettings:
    return ProviderSettings(
        provider="local", base_url=emu.base_url, api_key_env=TEST_KEY_ENV, timeout_s=5, stream=stream
    )


def run(emu, job, source: Path, out_dir: Path, stream: bool = False, **kw) -> dict:
    provider = settings(emu, stream)
    options = RunOptions(input=str(source), output=str(out_dir), provider=provider, **{"retry": FAST_RETRY, **kw})
    return asyncio.run(run_job(job, options))


def small_corpus(tmp_path: Path) -> tuple[Path, dict[int, str]]:
    texts = {1: "a harbour at dawn", 2: "basalt columns", 3: "a field of juniper"}
    return write_corpus(tmp_path / "in.parquet", list(texts), list(texts.values())), texts


def assert_embedded(out_dir: Path, texts: dict[int, str]) -> None:
    out = read_output(out_dir).sort("id")
    assert out["id"].to_list() == sorted(texts)
    for row in out.iter_rows(named=True):
        assert row["embedding"] == pytest.approx(expected_vector(texts[row["id"]]).tolist(), rel=1e-6, abs=1e-7)
        assert row["model"] == MODEL


# -- the model check -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["models/", ""], ids=["gemini-style-ids", "bare-ids"])
def test_a_server_without_the_retrieve_route_runs_a_job_checked_against_its_model_list(emulator, tmp_path, prefix):
    emulator.configure(retrieve_route=False, model_id_prefix=prefix)
    source, texts = small_corpus(tmp_path)

    doc = run(emulator, EmbedJob(model=MODEL), source, tmp_path / "out")

    assert doc["status"] == "completed", doc["message"]
    assert doc["counts"]["succeeded"] == 3
    assert_embedded(tmp_path / "out", texts)
    # One GET models/{id} answered 404 by a route the server lacks, one GET models that named the model.
    assert emulator.stats["by_status"][404] == 1
    assert emulator.stats["by_route"]["models"] == 1


@pytest.mark.parametrize("prefix", ["models/", ""], ids=["gemini-style-ids", "bare-ids"])
@pytest.mark.parametrize("name", [MODEL, f"models/{MODEL}"])
def test_the_model_list_matches_a_name_with_or_without_models_prefix(emulator, prefix, name):
    emulator.configure(retrieve_route=False, model_id_prefix=prefix)

    async def check() -> None:
        conn = open_connection(settings(emulator))
        try:
            await check_model(conn, name, key_source=TEST_KEY_ENV)
            with pytest.raises(ConfigError, match="the server's model list does not name it"):
                await check_model(conn, f"{name}-999", key_source=TEST_KEY_ENV)
        finally:
            await conn.close()

    asyncio.run(check())


def test_without_the_retrieve_route_an_unknown_model_is_refused_before_any_work(emulator, tmp_path):
    emulator.configure(retrieve_route=False)
    source, _ = small_corpus(tmp_path)

    with pytest.raises(ConfigError) as error:
        run(emulator, EmbedJob(model="gemini-embedding-999"), source, tmp_path / "out")

    message = str(error.value)
    assert message.startswith(f"model 'gemini-embedding-999' was not found at 127.0.0.1:{emulator.port}"), message
    assert "GET models/gemini-embedding-999 answered HTTP 404: Not Found, " in message
    listed = "the server's model list does not name it either (it lists 16: models/dall-e-3, "
    assert listed + "models/gemini-2.5-flash-lite, " in message
    assert message.endswith(
        "List the available models with `gembatch models`, then pass one with --model. Nothing was sent."
    )
    assert not (tmp_path / "out").exists()
    assert emulator.stats["by_route"]["embeddings"] == 0


def test_without_the_retrieve_route_a_wrong_key_is_still_a_clear_config_error(emulator, tmp_path, monkeypatch):
    emulator.configure(retrieve_route=False)
    wrong = "sk-wrong-key-0123456789abcdef"
    monkeypatch.setenv(TEST_KEY_ENV, wrong)
    source, _ = small_corpus(tmp_path)

    with pytest.raises(ConfigError) as error:
        run(emulator, EmbedJob(model=MODEL), source, tmp_path / "out")

    message = str(error.value)
    assert message.startswith(f"the API key in {TEST_KEY_ENV} was rejected by 127.0.0.1:{emulator.port}"), message
    assert "HTTP 400: API key not valid." in message and "--api-key-env" in message
    assert wrong not in message and TEST_KEY not in message
    assert emulator.stats["by_status"] == {404: 1, 400: 1}
    assert not (tmp_path / "out").exists()


def test_a_server_with_no_model_routes_at_all_is_trusted_and_the_first_request_tells(emulator, tmp_path):
    emulator.configure(retrieve_route=False, list_route=False)
    source, texts = small_corpus(tmp_path)

    doc = run(emulator, EmbedJob(model=MODEL), source, tmp_path / "out")
    assert doc["status"] == "completed", doc["message"]
    assert_embedded(tmp_path / "out", texts)

    doc = run(emulator, EmbedJob(model="gemini-embedding-999"), source, tmp_path / "other")
    assert doc["status"] == "failed: not_found"
    assert "gemini-embedding-999 is not found" in doc["message"]
    assert doc["counts"]["not_attempted"] == 3
    assert_balanced(doc)


def test_a_503_on_the_first_model_check_does_not_stop_the_run(emulator, tmp_path):
    emulator.configure(models_503_first=1)
    source, texts = small_corpus(tmp_path)
    began = time.monotonic()

    doc = run(emulator, EmbedJob(model=MODEL), source, tmp_path / "out")

    assert doc["status"] == "completed", doc["message"]
    assert_embedded(tmp_path / "out", texts)
    assert emulator.stats["by_route"]["models"] == 2
    assert emulator.stats["by_status"][503] == 1 and emulator.stats["faults"] == {"503": 1}
    assert time.monotonic() - began < 5, "one retry of the model check takes under a second"


def test_a_model_check_that_keeps_failing_gives_up_after_a_few_quick_tries(emulator, tmp_path):
    emulator.configure(models_503_first=100)
    source, _ = small_corpus(tmp_path)
    began = time.monotonic()

    with pytest.raises(ConfigError) as error:
        run(emulator, EmbedJob(model=MODEL), source, tmp_path / "out")

    message = str(error.value)
    assert message.startswith(f"checking model '{MODEL}' at 127.0.0.1:{emulator.port}"), message
    assert message.endswith("failed: HTTP 503: The model is overloaded. Please try again later")
    assert emulator.stats["by_route"]["models"] == 4
    assert time.monotonic() - began < 10
    assert not (tmp_path / "out").exists()


def test_the_model_check_waits_as_long_as_retry_after_says(emulator, tmp_path):
    # Every model check is a 429 with Retry-After: 0.4 s; four tries wait 3 x 0.4 s in between.
    emulator.configure(faults_on_models=True, retry_after_429_rate=1.0, retry_after_seconds=0.4)
    source, _ = small_corpus(tmp_path)
    began = time.monotonic()

    with pytest.raises(ConfigError, match="HTTP 429: Rate limit reached for requests"):
        run(emulator, EmbedJob(model=MODEL), source, tmp_path / "out")

    assert emulator.stats["by_route"]["models"] == 4 and emulator.stats["faults"] == {"429": 4}
    assert 1.2 <= time.monotonic() - began < 10


# -- 429s with Retry-After and 5xx on every route --------------------------------------------------------
COMPAT_FAULTS = {
    "retry_after_429_rate": 0.10,
    "retry_after_seconds": 0.05,
    "fault_rate_500": 0.05,
    "fault_rate_503": 0.05,
    "faults_on_models": True,
}
# Small on purpose: the adaptive limiter halves its rate on every 429 that follows its last cut, so
# random 429s (not caused by our rate) slow a run down request after request; ~30 requests a job
# already take about 10 s (the figures are printed with -s).
COMPAT_ROWS = {
    "embed": 300, "extract": 30, "caption": 30, "transcribe": 30, "images": 30,
    "generate": 30, "gen-stream": 30, "triage": 30,
}  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_retry_after_429s_and_5xx_on_every_route_lose_no_row(emulator, tmp_path, case: Case):
    rows = COMPAT_ROWS[case.name]
    source, expected_by_id = case.make_input(tmp_path, rows)
    out_dir = tmp_path / "out"
    job = case.make_job(source, out_dir)
    emulator.configure(**COMPAT_FAULTS, seed=77)

    doc = run(emulator, job, source, out_dir, case.stream, limits=Limits(max_concurrency=16), chunk_size=100)

    assert doc["status"] == "completed", doc["message"]
    assert_balanced(doc)
    c = doc["counts"]
    assert c["succeeded"] == rows and c["failed"] == 0, c
    assert read_errors(out_dir).height == 0
    out = read_output(out_dir)
    assert sorted(out["id"].to_list()) == list(range(rows))
    case.check_rows(job, out_dir, out, expected_by_id)

    faults = emulator.stats["faults"]
    assert {"429", "500", "503"} <= set(faults) <= {"429", "500", "503"}, faults
    requests = doc["requests"]
    # Every 429 and 5xx on the job's route was seen and retried; those on the model check were too.
    posts = emulator.stats["by_route"][case.route]
    assert requests["sent"] == posts == -(-rows // case.per_request) + requests["retries"], (requests, posts)
    assert requests["rate_limited_429"] + requests["transient_errors"] == requests["retries"] > 0
    assert requests["rate_limited_429"] > 0 and requests["transient_errors"] > 0
    limits = doc["limits"]
    print(
        f"\n{case.name:<10} {rows:>4} rows {requests['sent']:>3} requests {requests['rate_limited_429']:>2} x 429"
        f" {requests['transient_errors']:>2} x 5xx; {limits['rate_cuts_after_429']} rate cuts, lowest"
        f" {limits['lowest_rpm_after_429']:.0f} rpm; {doc['duration_s']:.1f} s",
        flush=True,
    )


def test_a_200_whose_body_is_not_json_still_gets_the_long_retry(emulator, tmp_path):
    # An HTML page with status 200 (a proxy's): the SDK hands back a str; that is a transport fault,
    # retried up to 8 times like a 5xx, not the "asked once more" of a reply that can't be used.
    case = next(c for c in CASES if c.name == "images")
    source, expected_by_id = case.make_input(tmp_path, 40)
    out_dir = tmp_path / "out"
    job = case.make_job(source, out_dir)
    emulator.configure(fault_rate_garbage=0.3, seed=5)

    doc = run(emulator, job, source, out_dir)

    assert doc["status"] == "completed", doc["message"]
    assert doc["counts"]["succeeded"] == 40 and doc["counts"]["failed"] == 0
    garbage = emulator.stats["faults"]["garbage"]
    assert doc["requests"]["transient_errors"] == doc["requests"]["retries"] == garbage > 0
    case.check_rows(job, out_dir, read_output(out_dir), expected_by_id)
