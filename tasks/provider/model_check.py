"""The check before a run: is the key good, does the server serve the model (a few quick retries)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from tasks.errors import ConfigError
from tasks.provider.client import Connection
from tasks.provider.failures import Failure, classify_failure

# Model check: a few quick tries for transient failures (429/5xx/timeouts/connection errors). Without
# delays from the server this waits at most about 0.5 + 1 + 2 s; a Retry-After is honoured up to the cap.
MODEL_CHECK_ATTEMPTS = 4
MODEL_CHECK_BASE_DELAY_S = 0.5
MODEL_CHECK_MAX_DELAY_S = 30.0
# Answers to GET models/{id} that mean "this server has no such route" (or no such model): then the
# model list decides.
_NO_RETRIEVE = (404, 405, 501)

log = logging.getLogger("gembatch.client")


async def check_model(conn: Connection, model: str, *, key_source: str) -> None:
    """Fail fast on a wrong key, an unknown model or an unreachable server.

    Asks ``models.retrieve``; a server without that route (404/405/501) is asked for its model list
    instead, and the model is refused only when neither knows it (Gemini lists ``models/<name>``: both
    forms match). A server that has neither route is trusted: the first request will say.
    """
    where = f"{conn.host} ({conn.shown_url})"
    failure = await _with_retries(lambda: conn.client.models.retrieve(model))
    if failure is None:
        _warn_lifecycle(model)
        return
    if failure.status not in _NO_RETRIEVE:
        raise _model_check_error(conn, model, failure, key_source=key_source)
    listed: list[str] = []

    async def list_all() -> None:
        listed.clear()
        async for entry in conn.client.models.list():
            listed.append(str(entry.id))

    list_failure = await _with_retries(list_all)
    if list_failure is None:
        if _same_model(model) & {name for entry in listed for name in _same_model(entry)}:
            _warn_lifecycle(model)
            return
        shown = ", ".join(sorted(listed)[:20]) + (", …" if len(listed) > 20 else "")
        raise ConfigError(
            f"model {model!r} was not found at {where}: GET models/{model} answered "
            f"{conn.redact(failure.message)}, and the server's model list does not name it either "
            f"(it lists {len(listed)}: {shown or 'none'}). {_not_served_hint(model)}"
        )
    if list_failure.status in _NO_RETRIEVE:
        log.warning(
            "%s answers neither GET models/%s (%s) nor GET models (%s): model %r is not checked before the run",
            conn.host, model, conn.redact(failure.message), conn.redact(list_failure.message), model,
        )  # fmt: skip
        return
    raise _model_check_error(conn, model, list_failure, key_source=key_source)


def _not_served_hint(model: str) -> str:
    """What the catalog knows of a model the server doesn't serve (shut down when, its replacement), and
    what to do. Nothing was sent."""
    from tasks.provider.catalog import lifecycle_note, model_info

    note = lifecycle_note(model)
    info = model_info(model)
    todo = "List the available models with `gembatch models`, then pass one with --model"
    if info is not None and info.replacement:
        todo = (
            f"Pass --model {info.replacement} (an output made with {info.id}: add --change-model, after "
            f"checking what it re-sends with --dry-run), or list the available models with `gembatch models`"
        )
    return (f"{note}. " if note else "") + f"{todo}. Nothing was sent."


def _warn_lifecycle(model: str) -> None:
    """A model the server still serves but that is deprecated or past its shutdown day: say so once."""
    from tasks.provider.catalog import lifecycle_note

    note = lifecycle_note(model)
    if note:
        log.warning("%s", note)


def _same_model(name: str) -> set[str]:
    bare = name.removeprefix("models/")
    return {bare, f"models/{bare}"}


async def _with_retries(call: Callable[[], Awaitable[object]]) -> Failure | None:
    """None when ``call`` succeeds; the last failure when it fails for good or isn't worth retrying."""
    for attempt in range(1, MODEL_CHECK_ATTEMPTS + 1):
        try:
            await call()
            return None
        except Exception as exc:  # noqa: BLE001 - classify_failure re-raises what it doesn't know
            failure = classify_failure(exc)
        if not failure.retryable or failure.status in _NO_RETRIEVE or attempt == MODEL_CHECK_ATTEMPTS:
            return failure
        if failure.retry_after_s is not None:
            delay = min(failure.retry_after_s, MODEL_CHECK_MAX_DELAY_S)
        else:
            backoff = MODEL_CHECK_BASE_DELAY_S * 2 ** (attempt - 1)
            delay = random.uniform(backoff / 2, backoff)
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def _model_check_error(conn: Connection, model: str, failure: Failure, *, key_source: str) -> ConfigError:
    where = f"{conn.host} ({conn.shown_url})"
    message = conn.redact(failure.message)
    if failure.kind == "auth":
        return ConfigError(
            f"the API key in {key_source} was rejected by {where}: "
            f"{message}. Check the key, or set the right variable with --api-key-env."
        )
    if failure.kind == "not_found":
        return ConfigError(f"model {model!r} was not found at {where}: {message}. {_not_served_hint(model)}")
    if failure.kind == "transient" and failure.status is None:
        return ConfigError(f"cannot reach {where}: {message}. Check --base-url and your network.")
    return ConfigError(f"checking model {model!r} at {where} failed: {message}")
