"""EmulatorConfig: how an emulator behaves (limits, latency, faults, models, gateway answers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus

from emulator.catalog import DEFAULT_MODELS
from emulator.errors import openai_error
from emulator.wire import Response

PREFIXES: tuple[str, ...] = ("/v1beta/openai/", "/v1/")
ROUTES: tuple[str, ...] = ("embeddings", "chat/completions", "images/generations", "audio/transcriptions", "models")
FAULT_KINDS: tuple[str, ...] = ("500", "503", "hang", "truncate", "drop", "garbage")
# How a chat request carrying response_format json_schema is met (EmulatorConfig.json_schema):
# "supported" answers JSON for the schema; "rejected" answers Groq's 400 for a model without
# structured outputs (llama-3.3-70b-versatile); "ignored" answers prose, as servers that drop the
# field do (Ollama's and vLLM's OpenAI routes in some versions, LM Studio's /v1/responses).
JSON_SCHEMA_SUPPORT: tuple[str, ...] = ("supported", "rejected", "ignored")
IMAGE_FORMATS: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "svg": "image/svg+xml"}

CANNED_BODIES: tuple[str, ...] = ("json", "text", "html", "empty", "raw")


@dataclass(frozen=True, kw_only=True)
class CannedAnswer:
    """What a route answers instead of its work (``EmulatorConfig.route_answers``), as gateways and load
    balancers do: ``body`` is ``json`` (OpenAI's error object), ``text`` (plain text), ``html`` (an nginx
    error page), ``empty`` (no body at all; with status 200, an empty success) or ``raw`` (``message`` is
    the JSON body itself, word for word: a gateway's own error shape, emulator/gateways.py). The first
    ``after`` requests to the route are served as usual; ``times``, when set, ends the canned answers
    after that many (a 429 that passes)."""

    status: int
    body: str = "json"
    message: str = "injected failure"
    after: int = 0
    times: int | None = None

    def __post_init__(self) -> None:
        if self.body not in CANNED_BODIES:
            raise ValueError(f"body must be one of {', '.join(CANNED_BODIES)}, got {self.body!r}")

    def response(self) -> Response:
        if self.body == "empty":
            return Response(self.status, b"")
        if self.body == "raw":
            return Response(self.status, self.message.encode(), content_type="application/json")
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
        return openai_error(self.status, self.message, str(self.status))


@dataclass(kw_only=True)
class EmulatorConfig:
    """How an emulator behaves. Flat on purpose: each field is a keyword of the constructor, a key of the
    admin route's JSON and (for some) a CLI flag, so grouping them would change all three."""

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
    # Request parameters dropped without a word, as a LiteLLM proxy with ``drop_params: true`` (or a server
    # that doesn't know them) does: embeddings answers as if the body hadn't carried them (``dimensions``:
    # vectors at the model's full size), in live requests and batch lines alike.
    ignore_params: tuple[str, ...] = ()
    # What images/generations answers when the request names no response_format: b64_json, or url (a
    # link to the image on this server, as OpenAI's DALL·E models answer by default).
    default_image_response: str = "b64_json"

    def serves(self, model: str) -> bool:
        return model in self.models and model not in self.retired

    def answered_by(self, model: str) -> str:
        """The model that answers a request for ``model`` (itself, or where it is rerouted)."""
        return self.reroutes.get(model, model)

    def __post_init__(self) -> None:
        self.models = tuple(self.models)
        self.refuse_params = tuple(self.refuse_params)
        self.ignore_params = tuple(self.ignore_params)
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
