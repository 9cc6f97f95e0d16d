"""A server or model without ``response_format`` json_schema: `extract --via tools` still gives the table.

Real servers meet a json_schema request in one of two ways (from public reports):
- a 400: Groq's models without structured outputs (``llama-3.3-70b-versatile``) answer
  ``{"error": {"message": "This model does not support response format `json_schema`.", "type":
  "invalid_request_error"}}``; older Groq said ``'response_format.type' : value is not one of the allowed
  values ['text','json_object']``, xAI ``The response_format parameter is unsupported at the moment``.
- a 200 with prose: the field is dropped (Ollama's and vLLM's OpenAI routes in some versions, a proxy
  that doesn't pass it on), and the model answers free text.

The emulator does both (``EmulatorConfig.json_schema = "rejected" | "ignored"``, ``gembatch emulator
--json-schema``). A rejecting server stops the json_schema run after its first request with a message
naming the cause and ``--via tools``; a prose answer is an error row, never data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pyarrow.parquet as pq
import pytest
from conftest import TEST_KEY, TEST_KEY_ENV, CliResult, assert_balanced, read_errors, read_output, run_gembatch
from test_tools import INVOICES, MODEL, expected, run, sorted_rows, texts_of

from emulator import Emulator, EmulatorConfig
from emulator.chat import JSON_SCHEMA_REJECTED
from schemas.examples import Invoice
from tasks.jobs.extract import ExtractJob
from tasks.jobs.tools import ToolsExtractJob
from tasks.provider.failures import classify_failure

ROWS = 10  # data/extract/invoices.csv


def _server(mode: str) -> Emulator:
    return Emulator(EmulatorConfig(api_key=TEST_KEY, json_schema=mode))


def _cli(capsys: pytest.CaptureFixture[str], out: Path, base_url: str, *extra: str) -> CliResult:
    """`gembatch extract` of the invoices in this process (conftest.run_gembatch), untracked."""
    argv = [
        "extract", str(INVOICES), "--output", str(out), "--schema", "schemas.examples:Invoice",
        "--base-url", base_url, "--api-key-env", TEST_KEY_ENV, "--model", MODEL, "--chunk-size", "4",
        "--no-progress", *extra,
    ]  # fmt: skip
    return run_gembatch(argv, capsys)


def _runs(out: Path) -> list[dict[str, Any]]:
    docs = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    return sorted(docs, key=lambda d: d["started_at"])


def _assert_exact_invoices(out: Path, dialect: str = "gemini") -> None:
    """Every input row once, each value what the emulator's function arguments give for its text."""
    branch = ToolsExtractJob(model=MODEL, schemas=(Invoice,), schema_dialect=dialect).branches["invoice"]
    texts = texts_of(INVOICES)
    rows = sorted_rows(out)
    assert [r["id"] for r in rows] == sorted(texts)
    for row in rows:
        want = expected(branch, texts[row["id"]])
        assert {k: row[k] for k in want} == want, row["id"]
        assert row["model"] == MODEL
    assert pq.read_schema(sorted(out.glob("part-*.parquet"))[0]).names == [
        "id", *(f.name for f in branch.mapping.arrow_fields), "content_hash", "model", "served_model"
    ]  # fmt: skip


def test_the_emulator_rejects_or_ignores_json_schema_as_real_servers_do():
    fmt = {"type": "json_schema", "json_schema": {"name": "X", "schema": {"type": "object", "properties": {}}}}
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "response_format": fmt}
    headers = {"Authorization": f"Bearer {TEST_KEY}"}
    with _server("rejected") as emu:
        r = httpx.post(emu.base_url + "chat/completions", json=request, headers=headers)
        assert r.status_code == 400
        assert r.json() == {
            "error": {
                "message": "This model does not support response format `json_schema`.",
                "type": "invalid_request_error",
                "param": "response_format",
                "code": None,
            }
        }
        plain = {k: v for k, v in request.items() if k != "response_format"}
        assert httpx.post(emu.base_url + "chat/completions", json=plain, headers=headers).status_code == 200
        assert emu.stats["faults"] == {"json_schema:rejected": 1}
    with _server("ignored") as emu:
        r = httpx.post(emu.base_url + "chat/completions", json=request, headers=headers)
        assert r.status_code == 200
        content = r.json()["choices"][0]["message"]["content"]
        assert content.startswith(f"[emulator {MODEL}] reply #") and content.endswith(": hello")
    with pytest.raises(ValueError, match="json_schema must be one of supported, rejected, ignored"):
        EmulatorConfig(json_schema="maybe")


def test_a_rejecting_server_stops_extract_after_one_request_and_via_tools_fills_the_table(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with _server("rejected") as emu:
        groq_like = emu.base_url.replace("/v1beta/openai/", "/v1/")  # an OpenAI-style server's path
        first = _cli(capsys, out, groq_like)
        assert first.returncode == 3, first.stdout + first.stderr
        said = " ".join((first.stdout + first.stderr).split())
        assert "HTTP 400: This model does not support response format `json_schema`" in said
        assert "rerun the same command with --via tools" in said
        assert emu.stats["by_route"]["chat/completions"] == 1  # the first request went alone
        (doc,) = _runs(out)
        assert doc["status"] == "failed: json_schema unsupported"
        assert doc["counts"]["not_attempted"] == ROWS and doc["counts"]["failed"] == 0
        assert_balanced(doc)
        assert read_output(out).is_empty() and read_errors(out).is_empty()  # nothing lost, nothing half-done

        second = _cli(capsys, out, groq_like, "--via", "tools")
        assert second.returncode == 0, second.stdout + second.stderr
        assert emu.stats["by_route"]["chat/completions"] == 1 + ROWS
        assert emu.stats["faults"] == {"json_schema:rejected": 1}
    done = _runs(out)[-1]
    assert done["status"] == "completed" and done["counts"]["succeeded"] == ROWS
    assert done["job_parameters"]["via"] == "tools"
    _assert_exact_invoices(out, done["job_parameters"]["schema_dialect"])


def test_a_server_ignoring_json_schema_gives_error_rows_never_data_and_via_tools_finishes(tmp_path):
    out = tmp_path / "out"
    with _server("ignored") as emu:
        doc = run(emu, ExtractJob(model=MODEL, schema=Invoice), INVOICES, out)
        assert doc["status"] == "completed with errors"
        assert doc["counts"]["failed"] == ROWS and doc["counts"]["succeeded"] == 0
        assert_balanced(doc)
        assert read_output(out).is_empty()  # prose never becomes a row
        errors = sorted(read_errors(out).to_dicts(), key=lambda r: r["id"])
        texts = texts_of(INVOICES)
        assert [e["id"] for e in errors] == sorted(texts)
        for e in errors:
            assert e["error_type"] == "invalid_reply" and e["attempts"] == 2  # asked once more
            assert e["error_message"].startswith("the reply is text, not a JSON Invoice object (it begins ")
            assert e["error_message"].endswith("ignores response_format json_schema: rerun with --via tools")
            assert e["raw_reply"].startswith(f"[emulator {MODEL}] reply #")
            assert e["raw_reply"].endswith(texts[e["id"]][:60])

        fixed = run(emu, ToolsExtractJob(model=MODEL, schemas=(Invoice,)), INVOICES, out, retry_errors=True)
    assert fixed["status"] == "completed" and fixed["counts"]["succeeded"] == ROWS, fixed["message"]
    assert_balanced(fixed)
    _assert_exact_invoices(out)
    assert read_errors(out).is_empty()  # the old error rows are superseded by the rows now done


def test_servers_words_for_no_json_schema_stop_the_run_and_name_via_tools():
    def error(body: Any) -> openai.APIStatusError:
        request = httpx.Request("POST", "http://x/chat/completions")
        return openai.BadRequestError("bad", response=httpx.Response(400, request=request, json=body), body=body)

    unsupported = [
        {"error": {"message": JSON_SCHEMA_REJECTED, "type": "invalid_request_error", "param": "response_format"}},
        {"error": {"message": "'response_format.type' : value is not one of the allowed values ['text','json_object']",
                   "type": "invalid_request_error"}},
        {"code": "Client specified an invalid argument",
         "error": "The response_format parameter is unsupported at the moment. Leave it unset."},
    ]  # fmt: skip
    for body in unsupported:
        failure = classify_failure(error(body))
        assert failure.kind == "json_schema_unsupported" and failure.fatal, body
        stop = failure.stop()
        assert stop.status == "failed: json_schema unsupported" and "--via tools" in str(stop)
    # One schema refused (a keyword the server lacks) is still a schema refusal; other 400s stay per row.
    refused = {"error": {"message": "invalid schema for response format: response_format/json_schema/next_step: "
                                    "minItems is not supported", "type": "invalid_request_error"}}  # fmt: skip
    assert classify_failure(error(refused)).kind == "schema_refused"
    other = {"error": {"message": "messages[0]: content is empty", "type": "invalid_request_error"}}
    assert classify_failure(error(other)).kind == "invalid_request"
