"""Default models and prices, kept in one table (USD, paid tier, mid-2026).

Token prices are per 1M tokens. Image models are priced per generated image (``per_image``, keyed
``"quality:size"``, ``*`` for any other); the few text tokens of a prompt are billed at ``input`` where
the provider bills them. Sources, and what is confirmed: docs/how-to/images.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "Price",
    "PRICES",
    "DEFAULT_MODELS",
    "default_model",
    "estimate_cost_usd",
    "image_price_usd",
    "BATCH_PRICE_FACTOR",
]

# The batch APIs (OpenAI's, Gemini's) bill half the live price for the same tokens.
BATCH_PRICE_FACTOR = 0.5


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


PRICES: dict[str, Price] = {
    "gemini-2.5-flash": Price(input=0.30, output=2.50, audio_input=1.00),
    "gemini-2.5-flash-lite": Price(input=0.10, output=0.40, audio_input=0.30),
    "gemini-embedding-001": Price(input=0.15),
    "text-embedding-3-small": Price(input=0.02),
    "text-embedding-3-large": Price(input=0.13),
    "gpt-4o-mini": Price(input=0.15, output=0.60),
    # Imagen 4 on the Gemini API: a flat price per image, prompt free.
    "imagen-4.0-fast-generate-001": Price(per_image={"*:*": 0.02}),
    "imagen-4.0-generate-001": Price(per_image={"*:*": 0.04}),
    "imagen-4.0-ultra-generate-001": Price(per_image={"*:*": 0.06}),
    # 1,290 output tokens at $30/1M per image up to 1024x1024 (the native batch API halves it: $0.0195,
    # but the compatibility layer's batches don't take images). Input tokens $0.30/1M.
    "gemini-2.5-flash-image": Price(input=0.30, per_image={"*:*": 0.039}),
    # OpenAI: by quality, 1024x1024 or the larger sizes; text input $5/1M. No quality sent means
    # "auto" (the model picks): priced at high, the most it can cost.
    "gpt-image-1": Price(
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
    ),  # fmt: skip
    "dall-e-3": Price(
        default_quality="standard",
        per_image={"standard:1024x1024": 0.04, "standard:*": 0.08, "hd:1024x1024": 0.08, "hd:*": 0.12},
    ),
}

DEFAULT_MODELS: dict[str, dict[str, str]] = {
    # Imagen 4 standard: the family the compatibility guide's images.generate example uses, on the
    # route that serves it (docs/how-to/images.md); fast (half price) and ultra by --model.
    "gemini": {"embed": "gemini-embedding-001", "chat": "gemini-2.5-flash", "images": "imagen-4.0-generate-001"},
    "openai": {"embed": "text-embedding-3-small", "chat": "gpt-4o-mini", "images": "gpt-image-1"},
}


def default_model(provider: str, kind: str) -> str:
    """The local emulator and unknown OpenAI-compatible servers get Gemini's names."""
    return DEFAULT_MODELS.get(provider, DEFAULT_MODELS["gemini"])[kind]


def _price(model: str) -> Price | None:
    return PRICES.get(model.removeprefix("models/"))


def image_price_usd(model: str, size: str, quality: str | None = None, *, batch: bool = False) -> float | None:
    """USD for one generated image of ``model`` at ``size`` and ``quality``; None if not in the table."""
    price = _price(model)
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
) -> float | None:
    """Bill ``total - prompt`` as output: Gemini may leave thinking tokens out of completion_tokens.

    An image model (``per_image_usd`` given) is billed per image generated plus its prompt tokens; its
    output tokens are the images themselves, not billed twice. ``audio_input``: the prompt is audio
    (transcription; its few instruction tokens are billed at the audio price too), which costs more.
    """
    price = _price(model)
    if price is None:
        return None
    if per_image_usd is not None:
        return images * per_image_usd + prompt_tokens * price.input / 1e6
    output_tokens = max(0, total_tokens - prompt_tokens)
    input_price = price.audio_input if audio_input and price.audio_input is not None else price.input
    factor = BATCH_PRICE_FACTOR if batch else 1.0
    return factor * (prompt_tokens * input_price + output_tokens * price.output) / 1e6
