"""`extract --via tools` and document triage (several --schema) against the emulator over real HTTP.

The emulator calls a forced function; otherwise the first function whose name is in the text, so the
kind of each sample document is known in advance (emulator/chat.py). Arguments are the emulator's fake
JSON for the function's parameters, seeded by the text: the same values a json_schema reply carries.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from conftest import REPO, TEST_KEY, TEST_KEY_ENV, assert_balanced, read_errors, read_output
from test_extract import ENUM, invoice_row

from emulator.chat import BAD_ARGUMENTS, UNKNOWN_FUNCTION
from emulator.fake_json import fake_json_for_schema
from flows import commands
from flows.options import command_job
from schemas.examples import CalendarEvent, Contract, Invoice, Receipt
from tasks.engine.dry_run import plan_job
from tasks.engine.run import RunOptions, run_job
from tasks.engine.send.context import RetryPolicy
from tasks.errors import ConfigError
from tasks.jobs.extract import ExtractJob
from tasks.jobs.tools import ToolsExtractJob, function_name
from tasks.provider.client import ProviderSettings

MODEL = "gemini-3.8-flash"
DOCUMENTS = REPO / "data" / "extract" / "documents.csv"
INVOICES = REPO / "data" / "extract" / "invoices.csv"
TRIAGE = (Invoice, Receipt, Contract)
KINDS = {1: "invoice", 2: "receipt", 3: "contract", 4: "receipt", 5: "invoice", 6: "contract"}


def run(emu, job, input: Path, output: Path, **kw: Any) -> dict[str, Any]:
    provider = ProviderSettings(
        provider="local", base_url=emu.base_url, api_key_env=TEST_KEY_ENV, timeout_s=5, stream=kw.pop("stream", False)
    )
    retry = RetryPolicy(base_delay_s=0.01, max_delay_s=0.05)
    options = RunOptions(input=str(input), output=str(output), provider=provider, retry=retry, chunk_size=4, **kw)
    return asyncio.run(run_job(job, options))


def texts_of(path: Path) -> dict[int, str]:
    table = pcsv.read_csv(path)
    return dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))


def expected(branch: ExtractJob, text: str) -> dict[str, Any]:
    """The row the emulator's arguments give: fake JSON for the function's parameters, seeded by the text."""
    instance = branch.schema.model_validate(fake_json_for_schema(json.loads(json.dumps(branch.json_schema)), seed=text))
    return branch.mapping.row(instance)


def sorted_rows(out: Path) -> list[dict[str, Any]]:
    return sorted(read_output(out).to_arrow().to_pylist(), key=lambda r: r["id"])


def test_one_schema_via_tools_gives_the_same_typed_rows_as_json_schema(emulator, tmp_path):
    via_schema = run(emulator, ExtractJob(model=MODEL, schema=Invoice), INVOICES, tmp_path / "schema")
    via_tools = run(emulator, ToolsExtractJob(model=MODEL, schemas=(Invoice,)), INVOICES, tmp_path / "tools")

    assert via_schema["status"] == via_tools["status"] == "completed"
    assert via_tools["counts"]["succeeded"] == 10
    schema_rows, tools_rows = sorted_rows(tmp_path / "schema"), sorted_rows(tmp_path / "tools")
    drop = ("content_hash",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in tools_rows] == [
        {k: v for k, v in r.items() if k not in drop} for r in schema_rows
    ]
    branch = ToolsExtractJob(model=MODEL, schemas=(Invoice,)).branches["invoice"]
    texts = texts_of(INVOICES)
    for row in tools_rows:
        assert {k: row[k] for k in invoice_row(Invoice.model_validate(expected(branch, texts[row["id"]])))}
    # The same typed columns; other content hashes (another request), so switching --via re-extracts.
    assert pq.read_schema(sorted((tmp_path / "tools").glob("part-*"))[0]) == pq.read_schema(
        sorted((tmp_path / "schema").glob("part-*"))[0]
    )
    assert not {r["content_hash"] for r in tools_rows} & {r["content_hash"] for r in schema_rows}
    assert via_tools["job_parameters"]["via"] == "tools"


def test_triage_picks_one_schema_per_row_into_a_kind_and_typed_struct_columns(emulator, tmp_path):
    job = ToolsExtractJob(model=MODEL, schemas=TRIAGE)
    doc = run(emulator, job, DOCUMENTS, tmp_path / "out")
    assert doc["status"] == "completed" and doc["counts"]["succeeded"] == 6, doc["message"]
    assert_balanced(doc)

    schema = pq.read_schema(sorted((tmp_path / "out").glob("part-*"))[0])
    assert schema.names == ["id", "kind", "invoice", "receipt", "contract", "content_hash", "model", "served_model"]
    assert schema.field("receipt").type == pa.struct(
        [
            pa.field("merchant", pa.string()),
            pa.field("purchase_date", pa.date32()),
            pa.field(
                "items",
                pa.list_(
                    pa.field(
                        "item",
                        pa.struct(
                            [
                                pa.field("name", pa.string(), nullable=False),
                                pa.field("price", pa.decimal128(12, 2), nullable=False),
                            ]
                        ),
                        nullable=False,
                    )
                ),
            ),
            pa.field("total", pa.decimal128(14, 2)),
            pa.field("payment_method", ENUM),
        ]
    )
    assert schema == job.output_schema("id", pa.int64())

    texts = texts_of(DOCUMENTS)
    rows = sorted_rows(tmp_path / "out")
    assert {r["id"]: r["kind"] for r in rows} == KINDS
    for row in rows:
        kind = row["kind"]
        assert row[kind] == expected(job.branches[kind], texts[row["id"]]), row["id"]
        assert all(row[other] is None for other in job.branches if other != kind)


def test_triage_reruns_skip_and_share_stored_answers_streamed_or_not(emulator, tmp_path):
    job = ToolsExtractJob(model=MODEL, schemas=TRIAGE)
    run(emulator, job, DOCUMENTS, tmp_path / "out", stream=True)
    streamed = sorted_rows(tmp_path / "out")
    run(emulator, job, DOCUMENTS, tmp_path / "plain")
    assert streamed == sorted_rows(tmp_path / "plain")  # a streamed tool call is put back together

    texts = texts_of(DOCUMENTS)
    more = tmp_path / "more.parquet"
    ids = [*texts, 7]
    pq.write_table(pa.table({"id": ids, "text": [*texts.values(), texts[2]]}), more)
    emulator.reset_stats()
    doc = run(emulator, job, more, tmp_path / "out")
    assert emulator.stats["by_route"]["chat/completions"] == 0
    assert (doc["counts"]["skipped_done"], doc["counts"]["deduplicated"]) == (6, 1)
    rows = sorted_rows(tmp_path / "out")
    assert {k: v for k, v in rows[-1].items() if k != "id"} == {k: v for k, v in rows[1].items() if k != "id"}


@pytest.mark.parametrize(
    ("marker", "says", "raw"),
    [
        ("[[emulator:badargs]]", "reply does not match Receipt: (reply): Invalid JSON", BAD_ARGUMENTS),
        ("[[emulator:badtool]]", f"called function '{UNKNOWN_FUNCTION}', which was not offered", UNKNOWN_FUNCTION),
    ],
)
def test_bad_arguments_or_an_unknown_function_are_asked_once_more_then_kept_raw(emulator, tmp_path, marker, says, raw):
    texts = texts_of(DOCUMENTS)
    texts[2] = f"{texts[2]} {marker}"
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(texts), "text": list(texts.values())}), src)
    doc = run(emulator, ToolsExtractJob(model=MODEL, schemas=TRIAGE), src, tmp_path / "out")

    assert doc["status"] == "completed with errors" and doc["counts"]["failed"] == 1
    assert doc["requests"]["sent"] == 7  # the bad row was asked twice
    (error,) = read_errors(tmp_path / "out").to_dicts()
    assert (error["id"], error["error_type"], error["attempts"], error["retry"]) == (
        2,
        "invalid_reply",
        2,
        "on_request",
    )
    assert says in error["error_message"], error["error_message"]
    call = json.loads(error["raw_reply"])
    assert len(call) == 1 and raw in (call[0]["name"], call[0]["arguments"])
    assert sorted(r["id"] for r in sorted_rows(tmp_path / "out")) == [1, 3, 4, 5, 6]


def test_the_builder_takes_repeated_schemas_only_with_tools(tmp_path):
    base = {"provider": "local", "input": str(DOCUMENTS), "output": str(tmp_path), "text_col": "text"}
    refs = [f"schemas.examples:{m.__name__}" for m in TRIAGE]
    job = command_job(commands.extract, **{**base, "schema_ref": refs, "via": "tools"}).job
    assert isinstance(job, ToolsExtractJob) and list(job.branches) == ["invoice", "receipt", "contract"]
    assert job.tool_choice == "required"
    single = command_job(commands.extract, **{**base, "schema_ref": refs[:1], "via": "tools"}).job
    assert single.tool_choice == {"type": "function", "function": {"name": "invoice"}}
    assert isinstance(command_job(commands.extract, **{**base, "schema_ref": refs[0]}).job, ExtractJob)
    with pytest.raises(ConfigError, match="3 --schema given: .*add --via tools"):
        command_job(commands.extract, **{**base, "schema_ref": refs})
    with pytest.raises(ConfigError, match="--via 'xml'"):
        command_job(commands.extract, **{**base, "schema_ref": refs, "via": "xml"})
    with pytest.raises(ConfigError, match="both offered as function 'invoice'"):
        command_job(commands.extract, **{**base, "schema_ref": [refs[0], refs[0]], "via": "tools"})
    assert function_name(CalendarEvent) == "calendar_event"


def test_dry_run_and_key_leak_with_tools(emulator, tmp_path, monkeypatch):
    job = ToolsExtractJob(model=MODEL, schemas=TRIAGE)
    texts = texts_of(DOCUMENTS)
    texts[3] = texts[3] + " [[emulator:badtool]]"
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(texts), "text": list(texts.values())}), src)
    run(emulator, job, src, tmp_path / "out", stream=True)
    for path in (p for p in (tmp_path / "out").rglob("*") if p.is_file()):
        assert TEST_KEY.encode() not in path.read_bytes(), path
    monkeypatch.delenv(TEST_KEY_ENV)
    emulator.reset_stats()
    options = RunOptions(input=str(DOCUMENTS), output=str(tmp_path / "fresh"), dry_run=True)
    plan = asyncio.run(plan_job(job, options))
    assert emulator.stats["requests"] == 0
    assert plan["counts"]["would_send"] == 6
    assert plan["estimate"]["input_tokens"] == sum(
        job.prepare({"text": t}).tokens for t in texts_of(DOCUMENTS).values()
    )


def test_triage_as_a_prefect_flow_with_a_list_of_schemas(prefect_server, emulator, tmp_path):
    from flows.extract import extract_flow
    from flows.params import CommonOptions

    refs = [f"schemas.examples:{m.__name__}" for m in TRIAGE]
    doc = asyncio.run(
        extract_flow(
            input=str(DOCUMENTS),
            output=str(tmp_path / "out"),
            schema_ref=refs,
            via="tools",
            options=CommonOptions(provider="local", base_url=emulator.base_url, api_key_env=TEST_KEY_ENV, stream=True),
        )
    )
    assert doc["status"] == "completed" and doc["flow_run_id"]
    assert doc["parameters"]["schema_ref"] == refs and doc["parameters"]["stream"] is True
    assert {r["id"]: r["kind"] for r in sorted_rows(tmp_path / "out")} == KINDS
    assert doc["streaming"]["first_token"]["count"] == 6
