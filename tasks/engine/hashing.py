"""Content hashes of a whole text column at once: the check a rerun does for every input row.

A text job (embed, extract) hashes fields that are the same for every row (job, model, parameters)
plus the row's text. Encoded as sorted compact JSON (:func:`tasks.engine.chunk.content_hash`) that is
``head + json_string(text) + tail``, with ``head`` and ``tail`` fixed for the run. So a chunk is hashed
without building a dict, a :class:`~tasks.engine.chunk.Prepared` or a hex string per row:

* the texts come out of Arrow as ``bytes`` in one call;
* a text with nothing JSON escapes (no ``"``, ``\\`` or control character: found with numpy on the
  column's data buffer) is its own JSON body; the others are escaped by the json module's own encoder;
* sha256 runs in one list comprehension and the digests land in one ``(n, 32)`` uint8 array, whose
  first 8 bytes per row are the index's hash key (:func:`digest_keys`), no hex in between.

The bytes hashed are the ones :func:`~tasks.engine.chunk.content_hash` hashes, so a content hash is the
same whichever path computed it (tests check it, and every chunk checks one row against the per-row
path). Rows the job can't vouch for at once (null, blank, too long, not text) take the per-row path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["TextTemplate", "digest_keys", "hex_digests", "non_blank", "text_template"]

# Python's str.isspace() characters; RE2 (Arrow's regex engine) finds a character outside them.
PY_SPACE_CLASS = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_NOT_SPACE = f"[^{PY_SPACE_CLASS}]"
# A text that is not blank and not too long to send: a job's prepare() accepts it whatever it holds.
_SENTINEL = "gembatch text template"

_ENCODER = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
_encode_str = json.encoder.encode_basestring


@dataclass(frozen=True, slots=True)
class TextTemplate:
    """The bytes around a row's text in its hashed JSON: ``head`` + JSON string of the text + ``tail``."""

    column: str
    head: bytes
    tail: bytes

    def digests(self, texts: pa.Array) -> np.ndarray:
        """sha256 digests, ``(len(texts), 32)`` uint8, of a string array without nulls."""
        n = len(texts)
        if n == 0:
            return np.empty((0, 32), np.uint8)
        head, tail = self.head + b'"', b'"' + self.tail
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
    bad = np.flatnonzero((data < 0x20) | (data == 0x22) | (data == 0x5C))
    if not len(bad):
        return []
    rows = np.searchsorted(offsets, bad + lo, side="right") - 1
    return np.unique(rows).tolist()
