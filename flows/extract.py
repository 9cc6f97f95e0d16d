"""`gembatch extract`: pull typed records (a pydantic model) out of a text column."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import run_flow_job
from flows.jobs import extract_job
from tasks.client import DEFAULT_TIMEOUT_S
from tasks.outage import DEFAULT_MAX_OUTAGE_S
from tasks.run import DEFAULT_CHUNK_SIZE

__all__ = ["extract_flow", "extract_job"]


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
    schema_dialect: str | None = None,
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
