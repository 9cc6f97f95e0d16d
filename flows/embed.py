"""`gembatch embed`: backfill embeddings for a corpus."""

from __future__ import annotations

from typing import Any

from flows.common import run_flow
from flows.jobs import embed_job
from flows.params import CommonOptions
from flows.prefect_flow import flow
from tasks.jobs.embed import MAX_INPUTS_PER_REQUEST

__all__ = ["embed_flow", "embed_job"]


@flow(name="gembatch-embed")
async def embed_flow(
    input: str,
    output: str,
    text_col: str = "text",
    model: str | None = None,
    dimensions: int | None = None,
    batch_size: int = MAX_INPUTS_PER_REQUEST,
    options: CommonOptions = CommonOptions(),
) -> dict[str, Any]:
    """Embed ``text_col`` of every row of ``input`` into ``output`` (docs/how-to/embed.md)."""
    job = embed_job(
        input=input, output=output, text_col=text_col, model=model, dimensions=dimensions, batch_size=batch_size,
        options=options,
    )  # fmt: skip
    return await run_flow(job)
