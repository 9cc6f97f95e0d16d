"""A parameter of the run that a server or gateway refuses is the run's problem, not the rows'.

The words servers use (LiteLLM, OpenAI, vLLM, Gemini) are classified by the parameters the request
actually carried; a refusal stops the run after the first answers with one message naming the
parameter and the ways out, and leaves `_errors/` empty. Image generation is the exception where
gembatch added the parameter itself (response_format): it asks again without it, and downloads the
images the server then answers as URLs.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from conftest import TEST_KEY, TEST_KEY_ENV, gembatch, read_errors, read_output

from emulator import Emulator, EmulatorConfig
from tasks.jobs.image_replies import ImageNotFetched, download_image
from tasks.provider.failures import classify_failure


def refusal(body: Any, sent: dict[str, Any], *, status: int = 400, path: str = "/v1/embeddings") -> Exception:
    request = httpx2.Request("POST", f"http://127.0.0.1:4000{path}", content=json.dumps(sent).encode())
    return openai.BadRequestError("bad", response=httpx2.Response(status, request=request, json=body), body=body)


LITELLM_DIMENSIONS = {
    "error": {
        "message": "litellm.UnsupportedParamsError: Setting dimensions is not supported for OpenAI `text-embedding-3` "
        "and later models. To drop it from the call, set `litellm.drop_params = True`.\n\nLiteLLM: model group "
        "'gemini-embedding-001' failed with the error above. No fallback was attempted.",
        "type": "invalid_request_error",
        "param": None,
        "code": "400",
    }
}


def test_the_words_of_servers_and_gateways_name_the_refused_parameter():
    embed = {"model": "m", "input": ["a"], "encoding_format": "base64", "dimensions": 768}
    failure = classify_failure(refusal(LITELLM_DIMENSIONS, embed))
    assert failure.kind == "param_refused" and failure.param == "dimensions" and failure.fatal
    stop = failure.stop()
    assert stop.status == "failed: parameter refused"
    text = str(stop)
    assert "POST 127.0.0.1:4000/v1/embeddings" in text and "--dimensions" in text and "drop_params" in text
    assert "full size" in text and "No fallback" not in text  # the gateway's second paragraph is left out

    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2, "top_k": 3}
    path = "/v1/chat/completions"
    said = {
        # OpenAI
        "temperature": {"error": {"message": "Unsupported parameter: 'temperature' is not supported with this "
                                             "model.", "param": "temperature", "code": "unsupported_parameter"}},
        "top_k": {"error": {"message": "Unrecognized request argument supplied: top_k"}},
    }  # fmt: skip
    for param, body in said.items():
        failure = classify_failure(refusal(body, chat, path=path))
        assert (failure.kind, failure.param) == ("param_refused", param), body
    # vLLM / pydantic servers
    vllm = {"object": "error", "message": "[{'type': 'extra_forbidden', 'loc': ('body', 'seed'), 'msg': 'Extra "
            "inputs are not permitted', 'input': 3}]", "type": "BadRequestError", "code": 400}  # fmt: skip
    failure = classify_failure(refusal(vllm, {**chat, "seed": 3}, path=path))
    assert (failure.kind, failure.param) == ("param_refused", "seed")
    # Gemini: a value of the run's option
    gemini = [{"error": {"code": 400, "status": "INVALID_ARGUMENT",
                         "message": "Invalid reasoning_effort: minimal. Valid values are: low, high"}}]  # fmt: skip
    failure = classify_failure(refusal(gemini, {**chat, "reasoning_effort": "minimal"}, path=path))
    assert (failure.kind, failure.param) == ("param_refused", "reasoning_effort")
    assert "--reasoning-effort" in str(failure.stop())


def test_a_row_s_own_400_and_a_parameter_not_sent_stay_per_row():
    row = {"error": {"message": "Invalid value for 'input': the text is empty.", "param": "input"}}
    assert classify_failure(refusal(row, {"model": "m", "input": [""]})).kind == "invalid_request"
    # The body names dimensions, but this request did not carry it: not this run's parameter.
    assert classify_failure(refusal(LITELLM_DIMENSIONS, {"model": "m", "input": ["a"]})).kind == "invalid_request"
    gemini = [
        {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "Request contains an invalid argument."}}
    ]
    assert classify_failure(refusal(gemini, {"model": "m", "input": ["a"], "dimensions": 8})).kind == "invalid_request"


def test_the_json_schema_hint_only_for_a_request_that_sent_a_json_schema():
    images = {"model": "imagen-4.0-generate-001", "prompt": "a cat", "n": 1, "response_format": "b64_json"}
    body = {"error": {"message": "litellm.UnsupportedParamsError: Setting `response_format` is not supported by "
                                 "openai, imagen-4.0-generate-001. To drop it from the call, set "
                                 "`litellm.drop_params = True`."}}  # fmt: skip
    failure = classify_failure(refusal(body, images, path="/v1/images/generations"))
    assert (failure.kind, failure.param) == ("param_refused", "response_format")
    assert "--via tools" not in failure.message
    extract = {"model": "m", "messages": [], "response_format": {"type": "json_schema", "json_schema": {}}}
    failure = classify_failure(refusal(body, extract, path="/v1/chat/completions"))
    assert failure.kind == "json_schema_unsupported" and "--via tools" in str(failure.stop())


def texts(path: Path, rows: int) -> Path:
    path.write_text("id,text\n" + "".join(f"{i},text number {i}\n" for i in range(rows)))
    return path


@pytest.mark.parametrize(
    ("param", "args"),
    [
        ("dimensions", ["embed", "--model", "gemini-embedding-001", "--dimensions", "768", "--batch-size", "5"]),
        (
            "temperature",
            ["generate", "--prompt", "Say {text}", "--model", "gemini-2.5-flash-lite", "--temperature", "0.3"],
        ),
    ],
)
def test_a_refused_option_stops_the_run_after_its_first_answers_with_no_failed_rows(param, args, tmp_path, capsys):
    rows = 40
    src = texts(tmp_path / "in.csv", rows)
    out = tmp_path / "out"
    with Emulator(EmulatorConfig(api_key=TEST_KEY, refuse_params=(param,), latency_seconds=0.02)) as emu:
        argv = [args[0], str(src), *args[1:], "-o", str(out), "--base-url", emu.base_url]
        argv += ["--api-key-env", TEST_KEY_ENV, "--no-progress", "--max-concurrency", "4"]
        code, err = gembatch(argv, capsys)
        refused = emu.stats["faults"].get(f"refused:{param}", 0)
    assert code == 3 and "Traceback" not in err, err
    flat = " ".join(err.split())
    assert "failed: parameter refused" in flat and f"'{param}'" in flat and f"--{param}" in flat
    assert "drop_params" in flat and "--via tools" not in flat
    assert 1 <= refused <= 4  # the first answers stop the run: at most the requests already in flight
    assert read_errors(out).is_empty() and read_output(out).is_empty()
    run = json.loads(next((out / "_runs").glob("*.json")).read_text())
    assert run["status"] == "failed: parameter refused" and run["counts"]["not_attempted"] == rows


def test_images_ask_again_without_response_format_and_download_urls(tmp_path, capsys, caplog):
    """A gateway refuses the response_format gembatch adds; the server then answers URLs, as OpenAI's
    DALL·E models do by default: each image is downloaded, and made only once."""
    rows = 4
    src = tmp_path / "prompts.csv"
    src.write_text("id,prompt\n" + "".join(f"{i},a lighthouse number {i}\n" for i in range(rows)))
    out, direct = tmp_path / "out", tmp_path / "direct"
    config = EmulatorConfig(api_key=TEST_KEY, refuse_params=("response_format",), default_image_response="url")
    common = ["--model", "gemini-nano-banana-2.1", "--api-key-env", TEST_KEY_ENV, "--no-progress"]
    with Emulator(config) as emu:
        code, err = gembatch(["images", str(src), "-o", str(out), "--base-url", emu.base_url, *common], capsys)
        stats = emu.stats
    assert code == 0 and "Traceback" not in err, err
    assert stats["images"] == rows  # never paid twice: one image per prompt
    assert 1 <= stats["faults"]["refused:response_format"] <= 4
    warned = [r for r in caplog.records if "response_format" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    with Emulator(EmulatorConfig(api_key=TEST_KEY)) as emu:
        code, err = gembatch(["images", str(src), "-o", str(direct), "--base-url", emu.base_url, *common], capsys)
    assert code == 0, err
    got, want = read_output(out).sort("id"), read_output(direct).sort("id")
    assert got["image_path"].to_list() == want["image_path"].to_list()
    for path in got["image_path"]:
        assert (out / path).read_bytes() == (direct / path).read_bytes()
    assert read_errors(out).is_empty()


def test_an_image_url_that_cannot_be_fetched_fails_without_a_second_request():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    url = f"http://user:secret@127.0.0.1:{port}/img.png?X-Signature=abc"
    with pytest.raises(ImageNotFetched) as caught:
        asyncio.run(download_image(url, 0, timeout=httpx2.Timeout(2.0), attempts=2))
    message = str(caught.value)
    assert "secret" not in message and "abc" not in message and "--retry-errors" in message


def test_a_flow_run_stopped_by_a_refused_parameter_is_failed_with_the_paragraph(prefect_server, tmp_path):
    from flows.embed import embed_flow

    src = texts(tmp_path / "in.csv", 5)
    with Emulator(EmulatorConfig(api_key=TEST_KEY, refuse_params=("dimensions",))) as emu:
        common = {"base_url": emu.base_url, "api_key_env": TEST_KEY_ENV}
        state = asyncio.run(
            embed_flow(input=str(src), output=str(tmp_path / "out"), dimensions=768, options=common, return_state=True)
        )
    assert state.is_failed()
    assert state.message.startswith("failed: parameter refused: POST ")
    assert "'dimensions'" in state.message and "drop_params" in state.message and "Traceback" not in state.message
