"""The JSON-schema rules each real provider applies, with its error text, for the emulator's two paths.

OpenAI (``/v1/``), strict schemas only (``response_format.json_schema.strict`` or a function's
``strict``), as its API answers (messages from public reports): every object has
``additionalProperties: false``; ``required`` lists every property; ``default`` is not permitted; nor
are keywords strict mode doesn't support. Errors are ``{"error": {message, type, param, code}}``.

Gemini (``/v1beta/openai/``), in ``response_format`` and in function parameters: no ``$schema``; a
``$ref`` may only have ``description`` and ``default`` beside it. In function parameters also (the
native Schema type): no ``additionalProperties``, ``propertyNames``, ``const``, ``exclusiveMinimum``,
``exclusiveMaximum``; string formats only ``enum`` and ``date-time``; enum values strings only.
Errors are Gemini's array shape (``ApiError``).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

from emulator.errors import invalid
from emulator.wire import Response

__all__ = ["OpenAIError", "check_gemini", "check_openai_strict", "refusal"]

OPENAI_REFUSED_KEYWORDS = (
    "default",
    "patternProperties",
    "unevaluatedProperties",
    "propertyNames",
    "minProperties",
    "maxProperties",
    "unevaluatedItems",
    "contains",
    "minContains",
    "maxContains",
    "uniqueItems",
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
)
GEMINI_TOOL_UNKNOWN = ("additionalProperties", "propertyNames", "const", "exclusiveMinimum", "exclusiveMaximum")


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None, code: str | None) -> None:
        super().__init__(message)
        self.code = status
        self.message = message
        self.param = param
        self.error_code = code

    def body(self) -> bytes:
        error = {"message": self.message, "type": "invalid_request_error", "param": self.param, "code": self.error_code}
        return json.dumps({"error": error}, indent=2).encode()


def check_openai_strict(schema: Any, *, what: str, param: str, code: str) -> None:
    """Raise :class:`OpenAIError` for the first node strict mode refuses. ``what``: "response_format 'X'"
    or "function 'f'"."""
    problem = _openai_problem(schema, ())
    if problem is not None:
        context, text = problem
        shown = "(" + ", ".join(repr(k) for k in context) + ("," if len(context) == 1 else "") + ")"
        raise OpenAIError(400, f"Invalid schema for {what}: In context={shown}, {text}", param=param, code=code)


def _openai_problem(node: Any, context: tuple[str, ...]) -> tuple[tuple[str, ...], str] | None:
    if not isinstance(node, dict):
        return None
    is_object = node.get("type") == "object" or "properties" in node
    if is_object and node.get("additionalProperties") is not False:
        return context, "'additionalProperties' is required to be supplied and to be false."
    props = node.get("properties")
    if isinstance(props, dict):
        required = node.get("required")
        missing = [k for k in props if not isinstance(required, list) or k not in required]
        if missing:
            return context, (
                "'required' is required to be supplied and to be an array including every key in properties. "
                f"Missing '{missing[0]}'."
            )
    for keyword in OPENAI_REFUSED_KEYWORDS:
        if keyword in node:
            return context, f"'{keyword}' is not permitted."
    children: list[tuple[tuple[str, ...], Any]] = []
    for name, sub in (node.get("$defs") or {}).items():
        children.append(((*context, "$defs", name), sub))
    for name, sub in (props or {}).items():
        children.append(((*context, "properties", name), sub))
    if isinstance(node.get("items"), dict):
        children.append(((*context, "items"), node["items"]))
    for i, sub in enumerate(node.get("anyOf") or []):
        children.append(((*context, "anyOf", str(i)), sub))
    for child_context, sub in children:
        problem = _openai_problem(sub, child_context)
        if problem is not None:
            return problem
    return None


def check_gemini(schema: Any, *, where: str, tool: bool) -> str | None:
    """The message Gemini answers for ``schema`` at ``where`` (a request field path), or None."""
    unknown: list[str] = []
    other: list[str] = []
    _gemini_walk(schema, where, tool, unknown, other)
    if other:
        return other[0]
    if unknown:
        return "\n".join(unknown)
    return None


def _gemini_walk(node: Any, at: str, tool: bool, unknown: list[str], other: list[str]) -> None:
    if not isinstance(node, dict):
        return
    ref = node.get("$ref")
    if ref is not None:
        extra = [k for k in node if k not in ("$ref", "description", "default")]
        if extra:
            other.append(
                f"Schema.ref '{str(ref).rsplit('/', 1)[-1]}' was set alongside unsupported fields. If a schema node "
                "has Schema.ref set, then only description and default can be set alongside it; other fields they "
                "would be replaced by the expanded reference."
            )
    names = ["$schema", *(GEMINI_TOOL_UNKNOWN if tool else ())]
    for name in names:
        if name in node:
            unknown.append(f"Invalid JSON payload received. Unknown name \"{name}\" at '{at}': Cannot find field.")
    if tool:
        fmt = node.get("format")
        if node.get("type") == "string" and fmt is not None and fmt not in ("enum", "date-time"):
            other.append(
                f"GenerateContentRequest.{at}.format: only 'enum' and 'date-time' are supported for STRING type"
            )
        for i, value in enumerate(node.get("enum") or []):
            if not isinstance(value, str):
                other.append(f"Invalid value at '{at}.enum[{i}]' (TYPE_STRING), {json.dumps(value)}")
                break
    for i, (_, sub) in enumerate((node.get("properties") or {}).items()):
        _gemini_walk(sub, f"{at}.properties[{i}].value", tool, unknown, other)
    for name, sub in (node.get("$defs") or {}).items():
        _gemini_walk(sub, f"{at}.defs[{name}]", tool, unknown, other)
    if isinstance(node.get("items"), dict):
        _gemini_walk(node["items"], f"{at}.items", tool, unknown, other)
    for i, sub in enumerate(node.get("anyOf") or []):
        _gemini_walk(sub, f"{at}.any_of[{i}]", tool, unknown, other)


def refusal(path: str, body: dict[str, Any]) -> tuple[str, Response] | None:
    """Each provider's JSON-schema rules on its own path, for ``response_format`` and function parameters:
    OpenAI's strict rules under /v1/, Gemini's under /v1beta/openai/. A refusal is (fault name, answer)."""
    openai_path = unquote(path).startswith("/v1/")
    response_format = body.get("response_format")
    spec = response_format.get("json_schema") if isinstance(response_format, dict) else None
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    if openai_path:
        try:
            if isinstance(spec, dict) and spec.get("strict") is True:
                what = f"response_format '{spec.get('name', 'response')}'"
                check_openai_strict(spec.get("schema"), what=what, param="response_format", code="invalid_json_schema")
            for i, tool in enumerate(tools):
                fn = tool.get("function") if isinstance(tool, dict) else None
                if isinstance(fn, dict) and fn.get("strict") is True:
                    check_openai_strict(
                        fn.get("parameters"),
                        what=f"function '{fn.get('name', '')}'",
                        param=f"tools[{i}].function.parameters",
                        code="invalid_function_parameters",
                    )
        except OpenAIError as e:
            return "schema:openai", Response(e.code, e.body())
        return None
    problems = []
    if isinstance(spec, dict):
        problems.append(check_gemini(spec.get("schema"), where="generation_config.response_schema", tool=False))
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict):
            where = f"tools[0].function_declarations[{i}].parameters"
            problems.append(check_gemini(fn.get("parameters"), where=where, tool=True))
    message = "\n".join(p for p in problems if p)
    if message:
        return "schema:gemini", invalid(message).response()
    return None
