"""`gembatch images`: generate images (PNG, JPEG or WebP, as the provider answers) from a column of prompts."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import run_flow_job
from flows.jobs import images_job
from tasks.client import DEFAULT_TIMEOUT_S
from tasks.images import DEFAULT_SIZE
from tasks.outage import DEFAULT_MAX_OUTAGE_S
from tasks.run import DEFAULT_CHUNK_SIZE

__all__ = ["images_flow", "images_job"]


@flow(name="gembatch-images")
async def images_flow(
    input: str,
    output: str,
    prompt_col: str = "prompt",
    model: str | None = None,
    size: str = DEFAULT_SIZE,
    n: int = 1,
    quality: str | None = None,
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
    """Generate ``n`` images for ``prompt_col`` of every row of ``input`` into ``output``/_images."""
    parameters = dict(locals())
    return await run_flow_job(images_job(parameters), parameters)
