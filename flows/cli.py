"""The `gembatch` command: a thin typer layer over the flows."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tasks.errors import GembatchError

app = typer.Typer(
    help="Rate-limited, resumable LLM batch jobs over Parquet/CSV (Gemini's OpenAI-compatible API by default).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
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
MaxConcurrency = Annotated[int, typer.Option("--max-concurrency", help="Requests in flight at most.")]
ChunkSize = Annotated[
    int, typer.Option("--chunk-size", help="Rows per chunk (one Prefect task and one part file each).")
]  # noqa: E501
Limit = Annotated[int | None, typer.Option("--limit", help="Only the first N rows of the input.")]
RetryErrors = Annotated[bool, typer.Option("--retry-errors", help="Resend the rows recorded in _errors/.")]
Timeout = Annotated[float, typer.Option("--timeout", help="Seconds before one request is abandoned and retried.")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="No progress bar.")]


def _common(**values: Any) -> dict[str, Any]:
    values["progress"] = not values.pop("no_progress") and sys.stderr.isatty()
    return values


@app.command()
def embed(
    input: Annotated[str, typer.Argument(help="Parquet or CSV file (local path or fsspec URL).")],
    output: Output,
    text_col: Annotated[str, typer.Option("--text-col", help="Column with the text to embed.")] = "text",
    model: Annotated[
        str | None, typer.Option("--model", help="Embedding model [default: gemini-embedding-001].")
    ] = None,  # noqa: E501
    dimensions: Annotated[int | None, typer.Option("--dimensions", help="Shorter vectors (normalised here).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Texts per request (Gemini allows 100).")] = 100,
    id_col: IdCol = "id",
    provider: Provider = "gemini",
    base_url: BaseUrl = None,
    api_key_env: ApiKeyEnv = None,
    rpm: Rpm = None,
    tpm: Tpm = None,
    max_concurrency: MaxConcurrency = 16,
    chunk_size: ChunkSize = 2000,
    limit: Limit = None,
    retry_errors: RetryErrors = False,
    timeout: Timeout = 120.0,
    no_progress: NoProgress = False,
) -> None:
    """Embed a text column: one fixed-size float32 vector per row."""
    params = _common(**locals())
    from flows.embed import embed_flow, embed_job

    _run(embed_flow, embed_job, params)


@app.command()
def demo(
    output: Annotated[str, typer.Option("--output", "-o", help="Where the demo writes.")] = "data/out/demo",
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete the demo output first.")] = False,
) -> None:
    """Embed the sample corpus in data/ with the built-in emulator and show the result."""
    from flows.demo import run_demo

    run_demo(output=output, fresh=fresh, console=console)


@app.command()
def emulator(
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1 (0: a free one).")] = 8000,
    api_key_env: Annotated[
        str, typer.Option("--api-key-env", help="Variable with the key clients must send.")
    ] = "GEMBATCH_EMULATOR_KEY",  # noqa: E501
    rpm: Annotated[int | None, typer.Option("--rpm", help="Requests per window before 429s.")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", help="Input tokens per window before 429s.")] = None,
    rpd: Annotated[int | None, typer.Option("--rpd", help="Requests per day before a PerDay 429.")] = None,
    window: Annotated[float, typer.Option("--window", help="Rate window in seconds.")] = 60.0,
    latency: Annotated[float, typer.Option("--latency", help="Seconds added to every answer.")] = 0.0,
    fault_rate: Annotated[float, typer.Option("--fault-rate", help="Share of POSTs answered 503.")] = 0.0,
) -> None:
    """Serve the local OpenAI-compatible emulator (Gemini's quirks included) until Ctrl-C."""
    from emulator import EmulatorConfig, serve

    key = os.environ.get(api_key_env) or "emulator-key"
    config = EmulatorConfig(
        api_key=key,
        rpm=rpm,
        tpm=tpm,
        rpd=rpd,
        window_seconds=window,
        latency_seconds=latency,
        fault_rate_503=fault_rate,
    )
    if api_key_env not in os.environ:
        err_console.print(f"{api_key_env} is not set: clients must send the key 'emulator-key'.")
    serve(port, config)


@app.command()
def models(
    provider: Provider = "gemini",
    base_url: BaseUrl = None,
    api_key_env: ApiKeyEnv = None,
) -> None:
    """List the models the provider serves."""
    from tasks.client import ProviderSettings, list_models

    names = asyncio.run(list_models(ProviderSettings(provider=provider, base_url=base_url, api_key_env=api_key_env)))
    for name in names:
        console.print(name)


def print_summary(document: dict[str, Any]) -> None:
    from tasks.metadata import summary_rows

    table = Table(title=f"gembatch {document['job']}", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value")
    for row in summary_rows(document):
        table.add_row(row["metric"], row["value"])
    console.print(table)
    console.print(f"Run metadata: {document['output']['path']}/_runs/{document['run_id']}.json")


def _run(flow, build_job, params: dict[str, Any]) -> None:
    """Check what needs no server first (key, input, columns), so a mistake costs no Prefect start-up."""
    from flows.common import options_from
    from tasks.run import preflight

    preflight(build_job(dict(params)), options_from(params))
    _finish(asyncio.run(flow(**params)))


def _finish(document: dict[str, Any]) -> None:
    print_summary(document)
    if document["status"] != "completed":
        err_console.print(f"[bold red]{document['status']}[/]: {document['message']}")
        raise typer.Exit(3)


def main() -> None:
    # Prefect's temporary server would try to send telemetry; many batch hosts have no way out.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        app()
    except GembatchError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except ValueError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
