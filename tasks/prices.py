"""Default models and prices, kept in one table (USD per 1M tokens, paid tier, mid-2026)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Price", "PRICES", "DEFAULT_MODELS", "default_model", "estimate_cost_usd"]


@dataclass(frozen=True, kw_only=True)
class Price:
    input: float
    output: float = 0.0
    audio_input: float | None = None


PRICES: dict[str, Price] = {
    "gemini-2.5-flash": Price(input=0.30, output=2.50, audio_input=1.00),
    "gemini-2.5-flash-lite": Price(input=0.10, output=0.40, audio_input=0.30),
    "gemini-embedding-001": Price(input=0.15),
    "text-embedding-3-small": Price(input=0.02),
    "text-embedding-3-large": Price(input=0.13),
    "gpt-4o-mini": Price(input=0.15, output=0.60),
}

DEFAULT_MODELS: dict[str, dict[str, str]] = {
    "gemini": {"embed": "gemini-embedding-001", "chat": "gemini-2.5-flash", "images": "gemini-2.5-flash-image"},
    "openai": {"embed": "text-embedding-3-small", "chat": "gpt-4o-mini", "images": "gpt-image-1"},
}


def default_model(provider: str, kind: str) -> str:
    """The local emulator and unknown OpenAI-compatible servers get Gemini's names."""
    return DEFAULT_MODELS.get(provider, DEFAULT_MODELS["gemini"])[kind]


def estimate_cost_usd(model: str, *, prompt_tokens: int, total_tokens: int) -> float | None:
    """Bill ``total - prompt`` as output: Gemini may leave thinking tokens out of completion_tokens."""
    price = PRICES.get(model.removeprefix("models/"))
    if price is None:
        return None
    output_tokens = max(0, total_tokens - prompt_tokens)
    return (prompt_tokens * price.input + output_tokens * price.output) / 1e6
