"""What each image model takes on the route gembatch uses (`images.generate`): sizes, n, quality.

Imports nothing, so the command line can check `--size`, `--n` and `--quality` before any request (and
before pyarrow or openai are imported). Sources and what is confirmed: docs/how-to/images.md.

A model not named here (another server's) gets the generic checks: WIDTHxHEIGHT, n from 1 to 10.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "ImageModel",
    "IMAGE_MODELS",
    "GEMINI_ROUTE",
    "OPENAI_ROUTE",
    "MAX_IMAGES_PER_PROMPT",
    "image_model",
    "check_image_request",
]

GEMINI_ROUTE = "gemini"  # .../v1beta/openai/images/generations
OPENAI_ROUTE = "openai"  # https://api.openai.com/v1/images/generations
MAX_IMAGES_PER_PROMPT = 10  # the OpenAI images API's limit for n; the default for models not listed
_SIZE = re.compile(r"([1-9][0-9]*)x([1-9][0-9]*)")


@dataclass(frozen=True, kw_only=True)
class ImageModel:
    """``aspect_ratios``: ratio -> the model's own pixel size for it (Imagen, Gemini image models: any
    WIDTHxHEIGHT in exactly one of those ratios, or that pixel size, is accepted). ``sizes``: the only
    values accepted (OpenAI models)."""

    route: str
    max_n: int
    aspect_ratios: dict[str, str] | None = None
    sizes: tuple[str, ...] | None = None
    qualities: tuple[str, ...] = ()

    def allowed_sizes(self) -> str:
        if self.sizes is not None:
            return ", ".join(self.sizes)
        assert self.aspect_ratios is not None
        listed = ", ".join(f"{size} ({ratio})" for ratio, size in self.aspect_ratios.items())
        return f"{listed}, or any WIDTHxHEIGHT in exactly one of those aspect ratios"

    def aspect_ratio_of(self, size: str) -> str | None:
        """The aspect ratio a WIDTHxHEIGHT size stands for, or None if the model has none like it."""
        assert self.aspect_ratios is not None
        for ratio, native in self.aspect_ratios.items():
            if size == native:
                return ratio
        m = _SIZE.fullmatch(size)
        if m is None:
            return None
        found = Fraction(int(m.group(1)), int(m.group(2)))
        for ratio in self.aspect_ratios:
            w, h = ratio.split(":")
            if found == Fraction(int(w), int(h)):
                return ratio
        return None


# Imagen 4 (native route models/{m}:predict): 1-4 images, aspect ratios 1:1, 3:4, 4:3, 9:16, 16:9, with
# these pixel sizes at the default 1K output (Google's Imagen docs).
_IMAGEN_4 = ImageModel(
    route=GEMINI_ROUTE,
    max_n=4,
    aspect_ratios={
        "1:1": "1024x1024",
        "3:4": "896x1280",
        "4:3": "1280x896",
        "9:16": "768x1408",
        "16:9": "1408x768",
    },
)
# Gemini image models ("nano banana"): ten aspect ratios, at about one megapixel by default (Google's
# image generation docs: the 1K sizes below; 3 Pro Image also 2K and 4K, any WIDTHxHEIGHT in a listed
# ratio is sent as it is). Through the compatibility layer they answer images/generations with
# data[].b64_json, PNG or WebP (third-party code; a Google staff answer showed images/edits): the
# route, and n > 1 there, are unconfirmed; 4 like Imagen is assumed. docs/reference/models.md.
_GEMINI_IMAGE = ImageModel(
    route=GEMINI_ROUTE,
    max_n=4,
    aspect_ratios={
        "1:1": "1024x1024",
        "2:3": "832x1248",
        "3:2": "1248x832",
        "3:4": "864x1184",
        "4:3": "1184x864",
        "4:5": "896x1152",
        "5:4": "1152x896",
        "9:16": "768x1344",
        "16:9": "1344x768",
        "21:9": "1536x672",
    },
)

IMAGE_MODELS: dict[str, ImageModel] = {
    # Imagen 4: shut down 2026-08-17 (kept so that outputs made with it are described right).
    "imagen-4.0-generate-001": _IMAGEN_4,
    "imagen-4.0-fast-generate-001": _IMAGEN_4,
    "imagen-4.0-ultra-generate-001": _IMAGEN_4,
    "gemini-2.5-flash-image": _GEMINI_IMAGE,  # shut down 2026-10-02
    "gemini-nano-banana-2.1": _GEMINI_IMAGE,
    "gemini-3-pro-image": _GEMINI_IMAGE,
    "gemini-3.1-flash-lite-image": _GEMINI_IMAGE,
    "gemini-3.1-flash-image": _GEMINI_IMAGE,
    "gpt-image-1": ImageModel(
        route=OPENAI_ROUTE,
        max_n=10,
        sizes=("1024x1024", "1536x1024", "1024x1536", "auto"),
        qualities=("low", "medium", "high", "auto"),
    ),
    "dall-e-3": ImageModel(
        route=OPENAI_ROUTE,
        max_n=1,
        sizes=("1024x1024", "1792x1024", "1024x1792"),
        qualities=("standard", "hd"),
    ),
}


def image_model(model: str) -> ImageModel | None:
    return IMAGE_MODELS.get(model.removeprefix("models/"))


def check_image_request(model: str, size: str, n: int, quality: str | None, route: str | None) -> str | None:
    """Why this request can't go (a message naming the allowed values), or None if it can.

    ``route``: GEMINI_ROUTE or OPENAI_ROUTE when the provider is known (gemini, local; openai), None
    for another server (any model name goes there).
    """
    spec = image_model(model)
    name = model.removeprefix("models/")
    if spec is None:
        if not isinstance(size, str) or not _SIZE.fullmatch(size):
            return f"--size must look like WIDTHxHEIGHT in pixels, e.g. 1024x1024; got {size!r}"
        if not 1 <= n <= MAX_IMAGES_PER_PROMPT:
            return f"--n must be between 1 and {MAX_IMAGES_PER_PROMPT}, got {n}"
        return None
    if route is not None and spec.route != route:
        from tasks.provider.catalog import SHUT_DOWN, model_info

        served = sorted(
            m for m, s in IMAGE_MODELS.items() if s.route == route and getattr(model_info(m), "status", "") != SHUT_DOWN
        )
        where = "Gemini's OpenAI-compatible images route" if route == GEMINI_ROUTE else "OpenAI's images route"
        return (
            f"--model {name} is not served by {where}; image models there: {', '.join(served)} "
            "(or point --base-url at a server that has it)"
        )
    if spec.sizes is not None:
        if size not in spec.sizes:
            return f"--size {size!r} is not one {name} takes: use one of {spec.allowed_sizes()}"
    elif not isinstance(size, str) or spec.aspect_ratio_of(size) is None:
        return f"--size {size!r} is not an aspect ratio {name} takes: use {spec.allowed_sizes()}"
    if not 1 <= n <= spec.max_n:
        if spec.max_n == 1:
            return f"--n must be 1 for {name}, got {n}"
        return f"--n must be between 1 and {spec.max_n} for {name}, got {n}"
    if quality is not None and quality not in spec.qualities:
        if not spec.qualities:
            return f"--quality is not an option of {name}: drop it"
        return f"--quality {quality!r} is not one {name} takes: use one of {', '.join(spec.qualities)}"
    return None
