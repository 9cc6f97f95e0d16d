"""From a flow's built job to the engine's RunOptions (the provider, limits, retries, batching, shard)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flows.params import CommonOptions
from tasks.engine.plan.shard import Shard
from tasks.engine.run import RunOptions
from tasks.engine.send.batch.policy import BatchPolicy
from tasks.engine.send.context import RetryPolicy
from tasks.engine.send.limits import Limits
from tasks.engine.send.outage import OutagePolicy
from tasks.errors import ConfigError
from tasks.provider.client import ProviderSettings
from tasks.redact import MASK, redact_url

if TYPE_CHECKING:
    from flows.jobs import FlowJob

__all__ = ["options_of", "run_options"]


def run_options(input: str, output: str, options: CommonOptions) -> RunOptions:
    """What the engine runs with, from a flow's ``input``, ``output`` and common ``options``.

    The prices in use become the built-in table plus --prices (or GEMBATCH_PRICES)."""
    from tasks.provider.prices import use_prices

    use_prices(options.prices)
    return RunOptions(
        input=input,
        output=output,
        id_col=options.id_col,
        provider=ProviderSettings(
            provider=options.provider,
            base_url=_base_url(options),
            api_key_env=options.api_key_env,
            api_key_secret=options.api_key_secret,
            timeout_s=options.timeout,
            stream=options.stream,
            idle_timeout_s=options.idle_timeout,
        ),
        limits=Limits(
            rpm=options.rpm, tpm=options.tpm, max_concurrency=options.max_concurrency, window_s=options.rate_window
        ),
        retry=RetryPolicy.from_env(),
        chunk_size=options.chunk_size,
        limit=options.limit,
        retry_errors=options.retry_errors,
        progress=options.progress,
        dry_run=options.dry_run,
        max_cost_usd=options.max_cost_usd,
        force=options.force,
        change_model=options.change_model,
        outage=OutagePolicy(max_outage_s=options.max_outage),
        max_failed_pct=options.max_failed_pct,
        batch=BatchPolicy(
            mode=options.mode,
            poll_s=options.batch_poll,
            max_lines=options.batch_max_requests,
            auto_min_requests=options.auto_min_requests,
        ),
        shard=Shard.parse(options.shard) if options.shard else None,
    )


def _base_url(options: CommonOptions) -> str | None:
    """The URL the run connects to: --base-url-secret's (credentials and all) over --base-url's."""
    if options.base_url_secret:
        from tasks.provider.client import secret_base_url

        return secret_base_url(options.base_url_secret)
    url = options.base_url
    if url and MASK in url and redact_url(url) == url and redact_url(url.replace(MASK, "x")) != url.replace(MASK, "x"):
        # The URL as Prefect keeps a flow run's parameters (a run started again from the UI, say).
        raise ConfigError(
            f"--base-url {url} has its credentials masked (***), as gembatch shows and stores it: pass the URL "
            "with its credentials again, or keep it in a Prefect Secret block and name it with --base-url-secret"
        )
    return url


def options_of(flow_job: FlowJob) -> RunOptions:
    """The engine's options for a built job: its input, output and common options."""
    return run_options(flow_job.input, flow_job.output, flow_job.options)
