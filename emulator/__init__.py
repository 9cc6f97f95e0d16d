"""Local OpenAI-compatible emulator of Gemini's compat endpoint, for tests and benchmarks."""

from __future__ import annotations

from emulator.server import ApiError, CannedAnswer, Emulator, EmulatorConfig, serve

__all__ = ["ApiError", "CannedAnswer", "Emulator", "EmulatorConfig", "serve"]
