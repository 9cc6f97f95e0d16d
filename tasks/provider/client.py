"""One AsyncOpenAI client per run: the provider it talks to, its key, base URL and timeouts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

import httpx2
import openai
from openai import AsyncOpenAI

from tasks.defaults import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_TIMEOUT_S
from tasks.engine.send.limits import MAX_IN_FLIGHT
from tasks.errors import ConfigError
from tasks.provider.failures import classify_failure
from tasks.redact import redact_text, redact_url

__all__ = [
    "PROVIDERS",
    "ProviderSettings",
    "Connection",
    "open_connection",
    "require_key",
]

DEFAULT_CONNECT_TIMEOUT_S = 10.0
LOCAL_KEY_ENV = "GEMBATCH_LOCAL_KEY"


@dataclass(frozen=True, kw_only=True)
class ProviderSpec:
    base_url: str | None
    api_key_env: str | None


PROVIDERS: dict[str, ProviderSpec] = {
    "gemini": ProviderSpec(
        base_url="https://generativelanguage.googleapis.com/v1beta/openai/", api_key_env="GEMINI_API_KEY"
    ),
    "openai": ProviderSpec(base_url="https://api.openai.com/v1/", api_key_env="OPENAI_API_KEY"),
    # The built-in emulator: started in-process on a free loopback port with a one-off key.
    "local": ProviderSpec(base_url=None, api_key_env=None),
}


@dataclass(frozen=True, kw_only=True)
class ProviderSettings:
    """Where requests go and which environment variable holds the key (never the key itself)."""

    provider: str = "gemini"
    base_url: str | None = None
    api_key_env: str | None = None
    api_key_secret: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    # Chat replies as streams (tasks/jobs/chat.py): a gap longer than idle_timeout_s between two
    # chunks fails the attempt.
    stream: bool = False
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    # A key handed in by the caller rather than read from the environment: the one the command line
    # gives the emulator it starts for --provider local (flows/local.py). Never shown nor recorded.
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.idle_timeout_s <= 0:
            raise ConfigError(f"--idle-timeout must be positive, got {self.idle_timeout_s}")
        if self.provider not in PROVIDERS:
            raise ConfigError(
                f"unknown provider {self.provider!r}: use one of {', '.join(PROVIDERS)}, "
                "or --base-url URL --api-key-env NAME for another OpenAI-compatible server"
            )

    @property
    def key_source(self) -> str:
        """Where the key comes from, for messages (never the key)."""
        if self.api_key_secret:
            return f"the Prefect Secret block {self.api_key_secret!r}"
        return self.key_env or "the environment"

    @property
    def key_env(self) -> str | None:
        if self.api_key_env:
            return self.api_key_env
        if self.base_url and self.provider == "local":
            return None
        return PROVIDERS[self.provider].api_key_env


@dataclass
class Connection:
    """An open client plus what the run metadata may say about it (host, never the key)."""

    client: AsyncOpenAI
    base_url: str
    provider: str
    api_key: str = field(repr=False)
    stream: bool = False
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S

    @property
    def host(self) -> str:
        """host[:port], never the URL's ``user:pass@`` (it names shared limits and shows in summaries)."""
        return urlsplit(self.base_url).netloc.rsplit("@", 1)[-1]

    @property
    def shown_url(self) -> str:
        """The base URL as messages, logs and metadata show it: credentials in it redacted."""
        return redact_url(self.base_url)

    def redact(self, text: str) -> str:
        """Belt and braces: no message we store or print may carry the key, nor a URL's credentials."""
        text = text.replace(self.api_key, "***") if self.api_key else text
        return redact_text(text)

    async def close(self) -> None:
        await self.client.close()


def _allow_sockets(needed: int) -> None:
    """Raise the soft open-files limit when it is below what the in-flight ceiling may use."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def require_key(settings: ProviderSettings) -> str:
    """The key from its environment variable; a clear error naming the variable if it is missing."""
    if settings.api_key:
        return settings.api_key
    env = settings.key_env
    if settings.provider == "local" and not settings.base_url:
        return ""
    if settings.api_key_secret:
        return _secret_key(settings.api_key_secret)
    if not env:
        return "none"
    api_key = os.environ.get(env, "")
    if not api_key.strip():
        raise ConfigError(
            f"{env} is not set: export {env}=<your {settings.provider} API key> "
            f"(or pick another variable with --api-key-env NAME). "
            "To try gembatch without a key, use --provider local (the built-in emulator)."
        )
    return api_key


def _secret_key(name: str) -> str:
    return secret_text(name, what="key", instead="--api-key-env")


def secret_base_url(name: str) -> str:
    """The base URL kept in the Prefect Secret block ``name`` (--base-url-secret); checked to be a URL."""
    url = secret_text(name, what="base URL", instead="--base-url")
    if urlsplit(url.strip()).scheme not in ("http", "https"):
        raise ConfigError(f"the Prefect Secret block {name!r} holds no http(s) URL: save the gateway's base URL in it")
    return url.strip()


def secret_text(name: str, *, what: str, instead: str) -> str:
    """The text kept in the Prefect Secret block ``name``; a clear error when it is missing or empty."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name, _sync=True).get()
    except Exception as exc:  # noqa: BLE001 - a missing block, no Prefect API: one message either way
        raise ConfigError(
            f"no Prefect Secret block named {name!r} ({redact_text(str(exc))}): create it in the Prefect UI or with "
            f"`Secret(value=...).save({name!r})`, or use {instead}"
        ) from None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"the Prefect Secret block {name!r} holds no {what} (an empty or non-text value)")
    return value


def _split_query(base_url: str) -> tuple[str, dict[str, str]]:
    """A gateway URL's query (``…/openai/?key=…``) goes with every request as parameters: the SDK
    appends routes to the base URL's path, which a query left in it would swallow."""
    parts = urlsplit(base_url)
    if not parts.query:
        return base_url, {}
    return parts._replace(query="", fragment="").geturl(), dict(parse_qsl(parts.query, keep_blank_values=True))


def open_connection(settings: ProviderSettings) -> Connection:
    """Resolve the key and the base URL and build the client. Fails before any work on a missing key."""
    if settings.provider == "local" and not settings.base_url:
        raise ConfigError(
            "--provider local needs the emulator's address: the command line starts it (flows/local.py), "
            "or pass --base-url URL --api-key-env NAME"
        )
    base_url = settings.base_url or PROVIDERS[settings.provider].base_url
    api_key = require_key(settings)
    timeout = httpx2.Timeout(settings.timeout_s, connect=DEFAULT_CONNECT_TIMEOUT_S)
    base_url, query = _split_query(base_url)
    client = AsyncOpenAI(
        base_url=base_url,
        api_key=api_key,
        default_query=query or None,
        # The SDK's own retries ignore Gemini's retryDelay; the engine retries instead.
        max_retries=0,
        timeout=timeout,
        # One kept-alive connection per request the limiter lets fly (the SDK keeps only 100 alive,
        # so a run at high rate × latency would reconnect for most requests).
        http_client=openai.DefaultAsyncHttpxClient(
            timeout=timeout,
            limits=httpx2.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT),
        ),
    )
    _allow_sockets(MAX_IN_FLIGHT + 256)
    return Connection(
        client=client,
        base_url=base_url,
        provider=settings.provider,
        api_key=api_key,
        stream=settings.stream,
        idle_timeout_s=settings.idle_timeout_s,
    )


async def list_models(settings: ProviderSettings) -> list[str]:
    """Model ids the provider serves, sorted (`gembatch models`)."""
    conn = open_connection(settings)
    try:
        return sorted([model.id async for model in conn.client.models.list()])  # every page
    except Exception as exc:  # noqa: BLE001 - every failure here becomes a ConfigError
        failure = classify_failure(exc)
        raise ConfigError(f"listing models at {conn.host} failed: {conn.redact(failure.message)}") from None
    finally:
        await conn.close()
