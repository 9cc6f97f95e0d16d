"""Deterministic values valid against a JSON schema: the emulator's structured-output and tool-call answers.

Like everything in emulator/fakes.py, a pure function of its arguments, so tests can compute the exact
value the emulator sends back.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from emulator.fakes import WORDS


class _Gen:
    def __init__(self, root: dict[str, Any], seed: str, null_rate: float = 0.0) -> None:
        self.root = root
        self.seed = seed
        self.null_rate = null_rate

    def h(self, path: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{self.seed}\x00{path}".encode()).digest()[:8], "big")

    def resolve(self, schema: Any) -> dict[str, Any]:
        seen = 0
        while isinstance(schema, dict) and "$ref" in schema and seen < 64:
            ref = schema["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#"):
                raise ValueError(f"unsupported $ref: {ref!r}")
            target: Any = self.root
            for part in ref.lstrip("#").strip("/").split("/"):
                if part:
                    target = target[part.replace("~1", "/").replace("~0", "~")]
            extra = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **extra}
            seen += 1
        if not isinstance(schema, dict):
            return {}
        if "allOf" in schema:
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for sub in schema["allOf"]:
                sub = self.resolve(sub)
                for k, v in sub.items():
                    if k in ("properties", "$defs") and isinstance(v, dict):
                        merged[k] = {**merged.get(k, {}), **v}
                    elif k == "required":
                        merged[k] = sorted(set(merged.get(k, [])) | set(v))
                    else:
                        merged.setdefault(k, v)
            schema = merged
        return schema

    def gen(self, schema: Any, path: str, depth: int = 0) -> Any:
        s = self.resolve(schema)
        if depth > 24:
            return None
        if "const" in s:
            return s["const"]
        if "enum" in s:
            values = list(s["enum"])
            return values[self.h(path) % len(values)] if values else None
        for key in ("anyOf", "oneOf"):
            if key in s:
                branches = [self.resolve(b) for b in s[key]]
                # A nullable value is sometimes null, as a model answers for what the text doesn't say.
                nullable = any(b.get("type") == "null" for b in branches)
                if nullable and self.null_rate and (self.h(path + "#null") % 10_000) / 10_000 < self.null_rate:
                    return None
                for b in branches:
                    if b.get("type") != "null":
                        return self.gen(b, path, depth + 1)
                return None
        t = s.get("type")
        if isinstance(t, list):
            non_null = [x for x in t if x != "null"]
            t = non_null[0] if non_null else "null"
        if t is None:
            if "properties" in s or "additionalProperties" in s:
                t = "object"
            elif "items" in s or "prefixItems" in s:
                t = "array"
            else:
                t = "string"
        if t == "object":
            return self.gen_object(s, path, depth)
        if t == "array":
            return self.gen_array(s, path, depth)
        if t == "string":
            return self.gen_string(s, path)
        if t == "integer":
            return self.gen_integer(s, path)
        if t == "number":
            return self.gen_number(s, path)
        if t == "boolean":
            return self.h(path) % 2 == 0
        if t == "null":
            return None
        raise ValueError(f"unsupported schema type: {t!r}")

    def gen_object(self, s: dict[str, Any], path: str, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        props = s.get("properties") or {}
        for name, sub in props.items():
            out[name] = self.gen(sub, f"{path}.{name}", depth + 1)
        extra = s.get("additionalProperties")
        if not props and isinstance(extra, dict):
            n = max(1, int(s.get("minProperties", 1)))
            for i in range(n):
                out[f"key{i + 1}"] = self.gen(extra, f"{path}.key{i + 1}", depth + 1)
        return out

    def gen_array(self, s: dict[str, Any], path: str, depth: int) -> list[Any]:
        prefix = s.get("prefixItems")
        if isinstance(prefix, list):
            return [self.gen(sub, f"{path}[{i}]", depth + 1) for i, sub in enumerate(prefix)]
        lo = int(s.get("minItems", 1 if depth < 8 else 0))
        hi = int(s.get("maxItems", max(lo, 3)))
        lo = min(lo, hi)
        span = min(hi, max(lo, 3)) - lo + 1
        n = lo + self.h(path + "#n") % span
        items = s.get("items", {})
        out: list[Any] = []
        seen: set[str] = set()
        unique = bool(s.get("uniqueItems"))
        attempt = 0
        while len(out) < n and attempt < n + 16:
            value = self.gen(items, f"{path}[{attempt}]", depth + 1)
            attempt += 1
            if unique:
                key = json.dumps(value, sort_keys=True)
                if key in seen:
                    continue
                seen.add(key)
            out.append(value)
        return out

    def gen_string(self, s: dict[str, Any], path: str) -> str:
        h = self.h(path)
        fmt = s.get("format")
        if fmt is None:
            # A dialect that can't send a format says it in the description; a model reads it there.
            hint = _FORMAT_HINT.search(str(s.get("description") or ""))
            fmt = hint.group(1) if hint else None
        if fmt in ("date", "date-time", "time"):
            year, month, day = 2020 + h % 10, 1 + (h >> 8) % 12, 1 + (h >> 16) % 28
            hh, mm, ss = (h >> 24) % 24, (h >> 32) % 60, (h >> 40) % 60
            if fmt == "date":
                return f"{year:04d}-{month:02d}-{day:02d}"
            if fmt == "time":
                return f"{hh:02d}:{mm:02d}:{ss:02d}Z"
            return f"{year:04d}-{month:02d}-{day:02d}T{hh:02d}:{mm:02d}:{ss:02d}Z"
        if fmt == "email":
            return f"{WORDS[h % 26]}.{WORDS[(h >> 8) % 26]}@example.com"
        if fmt in ("uri", "url", "uri-reference"):
            return f"https://example.com/{WORDS[h % 26]}/{(h >> 8) % 1000}"
        if fmt == "uuid":
            x = hashlib.sha256(f"{self.seed}\x00{path}#uuid".encode()).hexdigest()
            return f"{x[:8]}-{x[8:12]}-4{x[13:16]}-a{x[17:20]}-{x[20:32]}"
        words = [WORDS[(h >> (8 * i)) % len(WORDS)] for i in range(2 + h % 2)]
        text = " ".join(words)
        min_len = int(s.get("minLength", 0))
        max_len = s.get("maxLength")
        while len(text) < min_len:
            text += " " + WORDS[len(text) % len(WORDS)]
        if max_len is not None:
            text = text[: int(max_len)]
        return text

    def _bounds(self, s: dict[str, Any]) -> tuple[float | None, float | None, bool, bool]:
        lo = s.get("minimum")
        hi = s.get("maximum")
        lo_x = hi_x = False
        if "exclusiveMinimum" in s and isinstance(s["exclusiveMinimum"], (int, float)):
            lo, lo_x = s["exclusiveMinimum"], True
        if "exclusiveMaximum" in s and isinstance(s["exclusiveMaximum"], (int, float)):
            hi, hi_x = s["exclusiveMaximum"], True
        return lo, hi, lo_x, hi_x

    def gen_integer(self, s: dict[str, Any], path: str) -> int:
        lo_f, hi_f, lo_x, hi_x = self._bounds(s)
        lo = None if lo_f is None else (math.floor(lo_f) + 1 if lo_x else math.ceil(lo_f))
        hi = None if hi_f is None else (math.ceil(hi_f) - 1 if hi_x else math.floor(hi_f))
        lo, hi = _span(lo, hi, 100)
        if hi < lo:
            return lo
        value = lo + self.h(path) % (hi - lo + 1)
        step = s.get("multipleOf")
        if isinstance(step, int) and step > 0:
            value = -(-value // step) * step
            if value > hi:
                value -= step
        return value

    def gen_number(self, s: dict[str, Any], path: str) -> float:
        lo_b, hi_b, _, _ = self._bounds(s)
        lo = float(lo_b) if lo_b is not None else None
        hi = float(hi_b) if hi_b is not None else None
        lo, hi = _span(lo, hi, 100.0)
        if hi <= lo:
            return lo
        frac = (self.h(path) % 10_000) / 10_000
        # Stay strictly inside the interval so exclusive bounds hold too.
        value = lo + (hi - lo) * (0.05 + 0.9 * frac)
        rounded = round(value, 2)
        return rounded if lo < rounded < hi else value


def _span(lo: Any, hi: Any, width: Any) -> tuple[Any, Any]:
    """The range a number is drawn from: its bounds, ``width`` wide past the one given, 0..width if none."""
    if lo is None and hi is None:
        return 0 * width, width
    if lo is None:
        return hi - width, hi
    if hi is None:
        return lo, lo + width
    return lo, hi


_FORMAT_HINT = re.compile(r"\bformat (date-time|date|time|email|uri|uuid)\b")


def fake_json_for_schema(schema: dict[str, Any], seed: str, null_rate: float = 0.0) -> object:
    """A value valid against `schema` (as pydantic's model_json_schema() emits it). ``null_rate``: the
    share of nullable values (``anyOf`` with a null branch) answered as null."""
    return _Gen(schema, seed, null_rate).gen(schema, "$")
