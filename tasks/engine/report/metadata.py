"""The run metadata document written to ``_runs/<run-id>.json`` and shown as a Prefect artifact."""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from typing import Any

from tasks.engine.send.context import RunStats
from tasks.provider.prices import estimate_cost_usd
from tasks.redact import redact_text, redact_url

__all__ = ["batch_cost", "input_record", "new_run_id", "package_versions", "counts", "summary_rows", "utc_now"]

VERSIONED_PACKAGES = ("gembatch", "prefect", "openai", "pyarrow", "polars", "aiolimiter", "numpy")


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_run_id(started: datetime) -> str:
    import secrets

    return f"{started:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def input_record(source: Any, rows: int) -> dict[str, Any]:
    """The ``input`` block of the run metadata: path, format, size, rows and fingerprint (blocking: the
    fingerprint reads the input; call it on a worker thread)."""
    return {
        "path": redact_url(source.path),
        "format": source.format,
        "size_bytes": source.size_bytes,
        "rows": rows,
        "fingerprint": source.fingerprint(),
    }


def counts(stats: RunStats) -> dict[str, int]:
    return {
        "input_rows": stats.input_rows,
        "skipped_done": stats.skipped_done,
        "deduplicated": stats.deduplicated,
        "succeeded": stats.succeeded,
        "failed": stats.failed,
        "not_attempted": stats.not_attempted,
    }


def usage(
    stats: RunStats, model: str, per_image_usd: float | None = None, *, audio_input: bool = False
) -> tuple[dict[str, int], dict[str, Any]]:
    """Tokens and cost; an image model (``per_image_usd``) is billed per image generated; ``audio_input``:
    the prompt tokens are audio (billed at the model's audio price)."""
    tokens = {
        "prompt": stats.prompt_tokens,
        "completion": stats.completion_tokens,
        "total": stats.total_tokens,
        # What the limiter charged before each request (retries included) against what came back:
        # the estimator's error, visible per run.
        "estimated_before_sending": stats.estimated_tokens,
        "estimate_error_pct": round(100 * (stats.estimated_tokens / stats.prompt_tokens - 1), 1)
        if stats.prompt_tokens
        else None,
    }
    cost = estimate_cost_usd(
        model,
        prompt_tokens=stats.prompt_tokens,
        total_tokens=stats.total_tokens,
        images=stats.images,
        per_image_usd=per_image_usd,
        audio_input=audio_input,
    )
    priced: dict[str, Any] = {"estimated_usd": None if cost is None else round(cost, 6), "priced_model": model}
    if per_image_usd is not None or stats.images:
        priced.update({"images_generated": stats.images, "usd_per_image": per_image_usd})
    return tokens, priced


def batch_cost(cost: dict[str, Any], totals: Any, model: str, *, audio_input: bool = False) -> dict[str, Any]:
    """The cost of a run whose tokens came partly through batches: those at the batch price."""
    if cost.get("estimated_usd") is None:
        return cost
    batch_live = estimate_cost_usd(
        model, prompt_tokens=totals.prompt_tokens, total_tokens=totals.total_tokens, audio_input=audio_input
    )
    batch_priced = estimate_cost_usd(
        model, prompt_tokens=totals.prompt_tokens, total_tokens=totals.total_tokens, batch=True, audio_input=audio_input
    )
    usd = cost["estimated_usd"] - (batch_live or 0.0) + (batch_priced or 0.0)
    return {
        **cost,
        "estimated_usd": round(usd, 6),
        "batch_usd": None if batch_priced is None else round(batch_priced, 6),
        "live_usd": max(0.0, round(usd - (batch_priced or 0.0), 6)),
        "batch_price_factor": 0.5,
    }


def summary_rows(document: dict[str, Any]) -> list[dict[str, str]]:
    """The same summary as a two-column table: for the terminal and the Prefect artifact."""
    c, r, t = document["counts"], document["requests"], document["tokens"]
    cost = document["cost"]["estimated_usd"]
    rows = [
        ("status", document["status"]),
        ("run id", document["run_id"]),
        ("job / model", f"{document['job']} / {document['provider']['model']}"),
        ("provider host", document["provider"]["host"]),
        ("input rows", c["input_rows"]),
        ("skipped (already done)", c["skipped_done"]),
        ("deduplicated (no request)", c["deduplicated"]),
        ("succeeded", c["succeeded"]),
        ("failed (see _errors/)", c["failed"]),
        ("not attempted", c["not_attempted"]),
        ("requests / retries / 429s", f"{r['sent']} / {r['retries']} / {r['rate_limited_429']}"),
        ("tokens prompt / total", f"{t['prompt']} / {t['total']}"),
        *(
            [("provider outages / paused s / probes", f"{o['outages']} / {o['paused_s']} / {o['probes']}")]
            if (o := document.get("outage")) and o["outages"]
            else []
        ),
        *(
            [
                (
                    "images generated / USD each",
                    f"{document['cost']['images_generated']} / {document['cost']['usd_per_image']}",
                )
            ]
            if "images_generated" in document["cost"]
            else []
        ),
        *(
            [
                (
                    f"batches ({b['mode']}) created / re-attached / rows live",
                    f"{b['batches_created']} / {b['batches_reattached']} / {b['rows_live']}",
                )
            ]
            if (b := document.get("batches"))
            else []
        ),
        ("estimated cost (USD)", "n/a (model not in price table)" if cost is None else f"{cost:.6f}"),
        ("duration (s)", document["duration_s"]),
        ("rows/s", document["throughput"]["rows_per_s"]),
        ("output", document["output"]["path"]),
    ]
    return [{"metric": k, "value": redact_text(str(v))} for k, v in rows]
