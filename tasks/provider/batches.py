"""A provider's batch API: upload a request file, create, poll, cancel and list batches, download results.

Two flavours (docs/how-to/batch-mode.md, "Providers: what is confirmed"):

- ``openai``: OpenAI's Files and Batches API through the SDK (``files.create`` purpose=batch,
  ``batches.*``, ``files.content`` streamed).
- ``gemini``: Gemini's OpenAI-compatible endpoint creates, polls and lists batches, but files go through
  Google's Files API: a resumable upload to ``/upload/v1beta/files`` and ``/download/v1beta/{file}:download``.
  Batch ids are ``batches/…``; they are put in the path as they are (the SDK would percent-encode the
  ``/``, which Google is not known to accept). Result lines have no ``id``, camelCase usage and a string
  ``created``: :func:`normalise_body` makes them what the SDK parses.

Request bodies and result parsing are the jobs' own: :class:`CapturingTransport` records the body the
SDK would POST for a job's request (so a batch line is byte for byte a live request), and
:class:`ReplayTransport` hands a result line's body to the same SDK call, so the job parses it as a
live reply.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
import openai
from openai import AsyncOpenAI

from tasks.errors import ConfigError

__all__ = [
    "BatchApi",
    "BatchInfo",
    "CapturingTransport",
    "ReplayTransport",
    "RequestCaptured",
    "batch_flavor",
    "normalise_body",
    "FINAL_STATES",
]

FINAL_STATES = ("completed", "failed", "expired", "cancelled")
UPLOAD_CHUNK_BYTES = 8 * 1024 * 1024  # what Google's SDK sends per resumable upload request
ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings")


def batch_flavor(base_url: str) -> str:
    """``gemini`` for Google's compat endpoint (and the emulator's copy of it), else ``openai``."""
    parts = urlsplit(base_url)
    if parts.netloc.endswith("googleapis.com") or "/v1beta/openai" in parts.path:
        return "gemini"
    return "openai"


@dataclass(frozen=True)
class BatchInfo:
    """What a poll says of one batch."""

    id: str
    status: str
    total: int
    completed: int
    failed: int
    output_file_id: str | None
    error_file_id: str | None
    input_file_id: str | None = None
    metadata: dict[str, Any] | None = None
    errors: str = ""

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATES

    @classmethod
    def of(cls, raw: Any) -> BatchInfo:
        data = raw if isinstance(raw, dict) else raw.model_dump()
        counts = data.get("request_counts") or {}
        errors = (data.get("errors") or {}).get("data") or []
        return cls(
            id=str(data["id"]),
            status=_status(data.get("status") or data.get("state")),
            total=int(counts.get("total") or 0),
            completed=int(counts.get("completed") or 0),
            failed=int(counts.get("failed") or 0),
            output_file_id=data.get("output_file_id"),
            error_file_id=data.get("error_file_id"),
            input_file_id=data.get("input_file_id"),
            metadata=data.get("metadata"),
            errors="; ".join(str(e.get("message") or e) for e in errors if e),
        )


class BatchApi:
    """The batch routes of the connection's provider. ``client`` is the run's AsyncOpenAI client."""

    def __init__(self, client: AsyncOpenAI, base_url: str, api_key: str, *, timeout_s: float = 300.0) -> None:
        self.client = client
        self.base_url = base_url
        self.flavor = batch_flavor(base_url)
        self._key = api_key
        self._root = re.split(r"/v1beta/openai", base_url.rstrip("/"), maxsplit=1)[0]
        self._timeout = httpx2.Timeout(timeout_s, connect=10.0)

    async def upload(self, path: Path, display_name: str) -> str:
        """Upload a JSONL request file; returns the id a batch names as ``input_file_id``."""
        if self.flavor == "openai":
            with path.open("rb") as f:
                uploaded = await self.client.files.create(file=(path.name, f, "application/jsonl"), purpose="batch")
            return uploaded.id
        size = path.stat().st_size
        headers = {
            "x-goog-api-key": self._key,
            "X-Goog-Upload-Protocol": "resumable",
            "X-Goog-Upload-Command": "start",
            "X-Goog-Upload-Header-Content-Length": str(size),
            "X-Goog-Upload-Header-Content-Type": "jsonl",
            "Content-Type": "application/json",
        }
        async with httpx2.AsyncClient(timeout=self._timeout) as http:
            start = await http.post(
                f"{self._root}/upload/v1beta/files", headers=headers, json={"file": {"display_name": display_name}}
            )
            _raise_for(start, "starting the upload of " + path.name)
            url = start.headers.get("x-goog-upload-url")
            if not url:
                raise ConfigError(f"the Files API gave no x-goog-upload-url for {path.name}: {start.text[:300]}")
            offset = 0
            reply = None
            with path.open("rb") as f:
                while True:
                    block = f.read(UPLOAD_CHUNK_BYTES)
                    last = offset + len(block) >= size
                    reply = await http.post(
                        url,
                        content=block,
                        headers={
                            "x-goog-api-key": self._key,
                            "X-Goog-Upload-Offset": str(offset),
                            "X-Goog-Upload-Command": "upload, finalize" if last else "upload",
                        },
                    )
                    _raise_for(reply, f"uploading {path.name} at byte {offset}")
                    offset += len(block)
                    if last:
                        break
        return str(reply.json()["file"]["name"])

    async def create(self, file_id: str, endpoint: str, metadata: dict[str, str]) -> BatchInfo:
        batch = await self.client.batches.create(
            input_file_id=file_id, endpoint=endpoint, completion_window="24h", metadata=metadata
        )
        return BatchInfo.of(batch)

    async def retrieve(self, batch_id: str) -> BatchInfo:
        if self.flavor == "gemini":
            return BatchInfo.of(await self.client.get(f"/batches/{batch_id}", cast_to=dict))
        return BatchInfo.of(await self.client.batches.retrieve(batch_id))

    async def cancel(self, batch_id: str) -> BatchInfo:
        if self.flavor == "gemini":
            return BatchInfo.of(await self.client.post(f"/batches/{batch_id}/cancel", cast_to=dict))
        return BatchInfo.of(await self.client.batches.cancel(batch_id))

    async def list(self, limit: int = 100) -> list[BatchInfo]:
        found = []
        async for batch in self.client.batches.list(limit=limit):
            found.append(BatchInfo.of(batch))
        return found

    async def download(self, file_id: str, dest: Path) -> None:
        """Stream a result file to ``dest`` (a temporary name first: a partial download is never used)."""
        tmp = dest.with_name(dest.name + ".part")
        with tmp.open("wb") as out:
            if self.flavor == "openai":
                async with self.client.files.with_streaming_response.content(file_id) as response:
                    async for block in response.iter_bytes():
                        out.write(block)
            else:
                url = f"{self._root}/download/v1beta/{file_id}:download"
                async with httpx2.AsyncClient(timeout=self._timeout) as http:
                    async with http.stream(
                        "GET", url, params={"alt": "media"}, headers={"x-goog-api-key": self._key}
                    ) as response:
                        if response.status_code != 200:
                            await response.aread()
                            _raise_for(response, f"downloading {file_id}")
                        async for block in response.aiter_bytes():
                            out.write(block)
        tmp.replace(dest)


# Gemini's native batch states (BATCH_STATE_*, shown as JOB_STATE_* by its SDKs), should the compat
# endpoint ever pass them through: the OpenAI names they mean.
_NATIVE_STATES = {
    "PENDING": "validating",
    "RUNNING": "in_progress",
    "SUCCEEDED": "completed",
    "FAILED": "failed",
    "CANCELLED": "cancelled",
    "EXPIRED": "expired",
}


def _status(raw: object) -> str:
    text = str(raw or "")
    for prefix in ("BATCH_STATE_", "JOB_STATE_"):
        if text.startswith(prefix):
            return _NATIVE_STATES.get(text[len(prefix) :], text.lower())
    return text


def _raise_for(response: httpx2.Response, what: str) -> None:
    if response.status_code >= 400:
        raise openai.APIStatusError(
            f"{what}: HTTP {response.status_code}", response=response, body=_json_or_text(response)
        )


def _json_or_text(response: httpx2.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:500]


# -- the jobs' own requests and parsing, without the network -------------------------------------------


class RequestCaptured(Exception):
    """Raised by :class:`CapturingTransport` in place of sending: the request is recorded."""


class CapturingTransport(httpx2.AsyncBaseTransport):
    """Records the request the SDK would send and sends nothing."""

    def __init__(self) -> None:
        self.path: str = ""
        self.body: dict[str, Any] | None = None

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.path = request.url.path
        content = await request.aread()
        try:
            self.body = json.loads(content)
        except ValueError:
            # Multipart (audio.transcriptions): no batch form for it.
            self.body = None
        raise RequestCaptured(self.path)


class ReplayTransport(httpx2.AsyncBaseTransport):
    """Answers the next request with a result line's status and body."""

    def __init__(self) -> None:
        self.status = 200
        self.body: Any = None

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        await request.aread()
        return httpx2.Response(
            self.status, content=json.dumps(self.body).encode(), headers={"content-type": "application/json"}
        )


def offline_client(base_url: str, transport: httpx2.AsyncBaseTransport) -> AsyncOpenAI:
    return AsyncOpenAI(
        base_url=base_url, api_key="offline", max_retries=0, http_client=httpx2.AsyncClient(transport=transport)
    )


_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def normalise_body(body: Any, custom_id: str) -> Any:
    """A result body as the SDK parses a live reply: Gemini's batch lines lack ``id``, spell usage in
    camelCase (``promptTokens``) and give ``created`` as a string."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    body.setdefault("id", f"batch-{custom_id}")
    created = body.get("created")
    if isinstance(created, str):
        try:
            body["created"] = int(float(created))
        except ValueError:
            body["created"] = 0
    usage = body.get("usage")
    if isinstance(usage, dict):
        body["usage"] = {_CAMEL.sub("_", k).lower(): v for k, v in usage.items()}
    return body


def endpoint_of(path: str) -> str | None:
    """The batch endpoint of a captured request path, or None when the route has no batch form."""
    for endpoint in ENDPOINTS:
        if path.rstrip("/").endswith(endpoint.removeprefix("/v1")):
            return endpoint
    return None
