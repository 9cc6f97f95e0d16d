"""Job defaults the command line shows in `--help`, in a module that imports nothing.

The job modules (tasks/jobs/embed.py, caption.py, …) import pyarrow, openai and Pillow; `gembatch JOB --help`
must not pay for those just to print a default. Each value is declared here once and re-exported by
its job module.
"""

from __future__ import annotations

# The common options' defaults (flows/params.py declares the options).
DEFAULT_CHUNK_SIZE = 2000  # rows per chunk: one Prefect task and one part file
DEFAULT_TIMEOUT_S = 120.0  # seconds before one request is abandoned and retried
DEFAULT_MAX_OUTAGE_S = 1800.0  # seconds a run waits out a provider that looks down
DEFAULT_IDLE_TIMEOUT_S = 30.0  # --stream: seconds allowed between two chunks of a reply

MAX_INPUTS_PER_REQUEST = 100  # Gemini: "at most 100 requests can be in one batch"

DEFAULT_CAPTION_PROMPT = "Describe this image in one or two sentences."
DEFAULT_MAX_SIDE = 1536

APIS = ("chat", "transcriptions")
# GEMINI.md, "Limits and errors": inline data is 20 MB per request historically; raised to 100 MB
# natively in January 2026, unconfirmed for the OpenAI-compatible endpoint. Stay at the safe value.
MAX_INLINE_BYTES = 20 * 1024 * 1024
# Recordings longer than this are cut into segments of about this many seconds, one request each.
DEFAULT_SEGMENT_S = 300.0
SEGMENT_FORMATS = ("mp3", "wav")  # how each segment is encoded for the request (tasks/jobs/audio.py)
DEFAULT_SEGMENT_FORMAT = "mp3"

DEFAULT_SIZE = "1024x1024"

# Batch mode (tasks/engine/send/batch/policy.py): polls, requests per batch (OpenAI's cap per input file), and the
# smallest request file --mode auto sends as a batch.
DEFAULT_BATCH_POLL_S = 30.0
MAX_BATCH_REQUESTS = 50_000
DEFAULT_AUTO_MIN_REQUESTS = 100
