"""The emulator's batch routes (their files: emulator/files.py), in OpenAI's and Gemini's shape.

Two flavours, by path, as the providers differ (docs/how-to/batch-mode.md):

- OpenAI (``/v1/``): ``POST files`` (multipart, purpose=batch), ``GET files/{id}`` and
  ``files/{id}/content``, ``POST batches``, ``GET batches[/{id}]``, ``POST batches/{id}/cancel``. Ids
  ``file-…`` and ``batch_…``; answered lines in the output file, failed and unfinished lines (expired,
  cancelled) in the error file, as OpenAI documents.
- Gemini (``/v1beta/openai/``): the batches routes answer, with ids ``batches/…`` and files ``files/…``,
  but ``files`` there is refused: uploads go through Google's Files API (``POST /upload/v1beta/files``,
  resumable, key in ``x-goog-api-key``) and results come back through ``GET
  /download/v1beta/files/{id}:download?alt=media`` (an uploaded file can't be downloaded). Output lines
  are ``{"custom_id", "response": {"status_code", "body"}}`` without ``id``; usage inside the body is
  camelCase and ``created`` a string; failed lines sit in the same file; unfinished lines are absent.

Every line is answered by the same handler as a live request (emulator/chat.py, emulator/embeddings.py),
so a batch's answers equal live ones. Time is simulated per batch from settings taken when it is
created (``EmulatorConfig.batch_*``): lines finish evenly over ``batch_seconds``; a batch set to expire
stops with only ``batch_expire_fraction`` of its lines answered; a cancel keeps the lines answered so far.
Files are kept on disk, never in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from emulator.bodies import parse_json
from emulator.config import EmulatorConfig
from emulator.errors import ApiError, internal, invalid, json_response, openai_error
from emulator.files import UPLOAD_PATH, FileStore
from emulator.state import ServerState
from emulator.wire import Request, Response

# Answers one batch line as the live route would: (request, route) -> the route's answer.
AnswerLine = Callable[[Request, str], Awaitable[Response]]

OPENAI_PREFIX = "/v1/"
GEMINI_PREFIX = "/v1beta/openai/"
DOWNLOAD_PREFIX = "/download/v1beta/"
ENDPOINTS = {"/v1/chat/completions": "chat/completions", "/v1/embeddings": "embeddings"}
FINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class Simulation:
    """How the emulator plays a batch out, from its settings when the batch was created (a test may
    shorten ``seconds`` of a running batch)."""

    seconds: float  # lines finish evenly over this time
    failure_rate: float
    expire_fraction: float | None  # set: the batch expires with only this part answered
    seed: int


@dataclass
class Results:
    """What a finished batch produced."""

    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    final_at: float | None = None
    # Lines answered with an error: (custom_id, the line's request body), for tests to check against.
    failed_lines: list[tuple[str, Any]] = field(default_factory=list)


@dataclass
class Batch:
    id: str
    flavor: str  # "openai" | "gemini"
    endpoint: str
    input_file_id: str
    created: float
    total: int
    simulation: Simulation
    metadata: dict[str, Any] | None = None
    status: str = "in_progress"
    cancel_requested_at: float | None = None
    results: Results = field(default_factory=Results)

    def progress(self, now: float) -> float:
        if self.simulation.seconds <= 0:
            return 1.0
        return min(1.0, (now - self.created) / self.simulation.seconds)


class BatchService:
    """Files and batches of one emulator. Runs on the emulator's event loop (no locking needed)."""

    def __init__(self, state: ServerState, answer_line: AnswerLine) -> None:
        self._state = state
        self._answer_line = answer_line
        self.files = FileStore(state)
        self.batches: dict[str, Batch] = {}
        # What the emulator did, for tests: batches created, lines answered / failed, cancels.
        self.created: list[str] = []

    def close(self) -> None:
        self.files.close()

    # -- routing -------------------------------------------------------------------------------------

    @staticmethod
    def handles(path: str) -> bool:
        path = unquote(path)
        if path.startswith(UPLOAD_PATH) or path.startswith(DOWNLOAD_PREFIX):
            return True
        for prefix in (OPENAI_PREFIX, GEMINI_PREFIX):
            if path.startswith(prefix):
                rest = path[len(prefix) :]
                return rest.split("/", 1)[0] in ("files", "batches")
        return False

    async def serve(self, req: Request, cfg: EmulatorConfig) -> Response:
        path = unquote(req.path)
        try:
            if path.startswith(UPLOAD_PATH):
                return self.files.google_upload(req)
            if path.startswith(DOWNLOAD_PREFIX):
                return await self.files.google_download(path[len(DOWNLOAD_PREFIX) :], cfg)
            flavor = "openai" if path.startswith(OPENAI_PREFIX) else "gemini"
            rest = path[len(OPENAI_PREFIX if flavor == "openai" else GEMINI_PREFIX) :].strip("/")
            if rest.startswith("files"):
                if flavor == "gemini":
                    raise ApiError(
                        404,
                        "NOT_FOUND",
                        "File upload and download are not supported through the OpenAI compatibility layer: "
                        "use the Files API (POST /upload/v1beta/files).",
                    )
                return await self.files.openai_route(req, rest[len("files") :].strip("/"), cfg)
            return await self._batches(req, flavor, rest[len("batches") :].strip("/"), cfg)
        except ApiError as e:
            if path.startswith(OPENAI_PREFIX):
                return openai_error(e.code, e.message, None)
            return e.response()

    # -- batches -------------------------------------------------------------------------------------

    async def _batches(self, req: Request, flavor: str, rest: str, cfg: EmulatorConfig) -> Response:
        if req.method == "POST" and not rest:
            return json_response(self._describe(self._create(flavor, parse_json(req), cfg)))
        if req.method == "GET" and not rest:
            now = time.time()
            for batch in self.batches.values():
                await self._advance(batch, now)
            data = [self._describe(b) for b in self.batches.values() if b.flavor == flavor]
            return json_response({"object": "list", "data": data[::-1], "has_more": False})
        cancel = False
        for suffix in ("/cancel", ":cancel"):
            if rest.endswith(suffix):
                rest, cancel = rest[: -len(suffix)], True
        batch_id = rest if flavor == "openai" or rest.startswith("batches/") else f"batches/{rest}"
        batch = self.batches.get(batch_id)
        if batch is None:
            raise ApiError(404, "NOT_FOUND", f"No batch found with id '{batch_id}'.")
        if cancel:
            if req.method != "POST":
                raise invalid("cancel needs POST")
            if batch.status not in FINAL and batch.cancel_requested_at is None:
                batch.cancel_requested_at = time.time()
                batch.status = "cancelling"
        elif req.method != "GET":
            raise invalid(f"unsupported batches request {req.method} {rest}")
        await self._advance(batch, time.time())
        return json_response(self._describe(batch))

    def _create(self, flavor: str, body: dict[str, Any], cfg: EmulatorConfig) -> Batch:
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise invalid(f"endpoint: batches take {', '.join(ENDPOINTS)}, got {endpoint!r}.")
        if body.get("completion_window") != "24h":
            raise invalid(f"completion_window: only '24h' is supported, got {body.get('completion_window')!r}.")
        stored = self.files.get(str(body.get("input_file_id")))
        total = 0
        with stored.path.open("rb") as f:
            for raw in f:
                if raw.strip():
                    line = json.loads(raw)
                    if line.get("url") != endpoint:
                        raise invalid(f"line {total + 1}: url {line.get('url')!r} differs from endpoint {endpoint}.")
                    total += 1
        token = self.files.next_token()
        batch = Batch(
            id=f"batch_{token}" if flavor == "openai" else f"batches/{token}",
            flavor=flavor,
            endpoint=endpoint,
            input_file_id=stored.id,
            created=time.time(),
            total=total,
            simulation=Simulation(
                seconds=cfg.batch_seconds,
                failure_rate=cfg.batch_line_failure_rate,
                expire_fraction=cfg.batch_expire_fraction,
                seed=cfg.seed,
            ),
            metadata=body.get("metadata"),
        )
        self.batches[batch.id] = batch
        self.created.append(batch.id)
        return batch

    def _describe(self, b: Batch) -> dict[str, Any]:
        created = int(b.created)
        done = b.results.completed + b.results.failed
        if b.status in ("in_progress", "cancelling"):
            done = math.floor(b.progress(time.time()) * b.total)
            if b.simulation.expire_fraction is not None:
                done = min(done, math.floor(b.simulation.expire_fraction * b.total))
        return {
            "id": b.id,
            "object": "batch",
            "endpoint": b.endpoint,
            "errors": None,
            "input_file_id": b.input_file_id,
            "completion_window": "24h",
            "status": b.status,
            "output_file_id": b.results.output_file_id,
            "error_file_id": b.results.error_file_id,
            "created_at": created,
            "in_progress_at": created,
            "expires_at": created + 24 * 3600,
            "completed_at": int(b.results.final_at) if b.results.final_at and b.status == "completed" else None,
            "expired_at": int(b.results.final_at) if b.results.final_at and b.status == "expired" else None,
            "cancelled_at": int(b.results.final_at) if b.results.final_at and b.status == "cancelled" else None,
            "cancelling_at": int(b.cancel_requested_at) if b.cancel_requested_at else None,
            "request_counts": {
                "total": b.total,
                "completed": b.results.completed if b.status in FINAL else done,
                "failed": b.results.failed,
            },
            "metadata": b.metadata,
        }

    async def _advance(self, b: Batch, now: float) -> None:
        if b.status in FINAL:
            return
        if b.cancel_requested_at is not None:
            done = math.floor(b.progress(b.cancel_requested_at) * b.total)
            if b.simulation.expire_fraction is not None:
                done = min(done, math.floor(b.simulation.expire_fraction * b.total))
            await self._finish(b, "cancelled", done)
        elif b.progress(now) >= 1.0:
            if b.simulation.expire_fraction is not None:
                await self._finish(b, "expired", math.floor(b.simulation.expire_fraction * b.total))
            else:
                await self._finish(b, "completed", b.total)

    async def _finish(self, b: Batch, status: str, answered: int) -> None:
        """Answer the first ``answered`` lines through the live handlers; write the output (and error) file."""
        out = self.files.new(b.flavor, f"{b.id.replace('/', '-')}-output.jsonl", "batch_output", generated=True)
        err = None
        if b.flavor == "openai":
            err = self.files.new(b.flavor, f"{b.id}-errors.jsonl", "batch_output", generated=True)
        stored = self.files.get(b.input_file_id)
        with stored.path.open("rb") as src, out.path.open("wb") as out_f:
            err_f = err.path.open("wb") if err is not None else None
            try:
                number = 0
                for raw in src:
                    if not raw.strip():
                        continue
                    line = json.loads(raw)
                    custom_id = line.get("custom_id")
                    if number < answered:
                        status_code, body = await self._answer(b, line)
                        ok = status_code == 200
                        b.results.completed += ok
                        b.results.failed += not ok
                        if not ok:
                            b.results.failed_lines.append((custom_id, line.get("body")))
                        record = self._result_line(b, custom_id, status_code, body)
                        target = out_f if ok or err_f is None else err_f
                        target.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
                    elif err_f is not None:
                        code = "batch_expired" if status == "expired" else "batch_cancelled"
                        message = (
                            "This request could not be executed before the completion window expired."
                            if status == "expired"
                            else "This request was not executed because the batch was cancelled."
                        )
                        record = {
                            "id": f"batch_req_{secrets.token_hex(8)}",
                            "custom_id": custom_id,
                            "response": None,
                            "error": {"code": code, "message": message},
                        }
                        err_f.write(json.dumps(record).encode() + b"\n")
                    number += 1
            finally:
                if err_f is not None:
                    err_f.close()
        b.results.output_file_id = out.id
        if err is not None:
            if err.size:
                b.results.error_file_id = err.id
            else:
                self.files.drop(err.id)
        b.status = status
        b.results.final_at = time.time()

    def _result_line(self, b: Batch, custom_id: str, status_code: int, body: Any) -> dict[str, Any]:
        if b.flavor == "openai":
            return {
                "id": f"batch_req_{secrets.token_hex(8)}",
                "custom_id": custom_id,
                "response": {"status_code": status_code, "request_id": secrets.token_hex(8), "body": body},
                "error": None,
            }
        return {"custom_id": custom_id, "response": {"status_code": status_code, "body": _gemini_body(body)}}

    async def _answer(self, b: Batch, line: dict[str, Any]) -> tuple[int, Any]:
        """One line through the live route's handler (no rate limits: batches have their own quota)."""

        digest = hashlib.sha256(f"{b.simulation.seed}\x00{b.id}\x00{line.get('custom_id')}".encode()).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 < b.simulation.failure_rate:
            self._state.bump("faults", sub="batch:line")
            resp = internal().response()
            return resp.status, json.loads(resp.body)
        route = ENDPOINTS[b.endpoint]
        prefix = OPENAI_PREFIX if b.flavor == "openai" else GEMINI_PREFIX
        body = json.dumps(line.get("body")).encode()
        req = Request("POST", prefix + route, "HTTP/1.1", {"content-type": "application/json"}, body)
        try:
            resp = await self._answer_line(req, route)
        except ApiError as e:
            resp = e.response()
        except Exception:  # noqa: BLE001 - a marker asking for a transport fault: the line fails as a 500
            resp = internal().response()
        raw = b"".join(resp.body) if isinstance(resp.body, list) else resp.body
        return resp.status, json.loads(raw)


def _gemini_body(body: Any) -> Any:
    """What Gemini's compat batches put in a result body: no ``id``, camelCase usage, ``created`` a string."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    body.pop("id", None)
    if "created" in body:
        body["created"] = str(body["created"])
    usage = body.get("usage")
    if isinstance(usage, dict):
        names = {
            "prompt_tokens": "promptTokens",
            "completion_tokens": "completionTokens",
            "total_tokens": "totalTokens",
        }
        body["usage"] = {names.get(k, k): v for k, v in usage.items()}
    return body
