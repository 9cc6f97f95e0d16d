"""The command line form of the common options (declared in flows/params.py), and running a job's flow."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from flows.params import CommonOptions, cli_flag, flow_arguments

if TYPE_CHECKING:
    from flows.jobs import FlowJob

console = Console()
err_console = Console(stderr=True)

Output = Annotated[
    str,
    typer.Option(
        "--output", "-o", help="Output folder (local path or fsspec URL), or a LanceDB table: lancedb://PATH/TABLE."
    ),
]


def common_option(name: str) -> Any:
    """The typer annotation of the common option ``name``: type, flag and help from flows/params.py."""
    flag, help = cli_flag(name)
    annotation = bool if flag.startswith("--no-") else CommonOptions.model_fields[name].annotation
    return Annotated[annotation, typer.Option(flag, help=help)]


def _common_parameters() -> list[inspect.Parameter]:
    """The options every job command takes after its own, one per field of :class:`CommonOptions`."""
    parameters = []
    for name, field in CommonOptions.model_fields.items():
        flag, _ = cli_flag(name)
        # A --no-… flag (--no-progress) is its own parameter (no_progress), off by default.
        own_name, default = (flag[2:].replace("-", "_"), False) if flag.startswith("--no-") else (name, field.default)
        parameters.append(
            inspect.Parameter(own_name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=common_option(name))
        )
    return parameters


Provider, BaseUrl, ApiKeyEnv = (common_option(name) for name in ("provider", "base_url", "api_key_env"))


def job_command(flow: str, build_job: str):
    """Make a job's command from a function declaring only its own arguments and options: the common
    options are appended to its signature (typer reads that), and calling it runs the job.

    ``flow`` and ``build_job`` are "module:attribute" names, imported only when the command runs: the
    command's --help needs neither (nor Prefect, which the flow modules import)."""

    def decorate(func: Callable[..., None]) -> Callable[..., None]:
        own = list(inspect.signature(func, eval_str=True).parameters.values())
        common = _common_parameters()

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


def built_job(build_job: str, params: dict[str, Any]) -> FlowJob:
    """The job that the builder ``build_job`` ("module:attribute") makes from a command's flat parameters."""
    return resolve(build_job)(**flow_arguments(params))


def command_job(command: Callable[..., None], **values: Any) -> FlowJob:
    """The job ``command`` builds from ``values`` and its own defaults for the rest, as the command line does."""
    return built_job(command.build_job, command_params(command, **values))


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
    change = document.get("model_change")
    for key, value in (
        ("model", document["model"]),
        ("price", document.get("price", "")),
        *(
            [
                ("--change-model", f"{change['from']} -> {change['to']}"),
                ("rows of the old model in the output", change["rows_in_output"]),
                ("rows to re-send with the new model", change["rows_to_resend"]),
            ]
            if change
            else []
        ),
        ("input rows", c["input_rows"]),
        ("already done (skipped)", c["skipped_done"]),
        ("duplicates (no request)", c["deduplicated"]),
        ("invalid rows (would fail)", c["invalid"]),
        ("failed before (not retried)", c["failed_before"]),
        ("rows to send", c["would_send"]),
        ("requests", e["requests"]),
        *(
            [
                (f"--mode {e['mode']}: batches (request files)", e["batches"]),
                ("requests by batch / live", f"{e['batch_requests']} / {e['live_requests']}"),
            ]
            if "batches" in e
            else []
        ),
        ("input tokens (estimate)", e["input_tokens"]),
        (
            "input cost USD (estimate)" + (" at batch price" if e.get("batch_requests") else ""),
            "unknown: no price for this model (see price)" if cost is None else f"{cost:.6f}",
        ),
        *(
            [
                ("output tokens at most (--max-tokens)", e["max_output_tokens"]),
                (
                    "output cost USD at most",
                    "n/a" if e["max_output_cost_usd"] is None else f"{e['max_output_cost_usd']:.6f}",
                ),
            ]
            if "max_output_tokens" in e
            else []
        ),
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
        *(
            [
                ("audio, all files (from headers)", _hours(e["audio_seconds"])),
                ("audio to send", _hours(e.get("audio_seconds_to_send", 0.0))),
            ]
            if "audio_seconds" in e
            else []
        ),
        (
            "minutes at --rpm/--tpm",
            "no --rpm/--tpm given" if e["minutes_at_limits"] is None else e["minutes_at_limits"],
        ),
    ):
        table.add_row(key, str(value))
    console.print(table)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h ({seconds:,.0f} s)"


def print_summary(document: dict[str, Any]) -> None:
    if document["status"] == "dry run":
        print_plan(document)
        return
    from tasks.engine.report.metadata import summary_rows

    table = Table(title=f"gembatch {document['job']}", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value")
    for row in summary_rows(document):
        table.add_row(row["metric"], row["value"])
    console.print(table)
    from tasks.sinks.location import staging_folder  # `gembatch --help` imports this module: not at its top

    synced = document["output"].get("table")
    if synced:
        console.print(_table_line(synced))
    console.print(f"Run metadata: {staging_folder(document['output']['path'])}/_runs/{document['run_id']}.json")


def _table_line(synced: dict[str, Any]) -> str:
    """What the run did to its LanceDB table (--output lancedb://…)."""
    if synced.get("sync") != "done":
        return f"LanceDB table: {synced.get('sync')}"
    line = (
        f"LanceDB table {synced['table']}: {synced['inserted']} inserted, {synced['updated']} updated, "
        f"{synced['deleted']} deleted, {synced['unchanged']} unchanged "
        f"({synced['rows']} rows, version {synced['version']})"
    )
    if "index" in synced:
        line += f"; index: {synced['index']['status']}"
    return line


def run_command(flow: str, build_job: str, params: dict[str, Any]) -> None:
    """Check what needs no server first (key, input, columns), so a mistake costs no Prefect import. A
    dry run never needs Prefect. A run is a flow run when a Prefect API is configured, else the same
    engine runs untracked (one note on stderr says so): no temporary Prefect server to start and stop."""
    from flows.common import run_untracked
    from flows.engine_options import options_of
    from flows.tracking import UNTRACKED_NOTE, configured_api_url
    from tasks.engine.preflight import preflight

    flow_job = built_job(build_job, params)
    options = options_of(flow_job)
    preflight(flow_job.job, options)
    if not options.dry_run and configured_api_url():
        from tasks.errors import RunNotCompleted

        try:
            document = asyncio.run(resolve(flow)(**flow_arguments(params)))
        except RunNotCompleted as exc:
            document = exc.document
        finish(document)
        return
    if not options.dry_run:
        err_console.print(UNTRACKED_NOTE, markup=False, highlight=False, soft_wrap=True)
    finish(asyncio.run(run_untracked(flow_job)))


# Exit codes: 0 completed (or a dry run), 2 a problem found before any work, 3 the run stopped early
# (resumable), 4 every row was tried but more than --max-failed-pct failed, 5 the rows are done but the
# LanceDB table was not updated (the next run updates it), 130 Ctrl-C.
EXIT_STOPPED = 3
EXIT_FAILED_ROWS = 4
EXIT_TABLE_NOT_SYNCED = 5


def finish(document: dict[str, Any]) -> None:
    from tasks.engine.run import COMPLETED_WITH_ERRORS
    from tasks.redact import redact_text

    print_summary(document)
    if document["status"] not in ("completed", "dry run"):
        err_console.print(f"[bold red]{document['status']}[/]: {redact_text(document['message'])}", highlight=False)
        raise typer.Exit(EXIT_FAILED_ROWS if document["status"] == COMPLETED_WITH_ERRORS else EXIT_STOPPED)
    if document.get("message"):
        err_console.print(redact_text(document["message"]), highlight=False)
    synced = (document.get("output") or {}).get("table") or {}
    if synced.get("sync") == "failed":
        err_console.print(f"[bold red]table not updated[/]: {redact_text(synced['message'])}", highlight=False)
        raise typer.Exit(EXIT_TABLE_NOT_SYNCED)
