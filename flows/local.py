"""--provider local: the built-in emulator, started at the command line's edge for the length of a run."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from tasks.provider.client import ProviderSettings

__all__ = ["local_provider"]


@contextmanager
def local_provider(settings: ProviderSettings) -> Iterator[ProviderSettings]:
    """``settings`` as they are, or, for --provider local without --base-url, pointed at an emulator
    started here (on loopback, with a fresh key) and stopped when the block ends."""
    if settings.provider != "local" or settings.base_url:
        yield settings
        return
    from emulator import Emulator, EmulatorConfig

    api_key = secrets.token_urlsafe(24)
    with Emulator(EmulatorConfig(api_key=api_key)) as emulator:
        yield dataclasses.replace(settings, base_url=emulator.base_url, api_key=api_key)
