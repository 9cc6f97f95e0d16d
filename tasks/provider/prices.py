"""Prices (USD, paid tier), dated, with where each was read; and the user's own prices file.

Token prices are per 1M tokens. Image models are priced per generated image (``per_image``, keyed
``"quality:size"``, ``*`` for any other); the few text tokens of a prompt are billed at ``input`` where
the provider bills them. A model may have several prices, each in force from its ``since`` day: the
price of a request is the one in force on the day it is sent (UTC).

Users give or override prices without editing this file: ``--prices FILE`` or ``GEMBATCH_PRICES=FILE``
(TOML or JSON, see :func:`load_prices` and docs/reference/models.md). The models' lives (current,
deprecated, shut down) and the defaults are in tasks/provider/catalog.py.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from tasks.errors import ConfigError
from tasks.provider.catalog import DEFAULT_MODELS, default_model

__all__ = [
    "BATCH_PRICE_FACTOR",
    "DEFAULT_MODELS",
    "PRICES",
    "PRICES_ENV",
    "Price",
    "PriceBook",
    "active_prices",
    "default_model",
    "estimate_cost_usd",
    "how_to_price",
    "image_price_usd",
    "load_prices",
    "price_of",
    "use_prices",
]

# The batch APIs (OpenAI's, Gemini's) bill half the live price for the same tokens.
BATCH_PRICE_FACTOR = 0.5
PRICES_ENV = "GEMBATCH_PRICES"


@dataclass(frozen=True, kw_only=True)
class Price:
    input: float = 0.0
    output: float = 0.0
    audio_input: float | None = None
    # USD per generated image by "quality:size" ("*": any quality or size not listed). None: not an image model.
    per_image: dict[str, float] | None = None
    # The quality priced when none is asked for (the provider's default).
    default_quality: str = "*"
    # USD per image through the provider's batch route, where that route serves this model; None: no
    # batch route for it (Gemini's batches take chat and embeddings only; see docs/how-to/batch-mode.md).
    batch_per_image: dict[str, float] | None = field(default=None)
    # In force from this day (None: from the beginning) until the next price's ``since``.
    since: date | None = None
    # Where the price was read and when; "your prices file …" for a user's price.
    source: str = ""

    def describe(self) -> str:
        if self.per_image is not None:
            flat = self.per_image.get("*:*")
            shown = f"${flat:g}/image" if flat is not None else "per image by size and quality"
            return shown + (f" + ${self.input:g}/1M in" if self.input else "")
        if not self.output:
            return f"${self.input:g}/1M in"
        return f"${self.input:g} in / ${self.output:g} out per 1M"


_GEMINI_PRICING = "Gemini pricing page, Sep/Oct 2026"
_GEMINI_MID_2026 = "Gemini pricing page, mid-2026"
_OPENAI_PRICING = "OpenAI pricing page, mid-2025 (not re-checked)"

# Each model's prices, oldest first.
PRICES: dict[str, tuple[Price, ...]] = {
    # -- today's Gemini models (docs/reference/models.md) --
    "gemini-3.8-flash": (
        Price(input=0.75, output=3.75, source=_GEMINI_PRICING),
        Price(input=1.50, output=7.50, since=date(2027, 1, 1), source=_GEMINI_PRICING),
    ),
    "gemini-3.5-flash-lite": (Price(input=0.30, output=2.50, source=_GEMINI_PRICING),),
    "gemini-4-argon": (Price(input=4.00, output=20.00, source=_GEMINI_PRICING),),
    "gemini-embedding-2": (Price(input=0.20, source=_GEMINI_PRICING),),
    # About 1,120 image tokens per 1K or 2K image (Google's figure, 2026); 4K images cost more (unconfirmed).
    "gemini-3-pro-image": (Price(input=2.00, per_image={"*:*": 0.134}, source=_GEMINI_PRICING),),
    "gemini-nano-banana-2.1": (
        Price(per_image={"*:*": 0.034}, source="third-party price list, Nov 2026 (unconfirmed)"),
    ),
    # -- older Gemini models, kept to price the outputs they made --
    "gemini-2.5-flash": (Price(input=0.30, output=2.50, audio_input=1.00, source=_GEMINI_MID_2026),),
    "gemini-2.5-flash-lite": (Price(input=0.10, output=0.40, audio_input=0.30, source=_GEMINI_MID_2026),),
    "gemini-embedding-001": (Price(input=0.15, source=_GEMINI_MID_2026),),
    # Imagen 4 on the Gemini API: a flat price per image, prompt free (shut down 2026-08-17).
    "imagen-4.0-fast-generate-001": (Price(per_image={"*:*": 0.02}, source=_GEMINI_MID_2026),),
    "imagen-4.0-generate-001": (Price(per_image={"*:*": 0.04}, source=_GEMINI_MID_2026),),
    "imagen-4.0-ultra-generate-001": (Price(per_image={"*:*": 0.06}, source=_GEMINI_MID_2026),),
    # 1,290 output tokens at $30/1M per image up to 1024x1024; input tokens $0.30/1M (shut down 2026-10-02).
    "gemini-2.5-flash-image": (Price(input=0.30, per_image={"*:*": 0.039}, source=_GEMINI_MID_2026),),
    # -- OpenAI --
    "text-embedding-3-small": (Price(input=0.02, source=_OPENAI_PRICING),),
    "text-embedding-3-large": (Price(input=0.13, source=_OPENAI_PRICING),),
    "gpt-4o-mini": (Price(input=0.15, output=0.60, source=_OPENAI_PRICING),),
    # By quality, 1024x1024 or the larger sizes; text input $5/1M. No quality sent means "auto" (the
    # model picks): priced at high, the most it can cost.
    "gpt-image-1": (
        Price(
            input=5.00,
            default_quality="auto",
            per_image={
                "low:1024x1024": 0.011,
                "low:*": 0.016,
                "medium:1024x1024": 0.042,
                "medium:*": 0.063,
                "high:1024x1024": 0.167,
                "high:*": 0.25,
                "auto:1024x1024": 0.167,
                "auto:*": 0.25,
            },
            source=_OPENAI_PRICING,
        ),
    ),  # fmt: skip
    "dall-e-3": (
        Price(
            default_quality="standard",
            per_image={"standard:1024x1024": 0.04, "standard:*": 0.08, "hd:1024x1024": 0.08, "hd:*": 0.12},
            source=_OPENAI_PRICING,
        ),
    ),
}


def _bare(model: str) -> str:
    return model.strip().removeprefix("models/")


def _today() -> date:
    return datetime.now(UTC).date()


@dataclass(frozen=True)
class PriceBook:
    """The built-in prices with a user's file laid over them: a model the file names takes the file's
    prices only (all of its dated entries), every other model keeps the built-in ones."""

    prices: dict[str, tuple[Price, ...]]
    path: str | None = None

    def schedule(self, model: str) -> tuple[Price, ...]:
        return self.prices.get(_bare(model), ())

    def price(self, model: str, on: date | None = None) -> Price | None:
        """The price in force on ``on`` (default: today, UTC); None if none is known for that day."""
        day = on or _today()
        found = None
        for price in self.schedule(model):
            if price.since is None or price.since <= day:
                found = price
        return found


BUILT_IN = PriceBook(PRICES)
_active: PriceBook = BUILT_IN


def use_prices(path: str | None) -> PriceBook:
    """Make the built-in prices plus ``path`` (or the file GEMBATCH_PRICES names) the prices in use."""
    global _active
    path = path or os.environ.get(PRICES_ENV) or None
    _active = load_prices(path) if path else BUILT_IN
    return _active


def active_prices() -> PriceBook:
    return _active


def load_prices(path: str) -> PriceBook:
    """Read a prices file (TOML or JSON) over the built-in table.

    TOML::

        [[price]]
        model = "gemini-3.8-flash"
        input = 0.75            # USD per 1M input tokens
        output = 3.75           # USD per 1M output tokens (thinking included)
        source = "our contract, 2026-11"

        [[price]]
        model = "gemini-3.8-flash"
        since = 2027-01-01      # in force from this day (UTC) on
        input = 1.50
        output = 7.50

        [[price]]
        model = "my-image-model"
        per_image = 0.05        # or a table by "quality:size": {"*:*" = 0.05, "hd:*" = 0.08}

    JSON: ``{"price": [{"model": …, "since": "2027-01-01", …}, …]}``. Optional fields: ``audio_input``
    (USD per 1M audio input tokens), ``default_quality``, ``source``.
    """
    where = f"prices file {path!r}"
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where} can't be read ({exc.strerror or exc}): check --prices / {PRICES_ENV}") from None
    try:
        if path.endswith(".json"):
            document = json.loads(raw)
        else:
            document = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "JSON" if path.endswith(".json") else "TOML"
        raise ConfigError(f"{where} is not valid {kind}: {exc}") from None
    entries = document.get("price") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f'{where} has no [[price]] entries (JSON: a "price" list): see docs/reference/models.md')
    given: dict[str, list[Price]] = {}
    for i, entry in enumerate(entries, 1):
        model, price = _entry(entry, f"{where}, entry {i}", path)
        given.setdefault(model, []).append(price)
    merged = dict(PRICES)
    for model, prices in given.items():
        prices.sort(key=lambda p: p.since or date.min)
        days = [p.since for p in prices]
        if len(set(days)) != len(days):
            raise ConfigError(f"{where}: model {model!r} has two prices from the same day: give each its own 'since'")
        merged[model] = tuple(prices)
    return PriceBook(merged, path)


_FIELDS = {"model", "since", "input", "output", "audio_input", "per_image", "default_quality", "source"}


def _entry(entry: Any, where: str, path: str) -> tuple[str, Price]:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table of fields, got {entry!r}")
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; fields are {', '.join(sorted(_FIELDS))}")
    model = entry.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(f"{where}: 'model' is required (the model id, e.g. \"gemini-3.8-flash\")")
    since = entry.get("since")
    if isinstance(since, str):
        try:
            since = date.fromisoformat(since)
        except ValueError:
            raise ConfigError(f"{where}: 'since' must be a date like 2027-01-01, got {since!r}") from None
    elif isinstance(since, datetime):
        since = since.date()
    elif since is not None and not isinstance(since, date):
        raise ConfigError(f"{where}: 'since' must be a date like 2027-01-01, got {since!r}")
    numbers: dict[str, float | None] = {}
    for name in ("input", "output", "audio_input"):
        value = entry.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ConfigError(f"{where}: {name!r} must be a number of USD per 1M tokens (0 or more), got {value!r}")
        numbers[name] = None if value is None else float(value)
    per_image = entry.get("per_image")
    if isinstance(per_image, (int, float)) and not isinstance(per_image, bool):
        per_image = {"*:*": float(per_image)}
    elif isinstance(per_image, dict):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in per_image.values()):
            raise ConfigError(f"{where}: 'per_image' values must be USD amounts, got {per_image!r}")
        per_image = {str(k): float(v) for k, v in per_image.items()}
    elif per_image is not None:
        raise ConfigError(f"{where}: 'per_image' must be a USD amount or a table by \"quality:size\"")
    if per_image is None and numbers["input"] is None:
        raise ConfigError(f"{where}: give 'input' (USD per 1M tokens) or 'per_image' for model {model!r}")
    price = Price(
        input=numbers["input"] or 0.0,
        output=numbers["output"] or 0.0,
        audio_input=numbers["audio_input"],
        per_image=per_image,
        default_quality=str(entry.get("default_quality") or "*"),
        since=since,
        source=str(entry.get("source") or f"your prices file {path}"),
    )
    return _bare(model), price


def how_to_price(model: str) -> str:
    """The sentence every "no price" message ends with."""
    return (
        f"give one in a prices file passed with --prices FILE or {PRICES_ENV}=FILE, e.g. a TOML file with "
        f'[[price]] model = "{_bare(model)}" input = 0.30 output = 2.50 (USD per 1M tokens; per_image = 0.04 '
        "for an image model; since = 2027-01-01 for a price from a date): see docs/reference/models.md"
    )


def price_of(model: str, on: date | None = None) -> Price | None:
    """The price in use for ``model`` on ``on`` (default today): the prices file's, else the built-in one."""
    return _active.price(model, on)


# Kept for callers of the old name.
_price = price_of


def image_price_usd(
    model: str, size: str, quality: str | None = None, *, batch: bool = False, on: date | None = None
) -> float | None:
    """USD for one generated image of ``model`` at ``size`` and ``quality``; None if not in the table."""
    price = price_of(model, on)
    if price is None:
        return None
    table = price.batch_per_image if batch else price.per_image
    if table is None:
        return None
    q = quality or price.default_quality
    for key in (f"{q}:{size}", f"{q}:*", f"*:{size}", "*:*"):
        if key in table:
            return table[key]
    return None


def estimate_cost_usd(
    model: str,
    *,
    prompt_tokens: int,
    total_tokens: int,
    images: int = 0,
    per_image_usd: float | None = None,
    audio_input: bool = False,
    batch: bool = False,
    on: date | None = None,
) -> float | None:
    """Bill ``total - prompt`` as output: Gemini may leave thinking tokens out of completion_tokens.

    An image model (``per_image_usd`` given) is billed per image generated plus its prompt tokens; its
    output tokens are the images themselves, not billed twice. ``audio_input``: the prompt is audio
    (transcription; its few instruction tokens are billed at the audio price too), which costs more.
    ``on``: the day the requests go (default today, UTC): a dated price applies from its day on.
    """
    price = price_of(model, on)
    if price is None:
        return None
    if per_image_usd is not None:
        return images * per_image_usd + prompt_tokens * price.input / 1e6
    output_tokens = max(0, total_tokens - prompt_tokens)
    input_price = price.audio_input if audio_input and price.audio_input is not None else price.input
    factor = BATCH_PRICE_FACTOR if batch else 1.0
    return factor * (prompt_tokens * input_price + output_tokens * price.output) / 1e6


def with_audio_price(price: Price) -> Price:
    """The price a transcription pays for its input (the audio price, where the model has one)."""
    return replace(price, input=price.audio_input) if price.audio_input is not None else price
