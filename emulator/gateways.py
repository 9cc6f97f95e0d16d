"""What gateways and OpenAI-compatible servers answer, word for word, when they refuse a parameter, miss
a route, reject a key or limit the rate: canned answers for ``EmulatorConfig.route_answers``.

Each body is the one the named product documents or was seen to send (the source is beside it;
docs/how-to/gateways.md lists them with what gembatch does about each). gembatch reads them all the
same way: the status says what kind of failure it is, the message says which parameter was refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from emulator.config import CannedAnswer

__all__ = ["GATEWAY_ANSWERS", "GatewayAnswer", "gateway_answer"]


@dataclass(frozen=True)
class GatewayAnswer:
    status: int
    body: dict
    source: str

    def canned(self, *, after: int = 0, times: int | None = None) -> CannedAnswer:
        return CannedAnswer(status=self.status, body="raw", message=json.dumps(self.body), after=after, times=times)


_OPENAI_DIMENSIONS = "This model does not support specifying dimensions."

GATEWAY_ANSWERS: dict[str, GatewayAnswer] = {
    # OpenRouter: {"error": {"code", "message", "metadata"}}; an upstream refusal comes as "Provider returned
    # error" with the provider's own body in metadata.raw (JSON text).
    "openrouter/param_refused": GatewayAnswer(
        400,
        {
            "error": {
                "message": "Provider returned error",
                "code": 400,
                "metadata": {
                    "raw": json.dumps(
                        {
                            "error": {
                                "message": _OPENAI_DIMENSIONS,
                                "type": "invalid_request_error",
                                "param": None,
                                "code": None,
                            }
                        }  # fmt: skip
                    ),
                    "provider_name": "OpenAI",
                    "is_byok": False,
                },
            }
        },
        "https://openrouter.ai/docs/api/reference/errors-and-debugging; metadata.raw: "
        "https://github.com/diegosouzapw/OmniRoute/issues/3044",
    ),
    "openrouter/auth": GatewayAnswer(
        401,
        {"error": {"message": "No auth credentials found", "code": 401}},
        "https://openrouter.ai/docs/api/reference/errors-and-debugging (401: invalid credentials)",
    ),
    "openrouter/rate_limited": GatewayAnswer(
        429,
        {"error": {"message": "Rate limit exceeded", "code": 429}},
        "https://openrouter.ai/docs/api/reference/errors-and-debugging (429: you are being rate limited)",
    ),
    # vLLM's OpenAI server (before 0.9: the fields at the top; later {"error": {...}} with the same fields).
    "vllm/param_refused": GatewayAnswer(
        400,
        {
            "object": "error",
            "message": 'Model "BAAI/bge-m3" does not support matryoshka representation, changing output dimensions '
            "will lead to poor results.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
        "vLLM docs, pooling models, Matryoshka embeddings (vllm-project/vllm docs/models/pooling_models.md)",
    ),
    "vllm/route_missing": GatewayAnswer(
        404,
        {"detail": "Not Found"},
        "vLLM serves no /v1/files nor /v1/batches: FastAPI's own 404 (vllm/entrypoints/openai/api_server.py)",
    ),
    # Portkey: a provider's error passed on as {"error": {message: "<provider> error: …"}, "provider": …};
    # its own checks as {"status": "failure", "message": …}.
    "portkey/param_refused": GatewayAnswer(
        400,
        {
            "error": {
                "message": f"openai error: {_OPENAI_DIMENSIONS}",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            },  # fmt: skip
            "provider": "openai",
        },
        "Portkey-AI/gateway src/providers/utils.ts (generateErrorResponse)",
    ),
    "portkey/bad_request": GatewayAnswer(
        400,
        {"status": "failure", "message": "Either x-portkey-config or x-portkey-provider header is required"},
        "Portkey-AI/gateway src/middlewares/requestValidator/index.ts",
    ),
    # Kong Gateway (ai-proxy passes the provider's own errors on): its own answers are {"message": …}.
    "kong/route_missing": GatewayAnswer(
        404,
        {"message": "no Route matched with those values"},
        "Kong Gateway's router (the answer for a path no Route matches)",
    ),
    "kong/auth": GatewayAnswer(
        401,
        {"message": "No API key found in request"},
        "Kong key-auth plugin",
    ),
    "kong/rate_limited": GatewayAnswer(
        429,
        {"message": "API rate limit exceeded"},
        "Kong/kong kong/plugins/rate-limiting/handler.lua",
    ),
    # Cloudflare AI Gateway: Cloudflare's API envelope; code 2009 for credentials the provider rejects.
    "cloudflare/auth": GatewayAnswer(
        401,
        {"success": False, "result": None, "messages": [], "errors": [{"code": 2009, "message": "Unauthorized"}]},
        "https://developers.cloudflare.com/changelog/post/2026-10-05-provider-credential-errors/ (HTTP 401, code "
        "2009); the envelope of Cloudflare's v4 API",
    ),
}


def gateway_answer(name: str, *, after: int = 0, times: int | None = None) -> CannedAnswer:
    """The canned answer ``name`` (``"<gateway>/<situation>"``) of :data:`GATEWAY_ANSWERS`."""
    return GATEWAY_ANSWERS[name].canned(after=after, times=times)
