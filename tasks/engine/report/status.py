"""How a run ended: its status and the message that says why, and what to do next."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from tasks.errors import GembatchError, RunStopped
from tasks.provider.failures import classify_failure

if TYPE_CHECKING:
    from tasks.engine.options import RunOptions
    from tasks.engine.send.context import RunContext

__all__ = ["COMPLETED", "COMPLETED_WITH_ERRORS", "answered_by_server", "rerouted_warning", "run_status"]

COMPLETED = "completed"
# Every row was tried, but more than --max-failed-pct of them are in _errors/ (the CLI exits 4, the
# Prefect flow run is Failed).
COMPLETED_WITH_ERRORS = "completed with errors"


def answered_by_server(error: BaseException) -> bool:
    """An error a server, a gateway or the network made (not a bug): the run ends with its status and
    message like any stopped run, instead of raising."""
    try:
        classify_failure(error)
    except BaseException:  # noqa: BLE001 - classify_failure re-raises what it doesn't know
        return False
    return True


def run_status(ctx: RunContext, error: BaseException | None, options: RunOptions) -> tuple[str, str]:
    if isinstance(error, (KeyboardInterrupt, asyncio.CancelledError)):
        return "interrupted", "the run was interrupted; rerun the same command to resume"
    if isinstance(error, RunStopped):
        return error.status, str(error)
    if isinstance(error, GembatchError):
        return "failed: " + type(error).__name__, str(error)
    if error is not None and answered_by_server(error):
        failure = classify_failure(error)
        return f"failed: {failure.kind}", (
            f"{failure.message.rstrip('.')}. The run stopped there: what was finished is kept, and a rerun of the "
            "same command resumes (with --mode live if the failure was on a files or batches route)"
        )
    if error is not None:
        return "failed: " + type(error).__name__, f"{type(error).__name__}: {error}"
    if ctx.stop.reason is not None:
        return ctx.stop.reason.status, str(ctx.stop.reason)
    stats = ctx.stats
    if not stats.failed:
        return COMPLETED, ""
    pct = 100 * stats.failed / max(stats.input_rows, 1)
    auto, on_request = stats.failed_retry_auto, stats.failed - stats.failed_retry_auto
    parts = [f"{stats.failed} of {stats.input_rows} rows failed ({pct:.2f}%), see {options.output}/_errors/"]
    if auto:
        parts.append(f"{auto} failed on transient errors only (the next plain run sends them again)")
    if on_request:
        parts.append(f"{on_request} failed for their own input (resent only with --retry-errors)")
    detail = "; ".join(parts)
    if pct > options.max_failed_pct:
        return COMPLETED_WITH_ERRORS, f"{detail} (more than --max-failed-pct {options.max_failed_pct:g})"
    return COMPLETED, f"{detail} (within --max-failed-pct {options.max_failed_pct:g})"


def rerouted_warning(model: str, rerouted: dict[str, int], ctx: RunContext) -> str:
    served = ", ".join(f"{rows} by {name}" for name, rows in sorted(rerouted.items()))
    where = "their served_model column says which" if ctx.output.served_column else "see served_models in _runs/"
    return (
        f"warning: rows asked of {model} were answered by another model ({served}): the provider rerouted "
        f"it; {where}. Pick the model that answers with --model (an existing output: --change-model)"
    )
