"""The models the emulator knows: which it serves, which image models take which sizes, reasoning efforts."""

from __future__ import annotations

# The models Gemini serves a new key as of December 2026 (GEMINI.md, "Models as of December 2026"),
# plus OpenAI's under /v1/. Older ids (Imagen 4, gemini-2.5-flash, gemini-2.5-flash-image) are not
# served: their requests answer 404 as Google's do. LEGACY_MODELS serves them again (a project that
# used them before, or an old recording).
DEFAULT_MODELS: tuple[str, ...] = (
    "gemini-embedding-2",
    "gemini-embedding-001",
    "gemini-3.8-flash",
    "gemini-3.5-flash-lite",
    "gemini-4-argon",
    "gemini-3.1-flash-lite",
    "gemini-2.5-flash-lite",
    "gemini-nano-banana-2.1",
    "gemini-3-pro-image",
    "gemini-3.1-flash-lite-image",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "gpt-4o-mini",
    "whisper-1",
    "gpt-image-1",
    "dall-e-3",
)
LEGACY_MODELS: tuple[str, ...] = (
    "gemini-2.5-flash",
    "gemini-2.5-flash-image",
    "imagen-4.0-generate-001",
    "imagen-4.0-fast-generate-001",
    "imagen-4.0-ultra-generate-001",
)
# Which image models images/generations serves on each path, and their largest n: under /v1beta/openai/
# Gemini's image models (and the retired Imagen 4 ids, when served), answered with data[].b64_json; under
# /v1/ OpenAI's image models with their documented sizes. Anything else is refused there like the real
# endpoint refuses it.
GEMINI_IMAGE_MODELS: dict[str, int] = {
    "gemini-nano-banana-2.1": 4,
    "gemini-3-pro-image": 4,
    "gemini-3.1-flash-lite-image": 4,
    "gemini-3.1-flash-image": 4,
    "imagen-4.0-generate-001": 4,
    "imagen-4.0-fast-generate-001": 4,
    "imagen-4.0-ultra-generate-001": 4,
    "gemini-2.5-flash-image": 4,
}
# Gemini 3 maps reasoning_effort to a thinking level and can't turn thinking off; gemini-4 (argon)
# takes low, medium and high only; both have deprecated the sampling options (changelog 2026-07-21).
NEWER_FAMILY_PREFIXES: tuple[str, ...] = ("gemini-3", "gemini-4")
DEPRECATED_SAMPLING: tuple[str, ...] = ("temperature", "top_p", "top_k")
OPENAI_IMAGE_MODELS: dict[str, tuple[int, tuple[str, ...]]] = {
    "gpt-image-1": (10, ("1024x1024", "1536x1024", "1024x1536", "auto")),
    "dall-e-3": (1, ("1024x1024", "1792x1024", "1024x1792")),
}
REASONING_EFFORT_TOKENS: dict[str, int] = {"none": 0, "minimal": 16, "low": 64, "medium": 256, "high": 1024}


def efforts_of(model: str) -> tuple[str, ...]:
    """The reasoning_effort values ``model`` accepts."""
    if model.startswith("gemini-4"):
        return ("low", "medium", "high")
    if model.startswith("gemini-3"):
        return ("minimal", "low", "medium", "high")
    return tuple(REASONING_EFFORT_TOKENS)
