"""The emulator's files: OpenAI's files routes and Google's resumable upload and download, kept on disk."""

from __future__ import annotations

import itertools
import json
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from emulator.bodies import multipart
from emulator.config import EmulatorConfig
from emulator.errors import ApiError, invalid, json_response
from emulator.state import ServerState
from emulator.wire import Request, Response

UPLOAD_PATH = "/upload/v1beta/files"


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
class Upload:
    path: Path
    filename: str
    received: int = 0


class FileStore:
    """Uploaded batch inputs and the files batches write, one file on disk each."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._dir = Path(tempfile.mkdtemp(prefix="gembatch-emulator-files-"))
        self.files: dict[str, StoredFile] = {}
        self._uploads: dict[str, Upload] = {}
        self._ids = itertools.count(1)

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def next_token(self) -> str:
        """A fresh id suffix: a counter (ids sort by creation) and a random part."""
        return f"{next(self._ids):06d}{secrets.token_hex(6)}"

    def drop(self, file_id: str) -> None:
        self.files.pop(file_id).path.unlink()

    def new(self, flavor: str, filename: str, purpose: str, *, generated: bool) -> StoredFile:
        token = self.next_token()
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

    async def openai_route(self, req: Request, rest: str, cfg: EmulatorConfig) -> Response:
        if req.method == "POST" and not rest:
            fields = multipart(req)
            purpose = fields.get("purpose", (b"", None, None))[0].decode()
            if purpose != "batch":
                raise invalid(f"purpose: only 'batch' is served here, got {purpose!r}.")
            if "file" not in fields:
                raise invalid("file: required.")
            content, filename, _ = fields["file"]
            _check_jsonl(content)
            stored = self.new("openai", filename or "upload.jsonl", purpose, generated=False)
            stored.path.write_bytes(content)
            return json_response(self._file_object(stored))
        file_id, _, what = rest.partition("/")
        stored = self.get(file_id)
        if req.method == "GET" and what == "content":
            return Response(200, stored.path, "application/octet-stream")
        if req.method == "GET" and not what:
            return json_response(self._file_object(stored))
        raise invalid(f"unsupported files request {req.method} {rest}")

    def get(self, file_id: str) -> StoredFile:
        stored = self.files.get(file_id)
        if stored is None:
            raise ApiError(404, "NOT_FOUND", f"No such file: {file_id}")
        return stored

    def google_upload(self, req: Request) -> Response:
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
        stored = self.new("gemini", upload.filename, "batch", generated=False)
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

    async def google_download(self, rest: str, cfg: EmulatorConfig) -> Response:
        name = rest.split(":download", 1)[0]
        stored = self.get(name)
        if not stored.generated:
            raise ApiError(400, "INVALID_ARGUMENT", f"Only generated files can be downloaded; {name} was uploaded.")
        return Response(200, stored.path, "application/octet-stream")


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
