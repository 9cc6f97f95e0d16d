"""`gembatch extract` end to end against the emulator over real HTTP, reading the typed Parquet back."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from conftest import REPO, TEST_KEY_ENV, assert_balanced, read_errors
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, Field

from emulator.fake_json import fake_json_for_schema
from emulator.faults import BAD_JSON_REPLY
from flows import commands
from flows.options import command_job
from schemas.arrow import model_mapping
from schemas.examples import CalendarEvent, Invoice
from tasks.engine.job import RowFailure
from tasks.engine.run import RunOptions, run_job
from tasks.errors import ConfigError
from tasks.jobs.extract import ExtractJob, import_model
from tasks.provider.client import ProviderSettings

MODEL = "gemini-3.8-flash"
INVOICES = REPO / "data" / "extract" / "invoices.csv"
EVENTS = REPO / "data" / "extract" / "events.csv"
ENUM = pa.dictionary(pa.int32(), pa.string())
UTC_US = pa.timestamp("us", tz="UTC")


def run_extract(emu, input: Path, output: Path, *, schema: type[BaseModel] = Invoice, chunk_size: int = 4, **kw):
    job = ExtractJob(model=MODEL, schema=schema, reasoning_effort=kw.pop("reasoning_effort", None))
    options = RunOptions(
        input=str(input),
        output=str(output),
        provider=ProviderSettings(provider="local", base_url=emu.base_url, api_key_env=TEST_KEY_ENV, timeout_s=5),
        chunk_size=chunk_size,
        **kw,
    )
    return job, asyncio.run(run_job(job, options))


def expected(job: ExtractJob, text: str) -> Any:
    """What the emulator answers for ``text``: the schema arrives as JSON, the last user message seeds it."""
    return job.schema.model_validate(fake_json_for_schema(json.loads(json.dumps(job.json_schema)), seed=text))


def read_rows(out: Path) -> tuple[pa.Schema, list[dict[str, Any]]]:
    files = sorted(out.glob("part-*.parquet"))
    table = pa.concat_tables(pq.read_table(f) for f in files)
    return pq.read_schema(files[0]), table.to_pylist()


def texts_of(path: Path) -> dict[int, str]:
    table = pcsv.read_csv(path)
    return dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))


def write_texts(path: Path, rows: list[tuple[int, str | None]]) -> Path:
    ids, texts = zip(*rows, strict=True)
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "text": pa.array(texts, pa.string())}), path)
    return path


def invoice_row(inv: Invoice) -> dict[str, Any]:
    return {
        "invoice_number": inv.invoice_number,
        "vendor": inv.vendor,
        "customer": inv.customer,
        "invoice_date": inv.invoice_date,
        "due_date": inv.due_date,
        "currency": inv.currency.value,
        "line_items": [
            {"description": li.description, "quantity": li.quantity, "unit_price": li.unit_price, "sku": li.sku}
            for li in inv.line_items
        ],
        "total": inv.total,
    }


def test_invoices_match_the_emulator_field_by_field_with_an_exact_nested_schema(emulator, tmp_path):
    texts = texts_of(INVOICES)
    job, doc = run_extract(emulator, INVOICES, tmp_path / "out")

    assert doc["status"] == "completed" and doc["counts"]["succeeded"] == len(texts) == 10
    assert_balanced(doc)
    schema, rows = read_rows(tmp_path / "out")
    line_item = pa.struct(
        [
            pa.field("description", pa.string(), nullable=False),
            pa.field("quantity", pa.int64(), nullable=False),
            pa.field("unit_price", pa.decimal128(12, 2), nullable=False),
            pa.field("sku", pa.string()),
        ]
    )
    want = [
        ("id", pa.int64()),
        ("invoice_number", pa.string()),
        ("vendor", pa.string()),
        ("customer", pa.string()),
        ("invoice_date", pa.date32()),
        ("due_date", pa.date32()),
        ("currency", ENUM),
        ("line_items", pa.list_(pa.field("item", line_item, nullable=False))),
        ("total", pa.decimal128(14, 2)),
        ("content_hash", pa.string()),
        ("model", pa.string()),
        ("served_model", pa.string()),  # the model the reply named
    ]
    assert [(f.name, f.type) for f in schema] == want
    assert [(f.name, f.type) for f in job.output_schema("id", pa.int64())] == want
    assert [f.nullable for f in job.mapping.arrow_fields] == [False, False, True, False, True, False, False, False]

    assert sorted(r["id"] for r in rows) == sorted(texts)
    for row in rows:
        inv = expected(job, texts[row["id"]])
        assert {k: row[k] for k in invoice_row(inv)} == invoice_row(inv), f"id {row['id']}"
        assert row["line_items"], "the fake fills lists"
        assert row["model"] == MODEL
    assert emulator.stats["by_route"]["chat/completions"] == doc["requests"]["sent"] == 10
    assert doc["tokens"]["prompt"] == emulator.stats["prompt_tokens"]
    assert doc["tokens"]["completion"] == emulator.stats["completion_tokens"] > 0
    assert doc["job_parameters"]["schema"] == "schemas.examples:Invoice"


def test_calendar_events_with_lists_of_structs_and_utc_timestamps(emulator, tmp_path):
    texts = texts_of(EVENTS)
    job, doc = run_extract(emulator, EVENTS, tmp_path / "out", schema=CalendarEvent)

    assert doc["counts"]["succeeded"] == 10
    schema, rows = read_rows(tmp_path / "out")
    participant = pa.struct(
        [
            pa.field("name", pa.string(), nullable=False),
            pa.field("email", pa.string()),
            pa.field("role", ENUM, nullable=False),
        ]
    )
    assert schema.field("start").type == UTC_US and schema.field("end").type == UTC_US
    assert schema.field("all_day").type == pa.bool_()
    assert schema.field("participants").type == pa.list_(pa.field("item", participant, nullable=False))
    for row in rows:
        event = expected(job, texts[row["id"]])
        assert row["title"] == event.title and row["location"] == event.location
        assert row["start"] == event.start and row["start"].utcoffset() == dt.timedelta(0)
        assert row["end"] == event.end and row["all_day"] is event.all_day
        assert row["participants"] == [p.model_dump() for p in event.participants]


def test_bad_json_is_asked_twice_then_kept_as_raw_reply_and_null_text_is_an_error_row(emulator, tmp_path):
    src = write_texts(
        tmp_path / "in.parquet",
        [
            (1, "Invoice 1 from Acme, total $10."),
            (2, "Invoice 2 [[emulator:badjson]] from Beta."),
            (3, None),
            (4, "Invoice 1 from Acme, total $10."),
        ],
    )
    out = tmp_path / "out"
    job, doc = run_extract(emulator, src, out)

    assert doc["counts"] == {
        "input_rows": 4,
        "skipped_done": 0,
        "deduplicated": 1,
        "succeeded": 1,
        "failed": 2,
        "not_attempted": 0,
    }
    _, rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == [1, 4]
    assert all(invoice_row(expected(job, "Invoice 1 from Acme, total $10.")).items() <= r.items() for r in rows)
    errors = {r["id"]: r for r in read_errors(out).to_dicts()}
    assert errors[2]["error_type"] == "invalid_reply" and errors[2]["attempts"] == 2
    assert errors[2]["raw_reply"] == BAD_JSON_REPLY
    assert "Invalid JSON" in errors[2]["error_message"] and "Invoice" in errors[2]["error_message"]
    assert errors[3]["error_type"] == "invalid_input" and "'text' is null" in errors[3]["error_message"]
    assert emulator.stats["by_route"]["chat/completions"] == 3  # row 1 once, row 2 twice, row 4 shares row 1

    emulator.reset_stats()
    _, again = run_extract(emulator, src, out)
    assert emulator.stats["by_route"]["chat/completions"] == 0 and again["requests"]["sent"] == 0
    assert again["counts"]["skipped_done"] == 2 and again["counts"]["failed"] == 2


def test_a_new_row_with_known_text_is_copied_from_the_typed_parquet(emulator, tmp_path):
    texts = texts_of(EVENTS)
    out = tmp_path / "out"
    job, _ = run_extract(emulator, EVENTS, out, schema=CalendarEvent)
    emulator.reset_stats()
    src = write_texts(tmp_path / "more.parquet", [(99, texts[3])])

    _, doc = run_extract(emulator, src, out, schema=CalendarEvent)

    assert doc["counts"]["deduplicated"] == 1 and emulator.stats["by_route"]["chat/completions"] == 0
    _, rows = read_rows(out)
    copied = next(r for r in rows if r["id"] == 99)
    assert copied["participants"] == [p.model_dump() for p in expected(job, texts[3]).participants]
    assert copied["start"] == expected(job, texts[3]).start


def test_reasoning_effort_reaches_the_server(emulator, tmp_path):
    src = write_texts(tmp_path / "in.parquet", [(1, "Lunch with Ana on 3 May 2024 at noon"), (2, "Standup 9am")])
    _, doc = run_extract(emulator, src, tmp_path / "out", schema=CalendarEvent, reasoning_effort="high")

    tokens = doc["tokens"]
    assert emulator.stats["thinking_tokens"] == 2 * 1024
    assert tokens["total"] == tokens["prompt"] + tokens["completion"] + 2 * 1024
    assert doc["job_parameters"]["reasoning_effort"] == "high"


def test_content_hash_follows_prompt_model_schema_and_effort():
    base = ExtractJob(model=MODEL, schema=Invoice).prepare({"text": "x"}).fields
    assert set(base) == {"job", "model", "schema_sha256", "prompt", "reasoning_effort", "text"}
    for other in (
        ExtractJob(model="gemini-2.5-flash-lite", schema=Invoice),
        ExtractJob(model=MODEL, schema=CalendarEvent),
        ExtractJob(model=MODEL, schema=Invoice, prompt="Be terse."),
        ExtractJob(model=MODEL, schema=Invoice, reasoning_effort="low"),
    ):
        assert other.prepare({"text": "x"}).fields != base
    with pytest.raises(ConfigError, match="--reasoning-effort 'max'"):
        ExtractJob(model=MODEL, schema=Invoice, reasoning_effort="max")


class Meta(BaseModel):
    meta: dict[str, Any]


class Item(BaseModel):
    name: str
    meta: dict[str, Any]


class Order(BaseModel):
    items: list[Item]


class Either(BaseModel):
    value: int | str | None


class Blob(BaseModel):
    data: bytes


class Tags(BaseModel):
    tags: set[str]


@pytest.mark.parametrize(
    ("model", "path"),
    [(Order, "Order.items[].meta"), (Either, "Either.value"), (Blob, "Blob.data"), (Tags, "Tags.tags")],
)
def test_an_unmappable_field_is_a_config_error_naming_its_path(model, path):
    with pytest.raises(ConfigError) as error:
        ExtractJob(model=MODEL, schema=model)
    assert str(error.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("no_such_module_xyz:Invoice", "module 'no_such_module_xyz' can't be imported"),
        ("schemas.examples:Reciept", "has no attribute 'Reciept' (models there: CalendarEvent, Contract, Invoice"),
        ("schemas.examples:Currency", "Currency is a EnumType, not a pydantic model"),
        ("schemas.examples", "expected MODULE:Model"),
    ],
)
def test_a_bad_schema_option_fails_when_the_job_is_built(spec, named):
    parameters = {"input": "", "output": "", "schema_ref": spec, "provider": "local", "text_col": "text"}
    with pytest.raises(ConfigError) as error:
        command_job(commands.extract, **parameters)
    assert named in str(error.value)
    assert import_model("schemas.examples:CalendarEvent") is CalendarEvent


def test_prompt_file_and_id_column_clash(tmp_path):
    (tmp_path / "prompt.txt").write_text("Pull out the invoice.\n")
    params = {"input": "", "output": "", "schema_ref": "schemas.examples:Invoice", "provider": "openai"}
    job = command_job(commands.extract, **{**params, "prompt_file": str(tmp_path / "prompt.txt")}).job
    assert job.system_prompt == "Pull out the invoice." and job.model == "gpt-4o-mini"
    with pytest.raises(ConfigError, match="only one"):
        command_job(commands.extract, **{**params, "prompt": "a", "prompt_file": str(tmp_path / "prompt.txt")})
    with pytest.raises(ConfigError, match="Invoice.vendor: the output's id column"):
        command_job(commands.extract, **{**params, "id_col": "vendor"})


class Stamp(BaseModel):
    at: dt.datetime
    maybe: dt.datetime | None
    amount: Decimal
    price: Decimal = Field(max_digits=6, decimal_places=2)
    kind: Literal["a", "b"] | None


def test_mapping_converts_timezones_and_decimals_and_round_trips_nulls():
    mapping = model_mapping(Stamp)
    assert [f.type for f in mapping.fields] == [UTC_US, UTC_US, pa.decimal128(38, 9), pa.decimal128(6, 2), ENUM]
    plus2 = dt.timezone(dt.timedelta(hours=2))
    rows = [
        mapping.row(Stamp(at=dt.datetime(2024, 5, 1, 12, tzinfo=plus2), maybe=None, amount=1, price=3, kind=None)),
        mapping.row(Stamp(at=dt.datetime(2024, 5, 1, 12), maybe=None, amount=Decimal("0.5"), price=1.5, kind="b")),
    ]
    table = pa.table(mapping.arrays(rows))
    back = mapping.rows(table)
    assert back[0]["at"] == dt.datetime(2024, 5, 1, 10, tzinfo=dt.UTC)
    assert back[1]["at"] == dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC)  # naive is read as UTC
    assert back[0]["maybe"] is None and back[0]["kind"] is None and back[1]["kind"] == "b"
    assert back[1]["amount"] == Decimal("0.5") and back[0]["price"] == Decimal("3.00")
    with pytest.raises(ValueError, match="Stamp.amount"):
        mapping.row(Stamp(at=dt.datetime(2024, 1, 1), maybe=None, amount=Decimal("1e40"), price=0, kind=None))


def test_a_reply_that_fails_validation_is_a_row_failure_with_a_short_message():
    job = ExtractJob(model=MODEL, schema=Invoice)
    content = json.dumps({"vendor": "Acme", "currency": "DOGE", "line_items": [{"quantity": "many"}]})
    completion = ChatCompletion.model_validate(
        {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": MODEL,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        }
    )
    failure = job._parse(completion)
    assert isinstance(failure, RowFailure) and failure.kind == "invalid_reply" and failure.raw_reply == content
    assert failure.message.startswith("reply does not match Invoice: ")
    assert "currency: Input should be" in failure.message and "more)" in failure.message
    assert len(failure.message) <= 600
