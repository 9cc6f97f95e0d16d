"""``@flow`` for gembatch's flows: Prefect stores a flow run's parameters with URL credentials redacted.

Prefect records the arguments of a flow call as the flow run's parameters (``Flow.serialize_parameters``)
and keeps them in clear. The options model redacts its ``base_url`` when Prefect serialises it, but a
caller may pass ``options`` as a plain mapping, or a URL with credentials in another parameter (an
input on a server behind ``user:pass@``): every string of the stored parameters goes through
:func:`tasks.redact.redact_data`. The run itself gets its arguments as they were given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import Flow

from tasks.redact import redact_data

__all__ = ["RedactedFlow", "flow"]


class RedactedFlow(Flow):
    """A Prefect flow whose stored parameters carry no credential of a URL."""

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        return redact_data(super().serialize_parameters(parameters))


def flow(*, name: str) -> Callable[[Callable[..., Any]], RedactedFlow]:
    """``@flow(name=…)`` as Prefect's, making a :class:`RedactedFlow`."""
    return lambda fn: RedactedFlow(fn, name=name)
