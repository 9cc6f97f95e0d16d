"""Is a Prefect API configured? Answered the way Prefect 3.8 answers it, without importing Prefect.

`gembatch` runs a job as a tracked flow run when a Prefect API is configured, and untracked otherwise
(docs/explanation/tracking.md). Importing Prefect to read one setting costs about 2.5 s on a small machine —
most of an untracked run — so this module reads the same sources in the same order itself
(prefect/settings/sources.py, settings/base.py ``settings_customise_sources``):

1. the environment variable ``PREFECT_API_URL``;
2. ``PREFECT_API_URL`` in ``.env`` in the working directory;
3. ``url`` under ``[api]`` in ``prefect.toml`` in the working directory;
4. ``url`` under ``[tool.prefect.api]`` in ``pyproject.toml`` in the working directory;
5. ``PREFECT_API_URL`` in the active profile (``PREFECT_PROFILE`` or ``active`` in profiles.toml), which
   is ``$PREFECT_PROFILES_PATH``, else ``profiles_path`` from .env/prefect.toml/pyproject.toml, else
   ``$PREFECT_HOME/profiles.toml``, else ``~/.prefect/profiles.toml``, else Prefect's bundled profiles;
   profiles are skipped in Prefect's test mode.

An empty value counts as set (it hides lower sources) and means "no API", as it does for Prefect.
tests/test_cli.py checks this against Prefect's own ``Settings().api.url`` in each of those places.
"""

from __future__ import annotations

import os
import tomllib
from importlib.util import find_spec
from pathlib import Path
from typing import Any

__all__ = ["UNTRACKED_NOTE", "configured_api_url"]

UNTRACKED_NOTE = (
    "note: no Prefect API is configured, so this is not tracked in Prefect (each run's record is "
    "OUTPUT/_runs/<run-id>.json). To track runs: start `prefect server start` and set "
    "PREFECT_API_URL=http://127.0.0.1:4200/api (or `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`)."
)

_KEY = "PREFECT_API_URL"
_UNSET = object()


def configured_api_url() -> str | None:
    """The Prefect API URL a flow run would report to, or None when Prefect would start its temporary
    server instead."""
    for source in (_from_env, _from_dotenv, _from_prefect_toml, _from_pyproject, _from_profile):
        value = source()
        if value is not _UNSET:
            return str(value) or None
    return None


def _from_env() -> Any:
    for key, value in os.environ.items():  # Prefect's settings ignore the case of variable names
        if key.upper() == _KEY:
            return value
    return _UNSET


def _dotenv() -> dict[str, str | None]:
    if not Path(".env").is_file():
        return {}
    from dotenv import dotenv_values  # python-dotenv, the parser Prefect's settings use

    return {k.upper(): v for k, v in dotenv_values(".env").items()}


def _from_dotenv() -> Any:
    values = _dotenv()
    return values[_KEY] if values.get(_KEY) is not None else _UNSET


def _toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _dig(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return _UNSET
        data = data[key]
    return _UNSET if data is None else data


def _from_prefect_toml() -> Any:
    return _dig(_toml("prefect.toml"), "api", "url")


def _from_pyproject() -> Any:
    return _dig(_toml("pyproject.toml"), "tool", "prefect", "api", "url")


def _test_mode() -> bool:
    modes = ("TEST_MODE", "UNIT_TEST_MODE", "TESTING_UNIT_TEST_MODE", "TESTING_TEST_MODE")
    return any(os.environ.get(f"PREFECT_{mode}") for mode in modes)


def _bundled_profiles() -> Path | None:
    spec = find_spec("prefect")  # finds the package without importing it
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "settings" / "profiles.toml"


def _profiles_path() -> Path | None:
    if path := os.environ.get("PREFECT_PROFILES_PATH"):
        return Path(path)
    if path := _dotenv().get("PREFECT_PROFILES_PATH"):
        return Path(path)
    in_toml = _dig(_toml("prefect.toml"), "profiles_path")
    in_pyproject = _dig(_toml("pyproject.toml"), "tool", "prefect", "profiles_path")
    for value in (in_toml, in_pyproject):
        if value is not _UNSET and value:
            return Path(value)
    if home := os.environ.get("PREFECT_HOME"):
        return Path(home) / "profiles.toml"
    default = Path.home() / ".prefect" / "profiles.toml"
    return default if default.exists() else _bundled_profiles()


def _active_profile(path: Path | None) -> dict[str, Any]:
    bundled = _bundled_profiles()
    data = _toml(path) if path is not None and path.exists() else None
    if data is not None:
        name = os.environ.get("PREFECT_PROFILE") or data.get("active")
        profiles = data.get("profiles", {})
        if name and name in profiles:
            return profiles[name]
    # Prefect's fall-back: the bundled file's active profile (a temporary server, no API URL).
    default = _toml(bundled) if bundled is not None else {}
    return default.get("profiles", {}).get(default.get("active", "ephemeral"), {})


def _from_profile() -> Any:
    if _test_mode():
        return _UNSET
    value = _active_profile(_profiles_path()).get(_KEY)
    return _UNSET if value is None else value
