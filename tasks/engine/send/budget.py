"""`--max-cost-usd`: no new request once the running cost estimate would pass the budget."""

from __future__ import annotations

from typing import Any

from tasks.errors import ConfigError, RunStopped
from tasks.provider.prices import Price, how_to_price, price_of, with_audio_price

__all__ = ["Budget"]


class Budget:
    """Spent (from reported usage) plus reserved (requests in flight, by estimate) stays under the cap.

    A request reserves its estimated input tokens at the input price plus the output seen so far per
    input token, so chat jobs learn their output cost as they go. An image job (``per_image_usd``)
    reserves the images it asks for (``images_per_request``) at their price before sending, and is
    charged for the images that came back.
    """

    def __init__(
        self, max_usd: float, model: str, *, per_image_usd: float | None = None, images_per_request: int = 0
    ) -> None:
        price = price_of(model)
        if price is None:
            raise ConfigError(
                f"--max-cost-usd needs a price for model {model!r}, and gembatch knows none for today: "
                f"{how_to_price(model)}; or run without --max-cost-usd"
            )
        if max_usd <= 0:
            raise ConfigError(f"--max-cost-usd must be positive, got {max_usd}")
        self.max_usd = max_usd
        self._price: Price = price
        self._per_image = per_image_usd
        self._images_per_request = images_per_request
        # 0.5 while a batch run prices its request files (the batch APIs' half price), 1.0 for live requests.
        self.price_factor = 1.0
        self.spent_usd = 0.0
        self._reserved_usd = 0.0
        self._prompt_tokens = 0
        self._output_tokens = 0

    @classmethod
    def for_job(cls, max_usd: float, job: Any) -> Budget:
        """The budget of ``job``: per image when the job prices its requests so (image generation)."""
        per_image = getattr(job, "per_image_usd", None)
        if per_image is None and getattr(job, "name", None) == "images":
            raise ConfigError(
                f"--max-cost-usd needs a price per image for model {job.model!r}, and gembatch knows none for "
                f"today: {how_to_price(job.model)}; or run without --max-cost-usd"
            )
        if per_image is None:
            budget = cls(max_usd, job.model)
            if getattr(job, "audio_input", False):
                # Transcription: the input is audio, billed at the model's audio price.
                budget._price = with_audio_price(budget._price)
            return budget
        return cls(max_usd, job.model, per_image_usd=per_image, images_per_request=job.n)

    def reserve(self, estimated_tokens: int) -> float | None:
        """The amount reserved for one request, or None if it would take the run past the budget."""
        if self._per_image is not None:
            cost = self._images_per_request * self._per_image + estimated_tokens * self._price.input / 1e6
        else:
            ratio = self._output_tokens / self._prompt_tokens if self._prompt_tokens else 0.0
            cost = estimated_tokens * (self._price.input + ratio * self._price.output) / 1e6
        cost *= self.price_factor
        if self.spent_usd + self._reserved_usd + cost > self.max_usd:
            return None
        self._reserved_usd += cost
        return cost

    def release(self, reservation: float) -> None:
        self._reserved_usd = max(0.0, self._reserved_usd - reservation)

    def charge(self, prompt_tokens: int, total_tokens: int, images: int = 0) -> None:
        if self._per_image is not None:
            self._prompt_tokens += prompt_tokens
            self.spent_usd += images * self._per_image + prompt_tokens * self._price.input / 1e6
            return
        output = max(0, total_tokens - prompt_tokens)
        self._prompt_tokens += prompt_tokens
        self._output_tokens += output
        self.spent_usd += self.price_factor * (prompt_tokens * self._price.input + output * self._price.output) / 1e6

    def stop(self) -> RunStopped:
        return RunStopped(
            "stopped: budget",
            f"the next request would take the estimated cost past --max-cost-usd {self.max_usd} "
            f"(spent so far: ${self.spent_usd:.6f}). Everything done so far is written; rerun with a "
            "larger budget to go on.",
        )
