"""The checks a run makes before it asks any server: the key is set, the input opens and has the columns."""

from __future__ import annotations

from tasks.engine.job import Job
from tasks.engine.options import RunOptions
from tasks.engine.plan.input import InputSource
from tasks.engine.send.batch.policy import check_batch_capable
from tasks.errors import ConfigError
from tasks.jobs.media import folder_extensions
from tasks.provider.client import require_key

__all__ = ["check_input_columns", "preflight"]


def preflight(job: Job, options: RunOptions) -> InputSource:
    """The checks that need no server: the key is set, the input opens and has the columns."""
    if options.provider.stream and not getattr(job, "streams", False):
        raise ConfigError(
            f"--stream: {job.name} replies don't come as streams; --stream is for the chat jobs (generate, "
            "extract, caption, transcribe --api chat)"
        )
    if not options.dry_run:
        require_key(options.provider)
    if options.batch.mode != "live":
        check_batch_capable(job, options.provider.provider, options.provider.base_url)
    source = InputSource.open(options.input, media_extensions=folder_extensions(job))
    check_input_columns(job, source)
    source.require_columns([options.id_col, *job.input_columns])
    return source


def check_input_columns(job: Job, source: InputSource) -> None:
    """A job whose columns come from a template says itself which are missing (and from where)."""
    check = getattr(job, "check_input_columns", None)
    if check is not None:
        check(source.path, source.columns())
