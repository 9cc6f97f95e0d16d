"""A local OpenAI-compatible HTTP server that behaves like Gemini's compat endpoint.

Written on raw asyncio streams (no web framework) so that transport faults -- truncated bodies,
dropped connections, hangs -- can be injected exactly.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from emulator import chat, fakes, schema_rules
from emulator.batches import BatchService

log = logging.getLogger("gembatch.emulator")

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
PREFIXES: tuple[str, ...] = ("/v1beta/openai/", "/v1/")
ROUTES: tuple[str, ...] = ("embeddings", "chat/completions", "images/generations", "audio/transcriptions", "models")
FAULT_KINDS: tuple[str, ...] = ("500", "503", "hang", "truncate", "drop", "garbage")
# How a chat request carrying response_format json_schema is met (EmulatorConfig.json_schema):
# "supported" answers JSON for the schema; "rejected" answers Groq's 400 for a model without
# structured outputs (llama-3.3-70b-versatile); "ignored" answers prose, as servers that drop the
# field do (Ollama's and vLLM's OpenAI routes in some versions, LM Studio's /v1/responses).
JSON_SCHEMA_SUPPORT: tuple[str, ...] = ("supported", "rejected", "ignored")
JSON_SCHEMA_REJECTED = "This model does not support response format `json_schema`."
MARKER_KINDS: tuple[str, ...] = ("400", "500", "503", "504", "garbage", "hang", "truncate", "drop", "badjson")
BAD_JSON_REPLY = '{"oops": '
REASONING_EFFORT_TOKENS: dict[str, int] = {"none": 0, "minimal": 16, "low": 64, "medium": 256, "high": 1024}
IMAGE_TOKENS = 258
AUDIO_TOKENS_PER_SECOND = 32
MAX_EMBEDDING_INPUTS = 100
MAX_BODY_BYTES = 128 * 1024 * 1024
IMAGE_MIMES = ("image/png", "image/jpeg", "image/webp", "image/heic", "image/heif", "image/gif")
IMAGE_FORMATS: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "svg": "image/svg+xml"}
AUDIO_FORMATS = ("wav", "mp3", "aiff", "aac", "ogg", "flac", "m4a", "webm", "mpeg", "mpga", "opus")

_RATE_LIMIT_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more information on "
    "this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits. To monitor your current usage, "
    "head to: https://ai.dev/rate-limit. \n* Quota exceeded for metric: {metric}, limit: {limit}, "
    "model: {model}\nPlease retry in {delay:.1f}s."
)
_QUOTAS: dict[str, tuple[str, str]] = {
    "rpm": (
        "generativelanguage.googleapis.com/generate_content_free_tier_requests",
        "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
    ),
    "tpm": (
        "generativelanguage.googleapis.com/generate_content_free_tier_input_token_count",
        "GenerateContentInputTokensPerModelPerMinute-FreeTier",
    ),
    "rpd": (
        "generativelanguage.googleapis.com/generate_content_free_tier_requests",
        "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
    ),
}
_MARKER_PREFIX = "[[emulator:"
STATS_PATH = "/_emulator/stats"
# POST a JSON object of EmulatorConfig fields (fault rates, latency…) to change an emulator running in
# another process, e.g. to start and end an outage during a benchmark. Needs the key.
CONFIG_PATH = "/_emulator/config"
# Images answered by URL are served here (no key: like a storage bucket's signed link).
SERVED_IMAGES_PATH = "/_emulator/images/"


def _route_key(path: str) -> str | None:
    """The route a path is on, as EmulatorConfig.route_answers names it."""
    path = unquote(path).split("?", 1)[0]
    if path.startswith(("/upload/v1beta/files", "/download/v1beta/")):
        return "files"
    for prefix in PREFIXES:
        if path.startswith(prefix):
            rest = path[len(prefix) :].strip("/")
            for route in (*ROUTES, "files", "batches"):
                if rest == route or rest.startswith(route + "/"):
                    return route
    return None


CANNED_BODIES: tuple[str, ...] = ("json", "text", "html", "empty")


@dataclass(frozen=True, kw_only=True)
class CannedAnswer:
    """What a route answers instead of its work (``EmulatorConfig.route_answers``), as gateways and load
    balancers do: ``body`` is ``json`` (OpenAI's error object), ``text`` (plain text), ``html`` (an nginx
    error page) or ``empty`` (no body at all; with status 200, an empty success). The first ``after``
    requests to the route are served as usual."""

    status: int
    body: str = "json"
    message: str = "injected failure"
    after: int = 0

    def __post_init__(self) -> None:
        if self.body not in CANNED_BODIES:
            raise ValueError(f"body must be one of {', '.join(CANNED_BODIES)}, got {self.body!r}")

    def response(self) -> Response:
        if self.body == "empty":
            return Response(self.status, b"")
        if self.body == "text":
            return Response(self.status, self.message.encode(), content_type="text/plain; charset=utf-8")
        if self.body == "html":
            try:
                phrase = HTTPStatus(self.status).phrase
            except ValueError:
                phrase = "Error"
            page = (
                f"<html>\r\n<head><title>{self.status} {phrase}</title></head>\r\n<body>\r\n<center><h1>"
                f"{self.status} {phrase}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
            )
            return Response(self.status, page.encode(), content_type="text/html")
        return _openai_error(self.status, self.message, str(self.status))


@dataclass(kw_only=True)
class EmulatorConfig:
    api_key: str = field(default="emulator-key", repr=False)
    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None
    window_seconds: float = 60.0
    # The rpm also holds over short spells, as OpenAI enforces it ("60,000 requests/minute may be enforced
    # as 1,000 requests/second"): a bucket of rpm * pace_seconds / window_seconds requests (at least 1),
    # refilled at rpm / window_seconds a second. None: only the window counts (Gemini, as documented).
    pace_seconds: float | None = None
    latency_seconds: float = 0.0
    # Lognormal spread of the latency (sigma of the log; 0 = every answer takes latency_seconds).
    # The mean stays latency_seconds, like a real model whose answers take 0.3x-3x the typical time.
    latency_jitter: float = 0.0
    fault_rate_500: float = 0.0
    fault_rate_503: float = 0.0
    fault_rate_hang: float = 0.0
    fault_rate_truncate: float = 0.0
    fault_rate_drop: float = 0.0
    fault_rate_garbage: float = 0.0
    hang_seconds: float = 3600.0
    # With text/html the openai SDK hands back the body as a str instead of raising; with
    # application/json it raises json.JSONDecodeError. Both happen in the wild.
    garbage_content_type: str = "text/html"
    seed: int = 0
    models: tuple[str, ...] = DEFAULT_MODELS
    # Models retired by the provider: every request for them, GET models/{id} included, answers 404
    # NOT_FOUND (Gemini's shape), and the list leaves them out, even when ``models`` names them.
    retired: tuple[str, ...] = ()
    # Reroutes "A": "B": requests for A are answered by B, as Google does with retired ids: the reply's
    # ``model`` names B, and its content is B's (other vectors for embeddings). A stays listed.
    reroutes: dict[str, str] = field(default_factory=dict)
    # Share of nullable values in a json_schema reply answered as null (a model leaving a field unstated).
    null_rate: float = 0.0
    # -- behaving like other OpenAI-compatible servers --
    # False: GET models/{id} is a route this server doesn't have (404 {"detail": "Not Found"}, like a
    # FastAPI app); only the list answers.
    retrieve_route: bool = True
    list_route: bool = True  # False: GET models is missing too (404 {"detail": "Not Found"})
    # How GET models names them: Gemini says "models/<name>", OpenAI and most servers the bare name.
    model_id_prefix: str = "models/"
    # The first N requests to the models routes (list or retrieve) answer 503 UNAVAILABLE.
    models_503_first: int = 0
    # The random faults (fault_rate_*, retry_after_429_rate) also hit GET models routes, not only POSTs.
    faults_on_models: bool = False
    # Share of POSTs (every route) answered 429 OpenAI-style: {"error": {...}} with a Retry-After
    # header of retry_after_seconds (fractions allowed, so tests stay quick), no Gemini RetryInfo.
    retry_after_429_rate: float = 0.0
    retry_after_seconds: float = 1.0
    # What images/generations returns in b64_json: png, jpeg, webp, or svg (which no raster decoder reads).
    image_format: str = "png"
    # -- streamed chat replies (emulator/chat.py) --
    # Share of streamed replies that break: closed mid-body, ended without a finish reason, stalled
    # (for hang_seconds), or carrying a chunk that is not JSON.
    stream_fault_rate_disconnect: float = 0.0
    stream_fault_rate_early_end: float = 0.0
    stream_fault_rate_stall: float = 0.0
    stream_fault_rate_malformed: float = 0.0
    # Seconds between the chunks of a streamed reply (the first one comes after latency_seconds).
    stream_chunk_delay_seconds: float = 0.0
    # -- batches (emulator/batches.py), read when a batch is created --
    # Seconds from a batch's creation until all its lines are answered (0: at the first poll).
    batch_seconds: float = 0.0
    # Share of a batch's lines answered 500 INTERNAL (drawn per batch and custom_id, so repeatable).
    batch_line_failure_rate: float = 0.0
    # None: batches complete. A share (0-1): the batch expires with only that share of its lines answered.
    batch_expire_fraction: float | None = None
    # Seconds every files/batches request (upload, create, poll, download) takes before its answer.
    batch_request_seconds: float = 0.0
    # A server or model without json_schema structured outputs: one of JSON_SCHEMA_SUPPORT.
    json_schema: str = "supported"
    # -- behaving like a gateway in front of the server --
    # Route -> a canned answer in place of its work: "embeddings", "chat/completions",
    # "images/generations", "audio/transcriptions", "models", "files" (uploads and downloads too) or
    # "batches".
    route_answers: dict[str, CannedAnswer] = field(default_factory=dict)
    # Request parameters refused with LiteLLM's 400 (``litellm.UnsupportedParamsError: Setting X is not
    # supported …``) when a POST's JSON body carries them.
    refuse_params: tuple[str, ...] = ()
    # What images/generations answers when the request names no response_format: b64_json, or url (a
    # link to the image on this server, as OpenAI's DALL·E models answer by default).
    default_image_response: str = "b64_json"

    def __post_init__(self) -> None:
        self.models = tuple(self.models)
        self.refuse_params = tuple(self.refuse_params)
        self.route_answers = {
            route: answer if isinstance(answer, CannedAnswer) else CannedAnswer(**answer)
            for route, answer in dict(self.route_answers).items()
        }
        if self.default_image_response not in ("b64_json", "url"):
            raise ValueError(f"default_image_response must be b64_json or url, got {self.default_image_response!r}")
        self.retired = tuple(self.retired)
        if not isinstance(self.reroutes, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.reroutes.items()
        ):
            raise ValueError("reroutes must map model ids to model ids, e.g. {'gemini-3.7-flash': 'gemini-3.8-flash'}")
        for kind in FAULT_KINDS:
            if not 0.0 <= getattr(self, f"fault_rate_{kind}") <= 1.0:
                raise ValueError(f"fault_rate_{kind} must be within [0, 1]")
        if not 0.0 <= self.retry_after_429_rate <= 1.0:
            raise ValueError("retry_after_429_rate must be within [0, 1]")
        if self.retry_after_seconds < 0:
            raise ValueError("retry_after_seconds must be 0 or more")
        if self.json_schema not in JSON_SCHEMA_SUPPORT:
            raise ValueError(f"json_schema must be one of {', '.join(JSON_SCHEMA_SUPPORT)}, got {self.json_schema!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}")
        if self.window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        if self.pace_seconds is not None and self.pace_seconds <= 0:
            raise ValueError("pace_seconds must be positive")
        if not 0.0 <= self.batch_line_failure_rate <= 1.0:
            raise ValueError("batch_line_failure_rate must be within [0, 1]")
        if self.batch_expire_fraction is not None and not 0.0 <= self.batch_expire_fraction <= 1.0:
            raise ValueError("batch_expire_fraction must be within [0, 1]")
        if self.batch_request_seconds < 0:
            raise ValueError("batch_request_seconds must be 0 or more")


# ---------------------------------------------------------------------------------------------
# errors and responses


@dataclass
class Response:
    status: int
    body: bytes | list[bytes] | Path  # a Path is streamed from disk (batch files)
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    # A streamed body: writes the whole answer itself; returns whether the connection stays open.
    stream: Callable[[asyncio.StreamWriter, bool], Awaitable[bool]] | None = None


class ApiError(Exception):
    """An error answered in Gemini's shape: a JSON array holding one {"error": {...}}."""

    def __init__(self, code: int, status: str, message: str, details: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message
        self.details = details or []

    def response(self) -> Response:
        err: dict[str, Any] = {"code": self.code, "message": self.message, "status": self.status}
        if self.details:
            err["details"] = self.details
        return Response(self.code, json.dumps([{"error": err}], indent=2).encode())


class _TransportFault(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _invalid(message: str) -> ApiError:
    return ApiError(400, "INVALID_ARGUMENT", message)


def _bad_key() -> ApiError:
    message = "API key not valid. Please pass a valid API key."
    return ApiError(
        400,
        "INVALID_ARGUMENT",
        message,
        [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            },
            {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": message},
        ],
    )


def _model_not_found(model: str, method: str) -> ApiError:
    return ApiError(
        404,
        "NOT_FOUND",
        f"models/{model} is not found for API version v1beta, or is not supported for {method}. "
        "Call ListModels to see the list of available models and their supported methods.",
    )


def _serves(cfg: EmulatorConfig, model: str) -> bool:
    return model in cfg.models and model not in cfg.retired


def _answered_by(cfg: EmulatorConfig, model: str) -> str:
    """The model that answers a request for ``model`` (itself, or where it is rerouted)."""
    return cfg.reroutes.get(model, model)


def _efforts_of(model: str) -> tuple[str, ...]:
    if model.startswith("gemini-4"):
        return ("low", "medium", "high")
    if model.startswith("gemini-3"):
        return ("minimal", "low", "medium", "high")
    return tuple(REASONING_EFFORT_TOKENS)


def _internal() -> ApiError:
    return ApiError(
        500,
        "INTERNAL",
        "An internal error has occurred. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting",
    )


def _overloaded() -> ApiError:
    return ApiError(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")


def _deadline() -> ApiError:
    return ApiError(504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete.")


def _openai_rate_limited(seconds: float) -> Response:
    """OpenAI's 429: an object body (not Gemini's array), the delay in a Retry-After header."""
    body = {
        "error": {
            "message": f"Rate limit reached for requests. Please try again in {seconds:g}s.",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    return Response(429, json.dumps(body).encode(), headers={"Retry-After": f"{seconds:g}"})


def _openai_error(status: int, message: str, code: str | None, param: str | None = None) -> Response:
    """OpenAI's error shape: an {"error": {...}} object."""
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return Response(status, json.dumps(body).encode())


def _json_response(obj: Any) -> Response:
    return Response(200, json.dumps(obj, separators=(",", ":")).encode())


# ---------------------------------------------------------------------------------------------
# rate limits


class _Limiter:
    """Per-model sliding windows for rpm/tpm and a Pacific-midnight day for rpd, like Gemini."""

    def __init__(self) -> None:
        self.requests: dict[str, deque[float]] = {}
        self.tokens: dict[str, deque[tuple[float, int]]] = {}
        self.token_sums: dict[str, int] = {}
        self.day_counts: dict[str, int] = {}
        self.day: dt.date | None = None
        self.paces: dict[str, tuple[float, float]] = {}  # model: (requests left in the bucket, when)
        # When each admitted request arrived (all models): benchmarks check every window against the limit.
        self.admitted: deque[float] = deque(maxlen=1_000_000)

    def check(self, model: str, tokens: int, cfg: EmulatorConfig) -> None:
        now = time.monotonic()
        window = cfg.window_seconds
        reqs = self.requests.setdefault(model, deque())
        toks = self.tokens.setdefault(model, deque())
        while reqs and reqs[0] <= now - window:
            reqs.popleft()
        total = self.token_sums.get(model, 0)
        while toks and toks[0][0] <= now - window:
            total -= toks.popleft()[1]
        self.token_sums[model] = total

        today, until_midnight = _pacific_day()
        if self.day != today:
            self.day = today
            self.day_counts.clear()
        if cfg.rpd is not None and self.day_counts.get(model, 0) >= cfg.rpd:
            raise _rate_limited("rpd", cfg.rpd, model, until_midnight)
        if cfg.rpm is not None and len(reqs) >= cfg.rpm:
            # The oldest request that must leave the window before one more fits.
            idx = len(reqs) - cfg.rpm
            delay = reqs[idx] + window - now if cfg.rpm > 0 else window
            raise _rate_limited("rpm", cfg.rpm, model, delay)
        pace_left = None
        if cfg.rpm is not None and cfg.pace_seconds is not None:
            per_second = cfg.rpm / window
            size = max(1.0, per_second * cfg.pace_seconds)
            left, then = self.paces.get(model, (size, now))
            pace_left = min(size, left + (now - then) * per_second)
            if pace_left < 1.0:
                raise _rate_limited("rpm", cfg.rpm, model, (1.0 - pace_left) / per_second)
        if cfg.tpm is not None and total + tokens > cfg.tpm:
            delay = window
            if tokens <= cfg.tpm:
                remaining = total
                for t, n in toks:
                    remaining -= n
                    if remaining + tokens <= cfg.tpm:
                        delay = t + window - now
                        break
            raise _rate_limited("tpm", cfg.tpm, model, delay)

        if pace_left is not None:
            self.paces[model] = (pace_left - 1.0, now)
        reqs.append(now)
        self.admitted.append(now)
        toks.append((now, tokens))
        self.token_sums[model] = total + tokens
        self.day_counts[model] = self.day_counts.get(model, 0) + 1


def busiest_window(times: Iterable[float], window: float) -> int:
    """The most of ``times`` that fall within any one window of ``window`` seconds."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def _pacific_day() -> tuple[dt.date, float]:
    try:
        from zoneinfo import ZoneInfo

        tz: dt.tzinfo = ZoneInfo("America/Los_Angeles")
    except Exception:  # no tz database: a fixed offset is close enough for an emulator
        tz = dt.timezone(dt.timedelta(hours=-8))
    now = dt.datetime.now(tz)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), tzinfo=tz)
    return now.date(), (midnight - now).total_seconds()


def _rate_limited(kind: str, limit: int, model: str, delay: float) -> ApiError:
    delay = max(delay, 0.1)
    metric, quota_id = _QUOTAS[kind]
    return ApiError(
        429,
        "RESOURCE_EXHAUSTED",
        _RATE_LIMIT_MESSAGE.format(metric=metric, limit=limit, model=model, delay=delay),
        [
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [
                    {
                        "quotaMetric": metric,
                        "quotaId": quota_id,
                        "quotaDimensions": {"location": "global", "model": model},
                        "quotaValue": str(limit),
                    }
                ],
            },
            {
                "@type": "type.googleapis.com/google.rpc.Help",
                "links": [
                    {
                        "description": "Learn more about Gemini API quotas",
                        "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                    }
                ],
            },
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{math.ceil(delay)}s"},
        ],
    )


# ---------------------------------------------------------------------------------------------
# HTTP plumbing


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request | None:
    try:
        line = await reader.readuntil(b"\r\n")
    except asyncio.IncompleteReadError as e:
        if e.partial.strip():
            raise _HttpError(400, "incomplete request line") from None
        return None
    except asyncio.LimitOverrunError:
        raise _HttpError(414, "request line too long") from None
    parts = line.decode("latin-1").strip().split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _HttpError(400, "malformed request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    while True:
        try:
            hline = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError:
            raise _HttpError(431, "header line too long") from None
        if hline == b"\r\n":
            break
        if len(headers) > 200:
            raise _HttpError(431, "too many headers")
        name, sep, value = hline.decode("latin-1").partition(":")
        if not sep:
            raise _HttpError(400, "malformed header")
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value

    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    else:
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise _HttpError(400, "bad content-length") from None
        if length < 0:
            raise _HttpError(400, "bad content-length")
        if length > MAX_BODY_BYTES:
            raise _HttpError(413, "request body too large")
        body = await reader.readexactly(length) if length else b""
    return Request(method.upper(), target, version, headers, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _HttpError(400, "bad chunk size") from None
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return b"".join(chunks)
        total += size
        if total > MAX_BODY_BYTES:
            raise _HttpError(413, "request body too large")
        chunks.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise _HttpError(400, "bad chunk terminator")


def _head(status: int, content_type: str, length: int, keep_alive: bool, extra: dict[str, str]) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {content_type}",
        f"Content-Length: {length}",
        "Server: gembatch-emulator",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
    ]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _multipart(req: Request) -> dict[str, tuple[bytes, str | None, str | None]]:
    """name -> (content, filename, content type)."""
    ctype = req.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise _invalid("Expected a multipart/form-data body.")
    boundary = None
    for param in ctype.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise _invalid("multipart/form-data body without a boundary.")
    delim = b"--" + boundary.encode("latin-1")
    fields: dict[str, tuple[bytes, str | None, str | None]] = {}
    for part in req.body.split(delim)[1:]:
        if part.startswith(b"--"):
            break
        part = part.removeprefix(b"\r\n")
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        content = content.removesuffix(b"\r\n")
        name = filename = part_type = None
        for hline in head.decode("utf-8", "replace").split("\r\n"):
            hname, _, hvalue = hline.partition(":")
            if hname.strip().lower() == "content-disposition":
                for param in hvalue.split(";")[1:]:
                    key, _, value = param.strip().partition("=")
                    value = value.strip().strip('"')
                    if key.lower() == "name":
                        name = value
                    elif key.lower() == "filename":
                        filename = value
            elif hname.strip().lower() == "content-type":
                part_type = hvalue.strip()
        if name is not None:
            fields[name] = (content, filename, part_type)
    return fields


# ---------------------------------------------------------------------------------------------
# request helpers


def _parse_json(req: Request) -> dict[str, Any]:
    try:
        body = json.loads(req.body)
    except (ValueError, UnicodeDecodeError):
        raise _invalid("Invalid JSON payload received.") from None
    if not isinstance(body, dict):
        raise _invalid("Invalid JSON payload received. Expected an object.")
    return body


def _model_of(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model is required.")
    return model.removeprefix("models/")


def _marker(texts: list[str]) -> str | None:
    for text in texts:
        if _MARKER_PREFIX in text:
            for kind in MARKER_KINDS:
                if f"{_MARKER_PREFIX}{kind}]]" in text:
                    return kind
    return None


def _decode_b64(data: Any, what: str) -> bytes:
    if not isinstance(data, str):
        raise _invalid(f"{what}: expected base64 data.")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(f"{what}: invalid base64 data.") from None


def _audio_tokens(audio: bytes, fmt: str) -> int:
    seconds = fakes.audio_seconds(audio, fmt)
    if seconds is None:
        seconds = len(audio) / 16000
    return math.ceil(seconds * AUDIO_TOKENS_PER_SECOND)


# ---------------------------------------------------------------------------------------------
# the server


def _empty_stats() -> dict[str, Any]:
    return {
        "requests": 0,
        "by_route": dict.fromkeys(ROUTES, 0),
        "by_status": {},
        "embedding_inputs": 0,
        "faults": {},
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "thinking_tokens": 0,
        "images": 0,
        "connections": 0,
        "in_flight": 0,
        "max_in_flight": 0,
    }


class Emulator:
    """OpenAI-compatible emulator of Gemini's compat endpoint, served from its own thread."""

    def __init__(self, config: EmulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0):
        self._config = config or EmulatorConfig()
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self._rng = random.Random(self._config.seed)
        self._models_503_left = self._config.models_503_first
        self._limiter = _Limiter()
        self._stats_lock = threading.Lock()
        self._stats = _empty_stats()
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._handlers: dict[tuple[str, str], Callable[[Request, str, EmulatorConfig], Awaitable[Response]]] = {
            ("POST", "embeddings"): self._embeddings,
            ("POST", "chat/completions"): self._chat,
            ("POST", "images/generations"): self._images,
            ("POST", "audio/transcriptions"): self._transcriptions,
            ("GET", "models"): self._models,
        }
        self.batches = BatchService(self)
        self._route_hits: dict[str, int] = {}
        # Images answered as URLs (default_image_response = "url"): name -> (bytes, mime type).
        self._images_served: dict[str, tuple[bytes, str]] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Emulator:
        if self._thread is not None:
            return self
        self._ready.clear()
        self._start_error = None
        self._thread = threading.Thread(target=self._run, name="gembatch-emulator", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            raise self._start_error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._on_connect, self.host, self._requested_port, limit=1 << 20)
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as e:  # reported to start()'s caller
            self._start_error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._conn_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            self._thread = None
            self._loop = None
            self._server = None
            self.batches.close()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("emulator not started")
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}/v1beta/openai/"

    # -- configuration and stats ---------------------------------------------------------------

    @property
    def config(self) -> EmulatorConfig:
        return self._config

    def configure(self, **changes: Any) -> EmulatorConfig:
        new = dataclasses.replace(self._config, **changes)
        if "seed" in changes:
            self._rng = random.Random(new.seed)
        if "models_503_first" in changes:
            self._models_503_left = new.models_503_first
        if "route_answers" in changes:
            self._route_hits.clear()
        self._config = new
        return new

    @property
    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            snap = dict(self._stats)
            for key in ("by_route", "by_status", "faults"):
                snap[key] = dict(self._stats[key])
            return snap

    def reset_stats(self) -> None:
        with self._stats_lock:
            in_flight = self._stats["in_flight"]
            self._stats = _empty_stats()
            self._stats["in_flight"] = in_flight

    def reset_limits(self) -> None:
        """Forget the rate-limit windows and the daily counts (thread-safe: runs on the loop)."""
        if self._loop is None:
            self._limiter = _Limiter()
            return

        def reset() -> None:
            self._limiter = _Limiter()

        self._loop.call_soon_threadsafe(reset)

    def busiest_window(self, seconds: float | None = None) -> int:
        """The most requests admitted within any window of ``seconds`` (default: the rate window)."""
        return busiest_window(self._limiter.admitted, seconds or self._config.window_seconds)

    def _reconfigure(self, req: Request, cfg: EmulatorConfig) -> Response:
        """The admin route: apply the posted changes, answer the new configuration (without the key)."""
        if not self._authorised(req, cfg):
            return _bad_key().response()
        try:
            changes = _parse_json(req)
            if "api_key" in changes:
                raise _invalid("the key can't be changed through the admin route")
            new = self.configure(**changes)
        except ApiError as e:
            return e.response()
        except (TypeError, ValueError) as e:
            return _invalid(f"bad configuration: {e}").response()
        return _json_response({k: v for k, v in dataclasses.asdict(new).items() if k != "api_key"})

    def _bump(self, key: str, n: int = 1, sub: str | int | None = None) -> None:
        with self._stats_lock:
            if sub is None:
                self._stats[key] += n
            else:
                bucket = self._stats[key]
                bucket[sub] = bucket.get(sub, 0) + n

    # -- connections -------------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        self._bump("connections")
        try:
            while True:
                try:
                    req = await _read_request(reader, writer)
                except _HttpError as e:
                    self._bump("requests")
                    resp = ApiError(e.status, "INVALID_ARGUMENT", str(e)).response()
                    await self._write(writer, resp, keep_alive=False)
                    break
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                if req is None:
                    break
                if not await self._serve(req, writer):
                    break
        except asyncio.CancelledError:
            pass
        except ConnectionError:
            pass
        except Exception:
            log.exception("emulator connection handler failed")
        finally:
            self._conn_tasks.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass

    async def _write(self, writer: asyncio.StreamWriter, resp: Response, *, keep_alive: bool) -> None:
        if isinstance(resp.body, Path):
            self._bump("by_status", sub=resp.status)
            size = resp.body.stat().st_size
            writer.write(_head(resp.status, resp.content_type, size, keep_alive, resp.headers))
            with resp.body.open("rb") as f:
                while block := f.read(1 << 20):
                    writer.write(block)
                    await writer.drain()
            return
        body = b"".join(resp.body) if isinstance(resp.body, list) else resp.body
        # Counted before writing: a client may read stats as soon as it has the answer.
        self._bump("by_status", sub=resp.status)
        # Two writes rather than head + body: concatenating would copy a multi-megabyte body again.
        writer.write(_head(resp.status, resp.content_type, len(body), keep_alive, resp.headers))
        writer.write(body)
        await writer.drain()

    def _route(self, method: str, path: str, cfg: EmulatorConfig) -> tuple[str | None, str]:
        path = unquote(path)
        for prefix in PREFIXES:
            if path.startswith(prefix):
                rest = path[len(prefix) :].strip("/")
                break
        else:
            return None, ""
        if rest == "models":
            if not cfg.list_route:
                return None, ""
            return ("models" if method == "GET" else None), ""
        if rest.startswith("models/"):
            if not cfg.retrieve_route:
                return None, ""
            return ("models" if method == "GET" else None), rest[len("models/") :]
        if rest in ROUTES and method == "POST":
            return rest, ""
        return None, ""

    def _pick_fault(self, cfg: EmulatorConfig) -> str | None:
        r = self._rng.random()
        acc = 0.0
        for kind in FAULT_KINDS:
            acc += getattr(cfg, f"fault_rate_{kind}")
            if r < acc:
                return kind
        if r < acc + cfg.retry_after_429_rate:  # drawn from the same number: seeded runs stay the same
            return "429"
        return None

    async def _serve(self, req: Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must close."""
        cfg = self._config
        keep_alive = req.keep_alive()
        if req.method == "GET" and req.path.split("?")[0] == STATS_PATH:
            # For benchmarks that drive an emulator in another process (no key: it holds no data).
            stats = {**self.stats, "busiest_window": self.busiest_window(), "window_seconds": cfg.window_seconds}
            if "arrivals=1" in req.target:
                # When each admitted request arrived, on the wall clock: benchmarks line them up with runs.
                offset = time.time() - time.monotonic()
                stats["admitted_unix"] = [round(t + offset, 3) for t in self._limiter.admitted]
            await self._write(writer, _json_response(stats), keep_alive=keep_alive)
            return keep_alive
        if req.method == "POST" and req.path == CONFIG_PATH:
            await self._write(writer, self._reconfigure(req, cfg), keep_alive=keep_alive)
            return keep_alive
        if req.method == "GET" and req.path.startswith(SERVED_IMAGES_PATH):
            await self._write(writer, self._served_image(req.path), keep_alive=keep_alive)
            return keep_alive
        self._bump("requests")
        canned = self._canned(req, cfg)
        if canned is not None:
            await self._write(writer, canned, keep_alive=keep_alive)
            return keep_alive
        if BatchService.handles(req.path):
            self._bump("by_route", sub="batches")
            if not (self._authorised(req, cfg) or req.headers.get("x-goog-api-key") == cfg.api_key):
                resp = _bad_key().response()
            else:
                if cfg.batch_request_seconds > 0:
                    await asyncio.sleep(cfg.batch_request_seconds)
                resp = await self.batches.serve(req, cfg)
            await self._write(writer, resp, keep_alive=keep_alive)
            return keep_alive
        with self._stats_lock:
            self._stats["in_flight"] += 1
            self._stats["max_in_flight"] = max(self._stats["max_in_flight"], self._stats["in_flight"])
        try:
            route, arg = self._route(req.method, req.path, cfg)
            fault: str | None = None
            if route is not None:
                self._bump("by_route", sub=route)
                if route == "models" and self._models_503_left > 0:
                    self._models_503_left -= 1
                    fault = "503"
                elif req.method == "POST" or (route == "models" and cfg.faults_on_models):
                    fault = self._pick_fault(cfg)
            if route is None and self._is_switched_off(req.path, cfg):
                resp = Response(404, b'{"detail":"Not Found"}')
            elif route is None:
                resp = ApiError(404, "NOT_FOUND", f"Unknown route: {req.method} {req.path}").response()
            elif not self._authorised(req, cfg):
                resp = _bad_key().response()
            elif fault == "429":
                self._bump("faults", sub=fault)
                resp = _openai_rate_limited(cfg.retry_after_seconds)  # answered at once, like a limit
            elif fault is not None:
                self._bump("faults", sub=fault)
                await self._delay(cfg)
                return await self._transport_fault(fault, writer, keep_alive, cfg)
            else:
                try:
                    resp = await self._handlers[(req.method, route)](req, arg, cfg)
                except ApiError as e:
                    resp = e.response()
                except _TransportFault as tf:
                    self._bump("faults", sub=f"marker:{tf.kind}")
                    await self._delay(cfg)
                    kind = "garbage-json" if tf.kind == "garbage" else tf.kind
                    return await self._transport_fault(kind, writer, keep_alive, cfg)
                except Exception:
                    log.exception("emulator handler failed for %s %s", req.method, req.path)
                    resp = _internal().response()
                # Limits are counted when a request arrives (as a real server does); a 429 answers at
                # once, and so does a model lookup: only work for a model takes the model's time.
                if resp.status != 429 and req.method == "POST":
                    await self._delay(cfg)
        finally:
            with self._stats_lock:
                self._stats["in_flight"] -= 1
        if resp.stream is not None:
            self._bump("by_status", sub=resp.status)
            return await resp.stream(writer, keep_alive)
        await self._write(writer, resp, keep_alive=keep_alive)
        return keep_alive

    def _canned(self, req: Request, cfg: EmulatorConfig) -> Response | None:
        """A gateway's own answer: a canned one for the route, or LiteLLM's 400 for a refused parameter."""
        if not cfg.route_answers and not cfg.refuse_params:
            return None
        route = _route_key(req.path)
        answer = cfg.route_answers.get(route) if route else None
        if answer is not None:
            with self._stats_lock:
                seen = self._route_hits[route] = self._route_hits.get(route, 0) + 1
            if seen > answer.after:
                self._bump("faults", sub=f"canned:{route}")
                return answer.response()
        if cfg.refuse_params and req.method == "POST" and req.body[:1] == b"{":
            try:
                body = json.loads(req.body)
            except ValueError:
                return None
            for param in cfg.refuse_params:
                if isinstance(body, dict) and param in body:
                    model = str(body.get("model", ""))
                    message = (
                        f"litellm.UnsupportedParamsError: Setting `{param}` is not supported by openai, {model}. To "
                        "drop it from the call, set `litellm.drop_params = True`.\n\nLiteLLM: model group "
                        f"'{model}' failed with the error above. No fallback was attempted."
                    )
                    self._bump("faults", sub=f"refused:{param}")
                    return _openai_error(400, message, "400")
        return None

    def _served_image(self, path: str) -> Response:
        found = self._images_served.get(path.rsplit("/", 1)[-1])
        if found is None:
            return Response(404, b"not found", content_type="text/plain")
        blob, mime = found
        return Response(200, blob, content_type=mime)

    @staticmethod
    def _is_switched_off(path: str, cfg: EmulatorConfig) -> bool:
        """A models route this configuration doesn't serve: answered like a FastAPI app's 404."""
        path = unquote(path)
        for prefix in PREFIXES:
            if path.startswith(prefix):
                rest = path[len(prefix) :].strip("/")
                if rest == "models":
                    return not cfg.list_route
                if rest.startswith("models/"):
                    return not cfg.retrieve_route
        return False

    async def _delay(self, cfg: EmulatorConfig) -> None:
        if cfg.latency_seconds <= 0:
            return
        seconds = cfg.latency_seconds
        if cfg.latency_jitter > 0:
            sigma = cfg.latency_jitter
            seconds *= math.exp(self._rng.gauss(0.0, sigma) - sigma * sigma / 2)
        await asyncio.sleep(seconds)

    def _authorised(self, req: Request, cfg: EmulatorConfig) -> bool:
        auth = req.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and token.strip() == cfg.api_key

    async def _transport_fault(
        self, kind: str, writer: asyncio.StreamWriter, keep_alive: bool, cfg: EmulatorConfig
    ) -> bool:
        if kind == "500":
            await self._write(writer, _internal().response(), keep_alive=keep_alive)
            return keep_alive
        if kind == "503":
            await self._write(writer, _overloaded().response(), keep_alive=keep_alive)
            return keep_alive
        if kind == "garbage":
            resp = Response(200, b"<html>oops</html>", cfg.garbage_content_type)
            await self._write(writer, resp, keep_alive=keep_alive)
            return keep_alive
        if kind == "garbage-json":
            body = b"<!DOCTYPE html><html>oops</html>"
            await self._write(writer, Response(200, body, "application/json"), keep_alive=keep_alive)
            return keep_alive
        if kind == "hang":
            await asyncio.sleep(cfg.hang_seconds)
            return False
        if kind == "truncate":
            body = json.dumps(
                {"id": "emulator-truncated", "object": "chat.completion", "choices": [], "padding": "x" * 256}
            ).encode()
            writer.write(_head(200, "application/json", len(body), True, {}))
            writer.write(body[: len(body) // 2])
            await writer.drain()
            return False
        return False  # drop: the caller closes the socket without a byte written

    # -- handlers ------------------------------------------------------------------------------

    def _check_markers(self, texts: list[str]) -> None:
        kind = _marker(texts)
        if kind is None or kind == "badjson":  # a 200 whose content is broken: see _chat
            return
        if kind == "400":
            self._bump("faults", sub="marker:400")
            raise _invalid("Request contains an invalid argument: the input holds the marker [[emulator:400]].")
        if kind in ("500", "503", "504"):
            self._bump("faults", sub=f"marker:{kind}")
            raise {"500": _internal, "503": _overloaded, "504": _deadline}[kind]()
        raise _TransportFault(kind)

    async def _embeddings(self, req: Request, _arg: str, cfg: EmulatorConfig) -> Response:
        body = _parse_json(req)
        model = _model_of(body)
        if not _serves(cfg, model) or model not in fakes.EMBEDDING_MODELS:
            raise _model_not_found(model, "embedContent")
        answering = _answered_by(cfg, model)
        if answering not in fakes.EMBEDDING_MODELS:
            answering = model
        raw = body.get("input")
        if isinstance(raw, str):
            texts = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
            texts = raw
        elif isinstance(raw, list) and raw:
            raise _invalid("input: token arrays are not supported; send strings.")
        else:
            raise _invalid("input: expected a non-empty string or a non-empty list of strings.")
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise _invalid(
                f"BatchEmbedContentsRequest.requests: at most {MAX_EMBEDDING_INPUTS} requests can be in one batch"
            )
        full = fakes.EMBEDDING_MODELS[answering]
        dims = body.get("dimensions")
        if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= full):
            raise _invalid(f"dimensions: must be an integer between 1 and {full} for {model}, got {dims!r}.")
        max_tokens = fakes.embedding_max_tokens(answering)
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise _invalid(f"encoding_format: must be 'float' or 'base64', got {fmt!r}.")
        counts = [fakes.count_tokens(t) for t in texts]
        for i, n in enumerate(counts):
            if n > max_tokens:
                raise _invalid(
                    f"BatchEmbedContentsRequest.requests[{i}]: input {i} has {n} tokens, more than the "
                    f"maximum of {max_tokens}."
                )
        self._check_markers(texts)
        tokens = sum(counts)
        self._limiter.check(model, tokens, cfg)

        matrix = fakes.fake_embeddings(texts, answering, dims)
        chunks: list[bytes] = [b'{"object":"list","data":[']
        for i, row in enumerate(matrix):
            if fmt == "base64":
                value = b'"' + base64.b64encode(row.tobytes()) + b'"'
            else:
                value = json.dumps(row.tolist()).encode()
            sep = b"," if i else b""
            chunks.append(sep + b'{"object":"embedding","index":%d,"embedding":' % i + value + b"}")
        tail = {"model": answering, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        chunks.append(b"]," + json.dumps(tail, separators=(",", ":")).encode()[1:])
        self._bump("embedding_inputs", len(texts))
        self._bump("prompt_tokens", tokens)
        return Response(200, chunks)

    async def _chat(self, req: Request, _arg: str, cfg: EmulatorConfig) -> Response:
        body = _parse_json(req)
        model = _model_of(body)
        if not _serves(cfg, model) or model in fakes.EMBEDDING_MODELS:
            raise _model_not_found(model, "generateContent")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _invalid("messages: must be a non-empty list.")
        answering = _answered_by(cfg, model)
        effort = body.get("reasoning_effort")
        efforts = _efforts_of(answering)
        if effort is not None and effort not in efforts:
            raise _invalid(f"Invalid reasoning_effort: {effort}. Valid values are: {', '.join(efforts)}")
        if answering.startswith(NEWER_FAMILY_PREFIXES):
            for option in DEPRECATED_SAMPLING:
                if body.get(option) is not None:
                    raise _invalid(f"{option} is deprecated for {answering} and is not accepted.")
        schema = None
        json_object = False
        response_format = body.get("response_format")
        if response_format is not None:
            rtype = response_format.get("type") if isinstance(response_format, dict) else None
            if rtype == "json_schema":
                spec = response_format.get("json_schema")
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if not isinstance(schema, dict):
                    raise _invalid("response_format.json_schema.schema: a JSON schema object is required.")
            elif rtype == "json_object":
                json_object = True
            elif rtype != "text":
                raise _invalid(f"response_format.type: unsupported value {rtype!r}.")
        problem = chat.check_request(body)
        if problem is not None:
            raise _invalid(problem)
        if schema is not None and cfg.json_schema == "rejected":
            # Groq's answer, whichever path was asked: an OpenAI-style object, no code.
            self._bump("faults", sub="json_schema:rejected")
            return _openai_error(400, JSON_SCHEMA_REJECTED, None, "response_format")
        if schema is not None and cfg.json_schema == "ignored":
            self._bump("faults", sub="json_schema:ignored")
            schema = None
            body = {k: v for k, v in body.items() if k != "response_format"}
        refused = self._refuse_schemas(req, body)
        if refused is not None:
            return refused

        texts: list[str] = []
        last_user: list[str] = []
        images: list[tuple[bytes, str]] = []
        audios: list[tuple[bytes, str]] = []
        for m_idx, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise _invalid(f"messages[{m_idx}]: must be an object.")
            content = msg.get("content")
            msg_texts: list[str] = []
            if isinstance(content, str):
                msg_texts.append(content)
            elif isinstance(content, list):
                for p_idx, part in enumerate(content):
                    where = f"messages[{m_idx}].content[{p_idx}]"
                    ptype = part.get("type") if isinstance(part, dict) else None
                    if ptype == "text":
                        text = part.get("text")
                        if not isinstance(text, str):
                            raise _invalid(f"{where}.text: must be a string.")
                        msg_texts.append(text)
                    elif ptype == "image_url":
                        images.append(self._image_part(part, where))
                    elif ptype == "input_audio":
                        audios.append(self._audio_part(part, where))
                    else:
                        raise _invalid(f"{where}: unsupported content part type {ptype!r}.")
            elif content is not None:
                raise _invalid(f"messages[{m_idx}].content: must be a string or a list of parts.")
            texts.extend(msg_texts)
            if msg.get("role") == "user":
                last_user = msg_texts
        self._check_markers(texts)

        prompt_text = "\n".join(last_user) if last_user else "\n".join(texts)
        prompt_tokens = sum(fakes.count_tokens(t) for t in texts)
        prompt_tokens += IMAGE_TOKENS * len(images)
        prompt_tokens += sum(_audio_tokens(data, fmt) for data, fmt in audios)
        self._limiter.check(model, prompt_tokens, cfg)

        if images:
            data, mime = images[-1]
            reply = fakes.fake_caption(data, mime, answering, prompt_text)
        elif audios:
            data, fmt = audios[-1]
            reply = fakes.fake_transcript(data, fmt, answering)
        elif schema is not None:
            reply = json.dumps(fakes.fake_json_for_schema(schema, seed=prompt_text, null_rate=cfg.null_rate))
        elif json_object:
            reply = json.dumps({"text": fakes.fake_chat_text(answering, prompt_text)})
        else:
            reply = fakes.fake_chat_text(answering, prompt_text)
        if _marker(texts) == "badjson":
            self._bump("faults", sub="marker:badjson")
            reply = BAD_JSON_REPLY
        thinking = REASONING_EFFORT_TOKENS.get(effort or "", 0)
        seq = next(self._ids)
        chat_id = "chatcmpl-emu-" + hashlib.sha256(f"{seq}\x00{prompt_text}".encode()).hexdigest()[:24]
        answer = chat.completion(
            body,
            model=answering,
            reply=reply,
            prompt_text=prompt_text,
            texts=texts,
            prompt_tokens=prompt_tokens,
            thinking=thinking,
            chat_id=chat_id,
            created=int(time.time()),
            null_rate=cfg.null_rate,
        )
        self._bump("prompt_tokens", prompt_tokens)
        self._bump("completion_tokens", answer["usage"]["completion_tokens"])
        self._bump("thinking_tokens", thinking)
        if body.get("stream"):
            return self._stream_chat(answer, body, texts, cfg)
        return _json_response(answer)

    def _refuse_schemas(self, req: Request, body: dict[str, Any]) -> Response | None:
        """Each provider's JSON-schema rules on its own path (emulator/schema_rules.py), for
        ``response_format`` and function parameters: OpenAI's strict rules under /v1/, Gemini's under
        /v1beta/openai/."""
        openai_path = unquote(req.path).startswith("/v1/")
        response_format = body.get("response_format")
        spec = response_format.get("json_schema") if isinstance(response_format, dict) else None
        tools = body.get("tools") if isinstance(body.get("tools"), list) else []
        if openai_path:
            try:
                if isinstance(spec, dict) and spec.get("strict") is True:
                    what = f"response_format '{spec.get('name', 'response')}'"
                    schema_rules.check_openai_strict(
                        spec.get("schema"), what=what, param="response_format", code="invalid_json_schema"
                    )
                for i, tool in enumerate(tools):
                    fn = tool.get("function") if isinstance(tool, dict) else None
                    if isinstance(fn, dict) and fn.get("strict") is True:
                        schema_rules.check_openai_strict(
                            fn.get("parameters"),
                            what=f"function '{fn.get('name', '')}'",
                            param=f"tools[{i}].function.parameters",
                            code="invalid_function_parameters",
                        )
            except schema_rules.OpenAIError as e:
                self._bump("faults", sub="schema:openai")
                return Response(e.code, e.body())
            return None
        problems = []
        if isinstance(spec, dict):
            problems.append(
                schema_rules.check_gemini(spec.get("schema"), where="generation_config.response_schema", tool=False)
            )
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(fn, dict):
                where = f"tools[0].function_declarations[{i}].parameters"
                problems.append(schema_rules.check_gemini(fn.get("parameters"), where=where, tool=True))
        message = "\n".join(p for p in problems if p)
        if message:
            self._bump("faults", sub="schema:gemini")
            return _invalid(message).response()
        return None

    def _stream_chat(
        self, answer: dict[str, Any], body: dict[str, Any], texts: list[str], cfg: EmulatorConfig
    ) -> Response:
        options = body.get("stream_options")
        events = chat.stream_events(answer, isinstance(options, dict) and bool(options.get("include_usage")))
        rates = {kind: getattr(cfg, f"stream_fault_rate_{kind}") for kind in chat.STREAM_FAULTS}
        fault = chat.pick_stream_fault(rates, texts, self._rng)
        if fault is not None:
            self._bump("faults", sub=f"stream:{fault}")

        def write(writer: asyncio.StreamWriter, keep_alive: bool) -> Awaitable[bool]:
            return chat.write_stream(
                writer,
                events,
                fault=fault,
                keep_alive=keep_alive,
                chunk_delay_s=cfg.stream_chunk_delay_seconds,
                stall_s=cfg.hang_seconds,
            )

        return Response(200, b"", "text/event-stream", stream=write)

    def _image_part(self, part: dict[str, Any], where: str) -> tuple[bytes, str]:
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str) or not url.startswith("data:"):
            raise _invalid(f"{where}.image_url: only inline data: URLs are supported (data:<mime>;base64,...).")
        header, sep, data = url[5:].partition(",")
        mime, _, encoding = header.partition(";")
        if not sep or encoding.lower() != "base64":
            raise _invalid(f"{where}.image_url: malformed data URL; expected data:<mime>;base64,<data>.")
        mime = mime.lower()
        if mime not in IMAGE_MIMES:
            raise _invalid(f"{where}.image_url: unsupported MIME type {mime!r}.")
        return _decode_b64(data, f"{where}.image_url"), mime

    def _audio_part(self, part: dict[str, Any], where: str) -> tuple[bytes, str]:
        spec = part.get("input_audio")
        if not isinstance(spec, dict):
            raise _invalid(f"{where}.input_audio: must be an object with data and format.")
        fmt = str(spec.get("format", "")).lower()
        if fmt not in AUDIO_FORMATS:
            raise _invalid(f"{where}.input_audio.format: unsupported audio format {fmt!r}.")
        return _decode_b64(spec.get("data"), f"{where}.input_audio.data"), fmt

    async def _images(self, req: Request, _arg: str, cfg: EmulatorConfig) -> Response:
        body = _parse_json(req)
        model = _model_of(body)
        openai_path = unquote(req.path).startswith("/v1/")
        if openai_path:
            if not _serves(cfg, model) or model not in OPENAI_IMAGE_MODELS:
                return _openai_error(
                    404, f"The model `{model}` does not exist or you do not have access to it.", "model_not_found"
                )
            max_n, sizes = OPENAI_IMAGE_MODELS[model]
            if body.get("size") is not None and body["size"] not in sizes:
                return _openai_error(
                    400,
                    f"Invalid value: '{body['size']}'. Supported values are: {', '.join(repr(s) for s in sizes)}.",
                    "invalid_value",
                    "size",
                )
        else:
            if not _serves(cfg, model) or model not in GEMINI_IMAGE_MODELS:
                raise _model_not_found(model, "predict")
            max_n = GEMINI_IMAGE_MODELS[model]
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise _invalid("prompt: a non-empty string is required.")
        n = body.get("n") or 1
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_n:
            message = f"n: must be an integer between 1 and {max_n} for {model}, got {n!r}."
            if openai_path:
                return _openai_error(400, message, "invalid_value", "n")
            raise _invalid(message)
        size = body.get("size") or "1024x1024"
        if size == "auto":
            size = "1024x1024"
        try:
            w_s, h_s = str(size).lower().split("x")
            width, height = int(w_s), int(h_s)
        except ValueError:
            raise _invalid(f"size: expected WIDTHxHEIGHT, got {size!r}.") from None
        if not (1 <= width <= 4096 and 1 <= height <= 4096):
            raise _invalid(f"size: {size!r} is out of range.")
        served_url = "response_format" not in body and cfg.default_image_response == "url"
        response_format = body.get("response_format") or cfg.default_image_response
        if response_format not in ("b64_json", "url"):
            raise _invalid(f"response_format: must be 'b64_json' or 'url', got {response_format!r}.")
        self._check_markers([prompt])
        self._limiter.check(model, fakes.count_tokens(prompt), cfg)

        loop = asyncio.get_running_loop()
        data = []
        for k in range(n):
            seed = prompt if k == 0 else f"{prompt}#{k}"
            # zlib releases the GIL, so big images don't stall other connections.
            image = await loop.run_in_executor(None, fakes.fake_image, seed, width, height, cfg.image_format)
            b64 = base64.b64encode(image).decode()
            item = {"revised_prompt": f"[emulator] {prompt}"}
            if served_url:
                name = f"{next(self._ids)}-{hashlib.sha256(image).hexdigest()[:16]}.{cfg.image_format}"
                self._images_served[name] = (image, IMAGE_FORMATS[cfg.image_format])
                item["url"] = f"http://{self.host}:{self.port}{SERVED_IMAGES_PATH}{name}"
            elif response_format == "url":
                item["url"] = f"data:{IMAGE_FORMATS[cfg.image_format]};base64,{b64}"
            else:
                item["b64_json"] = b64
            data.append(item)
        self._bump("images", n)
        self._bump("prompt_tokens", fakes.count_tokens(prompt))
        return _json_response({"created": int(time.time()), "data": data})

    async def _transcriptions(self, req: Request, _arg: str, cfg: EmulatorConfig) -> Response:
        fields = _multipart(req)
        model_field = fields.get("model")
        if model_field is None:
            raise _invalid("model is required.")
        model = model_field[0].decode("utf-8", "replace").strip().removeprefix("models/")
        if not _serves(cfg, model) or model in fakes.EMBEDDING_MODELS:
            raise _model_not_found(model, "generateContent")
        file_field = fields.get("file")
        if file_field is None or not file_field[0]:
            raise _invalid("file is required.")
        audio, filename, part_type = file_field
        fmt = ""
        if filename and "." in filename:
            fmt = filename.rsplit(".", 1)[1].lower()
        elif part_type and "/" in part_type:
            fmt = part_type.split("/", 1)[1].lower().removeprefix("x-")
        fmt = {"wave": "wav", "mpeg": "mp3", "mpga": "mp3"}.get(fmt, fmt) or "wav"
        prompt = fields["prompt"][0].decode("utf-8", "replace") if "prompt" in fields else ""
        self._check_markers([prompt] if prompt else [])
        tokens = _audio_tokens(audio, fmt) + (fakes.count_tokens(prompt) if prompt else 0)
        self._limiter.check(model, tokens, cfg)
        text = fakes.fake_transcript(audio, fmt, _answered_by(cfg, model))
        self._bump("prompt_tokens", tokens)
        rf = fields["response_format"][0].decode().strip() if "response_format" in fields else "json"
        if rf == "text":
            return Response(200, text.encode(), "text/plain; charset=utf-8")
        return _json_response({"text": text})

    async def _models(self, _req: Request, arg: str, cfg: EmulatorConfig) -> Response:
        if not arg:
            data = [
                {"id": f"{cfg.model_id_prefix}{m}", "object": "model", "created": 0, "owned_by": "gembatch-emulator"}
                for m in cfg.models
                if m not in cfg.retired
            ]
            return _json_response({"object": "list", "data": data})
        if not _serves(cfg, arg.removeprefix("models/")):
            raise ApiError(404, "NOT_FOUND", f"Model {arg} is not found for API version v1beta.")
        return _json_response({"id": arg, "object": "model", "created": 0, "owned_by": "gembatch-emulator"})


def serve(port: int, config: EmulatorConfig | None = None, *, host: str = "127.0.0.1") -> None:
    """Run an emulator in the foreground until interrupted."""
    emu = Emulator(config, host=host, port=port).start()
    print(f"gembatch emulator listening on {emu.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
