"""`gembatch images`: generate images (PNG, JPEG or WebP, as the provider answers) from a column of prompts."""

from __future__ import annotations

from typing import Any

from flows.common import run_flow
from flows.jobs import images_job
from flows.params import CommonOptions
from flows.prefect_flow import flow
from tasks.jobs.images import DEFAULT_SIZE

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
    options: CommonOptions = CommonOptions(),
) -> dict[str, Any]:
    """Generate ``n`` images for ``prompt_col`` of every row of ``input`` into ``output``/_images."""
    job = images_job(
        input=input, output=output, prompt_col=prompt_col, model=model, size=size, n=n, quality=quality,
        options=options,
    )  # fmt: skip
    return await run_flow(job)
