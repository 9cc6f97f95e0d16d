"""One pydantic model, the schema each provider accepts; a refused schema stops the run.

The emulator applies OpenAI's strict rules under /v1/ and Gemini's under /v1beta/openai/ (for
response_format and for function parameters), so these tests pin the dialects.
"""

from __future__ import annotations

import asyncio
import json
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TEST_KEY, TEST_KEY_ENV, assert_balanced
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel, ConfigDict, Field

from emulator.fake_json import fake_json_for_schema
from flows import commands
from flows.extract import extract_flow
from flows.options import command_job
from schemas.dialects import auto_dialect, build_schema, restore_defaults
from schemas.examples import CalendarEvent, Invoice
from tasks.engine.run import RunOptions, run_job
from tasks.errors import ConfigError
from tasks.jobs.extract import ExtractJob
from tasks.provider.client import ProviderSettings
from tasks.provider.failures import classify_failure

MODEL = "gemini-3.8-flash"


class Status(StrEnum):
    OPEN = "open"
    PAID = "paid"
    SHIPPED = "shipped"


class Address(BaseModel):
    street: str
    city: str
    postcode: str | None = None


class Line(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sku: str
    quantity: int = Field(default=1, ge=0, description="Units; 1 when not stated.")
    unit: Literal["pc", "kg", "m"]
    note: str | None = Field(default=None, description="Free text on the line, if any.")


class Shipment(BaseModel):
    """Nested models, lists of models, optional fields (None, a value and a factory as defaults),
    enums, Literal, and a nested model field with its own description."""

    order_id: str
    status: Status
    channel: Literal["web", "phone", "store"] = "web"
    ship_to: Address = Field(description="Where the goods go.")
    bill_to: Address | None = None
    lines: list[Line]
    tags: list[str] = Field(default_factory=list)
    express: bool = False


def paths(emu) -> dict[str, str]:
    return {"gemini": emu.base_url, "openai": emu.base_url.replace("/v1beta/openai/", "/v1/")}


def write_texts(path: Path, n: int) -> Path:
    texts = [f"Order {i}: ship {i % 4 + 1} crates of item SKU-{i} to {i} Main Street" for i in range(n)]
    pq.write_table(pa.table({"id": pa.array(range(n), pa.int64()), "text": pa.array(texts, pa.string())}), path)
    return path


def run(emu, base_url: str, src: Path, out: Path, *, schema=Shipment, dialect: str | None = None):
    job = ExtractJob(model=MODEL, schema=schema, schema_dialect=dialect or auto_dialect("local", base_url))
    options = RunOptions(
        input=str(src),
        output=str(out),
        provider=ProviderSettings(provider="local", base_url=base_url, api_key_env=TEST_KEY_ENV, timeout_s=5),
        chunk_size=8,
    )
    return job, asyncio.run(run_job(job, options))


def test_the_same_model_round_trips_value_by_value_through_both_providers_rules(emulator, tmp_path):
    emulator.configure(null_rate=0.35)
    src = write_texts(tmp_path / "in.parquet", 12)
    texts = {r["id"]: r["text"] for r in pq.read_table(src).to_pylist()}
    restored_defaults = 0
    for provider, base_url in paths(emulator).items():
        emulator.reset_stats()
        job, doc = run(emulator, base_url, src, tmp_path / provider)

        assert job.schema_dialect == provider
        assert doc["status"] == "completed" and doc["counts"]["succeeded"] == 12, doc["message"]
        assert_balanced(doc)
        assert emulator.stats["by_route"]["chat/completions"] == 12
        assert doc["job_parameters"]["schema_dialect"] == provider
        table = pa.concat_tables(pq.read_table(f) for f in sorted((tmp_path / provider).glob("part-*.parquet")))
        assert table.schema.field("status").type == pa.dictionary(pa.int32(), pa.string())
        for row in table.to_pylist():
            raw = fake_json_for_schema(json.loads(json.dumps(job.json_schema)), seed=texts[row["id"]], null_rate=0.35)
            want = Shipment.model_validate(restore_defaults(Shipment, raw))
            got = {k: row[k] for k in Shipment.model_fields}
            assert got == job.mapping.row(want), f"{provider} id {row['id']}"
            # A null for a field whose type refuses None (openai: required but nullable) is its default.
            for key, default in (("channel", "web"), ("tags", []), ("express", False)):
                if raw.get(key, "absent") is None:
                    restored_defaults += 1
                    assert row[key] == default
            for line, raw_line in zip(row["lines"], raw["lines"], strict=True):
                if raw_line.get("quantity", "absent") is None:
                    restored_defaults += 1
                    assert line["quantity"] == 1
    assert restored_defaults > 0, "the openai path answered some defaulted fields with null"


def test_dialect_shapes():
    openai = build_schema(Shipment, "openai").schema
    # The SDK's own strict conversion is used: a model without defaults comes out exactly as the SDK's.
    assert build_schema(CalendarEvent, "openai").schema == to_strict_json_schema(CalendarEvent)
    line = openai["$defs"]["Line"]
    assert line["additionalProperties"] is False and line["required"] == list(line["properties"])
    assert line["properties"]["quantity"]["anyOf"][1] == {"type": "null"}
    assert '"default":' not in json.dumps(openai)
    assert openai["properties"]["ship_to"]["description"] == "Where the goods go."

    gemini = build_schema(Shipment, "gemini")
    text = json.dumps(gemini.schema)
    for banned in ("$ref", "$defs", "$schema", "additionalProperties", "const"):
        assert banned not in text
    assert gemini.schema["required"] == ["order_id", "status", "ship_to", "lines"]  # optional stays optional
    assert gemini.schema["properties"]["ship_to"]["properties"]["city"] == {"title": "City", "type": "string"}

    plain = build_schema(Shipment, "plain")
    assert plain.strict is False and "$ref" not in json.dumps(plain.schema)

    class Scored(BaseModel):
        level: Literal[1, 2, 3]
        site: str = Field(json_schema_extra={"format": "uri"})

    scored = build_schema(Scored, "gemini")
    assert (
        "enum" not in scored.schema["properties"]["level"] and scored.schema["properties"]["level"]["type"] == "integer"
    )
    assert "one of 1, 2, 3" in scored.schema["properties"]["level"]["description"]
    assert any(n.startswith("Scored.site: format uri") for n in scored.notes)
    assert build_schema(Scored, "openai").schema["properties"]["level"]["enum"] == [1, 2, 3]


def test_dialects_follow_the_provider_and_go_into_the_content_hash():
    assert auto_dialect("gemini", None) == "gemini" and auto_dialect("local", None) == "gemini"
    assert auto_dialect("openai", None) == "openai"
    assert auto_dialect("gemini", "https://api.openai.com/v1/") == "openai"
    assert auto_dialect("gemini", "http://localhost:8000/v1/") == "plain"
    assert auto_dialect("local", "http://127.0.0.1:9/v1/") == "openai"
    params = {"input": "", "output": "", "schema_ref": "schemas.examples:Invoice"}

    def dialect(**kw: str) -> str:
        return command_job(commands.extract, **params | kw).job.schema_dialect

    assert dialect(provider="openai") == "openai"
    assert dialect(provider="gemini", base_url="http://vllm:8000/v1/") == "plain"
    assert dialect(provider="openai", schema_dialect="gemini") == "gemini"
    hashes = {d: ExtractJob(model=MODEL, schema=Invoice, schema_dialect=d).prepare({"text": "x"}) for d in
              ("openai", "gemini", "plain")}  # fmt: skip
    assert len({content.fields["schema_sha256"] for content in hashes.values()}) == 3
    with pytest.raises(ConfigError, match="--schema-dialect 'strict'"):
        ExtractJob(model=MODEL, schema=Invoice, schema_dialect="strict")


def _nested(depth: int) -> type[BaseModel]:
    model: type[BaseModel] = type("L0", (BaseModel,), {"__annotations__": {"value": str}})
    for i in range(1, depth):
        model = type(f"L{i}", (BaseModel,), {"__annotations__": {"child": model}})
    return model


def test_a_model_openai_cannot_express_fails_before_any_request_naming_the_path():
    ExtractJob(model=MODEL, schema=_nested(10), schema_dialect="openai")
    with pytest.raises(ConfigError) as error:
        ExtractJob(model=MODEL, schema=_nested(11), schema_dialect="openai")
    assert str(error.value).startswith("L10.child.child.child.child.child.child.child.child.child.child: ")
    assert "10 levels" in str(error.value) and "--schema-dialect plain" in str(error.value)
    ExtractJob(model=MODEL, schema=_nested(11), schema_dialect="gemini")  # no such limit known there


def test_a_refused_schema_stops_the_run_after_one_request(emulator, tmp_path):
    """Gemini's dialect sent to a server with OpenAI's strict rules: 30 rows, 1 request."""
    src = write_texts(tmp_path / "in.parquet", 30)
    out = tmp_path / "out"
    _, doc = run(emulator, paths(emulator)["openai"], src, out, dialect="gemini")

    assert doc["status"] == "failed: schema refused"
    assert (
        "Invalid schema for response_format 'Shipment': In context=(), 'additionalProperties' is required to be "
        "supplied and to be false" in doc["message"]
    )
    assert "[field: (the root object)]" in doc["message"] and "--schema-dialect" in doc["message"]
    assert emulator.stats["by_route"]["chat/completions"] == 1 and doc["requests"]["sent"] == 1
    assert doc["counts"]["failed"] == 0 and doc["counts"]["not_attempted"] == 30
    assert not (out / "_errors").exists() or not list((out / "_errors").glob("*.parquet"))
    assert_balanced(doc)


def test_the_cli_option_reaches_the_flow(tmp_path, prefect_server):
    """One Prefect flow run: --schema-dialect is a flow parameter and lands in the run metadata."""
    src = write_texts(tmp_path / "in.parquet", 3)
    doc = asyncio.run(
        extract_flow(
            input=str(src),
            output=str(tmp_path / "out"),
            schema_ref="schemas.examples:Invoice",
            schema_dialect="openai",
            options={"provider": "local"},
        )
    )
    assert doc["status"] == "completed" and doc["parameters"]["schema_dialect"] == "openai"
    assert doc["job_parameters"]["schema_dialect"] == "openai"


def _chat(emu, path: str, **body: Any) -> httpx.Response:
    url = paths(emu)[path] + "chat/completions"
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}
    return httpx.post(url, json=payload, headers={"Authorization": f"Bearer {TEST_KEY}"}, timeout=5)


def _response_format(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "Shipment", "schema": schema, "strict": strict}}


def _tool(schema: dict, strict: bool = True) -> list[dict]:
    return [{"type": "function", "function": {"name": "record", "parameters": schema, "strict": strict}}]


def test_the_emulator_applies_each_providers_rules_with_their_error_text(emulator):
    raw = Shipment.model_json_schema()
    # OpenAI, strict: the refusal users report, in OpenAI's error shape.
    r = _chat(emulator, "openai", response_format=_response_format(raw))
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "response_format" and error["code"] == "invalid_json_schema"
    assert error["message"].startswith("Invalid schema for response_format 'Shipment': In context=(), ")
    line_ok = build_schema(Shipment, "openai").schema
    bad_default = json.loads(json.dumps(line_ok))
    bad_default["$defs"]["Line"]["properties"]["unit"]["default"] = "pc"
    r = _chat(emulator, "openai", response_format=_response_format(bad_default))
    assert (
        "In context=('$defs', 'Line', 'properties', 'unit'), 'default' is not permitted."
        in r.json()["error"]["message"]
    )
    r = _chat(emulator, "openai", tools=_tool(raw))
    assert r.json()["error"]["param"] == "tools[0].function.parameters"
    assert r.json()["error"]["message"].startswith("Invalid schema for function 'record': ")
    assert _chat(emulator, "openai", response_format=_response_format(raw, strict=False)).status_code == 200
    assert _chat(emulator, "openai", response_format=_response_format(line_ok)).status_code == 200
    assert _chat(emulator, "openai", tools=_tool(line_ok)).status_code == 200

    # Gemini: $schema and a $ref with siblings (pydantic's own schema with a titled nested field).
    class Titled(BaseModel):
        ship_to: Address = Field(title="Destination")

    r = _chat(emulator, "gemini", response_format=_response_format({"$schema": "x", **Titled.model_json_schema()}))
    assert r.status_code == 400
    message = r.json()[0]["error"]["message"]
    assert message.startswith("Schema.ref 'Address' was set alongside unsupported fields.")
    r = _chat(emulator, "gemini", response_format=_response_format({"$schema": "x", **raw}))
    assert r.json()[0]["error"]["message"] == (
        "Invalid JSON payload received. Unknown name \"$schema\" at 'generation_config.response_schema': "
        "Cannot find field."
    )
    r = _chat(emulator, "gemini", tools=_tool(raw))
    message = r.json()[0]["error"]["message"]
    assert 'Unknown name "additionalProperties" at \'tools[0].function_declarations[0].parameters' in message
    # The strict OpenAI schema is accepted in Gemini's response_format (Google's own example sends it) …
    assert _chat(emulator, "gemini", response_format=_response_format(line_ok)).status_code == 200
    # … and the gemini dialect everywhere on Gemini's path.
    gemini = build_schema(Shipment, "gemini").schema
    assert _chat(emulator, "gemini", response_format=_response_format(gemini), tools=_tool(gemini)).status_code == 200
    assert _chat(emulator, "gemini", tools=_tool(build_schema(Invoice, "gemini").schema)).status_code == 200
    r = _chat(emulator, "gemini", tools=_tool(build_schema(Invoice, "plain").schema))
    assert "only 'enum' and 'date-time' are supported for STRING type" in r.json()[0]["error"]["message"]


def test_schema_refusals_are_fatal_and_other_400s_stay_per_row():
    import openai

    def error(status: int, body: Any) -> openai.APIStatusError:
        request = httpx.Request("POST", "http://x/chat/completions")
        response = httpx.Response(status, request=request, json=body)
        return openai.BadRequestError("bad", response=response, body=body)

    gemini = error(400, [{"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": (
        "Schema.ref 'Address' was set alongside unsupported fields. If a schema node has Schema.ref set, then only "
        "description and default can be set alongside it; other fields they would be replaced by the expanded "
        "reference.")}}])  # fmt: skip
    failure = classify_failure(gemini)
    assert failure.kind == "schema_refused" and failure.fatal
    assert failure.stop().status == "failed: schema refused"
    message = (
        "Invalid schema for response_format 'X': In context=('properties', 'lines', 'items'), "
        "'default' is not permitted."
    )
    body = {"message": message, "code": "invalid_json_schema", "param": "response_format"}
    openai_error = error(400, {"error": {**body, "type": "invalid_request_error"}})
    failure = classify_failure(openai_error)
    assert failure.kind == "schema_refused" and failure.message.endswith("[field: lines[]]")
    per_row = error(400, [{"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "Request contains an "
                                     "invalid argument."}}])  # fmt: skip
    assert classify_failure(per_row).kind == "invalid_request" and not classify_failure(per_row).fatal
