"""`gembatch caption`: describe the image named in each row."""

from __future__ import annotations

from typing import Any

from flows.common import run_flow
from flows.jobs import caption_job
from flows.params import CommonOptions
from flows.prefect_flow import flow
from tasks.jobs.caption import DEFAULT_CAPTION_PROMPT, DEFAULT_MAX_SIDE

__all__ = ["caption_flow", "caption_job"]


@flow(name="gembatch-caption")
async def caption_flow(
    input: str,
    output: str,
    image_col: str = "image",
    prompt: str = DEFAULT_CAPTION_PROMPT,
    model: str | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
    media_root: list[str] | None = None,
    allow_media_scheme: list[str] | None = None,
    allow_private_urls: bool = False,
    options: CommonOptions = CommonOptions(),
) -> dict[str, Any]:
    """Caption the image in ``image_col`` of every row of ``input`` into ``output`` (docs/how-to/caption.md)."""
    job = caption_job(
        input=input, output=output, image_col=image_col, prompt=prompt, model=model, max_side=max_side,
        media_root=media_root, allow_media_scheme=allow_media_scheme, allow_private_urls=allow_private_urls,
        options=options,
    )  # fmt: skip
    return await run_flow(job)
