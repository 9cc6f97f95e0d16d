"""A real gateway: the LiteLLM proxy, with its default settings, in front of the emulator.

The proxy lives in a virtualenv of its own (tests/gateway/install_litellm.sh; GEMBATCH_LITELLM_VENV,
default ~/.cache/gembatch-litellm): LiteLLM's pins clash with the project's. Without it the test is
skipped, except under CI=true, where it fails.

Every job goes through the proxy as a team that sends all its traffic through LiteLLM would run it
(`--base-url http://127.0.0.1:PORT/v1 --api-key-env NAME`, the proxy's master key), and each row's
values are compared with the same command sent straight to the emulator. Then what LiteLLM refuses:
`embed --dimensions 768` stops with one message naming dimensions and drop_params, nothing in
`_errors/`; `--mode batch` (no files_settings) is one paragraph and exit 3; `--mode auto` completes live
with one warning line.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import polars as pl
import pyarrow.csv as pcsv
import pytest
from conftest import REPO, TEST_KEY, TEST_KEY_ENV, cli_env, read_errors, read_output

from emulator import Emulator, EmulatorConfig

pytestmark = pytest.mark.slow

VENV = Path(os.environ.get("GEMBATCH_LITELLM_VENV") or Path.home() / ".cache" / "gembatch-litellm")
LITELLM = VENV / "bin" / "litellm"
PROXY_KEY_ENV = "GEMBATCH_PROXY_KEY"
EMBED_MODEL = "gemini-embedding-001"
CHAT_MODEL = "gemini-3.8-flash"
IMAGE_MODEL = "gemini-nano-banana-2.1"
READY_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def upstream():
    with Emulator(EmulatorConfig(api_key=TEST_KEY)) as emu:
        yield emu


@pytest.fixture(scope="module")
def proxy(upstream: Emulator, tmp_path_factory: pytest.TempPathFactory):
    """``(base_url, master_key)`` of a LiteLLM proxy serving three models as ``openai/<model>``."""
    if not LITELLM.exists():
        reason = f"the LiteLLM proxy is not installed in {VENV}: run tests/gateway/install_litellm.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("litellm")
    models = "".join(
        f"""  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: {upstream.base_url}
      api_key: os.environ/GEMBATCH_UPSTREAM_KEY
"""
        for model in (EMBED_MODEL, CHAT_MODEL, IMAGE_MODEL)
    )
    config = folder / "config.yaml"
    config.write_text(f"model_list:\n{models}general_settings:\n  master_key: os.environ/LITELLM_MASTER_KEY\n")
    master_key = "sk-gembatch-" + secrets.token_hex(16)
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LITELLM", "OPENAI"))},
        "GEMBATCH_UPSTREAM_KEY": TEST_KEY,
        "LITELLM_MASTER_KEY": master_key,
        # No way out of this machine: the bundled model price map, not a download.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    log = (folder / "litellm.log").open("wb")
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(LITELLM), "--config", str(config), "--port", str(port), "--host", "127.0.0.1"],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"litellm exited with {proc.returncode}: {(folder / 'litellm.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/readiness", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > READY_TIMEOUT_S:
                tail = (folder / "litellm.log").read_text()[-3000:]
                pytest.fail(f"litellm not ready after {READY_TIMEOUT_S:g} s: {tail}")
            time.sleep(0.25)
        print(f"\nlitellm proxy ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
        yield f"http://127.0.0.1:{port}/v1", master_key
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    for name in ("images", "audio"):
        shutil.copytree(REPO / "data" / name, root / name)
        shutil.copy(REPO / "data" / f"{name}.csv", root / f"{name}.csv")
    corpus = pcsv.read_csv(REPO / "data" / "corpus.csv")
    pcsv.write_csv(corpus.slice(0, 40), root / "texts.csv")
    shutil.copy(REPO / "data" / "extract" / "invoices.csv", root / "invoices.csv")
    prompts = pcsv.read_csv(REPO / "data" / "prompts.csv")
    pcsv.write_csv(prompts.slice(0, 3), root / "prompts.csv")
    return {k: root / f"{k}.csv" for k in ("images", "audio", "texts", "invoices", "prompts")}


JOBS: dict[str, list[str]] = {
    "embed": ["embed", "{texts}", "--model", EMBED_MODEL],
    "extract": ["extract", "{invoices}", "--schema", "schemas.examples:Invoice", "--model", CHAT_MODEL],
    "caption": ["caption", "{images}", "--model", CHAT_MODEL],
    "transcribe": ["transcribe", "{audio}", "--model", CHAT_MODEL],
    "images": ["images", "{prompts}", "--model", IMAGE_MODEL],
    "generate": ["generate", "{texts}", "--prompt", "In one line: {text}", "--model", CHAT_MODEL],
    "generate-stream": ["generate", "{texts}", "--prompt", "In one line: {text}", "--model", CHAT_MODEL, "--stream"],
}


def gembatch(args: list[str], inputs: dict[str, Path], out: Path, base_url: str, key: str, *extra: str):
    filled = [a.format(**{k: str(v) for k, v in inputs.items()}) if a.startswith("{") else a for a in args]
    key_env = PROXY_KEY_ENV if key != TEST_KEY else TEST_KEY_ENV
    argv = [sys.executable, "-m", "flows.cli", *filled, "--output", str(out), "--base-url", base_url]
    argv += ["--api-key-env", key_env, "--no-progress", *extra]
    env = cli_env(**{PROXY_KEY_ENV: key})
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _values(out: Path) -> pl.DataFrame:
    table = read_output(out)
    # image_path names the content_hash: the same for both (same model, prompt and parameters).
    order = ["id", "image_index"] if "image_index" in table.columns else ["id"]
    return table.drop([c for c in ("revised_prompt",) if c in table.columns]).sort(order)


@pytest.mark.parametrize("job", list(JOBS))
def test_every_job_through_the_proxy_gives_the_same_rows(job, proxy, upstream, inputs, tmp_path):
    base_url, key = proxy
    via_proxy, direct = tmp_path / "proxy", tmp_path / "direct"
    got = gembatch(JOBS[job], inputs, via_proxy, base_url, key)
    assert got.returncode == 0, got.stderr
    assert "Traceback" not in got.stderr
    want = gembatch(JOBS[job], inputs, direct, upstream.base_url, TEST_KEY)
    assert want.returncode == 0, want.stderr
    assert read_errors(via_proxy).is_empty()
    proxied, straight = _values(via_proxy), _values(direct)
    assert proxied.height == straight.height > 0
    assert proxied.equals(straight), (proxied.head(3), straight.head(3))
    if job == "images":
        assert "response_format" in got.stderr  # refused once, asked again without it (one warning)
        for path in proxied["image_path"]:
            assert (via_proxy / path).read_bytes() == (direct / path).read_bytes()


def test_an_option_the_proxy_refuses_stops_the_run_naming_it(proxy, inputs, tmp_path):
    base_url, key = proxy
    out = tmp_path / "out"
    got = gembatch(JOBS["embed"], inputs, out, base_url, key, "--dimensions", "768")
    assert got.returncode == 3, got.stderr
    assert "Traceback" not in got.stderr
    assert "failed: parameter refused" in got.stderr
    assert "'dimensions'" in got.stderr and "drop_params" in got.stderr and "--dimensions" in got.stderr
    assert read_errors(out).is_empty() and read_output(out).is_empty()


def test_batch_through_a_proxy_without_file_storage_is_one_paragraph(proxy, inputs, tmp_path):
    base_url, key = proxy
    out = tmp_path / "out"
    got = gembatch(JOBS["embed"], inputs, out, base_url, key, "--mode", "batch")
    assert got.returncode == 3, got.stderr
    assert "Traceback" not in got.stderr
    assert "failed: batch unavailable" in got.stderr and "files_settings" in got.stderr
    assert "--mode live" in got.stderr
    assert read_errors(out).is_empty() and read_output(out).is_empty()


def test_auto_through_a_proxy_without_file_storage_completes_live(proxy, upstream, inputs, tmp_path):
    base_url, key = proxy
    out = tmp_path / "out"
    got = gembatch(JOBS["embed"], inputs, out, base_url, key, "--mode", "auto", "--auto-min-requests", "1")
    assert got.returncode == 0, got.stderr
    assert "Traceback" not in got.stderr
    assert got.stderr.count("sending every row live instead") == 1, got.stderr
    assert read_output(out)["id"].n_unique() == 40 and read_errors(out).is_empty()
