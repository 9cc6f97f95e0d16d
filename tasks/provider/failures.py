"""What a failed call to the provider means: its kind, whether to retry, and what the user can do about it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import httpx2
import openai

from tasks.errors import RunStopped


@dataclass(frozen=True)
class Failure:
    """What a failed call means for the engine.

    kind: ``rate_limited`` | ``daily_quota`` | ``transient`` | ``invalid_request`` | ``auth`` |
    ``not_found`` | ``permission`` | ``schema_refused`` (a 400 refusing the request's JSON schema) |
    ``json_schema_unsupported`` (a 400 saying the server or model has no ``response_format`` json_schema) |
    ``param_refused`` (a 400 refusing a parameter the run sends with every request, named in ``param``).
    """

    kind: str
    message: str
    status: int | None = None
    retry_after_s: float | None = None
    param: str | None = None

    @property
    def retryable(self) -> bool:
        return self.kind in ("rate_limited", "transient")

    @property
    def fatal(self) -> bool:
        """Fatal for the whole run: every other request would fail the same way."""
        return self.kind in (
            "auth", "not_found", "permission", "daily_quota", "schema_refused", "json_schema_unsupported",
            "param_refused",
        )  # fmt: skip

    def stop(self) -> RunStopped:
        status = {
            "daily_quota": "stopped: daily quota",
            "schema_refused": "failed: schema refused",
            "json_schema_unsupported": "failed: json_schema unsupported",
            "param_refused": "failed: parameter refused",
        }.get(self.kind, f"failed: {self.kind}")
        hint = {
            "daily_quota": "The provider's per-day quota is used up; rerun after it resets "
            "(midnight Pacific for Gemini): finished rows are kept and skipped.",
            "auth": "The key was rejected; check it and rerun.",
            "not_found": "The model or route was not found; check --model and --base-url.",
            "permission": "The key may not use this model; check the project's permissions.",
            "schema_refused": "The provider refused the JSON schema sent for every row, so nothing more was "
            "sent. Pick the schema dialect this server accepts with --schema-dialect openai|gemini|plain, or "
            "change the field it names.",
            "json_schema_unsupported": "This server or model does not take response_format json_schema, so "
            "nothing more was sent: rerun the same command with --via tools (the schema goes as a function "
            "with a forced tool_choice and gives the same typed columns); rows already done are kept.",
            "param_refused": param_hint(self.param or ""),
        }.get(self.kind, "")
        message = self.message.strip().rstrip(".")
        return RunStopped(status, f"{message}. {hint}" if hint else message)


_DELAY = re.compile(r"^\s*([0-9.]+)\s*s\s*$")
_RETRY_IN = re.compile(r"retry in ([0-9.]+)\s*s", re.IGNORECASE)


def classify_failure(exc: BaseException) -> Failure:
    """Map an exception from the SDK (or its transport) to what the engine should do."""
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        error = _error_object(exc.body)
        # "detail": FastAPI-style servers (a proxy, a route the server doesn't have).
        text = str(error.get("message") or error.get("detail") or _short(exc.body) or exc.message)
        text = _one_paragraph(text)
        message = f"HTTP {status}: {text}"
        sent = _sent_body(exc)
        retry_after = _retry_after(exc.response.headers, error)
        if status == 429:
            if _is_daily_quota(error):
                return Failure("daily_quota", message, status, retry_after)
            return Failure("rate_limited", message, status, retry_after)
        if (status >= 500 and status != 501) or status in (408, 409):
            return Failure("transient", message, status, retry_after)
        if status == 401 or "API_KEY_INVALID" in json.dumps(exc.body, default=str):
            return Failure("auth", message, status)
        if status == 403:
            return Failure("permission", message, status)
        if status == 400 and _is_schema_refusal(error, text):
            return Failure("schema_refused", _with_field_path(message), status)
        if status == 400 and _sent_json_schema(sent) and _is_json_schema_unsupported(error, text):
            return Failure("json_schema_unsupported", message, status)
        param = _refused_param(error, text, sent) if status in (400, 422) else None
        if param is not None:
            where = _route_of(exc)
            return Failure("param_refused", f"{where}HTTP {status}: {text}", status, param=param)
        if status in (404, 405, 501):
            # No such model, or a route this server (or the gateway before it) doesn't have.
            return Failure("not_found", message, status)
        return Failure("invalid_request", message, status)
    if isinstance(exc, openai.APITimeoutError):
        return Failure("transient", "the request timed out")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        return Failure("transient", f"connection failed: {cause or exc}")
    if isinstance(exc, openai.APIResponseValidationError):
        return Failure("transient", f"the reply did not have the expected shape: {exc}")
    if isinstance(exc, json.JSONDecodeError):
        return Failure("transient", f"the reply was not JSON ({exc.msg} at char {exc.pos})")
    if isinstance(exc, (httpx2.TransportError, httpx2.StreamError)):
        return Failure("transient", f"the connection broke: {type(exc).__name__}: {exc}")
    raise exc


def _one_paragraph(text: str, limit: int = 600) -> str:
    """A server's message as one line: a gateway's second paragraph ("LiteLLM: model group … failed")
    and an HTML page's markup add nothing a user can act on."""
    if "<" in text and ">" in text and re.search(r"<(html|body|head|title|h1|center)\b", text, re.IGNORECASE):
        title = re.search(r"<title[^>]*>(.*?)</title>|<h1[^>]*>(.*?)</h1>", text, re.IGNORECASE | re.DOTALL)
        inner = next((g for g in title.groups() if g), "") if title else ""
        text = f"an HTML page ({inner.strip() or 'no title'})"
    text = text.strip().split("\n\n", 1)[0]
    text = " ".join(text.split()).rstrip(".")
    return text if len(text) <= limit else text[:limit] + "…"


def _sent_body(exc: openai.APIStatusError) -> dict[str, Any] | None:
    """The JSON body of the request that failed (None: unknown, or not JSON, e.g. multipart)."""
    try:
        content = exc.response.request.content
    except Exception:  # noqa: BLE001 - no request, or a streamed body not read
        return None
    if not content:
        return None
    try:
        body = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def _route_of(exc: openai.APIStatusError) -> str:
    """``POST host/v1/embeddings answered `` for messages (no query string: it may hold a key)."""
    try:
        request = exc.response.request
    except Exception:  # noqa: BLE001 - an error built without a request
        return ""
    return f"{request.method} {request.url.host}:{request.url.port or ''}{request.url.path} answered ".replace(
        ":/", "/"
    )


def _sent_json_schema(sent: dict[str, Any] | None) -> bool:
    """Whether the request carried response_format json_schema (True when the body is unknown)."""
    if sent is None:
        return True
    response_format = sent.get("response_format")
    return isinstance(response_format, dict) and response_format.get("type") == "json_schema"


# The request's own content: a refusal naming these is about the row (or the model), not a parameter
# the run could leave out.
_CONTENT_KEYS = frozenset({"model", "messages", "input", "prompt", "file", "custom_id"})
# How servers and gateways say they won't take a parameter: LiteLLM ("litellm.UnsupportedParamsError:
# Setting dimensions is not supported …"), OpenAI ("Unrecognized request argument supplied: x",
# "Unknown parameter: 'x'", "Unsupported parameter: 'x' is not supported with this model"), pydantic
# servers such as vLLM ("Extra inputs are not permitted"), Gemini ("Invalid reasoning_effort: minimal").
_REFUSAL_WORDS = re.compile(
    r"UnsupportedParams|not supported|unsupported|does not support|doesn't support|unrecognized|unknown (?:param|"
    r"field|argument|name)|unexpected (?:keyword|param|field)|extra inputs are not permitted|extra_forbidden|not "
    r"permitted|not allowed|is not a valid|invalid (?:value for )?|deprecated|no longer (?:supported|available)",
    re.IGNORECASE,
)


def _refused_param(error: dict[str, Any], text: str, sent: dict[str, Any] | None) -> str | None:
    """The parameter of the request that a 400 refuses, when it names one the request carried."""
    if not sent or not _REFUSAL_WORDS.search(text):
        return None
    candidates = [key for key in sent if key not in _CONTENT_KEYS]
    named = str(error.get("param") or "").split(".", 1)[0].strip("'\"` ")
    if named in candidates:
        return named
    for key in sorted(candidates, key=len, reverse=True):
        # Short names (n) only when quoted, so that a word like "n't" never counts.
        quoted = rf"[`'\"]{re.escape(key)}[`'\"]"
        pattern = quoted if len(key) <= 2 else rf"{quoted}|(?<![\w.]){re.escape(key)}(?![\w])"
        if re.search(pattern, text):
            return key
    return None


# What each parameter gembatch may send is, and what leaving it out changes: the ways out of a refusal.
_PARAM_WAYS_OUT: dict[str, str] = {
    "dimensions": "rerun without --dimensions (the vectors then come at the model's full size, e.g. 3072 for "
    "gemini-embedding-001, and are not shortened)",
    "reasoning_effort": "rerun without --reasoning-effort (the model then thinks as much as it does by default), "
    "or with a value this model takes",
    "temperature": "rerun without --temperature (the model's own default is used)",
    "top_p": "rerun without the option that sets top_p",
    "top_k": "rerun without the option that sets top_k",
    "seed": "rerun without the option that sets seed",
    "max_tokens": "rerun without --max-tokens (answers are then as long as the model makes them)",
    "max_completion_tokens": "rerun without --max-tokens (answers are then as long as the model makes them)",
    "n": "rerun with --n 1 (one answer or image per row)",
    "size": "rerun with another --size, or the size this model takes",
    "quality": "rerun without --quality (the model's default quality is used, and priced)",
    "response_format": "for extract, rerun with --via tools (the schema goes as a function instead)",
    "tools": "for extract, rerun with --via json_schema (the default)",
    "tool_choice": "for extract, rerun with --via json_schema (the default)",
    "stream": "rerun without --stream",
    "stream_options": "rerun without --stream",
}


def param_hint(param: str) -> str:
    """What to do about a refused parameter: the option to drop, what that changes, and the gateway way."""
    own = _PARAM_WAYS_OUT.get(param)
    ways = [own] if own else [f"gembatch adds {param!r} itself: let the server or gateway accept or drop it"]
    ways.append(
        "or, behind a LiteLLM proxy, set `litellm_settings: drop_params: true` in its config.yaml (it then drops "
        f"{param} without a word, with the same effect as leaving it out)"
    )
    return (
        f"The server refused the parameter {param!r} that every request of this run carries, so nothing more was "
        f"sent and no row was marked failed. Ways out: {'; '.join(ways)}. Rows already done are kept."
    )


def _error_object(body: object) -> dict[str, Any]:
    # Gemini answers errors with a JSON array: [{"error": {...}}]; OpenAI with {"error": {...}}; vLLM
    # (before 0.9), Kong and Portkey's own checks with the fields at the top ({"message": ...}).
    if isinstance(body, list) and body and isinstance(body[0], dict):
        body = body[0]
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return _upstream_error(inner) or _listed_errors(inner) or inner
        if isinstance(inner, list):  # Cloudflare's API envelope names its list "errors"; some say "error"
            return _listed_errors({"errors": inner}) or {}
    return {}


def _upstream_error(error: dict[str, Any]) -> dict[str, Any] | None:
    """The provider's own error that a gateway wraps in its metadata: OpenRouter answers "Provider
    returned error" with the upstream body in ``metadata.raw`` (JSON text) and its name in
    ``metadata.provider_name``. Its message and ``param`` say what was refused."""
    metadata = error.get("metadata")
    raw = metadata.get("raw") if isinstance(metadata, dict) else None
    if isinstance(raw, dict) and isinstance(raw.get("data"), str):  # {"__kind": "OK", "data": "…"}
        raw = raw["data"]
    if not isinstance(raw, str) or not raw.strip():
        return None
    try:
        parsed = _error_object(json.loads(raw))
    except ValueError:
        parsed = {"message": raw}
    message = parsed.get("message") or parsed.get("detail")
    if not message:
        return None
    provider = metadata.get("provider_name")
    outer = str(error.get("message") or "the gateway's upstream answered")
    return parsed | {"message": f"{outer} ({provider}): {message}" if provider else f"{outer}: {message}"}


def _listed_errors(error: dict[str, Any]) -> dict[str, Any] | None:
    """Cloudflare's API envelope: ``{"success": false, "errors": [{"code": 2009, "message": "…"}]}``."""
    listed = error.get("errors")
    if error.get("message") or not isinstance(listed, list):
        return None
    found = [e for e in listed if isinstance(e, dict) and e.get("message")]
    if not found:
        return None
    message = "; ".join(f"{e['message']} (code {e['code']})" if e.get("code") else str(e["message"]) for e in found)
    return {"message": message, "code": found[0].get("code")}


# A 400 that refuses the request's JSON schema (response_format or function parameters), in the
# words OpenAI and Gemini use; every request of the run carries the same schema.
_SCHEMA_CODES = ("invalid_json_schema", "invalid_function_parameters")
_SCHEMA_WORDS = re.compile(
    r"invalid schema for|response_schema|response_json_schema|function_declarations\[|schema\.ref\b|"
    r"\$ref\b.*alongside|too many states",
    re.IGNORECASE,
)
_CONTEXT = re.compile(r"In context=\(([^)]*)\)")


def _is_schema_refusal(error: dict[str, Any], text: str) -> bool:
    return str(error.get("code") or "") in _SCHEMA_CODES or bool(_SCHEMA_WORDS.search(text))


# A 400 saying response_format json_schema itself is not available (no structured outputs on this
# server or model), in the words servers use: Groq ("This model does not support response format
# `json_schema`", or earlier "'response_format.type' : value is not one of the allowed values
# ['text','json_object']"), xAI ("The response_format parameter is unsupported at the moment"). Not a
# refusal of one schema (that is schema_refused): every request of the run would fail the same way.
_FORMAT_WORDS = re.compile(r"response[_ ]format|json_schema", re.IGNORECASE)
_UNSUPPORTED_WORDS = re.compile(
    r"does not support|doesn't support|not supported|unsupported|not one of the allowed values", re.IGNORECASE
)


def _is_json_schema_unsupported(error: dict[str, Any], text: str) -> bool:
    said = f"{error.get('param') or ''} {text}"
    return bool(_FORMAT_WORDS.search(said) and _UNSUPPORTED_WORDS.search(text))


def _with_field_path(message: str) -> str:
    """OpenAI names the schema node as a key path (``context=('properties', 'items', 'items')``): add
    the field path it means (``items[]``)."""
    match = _CONTEXT.search(message)
    if match is None:
        return message
    keys = [k.strip().strip("'\"") for k in match.group(1).split(",") if k.strip()]
    path, i = "", 0
    while i < len(keys):
        key = keys[i]
        if key in ("properties", "$defs", "definitions") and i + 1 < len(keys):
            path += ("." if key == "properties" else "#") + keys[i + 1] if path or key == "properties" else keys[i + 1]
            i += 2
            continue
        if key == "items":
            path += "[]"
        i += 1
    path = path.lstrip(".") or "(the root object)"
    return f"{message} [field: {path}]"


def _is_daily_quota(error: dict[str, Any]) -> bool:
    for detail in error.get("details") or []:
        for violation in detail.get("violations") or [] if isinstance(detail, dict) else []:
            if "PerDay" in str(violation.get("quotaId", "")):
                return True
    return False


def _retry_after(headers: httpx2.Headers, error: dict[str, Any]) -> float | None:
    for header, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(header)
        if value:
            try:
                return float(value) / divisor
            except ValueError:
                pass
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("RetryInfo"):
            match = _DELAY.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    match = _RETRY_IN.search(str(error.get("message", "")))
    return float(match.group(1)) if match else None


def _short(body: object, limit: int = 300) -> str:
    text = body if isinstance(body, str) else json.dumps(body, default=str) if body is not None else ""
    return text[:limit]
