"""The daily-quota stop every run on one key and model shares, through a Prefect variable.

A run that meets the provider's per-day quota records it, with the reason and the next Pacific midnight,
in the variable ``gembatch-daily-quota-<host>-<model>-<hash>``; every run on the key and model reads it
every ``FLAG_POLL_S`` seconds and ends ``stopped: daily quota`` (resumable), and so does a run started
before the quota resets. The first run after the reset removes it.

Once the stop is set, every wait of the run on the shared budget ends: :meth:`SharedStop.check` raises
:class:`~tasks.errors.RunStopped`, and :meth:`SharedStop.sleep` and :meth:`SharedStop.first` return at
the stop, so no request waits for a permit that will never come.

Prefect is imported inside the functions that use it (see tasks/engine/send/shared_limits.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import re
from typing import Any

from tasks.errors import RunStopped

__all__ = ["DAILY_QUOTA", "SharedStop", "daily_quota_variable", "next_pacific_midnight"]

log = logging.getLogger(__name__)

DAILY_QUOTA = "stopped: daily quota"
# How often a run reads the flag: a stop reaches every process on the key within this.
FLAG_POLL_S = 1.0


def daily_quota_variable(host: str, model: str) -> str:
    """The Prefect variable that holds a daily-quota stop for a host and model (letters, digits, -, _)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{host}-{model}").strip("-").lower()[:180]
    digest = hashlib.sha256(f"{host}\0{model}".encode()).hexdigest()[:8]
    return f"gembatch-daily-quota-{slug}-{digest}"


def next_pacific_midnight(now: dt.datetime | None = None) -> dt.datetime:
    """When Gemini's per-day quotas reset (midnight America/Los_Angeles), in UTC."""
    from zoneinfo import ZoneInfo

    tz = ZoneInfo("America/Los_Angeles")
    local = (now or dt.datetime.now(dt.UTC)).astimezone(tz)
    midnight = dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(), tz)
    return midnight.astimezone(dt.UTC)


class SharedStop:
    """The daily-quota stop of one host and model, shared through a Prefect variable."""

    def __init__(self, client: Any, variable: str) -> None:
        self.client = client
        self.variable = variable
        self.event = asyncio.Event()
        self.message = ""

    def is_set(self) -> bool:
        return self.event.is_set()

    def check(self) -> None:
        """Raise :class:`RunStopped` once the stop is set: nothing more may be sent on this key."""
        if self.is_set():
            raise RunStopped(DAILY_QUOTA, self.message)

    def set_here(self, message: str) -> None:
        """This process met the quota itself (``message`` says so): its own waits end at once."""
        if not self.is_set():
            self.message = message
            self.event.set()

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or less: the stop ends the sleep."""
        await self.first(None, timeout=seconds)

    async def first(self, task: asyncio.Future | None, *, timeout: float | None = None) -> None:
        """Wait until ``task`` is done, the stop is set, or ``timeout`` has passed (whichever comes first).

        ``task`` is neither cancelled nor awaited: a caller that leaves it (the stop came first) leaves it
        running for whoever collects it. (No ``asyncio.wait_for``: in 3.11 it can swallow a cancel.)"""
        if self.is_set() or (task is not None and task.done()):
            return
        stopped = asyncio.ensure_future(self.event.wait())
        try:
            waiting = {stopped} if task is None else {stopped, task}
            await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()

    async def check_flag(self, *, default: bool = False) -> bool:
        """Read the flag; set the stop when it is active (``default``: stop even if no flag says why)."""
        value = await self._read()
        if value is not None and _active(value):
            self._set(str(value.get("message") or "the provider's daily quota is used up"), value.get("until"))
            return True
        if default:
            self._set(
                "a shared limit of this key and model is set to 0: paused by an operator",
                None,
                "Rerun once `prefect gcl update <limit> --limit N` has lifted the pause",
            )
            return True
        return False

    def _set(self, message: str, until: str | None, hint: str = "Rerun after the quota resets") -> None:
        when = f" (until {until})" if until else ""
        self.set_here(f"{message}{when}. {hint}: rows already written are kept and skipped.")

    async def _read(self) -> dict[str, Any] | None:
        from prefect.exceptions import ObjectNotFound

        try:
            variable = await self.client.read_variable_by_name(self.variable)
        except ObjectNotFound:
            return None
        if variable is None or not isinstance(variable.value, dict):
            return None
        return variable.value

    async def raise_flag(self, message: str) -> None:
        """Stop everyone on this key and model: the reason and the next reset in the variable, which every
        run reads every ``FLAG_POLL_S`` seconds.

        The limits stay as they are: set to 0 they would stop asks at once, but Prefect 3.8 can't let
        slots go from a limit of 0 (its occupancy average divides by the limit), neither when a run
        releases them nor when a lease ends, so the slots held at the stop would stay taken for good."""
        from prefect.client.schemas.actions import VariableCreate, VariableUpdate
        from prefect.exceptions import ObjectAlreadyExists

        value = {"message": message, "until": next_pacific_midnight().isoformat()}
        try:
            await self.client.create_variable(VariableCreate(name=self.variable, value=value))
        except ObjectAlreadyExists:
            await self.client.update_variable(VariableUpdate(name=self.variable, value=value))

    async def watch(self) -> None:
        """Read the flag every ``FLAG_POLL_S`` seconds until it is raised: a run whose requests are not
        gated by a shared limit (none set) hears of another run's daily-quota stop this way."""
        while not self.is_set():
            await self.sleep(FLAG_POLL_S)
            if self.is_set():
                return
            try:
                await self.check_flag()
            except Exception as exc:  # noqa: BLE001 - a failed read is tried again
                log.warning("could not read %s: %s", self.variable, exc)

    async def clear_if_over(self) -> None:
        """At a run's start: a flag whose time has passed is removed."""
        from prefect.exceptions import ObjectNotFound

        value = await self._read()
        if value is None or _active(value):
            return
        try:
            await self.client.delete_variable_by_name(self.variable)
        except ObjectNotFound:  # another run starting at the same time removed it
            pass


def _active(value: dict[str, Any]) -> bool:
    until = value.get("until")
    if not until:
        return True
    try:
        return dt.datetime.now(dt.UTC) < dt.datetime.fromisoformat(until)
    except ValueError:
        return True
