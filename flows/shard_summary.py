"""The summary of a sharded run: every shard's run metadata read back from ``OUTPUT/_runs/`` and added up."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

COMPLETED = "completed"
# What the summary's status is when shards end differently: the first of these that any shard has.
STATUS_ORDER = ("stopped: daily quota", "interrupted", "completed with errors")
COUNTS = ("input_rows", "skipped_done", "deduplicated", "succeeded", "failed", "not_attempted")
REQUESTS = ("sent", "items_sent", "retries", "rate_limited_429", "transient_errors")
TOKENS = ("prompt", "completion", "total")


class ShardRecord(Protocol):
    """What the summary reads of one shard: its flow runs (one per attempt) and their final states."""

    flow_run_ids: list[str]
    states: list[str]
    restarts: int

    @property
    def spec(self) -> str: ...


def shard_documents(store: Any, shards: list[ShardRecord]) -> dict[str, dict[str, Any]]:
    """The run metadata each shard's flow runs wrote, by flow run id."""
    wanted = {fid for s in shards for fid in s.flow_run_ids}
    found: dict[str, dict[str, Any]] = {}
    folder = f"{store.root}/_runs"
    for path in store.fs.ls(folder, detail=False):
        if not path.endswith(".json"):
            continue
        with store.fs.open(path, "r") as f:
            try:
                doc = json.load(f)
            except ValueError:
                continue
        if doc.get("flow_run_id") in wanted:
            found[doc["flow_run_id"]] = doc
    return found


def rows_written_by(store: Any, run_ids: set[str]) -> dict[str, int]:
    """Result rows in the output written by these runs (read from each part's footer: its run id)."""
    import pyarrow.parquet as pq

    from tasks.engine.store.part_files import META_KEY

    rows: dict[str, int] = {}
    for path in store.result_files():
        metadata = pq.read_metadata(path, filesystem=store.fs)
        raw = (metadata.schema.to_arrow_schema().metadata or {}).get(META_KEY)
        run_id = json.loads(raw).get("run_id") if raw else None
        if run_id in run_ids:
            rows[run_id] = rows.get(run_id, 0) + metadata.num_rows
    return rows


def _add(total: dict[str, Any], part: dict[str, Any] | None) -> None:
    for key, value in (part or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        total[key] = total.get(key, 0) + value


@dataclass
class _Sent:
    """What every attempt of every shard sent (and paid for), added up."""

    requests: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(REQUESTS, 0))
    tokens: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(TOKENS, 0))
    cost_usd: float = 0.0
    priced: bool = True
    parts: list[str] = field(default_factory=list)
    error_parts: list[str] = field(default_factory=list)
    provider: Any = None
    limits: Any = None

    def add(self, doc: dict[str, Any] | None) -> None:
        """One attempt's metadata; a killed attempt wrote none, so its requests go unrecorded."""
        if doc is None or "requests" not in doc:
            return
        _add(self.requests, doc["requests"])
        _add(self.tokens, {k: v for k, v in doc["tokens"].items() if k in TOKENS})
        usd = (doc.get("cost") or {}).get("estimated_usd")
        self.priced = self.priced and usd is not None
        self.cost_usd += usd or 0.0
        self.parts += doc["output"]["parts_written"]
        self.error_parts += doc["output"]["error_parts_written"]
        self.provider = self.provider or doc.get("provider")
        self.limits = self.limits or doc.get("limits")


def _shard_entry(
    shard: ShardRecord, attempts: list[dict[str, Any] | None], written: dict[str, int], counts: dict[str, Any]
) -> dict[str, Any]:
    """One shard's line of the summary; its final counts are added to ``counts``."""
    final = attempts[-1]
    status = final["status"] if final and "counts" in final else f"failed: shard run {shard.states[-1].lower()}"
    recovered = sum(written.get(d["run_id"], 0) for d in attempts[:-1] if d)
    if final and "counts" in final:
        shard_counts = dict(final["counts"])
        moved = min(recovered, shard_counts["skipped_done"])
        shard_counts["skipped_done"] -= moved
        shard_counts["succeeded"] += moved
        _add(counts, shard_counts)
    return {
        "shard": shard.spec,
        "status": status,
        "flow_run_ids": shard.flow_run_ids,
        "flow_run_states": shard.states,
        "run_ids": [d["run_id"] if d else None for d in attempts],
        "restarts_after_crash": shard.restarts,
        "rows_written_by_crashed_attempts": recovered,
        "counts": final.get("counts") if final else None,
    }


def sharded_summary(
    shards: list[ShardRecord], docs: dict[str, dict[str, Any]], duration: float, written: dict[str, int]
) -> dict[str, Any]:
    """The shards added up. Rows a crashed attempt wrote count as succeeded (its rerun skipped them as
    done); its requests went unrecorded (the process died before writing its metadata)."""
    counts = dict.fromkeys(COUNTS, 0)
    sent = _Sent()
    per_shard = []
    messages = []
    for shard in shards:
        attempts = [docs.get(fid) for fid in shard.flow_run_ids]
        for doc in attempts:  # every attempt's requests were sent (and paid); a killed one's weren't recorded
            sent.add(doc)
        entry = _shard_entry(shard, attempts, written, counts)
        per_shard.append(entry)
        final = attempts[-1]
        if final and final.get("message"):
            messages.append(f"shard {shard.spec}: {final['message']}")
        elif entry["status"] != COMPLETED:
            messages.append(f"shard {shard.spec}: {entry['status']}")
    statuses = [entry["status"] for entry in per_shard]
    status = COMPLETED
    if any(s != COMPLETED for s in statuses):
        status = next((o for o in STATUS_ORDER if o in statuses), None) or next(s for s in statuses if s != COMPLETED)
    succeeded = counts.get("succeeded", 0) + counts.get("deduplicated", 0)
    return {
        "status": status,
        "message": "; ".join(messages),
        "provider": sent.provider or {"host": None, "model": None},
        "duration_s": round(duration, 3),
        "counts": counts,
        "requests": sent.requests,
        "tokens": sent.tokens,
        "cost": {"estimated_usd": round(sent.cost_usd, 6) if sent.priced else None},
        "throughput": {
            "rows_per_s": round(succeeded / duration, 2) if duration else None,
            "requests_per_s": round(sent.requests.get("sent", 0) / duration, 2) if duration else None,
        },
        "limits": sent.limits,
        "shards": per_shard,
        "parts": {"parts_written": sorted(sent.parts), "error_parts_written": sorted(sent.error_parts)},
    }
