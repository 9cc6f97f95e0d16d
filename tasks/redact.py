"""Secrets in URLs, hidden wherever a URL is printed, logged or written.

A gateway's base URL may carry credentials (``https://user:pass@gateway/v1/``, ``…/openai/?key=…``)
and so may a media cell (a presigned ``…?X-Amz-Signature=…`` link). :func:`redact_url` keeps what
tells a reader where the URL points (scheme, host, port, path, the names of the query parameters)
and replaces the user name, the password and the values of parameters that carry keys with ``***``.
:func:`redact_text` does the same for every URL in a free text (an error message, a log line), and
:func:`redact_data` for every string in a JSON-like document (the run metadata).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

__all__ = ["MASK", "SECRET_PARAMS", "is_secret_param", "redact_data", "redact_text", "redact_url"]

MASK = "***"
# Query parameters whose value is a credential (compared without case, "-" read as "_").
SECRET_PARAMS = frozenset(
    {
        "key", "api_key", "apikey", "token", "access_token", "auth", "auth_token", "id_token", "refresh_token",
        "secret", "client_secret", "password", "pass", "pwd", "sig", "signature", "credential", "session_token",
        "x_amz_signature", "x_amz_credential", "x_amz_security_token", "x_goog_signature", "x_goog_credential",
        "code",
    }
)  # fmt: skip
# A URL in free text: a scheme, "://", then anything up to a space, a quote or a closing bracket.
_URL_IN_TEXT = re.compile(r"""[A-Za-z][A-Za-z0-9+.\-]*://[^\s'"<>`]+""")
# user:pass@ left behind where a URL could not be parsed (a broken one in a message)
_USERINFO = re.compile(r"(?<=://)[^/@\s'\"]+@")


def is_secret_param(name: str) -> bool:
    return name.lower().replace("-", "_") in SECRET_PARAMS


def redact_url(url: str) -> str:
    """``url`` with its userinfo and the values of key-carrying query parameters replaced by ``***``."""
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        hostname, port = parts.hostname, parts.port
    except ValueError:  # a malformed port or host: hide what could be userinfo
        return _USERINFO.sub(MASK + "@", url)
    netloc, query = parts.netloc, parts.query
    secret_query = bool(query) and any(is_secret_param(k) for k, _ in parse_qsl(query, keep_blank_values=True))
    if "@" not in netloc and not secret_query:
        return url  # nothing to hide: the URL exactly as given
    if "@" in netloc:
        host = hostname or ""
        if ":" in host:  # IPv6
            host = f"[{host}]"
        netloc = f"{MASK}@{host}" + (f":{port}" if port is not None else "")
    if secret_query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{k}={MASK}" if is_secret_param(k) else (f"{k}={v}" if v else k) for k, v in pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with every URL in it passed through :func:`redact_url`."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: _redact_match(m.group(0)), text)


def _redact_match(found: str) -> str:
    # Punctuation that ends a sentence is not part of the URL.
    stripped = found.rstrip(".,;:)]}")
    return redact_url(stripped) + found[len(stripped) :]


def redact_data(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, tuples, strings) with every string redacted."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_data(v) for v in value]
    return value
