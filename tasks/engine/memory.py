"""Give freed heap memory back to the system (glibc), between the phases of a long run.

A scan of 5,000 part files and a rerun's 5,000 chunks free many small blocks; glibc keeps them in its
heap, where they count as resident until reused. ``malloc_trim(0)`` returns the free pages (measured on
a 10M-row rerun: 351 → 250 MiB right after the scan). Elsewhere (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["release_free_memory"]

_trim = None
if sys.platform.startswith("linux"):
    try:
        _trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        _trim = None


def release_free_memory() -> None:
    if _trim is not None:
        _trim(0)
