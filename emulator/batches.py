"""The emulator's batch routes: OpenAI files + batches, and Gemini's shape of them.

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
import itertools
import json
import math
import secrets
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from emulator.bodies import multipart, parse_json
from emulator.config import EmulatorConfig
from emulator.errors import ApiError, internal, invalid, json_response, openai_error
from emulator.state import ServerState
from emulator.wire import Request, Response

# Answers one batch line as the live route would: (request, route) -> the route's answer.
AnswerLine = Callable[[Request, str], Awaitable[Response]]

OPENAI_PREFIX = "/v1/"
GEMINI_PREFIX = "/v1beta/openai/"
UPLOAD_PATH = "/upload/v1beta/files"
DOWNLOAD_PREFIX = "/download/v1beta/"
ENDPOINTS = {"/v1/chat/completions": "chat/completions", "/v1/embeddings": "embeddings"}
FINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class StoredFile:
    id: str
    path: Path
    filename: str
    purpose: str
    created: int
    generated: bool  # written by a batch (downloadable on Gemini) rather than uploaded

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@dataclass
class Batch:
    id: str
    flavor: str  # "openai" | "gemini"
    endpoint: str
    input_file_id: str
    created: float
    total: int
    seconds: float
    failure_rate: float
    expire_fraction: float | None
    seed: int
    metadata: dict[str, Any] | None = None
    status: str = "in_progress"
    cancel_requested_at: float | None = None
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    final_at: float | None = None
    # Lines answered with an error: (custom_id, the line's request body), for tests to check against.
    failed_lines: list[tuple[str, Any]] = field(default_factory=list)

    def progress(self, now: float) -> float:
        if self.seconds <= 0:
            return 1.0
        return min(1.0, (now - self.created) / self.seconds)


@dataclass
class Upload:
    path: Path
    filename: str
    received: int = 0


class BatchService:
    """Files and batches of one emulator. Runs on the emulator's event loop (no locking needed)."""

    def __init__(self, state: ServerState, answer_line: AnswerLine) -> None:
        self._state = state
        self._answer_line = answer_line
        self._dir = Path(tempfile.mkdtemp(prefix="gembatch-emulator-files-"))
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, Batch] = {}
        self._uploads: dict[str, Upload] = {}
        self._ids = itertools.count(1)
        # What the emulator did, for tests: batches created, lines answered / failed, cancels.
        self.created: list[str] = []

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

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
                return self._google_upload(req)
            if path.startswith(DOWNLOAD_PREFIX):
                return await self._google_download(path[len(DOWNLOAD_PREFIX) :], cfg)
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
                return await self._openai_files(req, rest[len("files") :].strip("/"), cfg)
            return await self._batches(req, flavor, rest[len("batches") :].strip("/"), cfg)
        except ApiError as e:
            if path.startswith(OPENAI_PREFIX):
                return openai_error(e.code, e.message, None)
            return e.response()

    # -- files ---------------------------------------------------------------------------------------

    def _new_file(self, flavor: str, filename: str, purpose: str, *, generated: bool) -> StoredFile:
        token = f"{next(self._ids):06d}{secrets.token_hex(6)}"
        file_id = f"file-{token}" if flavor == "openai" else f"files/{token}"
        stored = StoredFile(file_id, self._dir / token, filename, purpose, int(time.time()), generated)
        self.files[file_id] = stored
        return stored

    @staticmethod
    def _file_object(f: StoredFile) -> dict[str, Any]:
        return {
            "id": f.id,
            "object": "file",
            "bytes": f.size,
            "created_at": f.created,
            "filename": f.filename,
            "purpose": f.purpose,
            "status": "processed",
        }

    async def _openai_files(self, req: Request, rest: str, cfg: EmulatorConfig) -> Response:
        if req.method == "POST" and not rest:
            fields = multipart(req)
            purpose = fields.get("purpose", (b"", None, None))[0].decode()
            if purpose != "batch":
                raise invalid(f"purpose: only 'batch' is served here, got {purpose!r}.")
            if "file" not in fields:
                raise invalid("file: required.")
            content, filename, _ = fields["file"]
            _check_jsonl(content)
            stored = self._new_file("openai", filename or "upload.jsonl", purpose, generated=False)
            stored.path.write_bytes(content)
            return json_response(self._file_object(stored))
        file_id, _, what = rest.partition("/")
        stored = self._file(file_id)
        if req.method == "GET" and what == "content":
            return Response(200, stored.path, "application/octet-stream")
        if req.method == "GET" and not what:
            return json_response(self._file_object(stored))
        raise invalid(f"unsupported files request {req.method} {rest}")

    def _file(self, file_id: str) -> StoredFile:
        stored = self.files.get(file_id)
        if stored is None:
            raise ApiError(404, "NOT_FOUND", f"No such file: {file_id}")
        return stored

    def _google_upload(self, req: Request) -> Response:
        """Google's resumable upload: ``start`` answers an upload URL; ``upload, finalize`` ends it."""

        command = req.headers.get("x-goog-upload-command", "").lower()
        query = parse_qs(req.target.partition("?")[2])
        if "start" in command:
            try:
                meta = json.loads(req.body or b"{}").get("file", {})
            except ValueError:
                raise invalid("Invalid JSON payload received.") from None
            upload_id = secrets.token_hex(8)
            self._uploads[upload_id] = Upload(self._dir / f"upload-{upload_id}", meta.get("display_name") or "")
            self._uploads[upload_id].path.touch()
            host = req.headers.get("host", f"127.0.0.1:{self._state.port}")
            headers = {
                "x-goog-upload-url": f"http://{host}{UPLOAD_PATH}?upload_id={upload_id}&upload_protocol=resumable",
                "x-goog-upload-status": "active",
            }
            return Response(200, b"", "text/plain", headers)
        upload = self._uploads.get((query.get("upload_id") or [""])[0])
        if upload is None:
            raise invalid("unknown upload_id: start the upload first.")
        offset = int(req.headers.get("x-goog-upload-offset", "-1"))
        if offset != upload.received:
            raise invalid(f"X-Goog-Upload-Offset {offset} does not match the {upload.received} bytes received.")
        with upload.path.open("ab") as f:
            f.write(req.body)
        upload.received += len(req.body)
        if "finalize" not in command:
            return Response(200, b"", "text/plain", {"x-goog-upload-status": "active"})
        self._uploads.pop((query.get("upload_id") or [""])[0])
        with upload.path.open("rb") as f:
            _check_jsonl_file(f)
        stored = self._new_file("gemini", upload.filename, "batch", generated=False)
        upload.path.rename(stored.path)
        obj = {
            "name": stored.id,
            "displayName": stored.filename,
            "mimeType": "jsonl",
            "sizeBytes": str(stored.size),
            "state": "ACTIVE",
            "source": "UPLOADED",
            "expirationTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 48 * 3600)),
        }
        resp = json_response({"file": obj})
        resp.headers["x-goog-upload-status"] = "final"
        return resp

    async def _google_download(self, rest: str, cfg: EmulatorConfig) -> Response:
        name = rest.split(":download", 1)[0]
        stored = self._file(name)
        if not stored.generated:
            raise ApiError(400, "INVALID_ARGUMENT", f"Only generated files can be downloaded; {name} was uploaded.")
        return Response(200, stored.path, "application/octet-stream")

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
        stored = self._file(str(body.get("input_file_id")))
        total = 0
        with stored.path.open("rb") as f:
            for raw in f:
                if raw.strip():
                    line = json.loads(raw)
                    if line.get("url") != endpoint:
                        raise invalid(f"line {total + 1}: url {line.get('url')!r} differs from endpoint {endpoint}.")
                    total += 1
        token = f"{next(self._ids):06d}{secrets.token_hex(6)}"
        batch = Batch(
            id=f"batch_{token}" if flavor == "openai" else f"batches/{token}",
            flavor=flavor,
            endpoint=endpoint,
            input_file_id=stored.id,
            created=time.time(),
            total=total,
            seconds=cfg.batch_seconds,
            failure_rate=cfg.batch_line_failure_rate,
            expire_fraction=cfg.batch_expire_fraction,
            seed=cfg.seed,
            metadata=body.get("metadata"),
        )
        self.batches[batch.id] = batch
        self.created.append(batch.id)
        return batch

    def _describe(self, b: Batch) -> dict[str, Any]:
        created = int(b.created)
        done = b.completed + b.failed
        if b.status in ("in_progress", "cancelling"):
            done = math.floor(b.progress(time.time()) * b.total)
            if b.expire_fraction is not None:
                done = min(done, math.floor(b.expire_fraction * b.total))
        return {
            "id": b.id,
            "object": "batch",
            "endpoint": b.endpoint,
            "errors": None,
            "input_file_id": b.input_file_id,
            "completion_window": "24h",
            "status": b.status,
            "output_file_id": b.output_file_id,
            "error_file_id": b.error_file_id,
            "created_at": created,
            "in_progress_at": created,
            "expires_at": created + 24 * 3600,
            "completed_at": int(b.final_at) if b.final_at and b.status == "completed" else None,
            "expired_at": int(b.final_at) if b.final_at and b.status == "expired" else None,
            "cancelled_at": int(b.final_at) if b.final_at and b.status == "cancelled" else None,
            "cancelling_at": int(b.cancel_requested_at) if b.cancel_requested_at else None,
            "request_counts": {
                "total": b.total,
                "completed": b.completed if b.status in FINAL else done,
                "failed": b.failed,
            },
            "metadata": b.metadata,
        }

    async def _advance(self, b: Batch, now: float) -> None:
        if b.status in FINAL:
            return
        if b.cancel_requested_at is not None:
            done = math.floor(b.progress(b.cancel_requested_at) * b.total)
            if b.expire_fraction is not None:
                done = min(done, math.floor(b.expire_fraction * b.total))
            await self._finish(b, "cancelled", done)
        elif b.progress(now) >= 1.0:
            if b.expire_fraction is not None:
                await self._finish(b, "expired", math.floor(b.expire_fraction * b.total))
            else:
                await self._finish(b, "completed", b.total)

    async def _finish(self, b: Batch, status: str, answered: int) -> None:
        """Answer the first ``answered`` lines through the live handlers; write the output (and error) file."""
        out = self._new_file(b.flavor, f"{b.id.replace('/', '-')}-output.jsonl", "batch_output", generated=True)
        err = None
        if b.flavor == "openai":
            err = self._new_file(b.flavor, f"{b.id}-errors.jsonl", "batch_output", generated=True)
        stored = self.files[b.input_file_id]
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
                        b.completed += ok
                        b.failed += not ok
                        if not ok:
                            b.failed_lines.append((custom_id, line.get("body")))
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
        b.output_file_id = out.id
        if err is not None:
            if err.size:
                b.error_file_id = err.id
            else:
                self.files.pop(err.id)
                err.path.unlink()
        b.status = status
        b.final_at = time.time()

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

        digest = hashlib.sha256(f"{b.seed}\x00{b.id}\x00{line.get('custom_id')}".encode()).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 < b.failure_rate:
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


def _check_jsonl(content: bytes) -> None:
    for number, raw in enumerate(content.splitlines(), 1):
        if raw.strip():
            _check_line(raw, number, invalid)


def _check_jsonl_file(f: Any) -> None:
    for number, raw in enumerate(f, 1):
        if raw.strip():
            _check_line(raw, number, invalid)


def _check_line(raw: bytes, number: int, invalid: Any) -> None:
    try:
        line = json.loads(raw)
    except ValueError:
        raise invalid(f"line {number} is not JSON.") from None
    if not isinstance(line, dict) or not line.get("custom_id") or not isinstance(line.get("body"), dict):
        raise invalid(f"line {number}: custom_id, method, url and body are required.")
