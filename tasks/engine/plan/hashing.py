"""Content hashes of a whole text column at once: the check a rerun does for every input row.

A text job (embed, extract) hashes fields that are the same for every row (job, model, parameters)
plus the row's text. Encoded as sorted compact JSON (:func:`tasks.engine.plan.rows.content_hash`) that is
``head + json_string(text) + tail``, with ``head`` and ``tail`` fixed for the run. So a chunk is hashed
without building a dict, a :class:`~tasks.engine.job.Prepared` or a hex string per row:

* the texts come out of Arrow as ``bytes`` in one call;
* a text with nothing JSON escapes (no ``"``, ``\\`` or control character: found with numpy on the
  column's data buffer) is its own JSON body; the others are escaped by the json module's own encoder;
* sha256 runs in one list comprehension and the digests land in one ``(n, 32)`` uint8 array, whose
  first 8 bytes per row are the index's hash key (:func:`digest_keys`), no hex in between.

The bytes hashed are the ones :func:`~tasks.engine.plan.rows.content_hash` hashes, so a content hash is the
same whichever path computed it (tests check it, and every chunk checks one row against the per-row
path). Rows the job can't vouch for at once (null, blank, too long, not text) take the per-row path.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.engine.plan.hash_worker import HEADER

__all__ = ["HashProcesses", "TextTemplate", "digest_keys", "hex_digests", "non_blank", "text_template"]

# Python's str.isspace() characters; RE2 (Arrow's regex engine) finds a character outside them.
PY_SPACE_CLASS = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_NOT_SPACE = f"[^{PY_SPACE_CLASS}]"
# A text that is not blank and not too long to send: a job's prepare() accepts it whatever it holds.
_SENTINEL = "gembatch text template"

_ROOT = str(Path(__file__).resolve().parents[3])  # where the child imports tasks.engine.plan.hash_worker from
_ENCODER = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
_encode_str = json.encoder.encode_basestring


@dataclass(frozen=True, slots=True)
class TextTemplate:
    """The bytes around a row's text in its hashed JSON: ``head`` + JSON string of the text + ``tail``."""

    column: str
    head: bytes
    tail: bytes

    def digests(self, texts: pa.Array, processes: HashProcesses | None = None) -> np.ndarray:
        """sha256 digests, ``(len(texts), 32)`` uint8, of a string array without nulls. ``processes``:
        hash in a child process (the same bytes: rows JSON escapes are hashed here)."""
        n = len(texts)
        if n == 0:
            return np.empty((0, 32), np.uint8)
        head, tail = self.head + b'"', b'"' + self.tail
        if processes is not None:
            found = processes.digests(head, tail, texts)
            if found is not None:
                for pos in _needs_escaping(texts):
                    body = _encode_str(texts[pos].as_py())[1:-1].encode()
                    found[pos] = np.frombuffer(hashlib.sha256(head + body + tail).digest(), np.uint8)
                return found
        bodies = texts.cast(pa.binary()).to_pylist()
        for pos in _needs_escaping(texts):
            bodies[pos] = _encode_str(texts[pos].as_py())[1:-1].encode()
        start = hashlib.sha256(head)  # each row's hash goes on from a copy of the head's state

        def digest(body: bytes) -> bytes:
            h = start.copy()
            h.update(body)
            h.update(tail)
            return h.digest()

        joined = b"".join(map(digest, bodies))
        return np.frombuffer(joined, np.uint8).reshape(n, 32)


class HashProcesses:
    """Child processes (:mod:`tasks.engine.plan.hash_worker`) that hash text columns beside this process.

    A rerun's work is hashing every input row, and in threads the GIL keeps sha256 of short texts on
    one core; a child process hashes a chunk while this process reads, looks up and drives the next.
    The threads that ask (a rerun's check threads) each borrow an idle child, starting one while fewer
    than ``processes`` were started; with none free, or a child gone, the caller hashes in process
    (:meth:`digests` returns None). Each child holds ~14 MiB.
    """

    def __init__(self, processes: int = 2) -> None:
        self.processes = processes
        self._idle: list[subprocess.Popen] = []
        self._started = 0
        self._lock = threading.Lock()
        self._closed = False

    def digests(self, head: bytes, tail: bytes, texts: pa.Array) -> np.ndarray | None:
        child = self._borrow()
        if child is None:
            return None
        array = texts.cast(pa.binary()) if not pa.types.is_binary(texts.type) else texts
        n = len(array)
        offsets = np.frombuffer(array.buffers()[1], np.int32, count=n + 1, offset=array.offset * 4).astype(np.uint64)
        lo, hi = int(offsets[0]), int(offsets[-1])
        offsets -= np.uint64(lo)
        data = memoryview(array.buffers()[2])[lo:hi] if hi > lo else b""
        try:
            pipe = child.stdin
            pipe.write(HEADER.pack(len(head), len(tail), n, hi - lo))
            pipe.write(head)
            pipe.write(tail)
            pipe.write(offsets.tobytes())
            pipe.write(data)
            pipe.flush()
            answer = child.stdout.read(32 * n)
            if len(answer) != 32 * n:
                raise OSError("the hashing process stopped")
        except (OSError, ValueError):
            self._discard(child)
            return None
        self._give_back(child)
        return np.frombuffer(answer, np.uint8).reshape(n, 32).copy()

    def _borrow(self) -> subprocess.Popen | None:
        with self._lock:
            if self._closed:
                return None
            if self._idle:
                return self._idle.pop()
            if self._started >= self.processes:
                return None
            self._started += 1
        try:
            return subprocess.Popen(
                [sys.executable, "-c", "from tasks.engine.plan.hash_worker import serve; serve()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=_ROOT,
            )
        except OSError:
            return None

    def _give_back(self, child: subprocess.Popen) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(child)
                return
        _stop(child)

    def _discard(self, child: subprocess.Popen) -> None:
        _stop(child)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for child in idle:
            _stop(child)


def _stop(child: subprocess.Popen) -> None:
    for pipe in (child.stdin, child.stdout):
        try:
            pipe.close()
        except OSError:
            pass
    try:
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def text_template(job: Any) -> TextTemplate | None:
    """The template of a job that declares ``hash_text_field`` (the field of ``prepare()``'s fields that
    holds the text column as-is; every other field the same for every row), else None."""
    field = getattr(job, "hash_text_field", None)
    if field is None or len(job.input_columns) != 1:
        return None
    (column,) = job.input_columns
    fields = job.prepare({column: _SENTINEL}).fields
    if fields.get(field) is not _SENTINEL:
        raise TypeError(f"{type(job).__name__}.prepare() does not put the text as-is in field {field!r}")
    encoded = _ENCODER.encode(fields)
    marker = _encode_str(_SENTINEL)
    if encoded.count(marker) != 1:
        raise TypeError(f"{type(job).__name__}: the text template is ambiguous")
    head, tail = encoded.split(marker)
    return TextTemplate(column=column, head=head.encode(), tail=tail.encode())


def non_blank(texts: pa.Array) -> np.ndarray:
    """For each text: not null and holding a character that is not whitespace (as ``str.isspace``)."""
    if len(texts) == 0:
        return np.zeros(0, bool)
    found = pc.match_substring_regex(texts, _NOT_SPACE)
    return found.fill_null(False).to_numpy(zero_copy_only=False)


def digest_keys(digests: np.ndarray) -> np.ndarray:
    """The index's 64-bit hash keys (the first 16 hex digits of the content hash) of sha256 digests."""
    if len(digests) == 0:
        return np.empty(0, np.uint64)
    return np.ascontiguousarray(digests[:, :8]).view(">u8").ravel().astype(np.uint64)


def hex_digests(digests: np.ndarray, rows: np.ndarray | list[int]) -> dict[int, str]:
    """Hex content hashes of some rows."""
    return {int(r): digests[r].tobytes().hex() for r in rows}


def _needs_escaping(texts: pa.Array) -> list[int]:
    """Rows whose JSON string differs from their text: a ``"``, ``\\`` or a byte below 0x20."""
    array = texts.cast(pa.string()) if not pa.types.is_string(texts.type) else texts
    offsets = np.frombuffer(array.buffers()[1], np.int32, count=len(array) + 1, offset=array.offset * 4)
    lo, hi = int(offsets[0]), int(offsets[-1])
    if hi == lo:
        return []
    data = np.frombuffer(array.buffers()[2], np.uint8, count=hi - lo, offset=lo)
    if data.min() >= 0x20:
        raw = bytes(memoryview(array.buffers()[2])[lo:hi])
        if b'"' not in raw and b"\\" not in raw:
            return []  # the common case, found ~14x faster than the byte-wise test below (memchr, SIMD min)
    bad = np.flatnonzero((data < 0x20) | (data == 0x22) | (data == 0x5C))
    if not len(bad):
        return []
    rows = np.searchsorted(offsets, bad + lo, side="right") - 1
    return np.unique(rows).tolist()
