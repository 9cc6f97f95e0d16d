"""The errors the emulator answers: Gemini's shape (a JSON array) and OpenAI's (an object)."""

from __future__ import annotations

import json
import math
from typing import Any

from emulator.wire import Response

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


class TransportFault(Exception):
    """A marker asking for a broken answer (hang, truncated body, dropped connection, garbage)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def invalid(message: str) -> ApiError:
    return ApiError(400, "INVALID_ARGUMENT", message)


def bad_key() -> ApiError:
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


def model_not_found(model: str, method: str) -> ApiError:
    return ApiError(
        404,
        "NOT_FOUND",
        f"models/{model} is not found for API version v1beta, or is not supported for {method}. "
        "Call ListModels to see the list of available models and their supported methods.",
    )


def internal() -> ApiError:
    return ApiError(
        500,
        "INTERNAL",
        "An internal error has occurred. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting",
    )


def overloaded() -> ApiError:
    return ApiError(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")


def deadline() -> ApiError:
    return ApiError(504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete.")


def openai_rate_limited(seconds: float) -> Response:
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


def openai_error(status: int, message: str, code: str | None, param: str | None = None) -> Response:
    """OpenAI's error shape: an {"error": {...}} object."""
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return Response(status, json.dumps(body).encode())


def json_response(obj: Any) -> Response:
    return Response(200, json.dumps(obj, separators=(",", ":")).encode())


# ---------------------------------------------------------------------------------------------
# rate limits


def rate_limited(kind: str, limit: int, model: str, delay: float) -> ApiError:
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
