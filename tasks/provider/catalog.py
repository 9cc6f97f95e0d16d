"""What gembatch knows about each model's life: current, deprecated or shut down, since when, what
replaces it, and where that was read. One table beside the prices (tasks/provider/prices.py).

Imports nothing heavy: `gembatch JOB --help` shows the defaults from here, and the job builders check
parameters against a model's family (reasoning_effort values, deprecated sampling options) before any
request. Facts as of 2026-12-06; docs/reference/models.md lists them with their sources.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

__all__ = [
    "CATALOG",
    "CATALOG_DATE",
    "CURRENT",
    "DEFAULT_MODELS",
    "DEPRECATED",
    "Family",
    "ModelInfo",
    "SHUT_DOWN",
    "default_model",
    "family_of",
    "lifecycle_note",
    "model_info",
    "same_model",
]

CATALOG_DATE = date(2026, 12, 6)  # when the table below was last checked against Google's pages
CURRENT = "current"
DEPRECATED = "deprecated"  # still served (to some keys), with a shutdown announced or likely
SHUT_DOWN = "shut down"  # the id answers 404, or is answered by another model (rerouted_to)

# Where the facts were read (docs/reference/models.md links each page).
_DEPRECATIONS = "Gemini deprecations page, 2026-12-06"
_MODELS_PAGE = "Gemini models page, 2026-12-06"
_FIREBASE = "Firebase AI Logic migration guide, 2026-12-06"
_CHANGELOG = "Gemini changelog, 2026-12-06"
_OPENAI = "OpenAI models page, mid-2025 (not re-checked)"


@dataclass(frozen=True, kw_only=True)
class Family:
    """What a family of models accepts. ``reasoning_efforts`` None: not checked here (the server says);
    ``deprecated_options``: sampling options refused before sending (option name -> since when)."""

    name: str
    reasoning_efforts: tuple[str, ...] | None = None
    deprecated_options: tuple[str, ...] = ()
    deprecated_since: str = ""

    def __repr__(self) -> str:
        return f"Family({self.name!r})"


_SAMPLING = ("temperature", "top_p", "top_k")
GEMINI_25 = Family(name="gemini-2.5", reasoning_efforts=("none", "minimal", "low", "medium", "high"))
# Gemini 3 maps reasoning_effort to a thinking level and can't turn thinking off (no "none"); the
# sampling options are deprecated for newer models (changelog 2026-07-21).
GEMINI_3 = Family(
    name="gemini-3",
    reasoning_efforts=("minimal", "low", "medium", "high"),
    deprecated_options=_SAMPLING,
    deprecated_since="2026-07-21",
)
GEMINI_4_PRO = Family(
    name="gemini-4 pro",
    reasoning_efforts=("low", "medium", "high"),
    deprecated_options=_SAMPLING,
    deprecated_since="2026-07-21",
)
OTHER = Family(name="other")


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """One model's life as far as gembatch knows. ``since``: released (current) or deprecated;
    ``shutdown``: the day it stopped (or stops) being served; ``rerouted_to``: the model that answers
    its id since then; ``source``: where these facts were read, and when."""

    id: str
    kind: str  # chat | embed | images | transcriptions
    status: str
    source: str
    family: Family = OTHER
    since: date | None = None
    shutdown: date | None = None
    replacement: str | None = None
    rerouted_to: str | None = None
    note: str = ""

    def lifecycle(self) -> str:
        """One line: status, dates, replacement."""
        if self.status == SHUT_DOWN:
            parts = [f"shut down {self.shutdown}" if self.shutdown else SHUT_DOWN]
        elif self.status == DEPRECATED:
            parts = [f"deprecated, shuts down {self.shutdown}" if self.shutdown else DEPRECATED]
        else:
            parts = [f"current since {self.since}" if self.since else CURRENT]
            if self.shutdown:
                parts.append(f"shuts down {self.shutdown}")
        if self.rerouted_to:
            parts.append(f"answered by {self.rerouted_to}")
        if self.replacement:
            parts.append(f"replacement {self.replacement}")
        if self.note and self.status != CURRENT:
            parts.append(self.note)
        return "; ".join(parts)


def _m(id: str, kind: str, status: str, source: str, **kw: object) -> ModelInfo:
    return ModelInfo(id=id, kind=kind, status=status, source=source, **kw)  # type: ignore[arg-type]


_IMAGEN_NOTE = (
    "replacements named by Google: gemini-3.1-flash-image (deprecations page), "
    "gemini-nano-banana-2.1 and gemini-3-pro-image (Firebase)"
)
CATALOG: dict[str, ModelInfo] = {
    m.id: m
    for m in (
        # -- chat (extract, caption, transcribe, generate) --
        _m("gemini-3.8-flash", "chat", CURRENT, _MODELS_PAGE, family=GEMINI_3, since=date(2026, 9, 2),
           note="the model of the OpenAI-compatibility guide's examples"),
        _m("gemini-3.5-flash-lite", "chat", CURRENT, _MODELS_PAGE, family=GEMINI_3, since=date(2026, 7, 21)),
        _m("gemini-4-argon", "chat", CURRENT, _MODELS_PAGE, family=GEMINI_4_PRO, since=date(2026, 10, 13),
           note="pro model; reasoning_effort low, medium or high only"),
        _m("gemini-3.1-flash-lite", "chat", DEPRECATED, _DEPRECATIONS, family=GEMINI_3,
           shutdown=date(2027, 5, 7), replacement="gemini-3.5-flash-lite"),
        _m("gemini-3.7-flash", "chat", SHUT_DOWN, _CHANGELOG, family=GEMINI_3, shutdown=date(2026, 10, 8),
           replacement="gemini-3.8-flash", rerouted_to="gemini-3.8-flash"),
        _m("gemini-3.5-flash", "chat", SHUT_DOWN, _CHANGELOG, family=GEMINI_3, shutdown=date(2026, 10, 8),
           replacement="gemini-3.6-flash", rerouted_to="gemini-3.6-flash"),
        _m("gemini-2.5-flash", "chat", DEPRECATED, _DEPRECATIONS, family=GEMINI_25, replacement="gemini-3.8-flash",
           note="served 'until further notice' only to projects that used it before, not to new keys; a "
           "third-party tracker reports it retired 2026-12-01, rerouted to gemini-3.5-flash-lite and billed "
           "at that model's price (unconfirmed)"),
        _m("gemini-2.5-pro", "chat", DEPRECATED, _DEPRECATIONS, family=GEMINI_25, replacement="gemini-4-argon",
           note="served 'until further notice' only to projects that used it before, not to new keys"),
        _m("gemini-2.5-flash-lite", "chat", CURRENT, _DEPRECATIONS, family=GEMINI_25,
           note="still served (no shutdown announced)"),
        # -- embeddings --
        _m("gemini-embedding-2", "embed", CURRENT, _MODELS_PAGE, since=date(2026, 4, 22),
           note="128-3072 dims (3072 by default), about 8,192 tokens per input; also images, audio, PDF"),
        _m("gemini-embedding-001", "embed", DEPRECATED, _DEPRECATIONS, shutdown=date(2028, 5, 14),
           replacement="gemini-embedding-2", note="2,048 tokens per input"),
        _m("text-embedding-004", "embed", SHUT_DOWN, _DEPRECATIONS, shutdown=date(2026, 1, 14),
           replacement="gemini-embedding-2", note="retired January 2026 (day unconfirmed)"),
        # -- images --
        _m("gemini-nano-banana-2.1", "images", CURRENT, _FIREBASE, note="also in the models page's list"),
        _m("gemini-3-pro-image", "images", CURRENT, _FIREBASE, note="also in the models page's list"),
        _m("gemini-3.1-flash-lite-image", "images", CURRENT, _MODELS_PAGE),
        _m("gemini-3.1-flash-image", "images", CURRENT, _DEPRECATIONS,
           note="named as Imagen's replacement on the deprecations page, but not in the models list: "
           "unconfirmed that it is served"),
        _m("gemini-2.5-flash-image", "images", SHUT_DOWN, _DEPRECATIONS, shutdown=date(2026, 10, 2),
           replacement="gemini-nano-banana-2.1"),
        _m("imagen-4.0-generate-001", "images", SHUT_DOWN, _DEPRECATIONS, shutdown=date(2026, 8, 17),
           replacement="gemini-nano-banana-2.1", note=_IMAGEN_NOTE),
        _m("imagen-4.0-fast-generate-001", "images", SHUT_DOWN, _DEPRECATIONS, shutdown=date(2026, 8, 17),
           replacement="gemini-nano-banana-2.1", note=_IMAGEN_NOTE),
        _m("imagen-4.0-ultra-generate-001", "images", SHUT_DOWN, _DEPRECATIONS, shutdown=date(2026, 8, 17),
           replacement="gemini-3-pro-image", note=_IMAGEN_NOTE),
        # -- OpenAI (--provider openai); not re-checked since mid-2025 --
        _m("gpt-4o-mini", "chat", CURRENT, _OPENAI),
        _m("text-embedding-3-small", "embed", CURRENT, _OPENAI),
        _m("text-embedding-3-large", "embed", CURRENT, _OPENAI),
        _m("gpt-image-1", "images", CURRENT, _OPENAI),
        _m("dall-e-3", "images", CURRENT, _OPENAI),
        _m("whisper-1", "transcriptions", CURRENT, _OPENAI),
    )
}  # fmt: skip

# The defaults a new key can use today, per provider and kind (docs/reference/models.md says why).
DEFAULT_MODELS: dict[str, dict[str, str]] = {
    "gemini": {"embed": "gemini-embedding-2", "chat": "gemini-3.8-flash", "images": "gemini-nano-banana-2.1"},
    "openai": {"embed": "text-embedding-3-small", "chat": "gpt-4o-mini", "images": "gpt-image-1"},
}


def default_model(provider: str, kind: str) -> str:
    """The local emulator and unknown OpenAI-compatible servers get Gemini's names."""
    return DEFAULT_MODELS.get(provider, DEFAULT_MODELS["gemini"])[kind]


def _bare(name: str) -> str:
    return name.strip().removeprefix("models/")


def model_info(model: str) -> ModelInfo | None:
    return CATALOG.get(_bare(model))


_FAMILIES = ((re.compile(r"gemini-2\.5-"), GEMINI_25), (re.compile(r"gemini-3[.-]"), GEMINI_3),
             (re.compile(r"gemini-4-"), GEMINI_4_PRO))  # fmt: skip


def family_of(model: str) -> Family:
    """The family of a model id: from the catalog, else from its name (gemini-3.9-flash is Gemini 3)."""
    info = model_info(model)
    if info is not None and info.family is not OTHER:
        return info.family
    name = _bare(model)
    if "image" in name or "embedding" in name:
        return OTHER
    for pattern, family in _FAMILIES:
        if pattern.match(name):
            return family
    return OTHER


# A served model name that is the requested one with a version tail: gemini-3.8-flash-001,
# gemini-3.8-flash-preview-09-2026, gemini-3.8-flash-latest.
_VERSION_TAIL = re.compile(r"-(\d{3}|latest|preview([-.][0-9a-z-]+)?|exp([-.][0-9a-z-]+)?|\d{2}-\d{2,4}|\d{8})")


def same_model(requested: str, served: str) -> bool:
    """Whether a reply's ``model`` names the model that was asked for (``models/`` prefix, letter case
    and a version tail such as ``-001`` or ``-preview-09-2026`` aside)."""
    want, got = _bare(requested).lower(), _bare(served).lower()
    if want == got:
        return True
    if got.startswith(want) and _VERSION_TAIL.fullmatch(got[len(want) :]):
        return True
    return want.startswith(got) and bool(_VERSION_TAIL.fullmatch(want[len(got) :]))


def lifecycle_note(model: str, *, today: date | None = None) -> str:
    """What the catalog says about a model a provider refused or may soon refuse: shut down when, the
    replacement, the source; empty when the catalog doesn't know it."""
    info = model_info(model)
    if info is None:
        return ""
    today = today or date.today()
    bits = []
    if info.shutdown and (info.status == SHUT_DOWN or info.shutdown <= today):
        bits.append(f"{info.id} was shut down on {info.shutdown}")
    elif info.shutdown:
        bits.append(f"{info.id} is deprecated and shuts down on {info.shutdown}")
    elif info.status == DEPRECATED:
        bits.append(f"{info.id} is deprecated ({info.note})" if info.note else f"{info.id} is deprecated")
    else:
        return ""
    if info.rerouted_to:
        bits.append(f"its id is answered by {info.rerouted_to}")
    if info.replacement:
        bits.append(f"replacement: {info.replacement}")
    return "; ".join(bits) + f" (source: {info.source})"
