"""Local OpenAI-compatible emulator of Gemini's compat endpoint, for tests and benchmarks."""

from __future__ import annotations

from emulator.config import CannedAnswer, EmulatorConfig
from emulator.errors import ApiError
from emulator.server import Emulator, serve

__all__ = ["ApiError", "CannedAnswer", "Emulator", "EmulatorConfig", "serve"]
