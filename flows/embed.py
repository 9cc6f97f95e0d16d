"""`gembatch embed`: backfill embeddings for a corpus."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import run_flow_job
from flows.jobs import embed_job
from tasks.client import DEFAULT_TIMEOUT_S
from tasks.embed import MAX_INPUTS_PER_REQUEST
from tasks.outage import DEFAULT_MAX_OUTAGE_S
from tasks.run import DEFAULT_CHUNK_SIZE

__all__ = ["embed_flow", "embed_job"]


@flow(name="gembatch-embed")
async def embed_flow(
    input: str,
    output: str,
    text_col: str = "text",
    model: str | None = None,
    dimensions: int | None = None,
    batch_size: int = MAX_INPUTS_PER_REQUEST,
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
    """Embed ``text_col`` of every row of ``input`` into ``output`` (see README: gembatch embed)."""
    parameters = dict(locals())
    return await run_flow_job(embed_job(parameters), parameters)
