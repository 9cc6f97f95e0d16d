"""The provider's Files and Batches routes as a batch run meets them: request bodies, retries, "unavailable"."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from tasks.engine.job import Item
from tasks.engine.send.context import RunContext
from tasks.errors import ConfigError, RunStopped
from tasks.provider.batches import CapturingTransport, RequestCaptured, endpoint_of, offline_client
from tasks.provider.client import Connection
from tasks.provider.failures import classify_failure

log = logging.getLogger("gembatch.batch")
# Tries of an upload or a batch creation that fails with a 5xx, a timeout or a broken connection.
BATCH_ROUTE_ATTEMPTS = 4
# A body saying the server has nowhere to keep files (LiteLLM without files_settings, a proxy without a store).
_NO_STORAGE = re.compile(r"files_settings|file storage|storage (?:is )?not (?:set|configured)|no storage", re.I)


def offline_connection(conn: Connection, transport: Any) -> Connection:
    """A connection like ``conn`` whose requests go to ``transport`` (nothing leaves the machine, no key)."""
    return Connection(
        client=offline_client(conn.base_url, transport), base_url=conn.base_url, provider=conn.provider, api_key=""
    )


class BatchRoutes:
    """Builds request lines with the job's own ``send`` and calls the upload and create routes.

    ``unavailable``: why the provider's Files/Batches routes can't be used (a gateway without file
    storage, a server without batches): ``auto`` sends the rest live, ``batch`` stops. None: usable so far."""

    def __init__(self, ctx: RunContext, conn: Connection, *, auto: bool) -> None:
        self.ctx = ctx
        self.conn = conn
        self.auto = auto
        self.unavailable: str | None = None
        self._capture = CapturingTransport()
        self._capture_conn = offline_connection(conn, self._capture)

    async def close(self) -> None:
        await self._capture_conn.client.close()

    async def request_of(self, items: list[Item]) -> tuple[str, dict[str, Any]]:
        """The body the job's ``send`` would POST for these items, and the batch endpoint of its route."""
        try:
            await self.ctx.job.send(self._capture_conn, items)
        except RequestCaptured:
            pass
        except Exception as exc:  # noqa: BLE001 - the SDK wraps the transport's exception
            if not isinstance(exc.__cause__, RequestCaptured):
                raise
        else:
            raise ConfigError(f"{self.ctx.job.name}: building a batch request sent nothing")
        endpoint = endpoint_of(self._capture.path)
        if endpoint is None or self._capture.body is None:
            raise ConfigError(
                f"--mode batch: the {self.ctx.job.name} job's route {self._capture.path} has no batch form "
                "(batches take /v1/chat/completions and /v1/embeddings); use --mode live"
            )
        return endpoint, self._capture.body

    async def call(self, route: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """``call``'s answer; None when the route can't be used (then ``unavailable`` says why, and a
        ``batch`` run is stopped). Transient failures are retried as requests are."""
        ctx = self.ctx
        attempts = 0
        while True:
            attempts += 1
            try:
                return await call()
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - classified below; a bug is re-raised
                try:
                    failure = classify_failure(exc)
                except Exception:  # noqa: BLE001 - not a server's answer
                    if isinstance(exc, ConfigError):
                        failure = None
                        message = str(exc)
                    else:
                        raise
                else:
                    message = self.conn.redact(failure.message)
            if failure is not None and failure.retryable and attempts < BATCH_ROUTE_ATTEMPTS:
                try:
                    await asyncio.wait_for(ctx.stop.event.wait(), timeout=ctx.retry.delay(attempts, failure))
                except TimeoutError:
                    pass
                if not ctx.stop.event.is_set():
                    continue
            self._unusable(route, message, failure)
            return None

    def _unusable(self, route: str, message: str, failure: Any) -> None:
        where = f"{self.conn.host} ({self.conn.base_url})"
        said = message.rstrip(".")
        if failure is not None and failure.kind == "auth":
            cause = "the key may not use the files or batches routes"
        elif _NO_STORAGE.search(said):
            cause = "the server or gateway has no file storage configured (LiteLLM: files_settings in its config.yaml)"
        else:
            cause = "the server or gateway offers no usable Files/Batches API"
        self.unavailable = f"{route} at {where} answered {said}: {cause}"
        if self.auto:
            log.warning(
                "--mode auto: %s; sending every row live instead (at the live price; nothing was sent as a batch)",
                self.unavailable,
            )
            return
        self.ctx.request_stop(
            RunStopped(
                "failed: batch unavailable",
                f"--mode batch: {self.unavailable}. No batch was created and no row was marked as sent. Run the "
                "same command with --mode live (or --mode auto, which falls back to live by itself)",
            )
        )
