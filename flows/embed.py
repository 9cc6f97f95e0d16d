"""`gembatch embed`: backfill embeddings for a corpus."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import run_flow_job
from tasks.client import DEFAULT_TIMEOUT_S
from tasks.embed import MAX_INPUTS_PER_REQUEST, EmbedJob
from tasks.limits import DEFAULT_MAX_CONCURRENCY
from tasks.prices import default_model
from tasks.run import DEFAULT_CHUNK_SIZE

__all__ = ["embed_flow"]


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
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    limit: int | None = None,
    retry_errors: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
    progress: bool = False,
) -> dict[str, Any]:
    """Embed ``text_col`` of every row of ``input`` into ``output`` (see README: gembatch embed)."""
    parameters = dict(locals())
    model = model or default_model(provider, "embed")
    parameters["model"] = model
    job = EmbedJob(model=model, text_col=text_col, dimensions=dimensions, batch_size=batch_size)
    return await run_flow_job(job, parameters)
