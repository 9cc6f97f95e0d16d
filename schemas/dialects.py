"""One pydantic model, the JSON schema each provider accepts: the schema dialects of `gembatch extract`.

``openai``  OpenAI's strict structured outputs. The conversion is the openai SDK's own (what
            ``chat.completions.parse`` and ``pydantic_function_tool`` send): every object closed
            (``additionalProperties: false``) and every property in ``required``; ``$ref`` kept with
            ``$defs`` unless it has siblings. Before it, a field the model may leave out (it has a
            default) becomes required-but-nullable and loses its ``default`` (strict mode refuses
            ``default``); a null there maps back to the model's default (:func:`restore_defaults`).
``gemini``  Gemini's schema subset, the one that holds for both ``response_format`` and function
            parameters: self-contained (every ``$ref`` inlined, no ``$defs``, no ``$schema``), no
            ``additionalProperties`` / ``propertyNames``, ``const`` as a one-value ``enum``, enums of
            strings only, string formats only ``date-time``; optional fields stay optional.
``plain``   pydantic's schema as it is, self-contained (refs inlined), sent with ``strict: false``: the
            form any OpenAI-compatible server with guided decoding reads (vLLM, Ollama, llama.cpp,
            LiteLLM — which converts it for its own backend). The default for an unknown ``--base-url``.

A keyword a dialect can't carry is not dropped silently: it moves into the field's description as a
hint ("minimum length 3") and is reported in :attr:`DialectSchema.notes`; the reply is validated with
the user's model anyway, so the constraint still holds. A schema a dialect can't express at all (too
deep, too many properties for OpenAI's limits) is a :class:`ConfigError` naming the field path, raised
before any request.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel

from tasks.errors import ConfigError

__all__ = [
    "DIALECTS",
    "DialectSchema",
    "auto_dialect",
    "build_schema",
    "needs_restore",
    "restore_defaults",
    "response_format_name",
]

DIALECTS = ("openai", "gemini", "plain")

# OpenAI's documented limits for strict schemas.
OPENAI_MAX_NESTING = 10
OPENAI_MAX_PROPERTIES = 5000
OPENAI_MAX_ENUM_VALUES = 1000
OPENAI_FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"})
GEMINI_STRING_FORMATS = frozenset({"date-time", "enum"})

# Keywords each dialect sends as they are (besides structure handled explicitly).
_ANNOTATIONS = {"title", "description"}
_OPENAI_KEEP = _ANNOTATIONS | {
    "type", "properties", "required", "additionalProperties", "items", "anyOf", "enum", "$ref", "$defs",
    "format", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "minItems", "maxItems",
}  # fmt: skip
_GEMINI_KEEP = _ANNOTATIONS | {
    "type", "properties", "required", "items", "anyOf", "enum", "format", "nullable", "minimum", "maximum",
    "minItems", "maxItems", "minLength", "maxLength", "pattern", "minProperties", "maxProperties", "default",
    "propertyOrdering",
}  # fmt: skip
# How a keyword reads when it moves into the description.
_HINTS = {
    "minLength": "at least {} characters",
    "maxLength": "at most {} characters",
    "pattern": "matches the pattern {}",
    "format": "format {}",
    "minimum": "at least {}",
    "maximum": "at most {}",
    "exclusiveMinimum": "greater than {}",
    "exclusiveMaximum": "less than {}",
    "multipleOf": "a multiple of {}",
    "minItems": "at least {} items",
    "maxItems": "at most {} items",
    "uniqueItems": "items unique",
    "minProperties": "at least {} keys",
    "maxProperties": "at most {} keys",
    "examples": "e.g. {}",
    "enum": "one of {}",
    "const": "exactly {}",
}
# Keys that say nothing the model needs (dropped without a note).
_SILENT = {
    "$schema", "$id", "$comment", "deprecated", "readOnly", "writeOnly", "default", "discriminator",
    "additionalProperties", "propertyNames",
}  # fmt: skip


@dataclass(frozen=True)
class DialectSchema:
    """The schema sent for one dialect, whether it is sent as strict, and what had to give way."""

    dialect: str
    schema: dict[str, Any]
    strict: bool
    notes: tuple[str, ...] = field(default=())


def auto_dialect(provider: str, base_url: str | None) -> str:
    """The dialect for a provider: Gemini's URL → gemini, OpenAI's → openai, the built-in emulator by its
    path (it answers Gemini's rules under /v1beta/openai/ and OpenAI's under /v1/), anything else → plain."""
    if not base_url:
        return {"openai": "openai"}.get(provider, "gemini")  # gemini, and local (the emulator's Gemini path)
    parts = urlsplit(base_url)
    host = (parts.hostname or "").lower()
    if host == "generativelanguage.googleapis.com" or host.endswith("-aiplatform.googleapis.com"):
        return "gemini"
    if host == "api.openai.com":
        return "openai"
    if provider == "local":
        return "gemini" if "/v1beta/openai" in parts.path else "openai"
    return "plain"


def response_format_name(model: type[BaseModel]) -> str:
    # OpenAI allows [a-zA-Z0-9_-]{1,64} as the name.
    return re.sub(r"[^a-zA-Z0-9_-]", "_", model.__name__)[:64]


def build_schema(model: type[BaseModel], dialect: str) -> DialectSchema:
    """``model``'s JSON schema in ``dialect``, or a :class:`ConfigError` for what the dialect can't express."""
    if dialect not in DIALECTS:
        raise ConfigError(f"--schema-dialect {dialect!r}: use one of {', '.join(DIALECTS)} (or leave it out: auto)")
    base = model.model_json_schema()
    notes: list[str] = []
    if dialect == "openai":
        schema = _openai(base, model.__name__, notes)
        _check_openai_limits(schema, model.__name__)
        return DialectSchema(dialect, schema, True, tuple(notes))
    inlined = _inline(base, base, model.__name__, ())
    if dialect == "gemini":
        return DialectSchema(dialect, _gemini(inlined, model.__name__, notes), True, tuple(notes))
    inlined.pop("$schema", None)
    return DialectSchema(dialect, inlined, False, ())


# ---------------------------------------------------------------------------------------------
# openai


def _openai(base: dict[str, Any], name: str, notes: list[str]) -> dict[str, Any]:
    from openai.lib._pydantic import _ensure_strict_json_schema

    schema = copy.deepcopy(base)
    _walk_objects(schema, _nullable_optionals)
    # The SDK's strict conversion (to_strict_json_schema's body; its public wrapper takes only a model).
    schema = _ensure_strict_json_schema(schema, path=(), root=schema)
    return _filter(schema, _OPENAI_KEEP, name, notes, _openai_node)


def _nullable_optionals(node: dict[str, Any]) -> None:
    """Strict mode wants every property required: one the model may omit becomes nullable instead."""
    required = set(node.get("required") or [])
    for key, prop in list(node["properties"].items()):
        if key in required or not isinstance(prop, dict):
            continue
        prop = dict(prop)
        prop.pop("default", None)
        if not _is_nullable(prop):
            outer = {k: prop.pop(k) for k in list(prop) if k in _ANNOTATIONS}
            prop = {"anyOf": [prop, {"type": "null"}], **outer}
        node["properties"][key] = prop


def _openai_node(node: dict[str, Any], hints: list[str]) -> None:
    if "const" in node:
        node["enum"] = [node.pop("const")]
    fmt = node.get("format")
    if fmt is not None and fmt not in OPENAI_FORMATS:
        hints.append(_HINTS["format"].format(node.pop("format")))


def _check_openai_limits(schema: dict[str, Any], name: str) -> None:
    defs = schema.get("$defs") or {}
    total_props = 0
    enum_values = 0

    def visit(node: Any, path: str, depth: int, stack: tuple[str, ...]) -> None:
        nonlocal total_props, enum_values
        if not isinstance(node, dict):
            return
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            target = ref.rsplit("/", 1)[-1]
            if target not in stack:
                visit(defs.get(target), path, depth, (*stack, target))
        if "properties" in node:
            depth += 1
            if depth > OPENAI_MAX_NESTING:
                raise ConfigError(
                    f"{path}: OpenAI's strict structured outputs allow {OPENAI_MAX_NESTING} levels of nested "
                    "objects; this model nests deeper. Flatten a level, or pass --schema-dialect plain to "
                    "send the schema unenforced (replies are still validated with the model)"
                )
            total_props += len(node["properties"])
            for key, sub in node["properties"].items():
                visit(sub, f"{path}.{key}", depth, stack)
        enum_values += len(node.get("enum") or [])
        if isinstance(node.get("items"), dict):
            visit(node["items"], f"{path}[]", depth, stack)
        for sub in node.get("anyOf") or []:
            visit(sub, path, depth, stack)

    visit(schema, name, 0, ())
    if total_props > OPENAI_MAX_PROPERTIES:
        raise ConfigError(
            f"{name}: {total_props} object properties in all, over the {OPENAI_MAX_PROPERTIES} OpenAI's strict "
            "structured outputs allow; split the model, or pass --schema-dialect plain"
        )
    if enum_values > OPENAI_MAX_ENUM_VALUES:
        raise ConfigError(
            f"{name}: {enum_values} enum values in all, over the {OPENAI_MAX_ENUM_VALUES} OpenAI's strict "
            "structured outputs allow; use a plain string for the longest enum, or pass --schema-dialect plain"
        )


# ---------------------------------------------------------------------------------------------
# gemini


def _gemini(schema: dict[str, Any], name: str, notes: list[str]) -> dict[str, Any]:
    return _filter(schema, _GEMINI_KEEP, name, notes, _gemini_node)


def _gemini_node(node: dict[str, Any], hints: list[str]) -> None:
    if "const" in node:
        node["enum"] = [node.pop("const")]
    enum = node.get("enum")
    if enum is not None and not all(isinstance(v, str) for v in enum):
        # Gemini's Schema.enum is a list of strings: other values can only be described.
        hints.append(_HINTS["enum"].format(", ".join(str(v) for v in node.pop("enum"))))
        if "type" not in node:
            kinds = {type(v) for v in enum}
            if kinds <= {int}:
                node["type"] = "integer"
            elif kinds <= {int, float}:
                node["type"] = "number"
    elif enum is not None and "type" not in node:
        node["type"] = "string"
    fmt = node.get("format")
    if fmt is not None and not (node.get("type") == "string" and fmt in GEMINI_STRING_FORMATS):
        hints.append(_HINTS["format"].format(node.pop("format")))


# ---------------------------------------------------------------------------------------------
# shared walks


def _filter(schema: dict[str, Any], keep: set[str], name: str, notes: list[str], fix) -> dict[str, Any]:
    """Keep the dialect's keywords; move the others into the description as hints, with a note each."""

    def visit(node: Any, path: str) -> Any:
        if not isinstance(node, dict):
            return node
        node = dict(node)
        hints: list[str] = []
        fix(node, hints)
        for key in list(node):
            if key in keep:
                continue
            value = node.pop(key)
            if key in _SILENT:
                continue
            hint = _HINTS.get(key)
            hints.append(hint.format(_show(value)) if hint else f"{key}: {_show(value)}")
        if hints:
            notes.append(f"{path}: {'; '.join(hints)} (not enforced by the provider; checked on the reply)")
            described = node.get("description")
            node["description"] = (f"{described} " if described else "") + f"({'; '.join(hints)})"
        if isinstance(node.get("properties"), dict):
            node["properties"] = {k: visit(v, f"{path}.{k}") for k, v in node["properties"].items()}
        if isinstance(node.get("items"), dict):
            node["items"] = visit(node["items"], f"{path}[]")
        if isinstance(node.get("anyOf"), list):
            node["anyOf"] = [visit(v, path) for v in node["anyOf"]]
        if isinstance(node.get("$defs"), dict):
            node["$defs"] = {k: visit(v, k) for k, v in node["$defs"].items()}
        return node

    return visit(schema, name)


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _inline(node: Any, root: dict[str, Any], path: str, stack: tuple[str, ...]) -> Any:
    """``node`` with every local ``$ref`` replaced by its target (siblings win), ``$defs`` dropped."""
    if isinstance(node, list):
        return [_inline(v, root, path, stack) for v in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str):
        if not ref.startswith("#/"):
            raise ConfigError(f"{path}: the schema refers to {ref!r}, outside itself; only local references work")
        if ref in stack:
            raise ConfigError(f"{path}: {ref.rsplit('/', 1)[-1]} contains itself; the schema can't be inlined")
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _inline(merged, root, path, (*stack, ref))
    out = {}
    for key, value in node.items():
        if key == "$defs":
            continue
        if key == "properties" and isinstance(value, dict):
            out[key] = {k: _inline(v, root, f"{path}.{k}", stack) for k, v in value.items()}
        elif key == "items":
            out[key] = _inline(value, root, f"{path}[]", stack)
        else:
            out[key] = _inline(value, root, path, stack)
    return out


def _walk_objects(node: Any, visit) -> None:
    if isinstance(node, list):
        for v in node:
            _walk_objects(v, visit)
        return
    if not isinstance(node, dict):
        return
    if isinstance(node.get("properties"), dict):
        visit(node)
    for value in node.values():
        if isinstance(value, (dict, list)):
            _walk_objects(value, visit)


def _is_nullable(prop: dict[str, Any]) -> bool:
    kind = prop.get("type")
    if kind == "null" or (isinstance(kind, list) and "null" in kind):
        return True
    return any(isinstance(b, dict) and b.get("type") == "null" for b in prop.get("anyOf") or [])


# ---------------------------------------------------------------------------------------------
# replies


def needs_restore(model: type[BaseModel]) -> bool:
    """True when some field (at any depth) has a default but no None in its type: a null sent for it
    under the openai dialect stands for "not stated" and must become the model's default."""
    return _needs_restore(model, ())


def _needs_restore(model: type[BaseModel], seen: tuple[type, ...]) -> bool:
    if model in seen:
        return False
    for info in model.model_fields.values():
        if not info.is_required() and not _admits_none(info.annotation):
            return True
        if any(_needs_restore(m, (*seen, model)) for m in _models_in(info.annotation)):
            return True
    return False


def restore_defaults(model: type[BaseModel], data: Any) -> Any:
    """``data`` (a reply parsed from JSON) with a null removed wherever the field has a default and its
    type refuses None, so validation gives the model's default. Other values are left as they are."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for name, info in model.model_fields.items():
        key = info.alias or name
        if key not in out:
            continue
        value = out[key]
        if value is None and not info.is_required() and not _admits_none(info.annotation):
            del out[key]
        else:
            out[key] = _restore(info.annotation, value)
    return out


def _restore(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _restore(typing.get_args(tp)[0], value)
    if origin in (typing.Union, types.UnionType):
        present = [a for a in typing.get_args(tp) if a is not type(None)]
        return _restore(present[0], value) if len(present) == 1 else value
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(tp) or (Any,)
        return [_restore(item, v) for v in value]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return restore_defaults(tp, value)
    return value


def _admits_none(tp: Any) -> bool:
    if tp is None or tp is type(None) or tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _admits_none(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_admits_none(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return None in typing.get_args(tp)
    return False


def _models_in(tp: Any) -> list[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for arg in typing.get_args(tp) for m in _models_in(arg)]
