"""`gembatch extract`: pull typed records (a pydantic model) out of a text column."""

from __future__ import annotations

from typing import Annotated, Any

import fsspec
import typer
from prefect import flow

from flows.common import run_flow_job
from flows.options import Output, job_command
from tasks.client import DEFAULT_TIMEOUT_S
from tasks.errors import ConfigError
from tasks.extract import ExtractJob, import_model
from tasks.outage import DEFAULT_MAX_OUTAGE_S
from tasks.prices import default_model
from tasks.run import DEFAULT_CHUNK_SIZE

__all__ = ["command", "extract_flow", "extract_job"]


@flow(name="gembatch-extract")
async def extract_flow(
    input: str,
    output: str,
    schema_ref: str,
    text_col: str = "text",
    prompt: str | None = None,
    prompt_file: str | None = None,
    model: str | None = None,
    reasoning_effort: str | None = None,
    id_col: str = "id",
    provider: str = "gemini",
    base_url: str | None = None,
    api_key_env: str | None = None,
    rpm: float | None = None,
    tpm: float | None = None,
    max_concurrency: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    limit: int | None = None,
    retry_errors: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
    progress: bool = False,
    dry_run: bool = False,
    max_cost_usd: float | None = None,
    force: bool = False,
    api_key_secret: str | None = None,
    max_outage: float = DEFAULT_MAX_OUTAGE_S,
    max_failed_pct: float = 0.0,
) -> dict[str, Any]:
    """Extract the --schema model (MODULE:Model) from ``text_col`` of every row of ``input`` into ``output``."""
    parameters = dict(locals())
    return await run_flow_job(extract_job(parameters), parameters)


def extract_job(parameters: dict[str, Any]) -> ExtractJob:
    """The job for these flow parameters (imports the schema, reads the prompt file, fills the model)."""
    parameters["model"] = parameters.get("model") or default_model(parameters["provider"], "chat")
    prompt, prompt_file = parameters.get("prompt"), parameters.get("prompt_file")
    if prompt is not None and prompt_file is not None:
        raise ConfigError("--prompt and --prompt-file both given: pass only one")
    if prompt_file is not None:
        prompt = _read_prompt(prompt_file)
    job = ExtractJob(
        model=parameters["model"],
        schema=import_model(parameters["schema_ref"]),
        text_col=parameters["text_col"],
        prompt=prompt,
        reasoning_effort=parameters.get("reasoning_effort"),
    )
    id_col = parameters.get("id_col", "id")
    if any(f.name == id_col for f in job.mapping.fields):
        raise ConfigError(
            f"{job.schema.__name__}.{id_col}: the output's id column is also called {id_col!r}; rename the field "
            "or pass another --id-col"
        )
    return job


def _read_prompt(path: str) -> str:
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--prompt-file {path!r} can't be read: {exc}") from None
    if not text:
        raise ConfigError(f"--prompt-file {path!r} is empty: write the instruction into it, or drop the option")
    return text


@job_command(extract_flow, extract_job)
def command(
    input: Annotated[str, typer.Argument(help="Parquet or CSV file (local path or fsspec URL).")],
    output: Output,
    schema_ref: Annotated[
        str,
        typer.Option("--schema", help="Pydantic model to extract, as MODULE:Model (e.g. schemas.examples:Invoice)."),
    ],
    text_col: Annotated[str, typer.Option("--text-col", help="Column with the text to read.")] = "text",
    prompt: Annotated[str | None, typer.Option("--prompt", help="System instruction (default: a short one).")] = None,
    prompt_file: Annotated[
        str | None, typer.Option("--prompt-file", help="File holding the system instruction.")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Chat model (default: gemini-2.5-flash; gpt-4o-mini for openai).")
    ] = None,
    reasoning_effort: Annotated[
        str | None,
        typer.Option("--reasoning-effort", help="none, minimal, low, medium or high (default: the model's own)."),
    ] = None,
) -> None:
    """Extract a pydantic model from a text column: one typed column per field."""
