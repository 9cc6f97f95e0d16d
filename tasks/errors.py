"""Errors a user can act on. Each message says what was wrong and what to do."""

from __future__ import annotations

__all__ = ["GembatchError", "ConfigError", "InputError", "RunStopped", "RunNotCompleted"]


class GembatchError(Exception):
    """Base class: the message is meant for the user, without a traceback."""


class ConfigError(GembatchError):
    """Something about the command's settings stops the run before any work starts."""


class InputError(GembatchError):
    """The input file can't be read as asked (path, format, columns)."""


class RunStopped(GembatchError):
    """The run must end early; everything finished so far is kept and a rerun resumes.

    ``status`` goes into the run metadata, e.g. ``stopped: daily quota``.
    """

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


class RunNotCompleted(GembatchError):
    """A run that ended without finishing cleanly: failed rows past --max-failed-pct, or stopped early.

    The Prefect flow run ends Failed with this as its data, so calling a flow raises it; ``document``
    is the run metadata (also written to ``_runs/<run-id>.json``).
    """

    def __init__(self, document: dict) -> None:
        super().__init__(f"{document['status']}: {document['message']}")
        self.document = document
