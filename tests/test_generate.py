"""`gembatch generate` end to end against the emulator over real HTTP, reading the Parquet back."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, TEST_KEY, TEST_KEY_ENV, assert_balanced, read_errors, read_output, run_gembatch

from emulator.catalog import REASONING_EFFORT_TOKENS
from emulator.chat import CHARS_PER_TOKEN, choice_text
from emulator.fakes import count_tokens, fake_chat_text
from flows import commands
from flows.options import command_job
from tasks.engine.dry_run import plan_job
from tasks.engine.run import RunOptions, run_job
from tasks.engine.send.context import RetryPolicy
from tasks.errors import ConfigError
from tasks.jobs.generate import GenerateJob, template_columns
from tasks.provider.client import ProviderSettings
from tasks.provider.prices import price_of

MODEL = "gemini-3.8-flash"  # the default chat model
SAMPLED = "gemini-2.5-flash-lite"  # still served, and still takes --temperature (Gemini 3 deprecated it)
REVIEWS = REPO / "data" / "generate" / "reviews.csv"
PROMPT_FILE = REPO / "data" / "generate" / "prompt.txt"
TEMPLATE = "Summarise the {product} review in one line: {review}"


def options(emu, input: Path, output: Path, **kw: Any) -> RunOptions:
    stream = kw.pop("stream", False)
    idle = kw.pop("idle_timeout_s", 5.0)
    return RunOptions(
        input=str(input),
        output=str(output),
        provider=ProviderSettings(
            provider="local",
            base_url=emu.base_url,
            api_key_env=TEST_KEY_ENV,
            timeout_s=5,
            stream=stream,
            idle_timeout_s=idle,
        ),
        chunk_size=kw.pop("chunk_size", 4),
        **{"retry": RetryPolicy(base_delay_s=0.01, max_delay_s=0.05), **kw},
    )


def run_generate(emu, input: Path, output: Path, job: GenerateJob | None = None, **kw: Any) -> dict[str, Any]:
    return asyncio.run(run_job(job or GenerateJob(model=MODEL, prompt=TEMPLATE), options(emu, input, output, **kw)))


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def reviews() -> list[dict[str, Any]]:
    import pyarrow.csv as pcsv

    return pcsv.read_csv(REVIEWS).to_pylist()


def expected_row(job: GenerateJob, row: dict[str, Any], k: int = 0) -> dict[str, Any]:
    """What the emulator answers for ``row``: the rendered template is the whole user message."""
    user = job.prompt.format_map(row)
    text = choice_text(fake_chat_text(job.model, user), k)
    finish = "stop"
    if job.max_tokens is not None and count_tokens(text) > job.max_tokens:
        text, finish = text[: job.max_tokens * CHARS_PER_TOKEN], "length"
    texts = [job.system, user] if job.system is not None else [user]
    return {
        "text": text,
        "choice": k,
        "finish_reason": finish,
        "truncated": finish == "length",
        "prompt_tokens": sum(count_tokens(t) for t in texts),
        "thinking_tokens": REASONING_EFFORT_TOKENS.get(job.reasoning_effort or "", 0),
    }


def check_output(job: GenerateJob, out: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    got = sorted(read_output(out).to_dicts(), key=lambda r: (r["id"], r["choice"]))
    want = [{"id": row["id"], **expected_row(job, row, k)} for row in rows for k in range(job.n)]
    assert [{k: g[k] for k in w} for g, w in zip(got, want, strict=True)] == want
    return got


def test_every_row_gets_its_answer_with_usage_and_a_system_prompt(emulator, tmp_path):
    rows = reviews()
    job = GenerateJob(model=SAMPLED, prompt=TEMPLATE, system="You are terse.", temperature=0.2, reasoning_effort="low")
    doc = run_generate(emulator, REVIEWS, tmp_path / "out", job)

    assert doc["status"] == "completed" and doc["counts"]["succeeded"] == len(rows) == 8
    assert_balanced(doc)
    got = check_output(job, tmp_path / "out", rows)
    # Completion tokens are the answer's; the request's usage adds up to the run's.
    assert all(g["completion_tokens"] == count_tokens(g["text"]) for g in got)
    assert doc["tokens"]["prompt"] == sum(g["prompt_tokens"] for g in got)
    assert doc["tokens"]["total"] == sum(
        g["prompt_tokens"] + g["completion_tokens"] + g["thinking_tokens"] for g in got
    )
    assert [(f.name, f.type) for f in pq.read_schema(sorted((tmp_path / "out").glob("part-*"))[0])] == [
        (f.name, f.type) for f in job.output_schema("id", pa.int64())
    ]
    assert doc["job_parameters"] == {
        "prompt": TEMPLATE, "system": "You are terse.", "columns": ["product", "review"],
        "temperature": 0.2, "max_tokens": None, "reasoning_effort": "low", "n": 1,
    }  # fmt: skip


def test_an_answer_cut_by_max_tokens_is_flagged_truncated(emulator, tmp_path):
    rows = [
        {"id": 1, "product": "kettle", "review": "ok"},
        {"id": 2, "product": "stove", "review": "a long review " * 20},
        {"id": 3, "product": "shoes", "review": "fine"},
    ]
    src = write_rows(tmp_path / "in.parquet", rows)
    job = GenerateJob(model=MODEL, prompt="{review}", max_tokens=16)
    doc = run_generate(emulator, src, tmp_path / "out", job)

    assert doc["status"] == "completed", doc["message"]
    got = check_output(job, tmp_path / "out", rows)
    assert [(g["id"], g["truncated"], g["finish_reason"]) for g in got] == [
        (1, False, "stop"), (2, True, "length"), (3, False, "stop"),
    ]  # fmt: skip
    assert len(got[1]["text"]) == 16 * CHARS_PER_TOKEN


def test_n_completions_are_rows_and_reruns_share_stored_answers(emulator, tmp_path):
    rows = [{"id": i, "product": "p", "review": f"review {i % 3}"} for i in range(6)]  # 3 distinct prompts
    src = write_rows(tmp_path / "in.parquet", rows)
    job = GenerateJob(model=MODEL, prompt="{review}", n=3)
    doc = run_generate(emulator, src, tmp_path / "out", job)

    c = doc["counts"]
    assert (c["succeeded"], c["deduplicated"], doc["requests"]["sent"]) == (3, 3, 3)
    check_output(job, tmp_path / "out", rows)

    # A new id whose prompt is already answered takes the stored three completions: no request.
    more = write_rows(tmp_path / "more.parquet", [*rows, {"id": 9, "product": "p", "review": "review 1"}])
    emulator.reset_stats()
    again = run_generate(emulator, more, tmp_path / "out", job)
    assert emulator.stats["by_route"]["chat/completions"] == 0
    assert (again["counts"]["skipped_done"], again["counts"]["deduplicated"]) == (6, 1)
    check_output(job, tmp_path / "out", [*rows, {"id": 9, "product": "p", "review": "review 1"}])


def test_rerun_sends_nothing_and_a_changed_parameter_or_system_sends_again(emulator, tmp_path):
    rows = reviews()
    first = GenerateJob(model=SAMPLED, prompt=TEMPLATE)
    run_generate(emulator, REVIEWS, tmp_path / "out", first)
    emulator.reset_stats()
    again = run_generate(emulator, REVIEWS, tmp_path / "out", first)
    assert again["counts"]["skipped_done"] == 8 and emulator.stats["by_route"]["chat/completions"] == 0

    for changed in (
        GenerateJob(model=SAMPLED, prompt=TEMPLATE, temperature=0.7),
        GenerateJob(model=SAMPLED, prompt=TEMPLATE, temperature=0.7, system="Be brief."),
        GenerateJob(model=SAMPLED, prompt=TEMPLATE + " ", temperature=0.7, system="Be brief."),
    ):
        doc = run_generate(emulator, REVIEWS, tmp_path / "out", changed)
        assert doc["counts"]["succeeded"] == 8, doc["counts"]
        # The newer answer supersedes the older one: still one row per id.
        check_output(changed, tmp_path / "out", rows)


def test_a_missing_template_column_is_named_before_any_request(emulator, tmp_path):
    job = GenerateJob(model=MODEL, prompt="{product}: {title} / {body}")
    for dry_run in (False, True):
        with pytest.raises(ConfigError) as exc:
            if dry_run:
                asyncio.run(plan_job(job, options(emulator, REVIEWS, tmp_path / "out", dry_run=True)))
            else:
                run_generate(emulator, REVIEWS, tmp_path / "out", job)
        message = str(exc.value)
        assert "uses column 'title', 'body'" in message and str(REVIEWS) in message
        assert "its columns are: id, product, review" in message
    assert emulator.stats["requests"] == 0
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("Summarise: {}", "names no column"),
        ("Summarise: {0}", "names no column"),
        ("Summarise: {text.upper}", "only whole columns"),
        ("Summarise: {text", "not a valid template"),
        ("Summarise the text.", "names no column, so every row would send the same prompt"),
    ],
)
def test_a_template_that_cannot_be_rendered_is_refused(template, says):
    with pytest.raises(ConfigError, match=says):
        GenerateJob(model=MODEL, prompt=template)


def test_template_columns_keep_their_order_and_literal_braces():
    assert template_columns("{b} and {a} and {b:>5} {{not}}") == ("b", "a")
    job = GenerateJob(model=MODEL, prompt="JSON like {{'x': 1}} for {a}")
    prepared = job.prepare({"a": 7})
    assert prepared.data == [{"role": "user", "content": "JSON like {'x': 1} for 7"}]


def test_null_cells_and_empty_prompts_become_error_rows_naming_the_column(emulator, tmp_path):
    rows = [
        {"id": 1, "product": "kettle", "review": "fine"},
        {"id": 2, "product": None, "review": "no product"},
        {"id": 3, "product": "stove", "review": "also fine"},
        {"id": 4, "product": " ", "review": " "},
    ]
    src = write_rows(tmp_path / "in.parquet", rows)
    job = GenerateJob(model=MODEL, prompt="{product}{review}")
    doc = run_generate(emulator, src, tmp_path / "out", job)
    assert doc["status"] == "completed with errors" and doc["counts"]["failed"] == 2
    assert_balanced(doc)
    check_output(job, tmp_path / "out", [rows[0], rows[2]])
    errors = sorted(read_errors(tmp_path / "out").to_dicts(), key=lambda r: r["id"])
    assert [(e["id"], e["error_type"]) for e in errors] == [(2, "invalid_input"), (4, "invalid_input")]
    assert "column 'product' is null" in errors[0]["error_message"]
    assert "rendered from column(s) product, review is empty" in errors[1]["error_message"]


def test_the_builder_reads_the_prompt_file_and_refuses_two_or_no_prompts(tmp_path):
    base = {"provider": "local", "input": str(REVIEWS), "output": str(tmp_path)}
    job = command_job(commands.generate, **{**base, "prompt_file": str(PROMPT_FILE), "n": 2}).job
    assert job.prompt == PROMPT_FILE.read_text().strip() and job.columns == ("product", "review")
    assert job.model == MODEL and job.n == 2
    with pytest.raises(ConfigError, match="--prompt and --prompt-file both given"):
        command_job(commands.generate, **{**base, "prompt": "{review}", "prompt_file": str(PROMPT_FILE)})
    with pytest.raises(ConfigError, match="needs a prompt template"):
        command_job(commands.generate, **dict(base))
    bad_temperature = {"temperature": 3.0, "model": SAMPLED}
    for bad, says in (({"n": 9}, "--n 9"), (bad_temperature, "--temperature 3"), ({"max_tokens": 0}, "--max")):
        with pytest.raises(ConfigError, match=says):
            command_job(commands.generate, **{**base, "prompt": "{review}", **bad})


def test_dry_run_estimates_the_rendered_prompts_without_a_request(emulator, tmp_path, monkeypatch):
    monkeypatch.delenv(TEST_KEY_ENV)
    job = GenerateJob(model=MODEL, prompt=TEMPLATE, system="Be brief.")
    plan = asyncio.run(plan_job(job, options(emulator, REVIEWS, tmp_path / "out", dry_run=True)))
    assert emulator.stats["requests"] == 0
    assert plan["counts"]["would_send"] == 8 and plan["estimate"]["requests"] == 8
    rendered = [job.prepare(r) for r in reviews()]
    assert plan["estimate"]["input_tokens"] == sum(p.tokens for p in rendered)
    assert "max_output_tokens" not in plan["estimate"]  # no --max-tokens: no bound on the output
    # With --max-tokens the output is bounded: 8 requests x 2 answers x 100 tokens at $2.50/1M.
    capped = GenerateJob(model=MODEL, prompt=TEMPLATE, system="Be brief.", max_tokens=100, n=2)
    plan = asyncio.run(plan_job(capped, options(emulator, REVIEWS, tmp_path / "out", dry_run=True)))
    assert plan["estimate"]["max_output_tokens"] == 1600
    assert plan["estimate"]["max_output_cost_usd"] == pytest.approx(1600 * price_of(MODEL).output / 1e6)


def test_the_key_appears_in_no_output_file(emulator, tmp_path):
    rows = [{"id": 1, "text": "fine"}, {"id": 2, "text": "refused [[emulator:400]]"}, {"id": 3, "text": "ok"}]
    src = write_rows(tmp_path / "in.parquet", rows)
    for stream in (False, True):
        out = tmp_path / f"out-{stream}"
        run_generate(emulator, src, out, GenerateJob(model=MODEL, prompt="{text}"), stream=stream)
        files = [p for p in out.rglob("*") if p.is_file()]
        assert len(files) >= 3
        for path in files:
            assert TEST_KEY.encode() not in path.read_bytes(), path


def test_the_command_runs_generate_untracked_and_a_typo_in_the_template_costs_nothing(emulator, tmp_path, capsys):
    base = ["generate", str(REVIEWS)]
    where = ["--base-url", emulator.base_url, "--api-key-env", TEST_KEY_ENV, "--no-progress"]
    out = tmp_path / "out"
    argv = [*base, "-o", str(out), "--prompt", TEMPLATE, "--stream", "--n", "2", "--max-tokens", "30", *where]
    ok = run_gembatch(argv, capsys)
    assert ok.returncode == 0, ok.stderr
    assert "completed" in ok.stdout
    job = GenerateJob(model=MODEL, prompt=TEMPLATE, n=2, max_tokens=30)
    check_output(job, out, reviews())
    emulator.reset_stats()
    typo = run_gembatch([*base, "-o", str(tmp_path / "typo"), "--prompt", "{prodcut}: {review}", *where], capsys)
    assert typo.returncode == 2
    said = " ".join(typo.stderr.split())
    assert "uses column 'prodcut', which input" in said and "its columns are: id, product, review" in said
    assert emulator.stats["requests"] == 0


def test_generate_as_a_prefect_flow(prefect_server, emulator, tmp_path):
    from flows.generate import generate_flow
    from flows.params import CommonOptions

    doc = asyncio.run(
        generate_flow(
            input=str(REVIEWS),
            output=str(tmp_path / "out"),
            prompt_file=str(PROMPT_FILE),
            system="Be brief.",
            max_tokens=40,
            options=CommonOptions(provider="local", base_url=emulator.base_url, api_key_env=TEST_KEY_ENV),
        )
    )
    assert doc["status"] == "completed" and doc["flow_run_id"]
    job = GenerateJob(model=MODEL, prompt=PROMPT_FILE.read_text().strip(), system="Be brief.", max_tokens=40)
    check_output(job, tmp_path / "out", reviews())


def test_a_template_may_name_the_id_and_numeric_columns_of_a_csv(emulator, tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("id,item,price\n1,kettle,19.5\n2,stove,120\n")
    job = command_job(
        commands.generate, input=str(src), output="", prompt="#{id}: {item} costs {price}", provider="local"
    ).job
    doc = run_generate(emulator, src, tmp_path / "out", job)
    assert doc["status"] == "completed", doc["message"]
    out = read_output(tmp_path / "out").sort("id")
    assert out.schema["id"] == pl.Int64  # read with its own type, not as text
    assert out["text"].to_list() == [
        fake_chat_text(MODEL, "#1: kettle costs 19.5"),
        fake_chat_text(MODEL, "#2: stove costs 120"),
    ]
