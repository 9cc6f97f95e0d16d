"""Command-line options every job shares, and running a job's flow from the command line."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

# Common options, declared once and shared by every job command.
Output = Annotated[str, typer.Option("--output", "-o", help="Output folder (local path or fsspec URL).")]
IdCol = Annotated[str, typer.Option("--id-col", help="Column with each row's unique id.")]
Provider = Annotated[
    str,
    typer.Option(
        "--provider", help="gemini (GEMINI_API_KEY), openai (OPENAI_API_KEY) or local (the built-in emulator)."
    ),
]  # noqa: E501
BaseUrl = Annotated[
    str | None, typer.Option("--base-url", help="Any OpenAI-compatible server (vLLM, Ollama, LiteLLM).")
]  # noqa: E501
ApiKeyEnv = Annotated[str | None, typer.Option("--api-key-env", help="Environment variable that holds the key.")]
Rpm = Annotated[float | None, typer.Option("--rpm", help="Requests per minute allowed (your quota).")]
Tpm = Annotated[float | None, typer.Option("--tpm", help="Input tokens per minute allowed (your quota).")]
MaxConcurrency = Annotated[
    int | None,
    typer.Option(
        "--max-concurrency",
        help="Your own cap on requests in flight (default: as many as --rpm and the latency need, at most 1024).",
    ),
]
ChunkSize = Annotated[
    int, typer.Option("--chunk-size", help="Rows per chunk (one Prefect task and one part file each).")
]  # noqa: E501
Limit = Annotated[int | None, typer.Option("--limit", help="Only the first N rows of the input.")]
RetryErrors = Annotated[bool, typer.Option("--retry-errors", help="Resend the rows recorded in _errors/.")]
Timeout = Annotated[float, typer.Option("--timeout", help="Seconds before one request is abandoned and retried.")]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Count, estimate tokens, cost and time; send nothing, write nothing.")
]
MaxCostUsd = Annotated[
    float | None, typer.Option("--max-cost-usd", help="Stop before the estimated cost passes this many USD.")
]
Force = Annotated[
    bool, typer.Option("--force", help="Write into a folder that holds another job's or model's results.")
]
ApiKeySecret = Annotated[
    str | None, typer.Option("--api-key-secret", help="Name of a Prefect Secret block holding the key.")
]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="No progress bar.")]
MaxOutage = Annotated[
    float,
    typer.Option(
        "--max-outage",
        help="Seconds the run waits (probing) while the provider answers only 5xx/timeouts before it stops, resumable.",
    ),
]
MaxFailedPct = Annotated[
    float,
    typer.Option(
        "--max-failed-pct",
        help="Share of failed rows (%) above which the run is 'completed with errors' (exit 4).",
    ),
]


def _common_options(
    id_col: IdCol = "id",
    provider: Provider = "gemini",
    base_url: BaseUrl = None,
    api_key_env: ApiKeyEnv = None,
    api_key_secret: ApiKeySecret = None,
    rpm: Rpm = None,
    tpm: Tpm = None,
    max_concurrency: MaxConcurrency = None,
    chunk_size: ChunkSize = 2000,
    limit: Limit = None,
    retry_errors: RetryErrors = False,
    timeout: Timeout = 120.0,
    dry_run: DryRun = False,
    max_cost_usd: MaxCostUsd = None,
    force: Force = False,
    max_outage: MaxOutage = 1800.0,
    max_failed_pct: MaxFailedPct = 0.0,
    no_progress: NoProgress = False,
) -> None:
    """The options every job command takes after its own (a signature template, never called)."""


def job_command(flow: str, build_job: str):
    """Make a job's command from a function declaring only its own arguments and options: the common
    options are appended to its signature (typer reads that), and calling it runs the job.

    ``flow`` and ``build_job`` are "module:attribute" names, imported only when the command runs: the
    command's --help needs neither (nor Prefect, which the flow modules import)."""

    def decorate(func: Callable[..., None]) -> Callable[..., None]:
        own = list(inspect.signature(func, eval_str=True).parameters.values())
        common = list(inspect.signature(_common_options, eval_str=True).parameters.values())

        def command(**values: Any) -> None:
            run_command(flow, build_job, common_params(**values))

        command.__name__, command.__doc__ = func.__name__, func.__doc__
        command.flow, command.build_job = flow, build_job
        command.__signature__ = inspect.Signature([*own, *common], return_annotation=None)
        command.__annotations__ = {p.name: p.annotation for p in (*own, *common)}
        return command

    return decorate


def common_params(**values: Any) -> dict[str, Any]:
    values["progress"] = not values.pop("no_progress") and sys.stderr.isatty()
    return values


def command_params(command: Callable[..., None], **values: Any) -> dict[str, Any]:
    """The flow parameters ``command`` runs its job with: its defaults, updated with ``values``."""
    defaults = {p.name: p.default for p in inspect.signature(command).parameters.values() if p.default is not p.empty}
    return common_params(**(defaults | {"no_progress": True} | values))


def resolve(ref: str) -> Any:
    """The object a "module:attribute" name refers to (imported now)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def print_plan(document: dict[str, Any]) -> None:
    c, e = document["counts"], document["estimate"]
    cost = e["input_cost_usd"]
    table = Table(title=f"gembatch {document['job']} --dry-run (nothing sent)", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value")
    for key, value in (
        ("model", document["model"]),
        ("input rows", c["input_rows"]),
        ("already done (skipped)", c["skipped_done"]),
        ("duplicates (no request)", c["deduplicated"]),
        ("invalid rows (would fail)", c["invalid"]),
        ("failed before (not retried)", c["failed_before"]),
        ("rows to send", c["would_send"]),
        ("requests", e["requests"]),
        ("input tokens (estimate)", e["input_tokens"]),
        ("input cost USD (estimate)", "n/a (model not in price table)" if cost is None else f"{cost:.6f}"),
        *(
            [
                ("images (n × rows)", e["images"]),
                (
                    "image cost USD (estimate)",
                    f"{e['image_cost_usd']:.6f}" if e["image_cost_usd"] is not None else "n/a (no price per image)",
                ),
            ]
            if "images" in e
            else []
        ),
        (
            "minutes at --rpm/--tpm",
            "no --rpm/--tpm given" if e["minutes_at_limits"] is None else e["minutes_at_limits"],
        ),
    ):
        table.add_row(key, str(value))
    console.print(table)


def print_summary(document: dict[str, Any]) -> None:
    if document["status"] == "dry run":
        print_plan(document)
        return
    from tasks.metadata import summary_rows

    table = Table(title=f"gembatch {document['job']}", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value")
    for row in summary_rows(document):
        table.add_row(row["metric"], row["value"])
    console.print(table)
    console.print(f"Run metadata: {document['output']['path']}/_runs/{document['run_id']}.json")


def run_command(flow: str, build_job: str, params: dict[str, Any]) -> None:
    """Check what needs no server first (key, input, columns), so a mistake costs no Prefect import. A
    dry run never needs Prefect. A run is a flow run when a Prefect API is configured, else the same
    engine runs untracked (one note on stderr says so): no temporary Prefect server to start and stop."""
    from flows.common import options_from, run_untracked
    from flows.tracking import UNTRACKED_NOTE, configured_api_url
    from tasks.run import preflight

    parameters = dict(params)
    job = resolve(build_job)(parameters)
    options = options_from(parameters)
    preflight(job, options)
    if not options.dry_run and configured_api_url():
        from tasks.errors import RunNotCompleted

        try:
            document = asyncio.run(resolve(flow)(**params))
        except RunNotCompleted as exc:
            document = exc.document
        finish(document)
        return
    if not options.dry_run:
        err_console.print(UNTRACKED_NOTE, markup=False, highlight=False, soft_wrap=True)
    finish(asyncio.run(run_untracked(job, parameters)))


# Exit codes: 0 completed (or a dry run), 2 a problem found before any work, 3 the run stopped early
# (resumable), 4 every row was tried but more than --max-failed-pct failed, 130 Ctrl-C.
EXIT_STOPPED = 3
EXIT_FAILED_ROWS = 4


def finish(document: dict[str, Any]) -> None:
    from tasks.run import COMPLETED_WITH_ERRORS

    print_summary(document)
    if document["status"] not in ("completed", "dry run"):
        err_console.print(f"[bold red]{document['status']}[/]: {document['message']}", highlight=False)
        raise typer.Exit(EXIT_FAILED_ROWS if document["status"] == COMPLETED_WITH_ERRORS else EXIT_STOPPED)
    if document.get("message"):
        err_console.print(document["message"], highlight=False)
