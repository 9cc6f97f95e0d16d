"""`gembatch caption`: describe the image named in each row."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import run_flow_job
from flows.jobs import caption_job
from tasks.caption import DEFAULT_CAPTION_PROMPT, DEFAULT_MAX_SIDE
from tasks.client import DEFAULT_TIMEOUT_S
from tasks.outage import DEFAULT_MAX_OUTAGE_S
from tasks.run import DEFAULT_CHUNK_SIZE

__all__ = ["caption_flow", "caption_job"]


@flow(name="gembatch-caption")
async def caption_flow(
    input: str,
    output: str,
    image_col: str = "image",
    prompt: str = DEFAULT_CAPTION_PROMPT,
    model: str | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
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
    """Caption the image in ``image_col`` of every row of ``input`` into ``output`` (see README: gembatch caption)."""
    parameters = dict(locals())
    return await run_flow_job(caption_job(parameters), parameters)
