"""`gembatch extract`: pull typed records (a pydantic model) out of a text column."""

from __future__ import annotations

from typing import Any

from flows.common import run_flow
from flows.jobs import extract_job
from flows.params import CommonOptions
from flows.prefect_flow import flow

__all__ = ["extract_flow", "extract_job"]


@flow(name="gembatch-extract")
async def extract_flow(
    input: str,
    output: str,
    schema_ref: str | list[str],
    text_col: str = "text",
    prompt: str | None = None,
    prompt_file: str | None = None,
    model: str | None = None,
    reasoning_effort: str | None = None,
    schema_dialect: str | None = None,
    via: str = "json_schema",
    options: CommonOptions = CommonOptions(),
) -> dict[str, Any]:
    """Extract the --schema model (MODULE:Model) from ``text_col`` of every row of ``input`` into ``output``.

    ``via="tools"`` sends the schema as a function; several schemas (a list) let the model pick one per row."""
    job = extract_job(
        input=input, output=output, schema_ref=schema_ref, text_col=text_col, prompt=prompt, prompt_file=prompt_file,
        model=model, reasoning_effort=reasoning_effort, schema_dialect=schema_dialect, via=via, options=options,
    )  # fmt: skip
    return await run_flow(job)
