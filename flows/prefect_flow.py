"""``@flow`` for gembatch's flows: Prefect stores a flow run's parameters with URL credentials redacted.

Prefect records the arguments of a flow call as the flow run's parameters (``Flow.serialize_parameters``)
and keeps them in clear. The options model redacts its ``base_url`` when Prefect serialises it, but a
caller may pass ``options`` as a plain mapping, or a URL with credentials in another parameter (an
input on a server behind ``user:pass@``): every string of the stored parameters goes through
:func:`tasks.redact.redact_data`. The run itself gets its arguments as they were given.

A flow run is named after what it does (``embed corpus.parquet → out/emb``) before its first log line:
Prefect resolves a flow's ``flow_run_name`` callable as the run begins, so "Beginning flow run …" already
shows that name, not a generated one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import Flow

from tasks.redact import redact_data

__all__ = ["RedactedFlow", "flow", "run_name"]


class RedactedFlow(Flow):
    """A Prefect flow whose stored parameters carry no credential of a URL."""

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        return redact_data(super().serialize_parameters(parameters))


def run_name() -> str:
    """The running flow run's name: its job, input and output (and shard, or dry run), from its parameters."""
    from prefect.context import FlowRunContext

    from flows.events import run_title

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return "gembatch"
    try:
        parameters = context.parameters
        options = parameters.get("options") or {}
        setting = options.get if isinstance(options, dict) else lambda key: getattr(options, key, None)
        job = context.flow.name.removeprefix("gembatch-")
        title = run_title(job, str(parameters["input"]), str(parameters["output"]), setting("shard"))
        return f"{title} (dry run)" if setting("dry_run") else title
    except Exception:  # noqa: BLE001 - a name is not worth failing a run for: keep Prefect's
        return context.flow_run.name


def flow(*, name: str) -> Callable[[Callable[..., Any]], RedactedFlow]:
    """``@flow(name=…)`` as Prefect's, making a :class:`RedactedFlow` named after its work as it begins."""
    return lambda fn: RedactedFlow(fn, name=name, flow_run_name=run_name)
