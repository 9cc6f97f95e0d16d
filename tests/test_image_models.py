"""Image models the routes serve, sizes and n per model, and prices per image.

The default (gemini-nano-banana-2.1: Imagen 4 shut down on 2026-08-17) is pinned; a size, n or model a
route doesn't take is refused before any
request; the emulator refuses on each path what that path's real endpoint doesn't serve; the dry run,
the `_runs/` cost and `--max-cost-usd` count images at the price table's price.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from conftest import REPO, TEST_KEY, TEST_KEY_ENV, assert_balanced, read_errors, read_output, run_gembatch
from test_images import SIZE, assert_images_match, run_images, sample_prompts, write_prompts

from flows import commands
from flows.options import command_job
from tasks.engine.dry_run import plan_job
from tasks.engine.run import RunOptions
from tasks.engine.send.budget import Budget
from tasks.errors import ConfigError
from tasks.jobs.image_models import IMAGE_MODELS, check_image_request
from tasks.jobs.images import ImagesJob
from tasks.provider.client import ProviderSettings
from tasks.provider.prices import PRICES, default_model, image_price_usd

ROUTE = "images/generations"
IMAGEN = "imagen-4.0-generate-001"  # shut down 2026-08-17: its spec is kept for outputs made with it
DEFAULT = "gemini-nano-banana-2.1"
DEFAULT_PRICE = 0.034
PROMPTS = REPO / "data" / "prompts.csv"


def params(**kw) -> dict:
    return {"provider": "gemini", "output": "out", "prompt_col": "prompt", "size": "1024x1024", "n": 1, **kw}


def build(parameters: dict) -> object:
    """The images job the command builds from these flat parameters."""
    return command_job(commands.images, **{"input": "", **parameters}).job


def gembatch(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """The command as a user runs it, untracked (no Prefect API)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {TEST_KEY_ENV: TEST_KEY, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "flows.cli", *argv, "--no-progress"]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


# -- the default ---------------------------------------------------------------------------------------------
def test_the_default_image_model_is_a_gemini_image_model_for_gemini_and_local_and_gpt_image_1_for_openai():
    assert default_model("gemini", "images") == default_model("local", "images") == DEFAULT
    assert default_model("openai", "images") == "gpt-image-1"
    for provider in ("gemini", "local"):
        p = params(provider=provider)
        job = build(p)
        assert job.model == DEFAULT and job.route == "gemini"
        assert job.per_image_usd == DEFAULT_PRICE
    assert build(params(provider="openai")).route == "openai"
    assert build(params(base_url="http://127.0.0.1:1/v1/")).route is None  # another server: any model


def test_a_local_run_with_the_default_model_writes_rows_priced_per_image(tmp_path):
    out_dir = tmp_path / "out"
    result = gembatch("images", str(PROMPTS), "-o", str(out_dir), "--provider", "local", "--size", SIZE, cwd=REPO)

    assert result.returncode == 0, result.stdout + result.stderr
    prompts = sample_prompts()
    assert_images_match(out_dir, prompts, n=1)  # every row's model is the default
    (run_file,) = (out_dir / "_runs").glob("*.json")
    doc = json.loads(run_file.read_text())
    assert doc["status"] == "completed" and doc["provider"]["model"] == DEFAULT
    assert doc["cost"] == {
        "estimated_usd": pytest.approx(len(prompts) * DEFAULT_PRICE),
        "priced_model": DEFAULT,
        "images_generated": len(prompts),
        "usd_per_image": DEFAULT_PRICE,
    }
    assert "images generated / USD each" in result.stdout


# -- what each model takes, refused before any request -------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "size", "n", "quality", "message"),
    [
        (IMAGEN, "1536x1024", 1, None, "--size '1536x1024' is not an aspect ratio imagen-4.0-generate-001 takes: "
         "use 1024x1024 (1:1), 896x1280 (3:4), 1280x896 (4:3), 768x1408 (9:16), 1408x768 (16:9), or any"),
        (IMAGEN, "auto", 1, None, "is not an aspect ratio"),
        (IMAGEN, "1024x1024", 5, None, "--n must be between 1 and 4 for imagen-4.0-generate-001, got 5"),
        ("imagen-4.0-ultra-generate-001", "1024x1024", 1, "hd", "--quality is not an option of imagen"),
        ("gemini-3-pro-image", "1000x1000x", 1, None, "is not an aspect ratio gemini-3-pro-image takes"),
        (DEFAULT, "1100x1000", 1, None, "--size '1100x1000' is not an aspect ratio gemini-nano-banana-2.1 takes: "
         "use 1024x1024 (1:1), 832x1248 (2:3), 1248x832 (3:2)"),
        (DEFAULT, "1024x1024", 5, None, "--n must be between 1 and 4 for gemini-nano-banana-2.1, got 5"),
        ("gpt-image-1", "1792x1024", 1, None, "--size '1792x1024' is not one gpt-image-1 takes: use one of "
         "1024x1024, 1536x1024, 1024x1536, auto"),
        ("gpt-image-1", "1024x1024", 11, None, "--n must be between 1 and 10 for gpt-image-1"),
        ("gpt-image-1", "1024x1024", 1, "hd", "--quality 'hd' is not one gpt-image-1 takes: use one of low, medium"),
        ("dall-e-3", "1536x1024", 1, None, "use one of 1024x1024, 1792x1024, 1024x1792"),
        ("dall-e-3", "1024x1024", 2, None, "--n must be 1 for dall-e-3, got 2"),
    ],
)  # fmt: skip
def test_a_size_n_or_quality_the_model_does_not_take_is_refused_naming_what_it_takes(model, size, n, quality, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ImagesJob(model=model, output="out", size=size, n=n, quality=quality)


@pytest.mark.parametrize(
    ("model", "size", "ratio"),
    [(IMAGEN, "1024x1024", "1:1"), (IMAGEN, "1408x768", "16:9"), (IMAGEN, "64x48", "4:3"), (IMAGEN, "720x1280", "9:16"),
     (DEFAULT, "1536x672", "21:9"), (DEFAULT, "300x200", "3:2"), ("gemini-3-pro-image", "2048x2048", "1:1")],
)  # fmt: skip
def test_sizes_in_the_models_aspect_ratios_are_taken(model, size, ratio):
    assert IMAGE_MODELS[model].aspect_ratio_of(size) == ratio
    assert check_image_request(model, size, 1, None, "gemini") is None


def test_a_model_the_providers_images_route_does_not_serve_is_refused_by_the_command():
    with pytest.raises(ConfigError) as error:
        build(params(model="gpt-image-1"))
    assert str(error.value) == (
        "--model gpt-image-1 is not served by Gemini's OpenAI-compatible images route; image models there: "
        "gemini-3-pro-image, gemini-3.1-flash-image, gemini-3.1-flash-lite-image, gemini-nano-banana-2.1 "
        "(or point --base-url at a server that has it)"
    )
    with pytest.raises(ConfigError, match="--model imagen-4.0-generate-001 is not served by OpenAI's images route"):
        build(params(provider="openai", model=IMAGEN))


def test_an_invalid_size_is_refused_by_the_command_before_any_request(emulator, tmp_path, capsys):
    result = run_gembatch([
        "images", str(PROMPTS), "-o", str(tmp_path / "out"), "--size", "1100x1000",
        "--base-url", emulator.base_url, "--api-key-env", TEST_KEY_ENV, "--no-progress",
    ], capsys)  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error: --size '1100x1000' is not an aspect ratio gemini-nano-banana-2.1 takes: use 1024x1024 (1:1)" in (
        " ".join(result.stderr.split())
    )
    assert "Traceback" not in result.stderr
    assert emulator.stats["requests"] == 0
    assert not (tmp_path / "out").exists()


# -- the emulator refuses what each path's real endpoint doesn't serve ------------------------------------
def _client(emu, path: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{emu.port}{path}", api_key=TEST_KEY, max_retries=0)


def test_the_emulator_serves_gemini_image_models_under_gemini_and_openai_models_under_v1(emulator):
    gemini, oai = _client(emulator, "/v1beta/openai/"), _client(emulator, "/v1/")
    for model in (DEFAULT, "gemini-3-pro-image", "gemini-3.1-flash-lite-image"):
        assert len(gemini.images.generate(model=model, prompt="a fox", n=4, size="16x9").data) == 4
    for retired in ("imagen-4.0-generate-001", "imagen-4.0-fast-generate-001", "gemini-2.5-flash-image"):
        with pytest.raises(openai.NotFoundError):  # shut down: answered 404 like Google's
            gemini.images.generate(model=retired, prompt="a fox")
    assert len(oai.images.generate(model="gpt-image-1", prompt="a fox", size="1024x1024").data) == 1
    assert len(oai.images.generate(model="dall-e-3", prompt="a fox", size="1024x1792", quality="hd").data) == 1

    with pytest.raises(openai.NotFoundError) as error:
        gemini.images.generate(model="gpt-image-1", prompt="a fox", size="1024x1024")
    assert error.value.body == [  # Gemini's shape: a JSON array holding the error
        {
            "error": {
                "code": 404,
                "message": "models/gpt-image-1 is not found for API version v1beta, or is not supported for predict. "
                "Call ListModels to see the list of available models and their supported methods.",
                "status": "NOT_FOUND",
            }
        }
    ]
    with pytest.raises(openai.BadRequestError) as error:
        gemini.images.generate(model=DEFAULT, prompt="a fox", n=5)
    assert error.value.body[0]["error"]["message"] == f"n: must be an integer between 1 and 4 for {DEFAULT}, got 5."
    with pytest.raises(openai.NotFoundError) as error:
        oai.images.generate(model=IMAGEN, prompt="a fox")
    assert error.value.code == "model_not_found"
    assert error.value.body["message"] == f"The model `{IMAGEN}` does not exist or you do not have access to it."
    with pytest.raises(openai.BadRequestError) as error:
        oai.images.generate(model="dall-e-3", prompt="a fox", size="1536x1024")
    assert error.value.code == "invalid_value" and error.value.body["param"] == "size"
    ids = {m.id for m in gemini.models.list().data}
    assert {f"models/{m}" for m in (DEFAULT, "gemini-3-pro-image", "gemini-3.1-flash-lite-image")} <= ids
    assert not {f"models/{m}" for m in ("imagen-4.0-generate-001", "gemini-2.5-flash-image")} & ids


def test_a_model_the_route_does_not_serve_stops_the_run_with_the_providers_message(emulator, tmp_path):
    # Through --base-url the command can't know the route, so the server's refusal is what the user sees.
    src = write_prompts(tmp_path / "in.parquet", [1, 2, 3], ["a kite", "a boat", "a hill"])
    doc = run_images(emulator, src, tmp_path / "out", model="gpt-image-1", size="1024x1024")

    assert doc["status"] == "failed: not_found"
    assert "models/gpt-image-1 is not found for API version v1beta, or is not supported for predict" in doc["message"]
    # The first refusal stops the run: no retry, nothing more sent after it (3 rows went out at once).
    assert emulator.stats["by_route"][ROUTE] == doc["requests"]["sent"] <= 3 and doc["requests"]["retries"] == 0
    assert doc["counts"]["succeeded"] == 0
    assert emulator.stats["images"] == 0 and doc["cost"]["images_generated"] == 0
    assert_balanced(doc)


# -- prices: dry run, _runs/ cost, budget -----------------------------------------------------------------
def test_the_price_table_prices_images_by_model_size_and_quality():
    assert image_price_usd("imagen-4.0-fast-generate-001", "1024x1024") == 0.02
    assert image_price_usd("models/imagen-4.0-generate-001", "1408x768") == 0.04
    assert image_price_usd("imagen-4.0-ultra-generate-001", "1024x1024") == 0.06
    assert image_price_usd("gemini-2.5-flash-image", "1024x1024") == 0.039
    assert image_price_usd(DEFAULT, "1024x1024") == DEFAULT_PRICE
    assert image_price_usd("gemini-3-pro-image", "2048x2048") == 0.134
    assert image_price_usd("gemini-3.1-flash-lite-image", "1024x1024") is None  # no price known: --prices
    assert image_price_usd("gpt-image-1", "1024x1024", "low") == 0.011
    assert image_price_usd("gpt-image-1", "1536x1024", "medium") == 0.063
    assert image_price_usd("gpt-image-1", "1024x1536") == 0.25  # no quality: "auto", priced at high
    assert image_price_usd("gpt-image-1", "auto", "high") == 0.25
    assert image_price_usd("dall-e-3", "1024x1024") == 0.04
    assert image_price_usd("dall-e-3", "1792x1024", "hd") == 0.12
    assert image_price_usd("gemini-2.5-flash", "1024x1024") is None  # a token-priced model
    assert image_price_usd("my-diffusion-model", "1024x1024") is None
    # No batch route serves images through these APIs (Gemini's compat batches: chat and embeddings).
    assert all(p.batch_per_image is None for schedule in PRICES.values() for p in schedule)


def test_dry_run_cost_is_n_times_rows_times_the_price_per_image(emulator, tmp_path, monkeypatch):
    prompts = sample_prompts()
    out_dir = tmp_path / "out"
    first = dict(list(prompts.items())[:4])
    run_images(emulator, write_prompts(tmp_path / "first.parquet", list(first), list(first.values())), out_dir, n=3,
               model="gemini-3-pro-image")  # fmt: skip
    emulator.reset_stats()
    monkeypatch.delenv(TEST_KEY_ENV)  # a dry run needs no key
    job = ImagesJob(model="gemini-3-pro-image", output=str(out_dir), size=SIZE, n=3)
    options = RunOptions(input=str(PROMPTS), output=str(out_dir), provider=ProviderSettings(provider="gemini"),
                         dry_run=True)  # fmt: skip

    plan = asyncio.run(plan_job(job, options))

    assert emulator.stats["requests"] == 0
    rows = len(prompts) - 4
    assert plan["counts"]["would_send"] == rows and plan["estimate"]["requests"] == rows
    e = plan["estimate"]
    assert e["images"] == 3 * rows and e["usd_per_image"] == 0.134
    assert e["image_cost_usd"] == pytest.approx(3 * rows * 0.134)
    assert e["cost_usd"] == pytest.approx(3 * rows * 0.134 + e["input_cost_usd"])  # prompt tokens at $2/1M


def test_dry_run_prints_the_image_cost(tmp_path):
    result = gembatch("images", str(PROMPTS), "-o", str(tmp_path / "out"), "--n", "2", "--dry-run", cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.stdout.splitlines()
             if line.count("│") == 3}  # fmt: skip
    rows = len(sample_prompts())
    assert lines["model"] == DEFAULT
    assert lines["images (n × rows)"] == str(2 * rows)
    assert float(lines["image cost USD (estimate)"]) == pytest.approx(2 * rows * DEFAULT_PRICE)


@pytest.mark.parametrize(
    ("model", "size", "quality", "base", "price"),
    [
        (DEFAULT, SIZE, None, "/v1beta/openai/", DEFAULT_PRICE),
        ("gpt-image-1", "1024x1024", "low", "/v1/", 0.011),
        ("dall-e-3", "1792x1024", "hd", "/v1/", 0.12),
    ],
)
def test_runs_cost_is_images_generated_times_the_price(emulator, tmp_path, model, size, quality, base, price):
    prompts = dict(list(sample_prompts().items())[:4])
    src = write_prompts(tmp_path / "in.parquet", list(prompts), list(prompts.values()))
    n = 1 if model == "dall-e-3" else 2
    url = f"http://127.0.0.1:{emulator.port}{base}"
    doc = run_images(emulator, src, tmp_path / "out", model=model, size=size, quality=quality, n=n, base_url=url)

    assert doc["status"] == "completed", doc["message"]
    assert emulator.stats["images"] == 4 * n
    run_file = json.loads((tmp_path / "out" / "_runs" / f"{doc['run_id']}.json").read_text())
    assert run_file["cost"] == {
        "estimated_usd": pytest.approx(4 * n * price),
        "priced_model": model,
        "images_generated": 4 * n,
        "usd_per_image": price,
    }
    assert set(read_output(tmp_path / "out")["model"]) == {model}
    if quality is not None:
        assert run_file["job_parameters"]["quality"] == quality


def test_max_cost_stops_an_images_run_before_the_budget_and_a_bigger_budget_finishes(emulator, tmp_path):
    prompts = sample_prompts()
    out_dir = tmp_path / "out"
    # Each request asks for 2 images at $0.034: $0.068 reserved before it is sent. $0.21 pays for 3.
    doc = run_images(emulator, PROMPTS, out_dir, n=2, max_cost_usd=0.21, chunk_size=100)

    assert doc["status"] == "stopped: budget" and "--max-cost-usd 0.21" in doc["message"]
    assert doc["counts"]["succeeded"] == 3 and doc["counts"]["not_attempted"] == len(prompts) - 3
    assert emulator.stats["images"] == doc["cost"]["images_generated"] == 6
    assert doc["cost"]["estimated_usd"] == pytest.approx(6 * DEFAULT_PRICE) and doc["cost"]["estimated_usd"] <= 0.21
    assert_balanced(doc)
    assert read_output(out_dir).height == 6 and read_errors(out_dir).height == 0

    emulator.reset_stats()
    doc = run_images(emulator, PROMPTS, out_dir, n=2, max_cost_usd=1.0, chunk_size=100)
    assert doc["status"] == "completed" and doc["counts"]["skipped_done"] == 3
    assert emulator.stats["images"] == 2 * (len(prompts) - 3)
    assert doc["cost"]["estimated_usd"] == pytest.approx(2 * (len(prompts) - 3) * DEFAULT_PRICE)
    assert_images_match(out_dir, prompts, n=2)


def test_an_images_budget_needs_a_price_per_image(tmp_path):
    job = ImagesJob(model="my-diffusion-model", output=str(tmp_path / "out"), size="64x64")
    expected = "needs a price per image for model 'my-diffusion-model'.*--prices FILE"
    with pytest.raises(ConfigError, match=expected):
        Budget.for_job(1.0, job)
