"""`gembatch batches OUTPUT`, and the bar that shows batches' states while a run polls them."""

from __future__ import annotations

import sys
from typing import Any

from tasks.engine.send.batch.records import BATCHES_DIR, SUBMITTED, Book, read_records
from tasks.errors import ConfigError
from tasks.provider.batches import BatchApi
from tasks.provider.client import Connection
from tasks.provider.failures import classify_failure


class PollBar:
    """While batches run: their states and request counts, on stderr."""

    def __init__(self, *, enabled: bool) -> None:
        self._progress = None
        self._tasks: dict[str, Any] = {}
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("requests · {task.fields[state]} · failed {task.fields[failed]}"),
                TimeElapsedColumn(),
                console=Console(file=sys.stderr),
            )
            self._progress.start()

    def show(self, record: dict[str, Any]) -> None:
        if self._progress is None:
            return
        counts = record.get("request_counts") or {}
        done = (counts.get("completed") or 0) + (counts.get("failed") or 0)
        name = record["batch_id"]
        if name not in self._tasks:
            self._tasks[name] = self._progress.add_task(
                f"batch {name}", total=record.get("requests") or counts.get("total"), state="", failed=0
            )
        self._progress.update(
            self._tasks[name], completed=done, state=record.get("status"), failed=counts.get("failed") or 0
        )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


async def manage_batches(output: str, settings: Any | None, *, refresh: bool, cancel: bool) -> list[dict[str, Any]]:
    """`gembatch batches OUTPUT`: the recorded batches, their states asked again (``refresh``) or cancelled.

    ``settings`` (a ProviderSettings) says where they were sent; None: as each record says (its provider
    and base URL, the key from that provider's usual variable)."""
    from tasks.engine.store.output import OutputStore
    from tasks.provider.client import ProviderSettings, open_connection

    store = OutputStore(output)
    records = read_records(store)
    if not records:
        raise ConfigError(f"no batches are recorded in {output}/{BATCHES_DIR}/ (a --mode batch run records them)")
    if not (refresh or cancel):
        return records
    book = Book(store)
    connections: dict[tuple[str, str], tuple[Connection, BatchApi]] = {}
    try:
        for record in records:
            if record["state"] != SUBMITTED:
                continue
            where = settings or ProviderSettings(
                provider=record["provider"],
                base_url=record["base_url"] if record["provider"] != "gemini" else None,
            )
            key = (where.provider, where.base_url or "")
            if key not in connections:
                conn = open_connection(where)
                connections[key] = (conn, BatchApi(conn.client, conn.base_url, conn.api_key))
            conn, api = connections[key]
            try:
                info = await (api.cancel(record["batch_id"]) if cancel else api.retrieve(record["batch_id"]))
            except Exception as exc:  # noqa: BLE001 - shown per batch; the others are still asked
                record["error"] = conn.redact(classify_failure(exc).message)
                continue
            record.update(
                status=info.status,
                request_counts={"total": info.total, "completed": info.completed, "failed": info.failed},
            )
            book.save(record)
    finally:
        for conn, _ in connections.values():
            await conn.close()
    return records
