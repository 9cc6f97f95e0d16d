"""`gembatch generate`: one chat completion per row, from a prompt template over the row's columns."""

from __future__ import annotations

from typing import Any

from flows.common import run_flow
from flows.jobs import generate_job
from flows.params import CommonOptions
from flows.prefect_flow import flow

__all__ = ["generate_flow", "generate_job"]


@flow(name="gembatch-generate")
async def generate_flow(
    input: str,
    output: str,
    prompt: str | None = None,
    prompt_file: str | None = None,
    system: str | None = None,
    model: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    reasoning_effort: str | None = None,
    n: int = 1,
    options: CommonOptions = CommonOptions(),
) -> dict[str, Any]:
    """Render ``prompt`` (or ``prompt_file``) over each row of ``input`` and write each answer to ``output``."""
    job = generate_job(
        input=input, output=output, prompt=prompt, prompt_file=prompt_file, system=system, model=model,
        temperature=temperature, max_tokens=max_tokens, reasoning_effort=reasoning_effort, n=n, options=options,
    )  # fmt: skip
    return await run_flow(job)
