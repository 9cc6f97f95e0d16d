"""The structured-extraction job: one chat completion per row, answered as JSON for a pydantic model.

The reply is validated with the model and stored as typed columns (see :mod:`schemas.arrow`).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, ValidationError

from schemas.arrow import ModelMapping, model_mapping
from schemas.dialects import DialectSchema, build_schema, needs_restore, response_format_name, restore_defaults
from tasks.engine.job import RowFailure, result_schema
from tasks.errors import ConfigError
from tasks.jobs.text_chat import REASONING_EFFORTS, TextChatJob

__all__ = ["ExtractJob", "REASONING_EFFORTS", "RESERVED_COLUMNS", "default_prompt", "import_model"]

RESERVED_COLUMNS = ("content_hash", "model")
MAX_ERROR_CHARS = 600
MAX_ERRORS_SHOWN = 5


def default_prompt(model: type[BaseModel]) -> str:
    return (
        f"Extract the fields of {model.__name__} from the user's text. Answer only with one JSON object "
        "that matches the given JSON schema; use null for an optional field the text does not state."
    )


def import_model(spec: str) -> type[BaseModel]:
    """``MODULE:Model`` → the pydantic model class, or a :class:`ConfigError` saying what to fix."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--schema {spec!r}: expected MODULE:Model, e.g. --schema schemas.examples:Invoice")
    # A console script's sys.path lacks the working directory; a user's own schema module lives there.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"--schema {spec!r}: module {module_name!r} can't be imported ({exc}); check the spelling and run "
            "from the folder that holds it, or install the package that provides it"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any error while importing the user's module is a config error
        raise ConfigError(
            f"--schema {spec!r}: importing module {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            models = sorted(
                name
                for name, value in vars(module).items()
                if inspect.isclass(value) and issubclass(value, BaseModel) and value is not BaseModel
            )
            hint = f"models there: {', '.join(models)}" if models else "it defines no pydantic models"
            raise ConfigError(f"--schema {spec!r}: module {module_name!r} has no attribute {attr!r} ({hint})")
        target = getattr(target, part)
    if not (inspect.isclass(target) and issubclass(target, BaseModel)):
        raise ConfigError(
            f"--schema {spec!r}: {attr} is a {type(target).__name__}, not a pydantic model; "
            "point --schema at a class that subclasses pydantic.BaseModel"
        )
    return target


@dataclass(frozen=True, kw_only=True)
class ExtractJob(TextChatJob):
    schema: type[BaseModel]

    mapping: ModelMapping = field(init=False, repr=False, compare=False)
    json_schema: dict[str, Any] = field(init=False, repr=False, compare=False)
    dialect: DialectSchema = field(init=False, repr=False, compare=False)
    restores_defaults: bool = field(init=False, repr=False, compare=False)
    schema_sha256: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        mapping = model_mapping(self.schema)
        clash = [f.name for f in mapping.fields if f.name in RESERVED_COLUMNS]
        if clash:
            raise ConfigError(
                f"{self.schema.__name__}.{clash[0]}: the output already has a {clash[0]!r} column; rename the "
                "field (an alias keeps the JSON key)"
            )
        dialect = build_schema(self.schema, self.schema_dialect)
        # What is sent decides the answer: the dialect's schema (and its strictness) is hashed, so
        # switching dialect re-extracts.
        blob = json.dumps({"schema": dialect.schema, "strict": dialect.strict}, sort_keys=True, separators=(",", ":"))
        object.__setattr__(self, "mapping", mapping)
        object.__setattr__(self, "dialect", dialect)
        object.__setattr__(self, "json_schema", dialect.schema)
        object.__setattr__(self, "restores_defaults", needs_restore(self.schema))
        object.__setattr__(self, "schema_sha256", hashlib.sha256(blob.encode()).hexdigest())
        object.__setattr__(self, "system_prompt", self.prompt or default_prompt(self.schema))

    @property
    def schema_ref(self) -> str:
        return f"{self.schema.__module__}:{self.schema.__qualname__}"

    @property
    def response_format(self) -> dict[str, Any]:
        spec = {"name": response_format_name(self.schema), "schema": self.json_schema, "strict": self.dialect.strict}
        return {"type": "json_schema", "json_schema": spec}

    def parameters(self) -> dict[str, Any]:
        return {
            "text_col": self.text_col,
            "schema": self.schema_ref,
            "schema_sha256": self.schema_sha256,
            "schema_dialect": self.schema_dialect,
            "schema_notes": list(self.dialect.notes),
            "prompt": self.system_prompt,
            "reasoning_effort": self.reasoning_effort,
        }

    def hashed_fields(self) -> dict[str, Any]:
        return {"schema_sha256": self.schema_sha256}

    def request_options(self) -> dict[str, Any]:
        return {"response_format": self.response_format}

    def _parse(self, response: ChatCompletion) -> dict[str, Any] | RowFailure:
        choice = response.choices[0]
        content = choice.message.content
        if content is None:
            refusal = getattr(choice.message, "refusal", None)
            why = f"refused: {refusal}" if refusal else f"finish_reason {choice.finish_reason!r}"
            return RowFailure("invalid_reply", f"the reply had no content ({why})", raw_reply=refusal)
        if not content.lstrip().startswith("{"):
            # Prose, not JSON at all: what a server that ignores response_format answers to every row.
            return RowFailure(
                "invalid_reply",
                f"the reply is text, not a JSON {self.schema.__name__} object (it begins {content[:40]!r}); if "
                "every row fails so, the server or model ignores response_format json_schema: rerun with --via tools",
                raw_reply=content,
            )
        return self.parse_json(content)

    def parse_json(self, content: str, raw_reply: str | None = None) -> dict[str, Any] | RowFailure:
        """A JSON reply (or function arguments) validated with the model: its typed row, or why not."""
        raw = content if raw_reply is None else raw_reply
        try:
            instance = self.schema.model_validate_json(self._restored(content))
            return self.mapping.row(instance)
        except ValidationError as exc:
            return RowFailure("invalid_reply", self._describe(exc), raw_reply=raw)
        except ValueError as exc:  # a value that validates but doesn't fit its column
            return RowFailure("invalid_reply", str(exc), raw_reply=raw)

    def _restored(self, content: str) -> str:
        """A null the dialect allowed for a field with a default becomes that default (schemas.dialects)."""
        if not self.restores_defaults:
            return content
        try:
            data = json.loads(content)
        except ValueError:
            return content  # validation reports the broken JSON
        return json.dumps(restore_defaults(self.schema, data))

    def _describe(self, exc: ValidationError) -> str:
        errors = exc.errors(include_url=False)
        parts = [f"{'.'.join(str(p) for p in e['loc']) or '(reply)'}: {e['msg']}" for e in errors[:MAX_ERRORS_SHOWN]]
        more = f" (+{len(errors) - MAX_ERRORS_SHOWN} more)" if len(errors) > MAX_ERRORS_SHOWN else ""
        message = f"reply does not match {self.schema.__name__}: {'; '.join(parts)}{more}"
        return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 1] + "…"

    def output_schema(self, id_col: str, id_type: pa.DataType) -> pa.Schema:
        return result_schema(id_col, id_type, self.mapping.arrow_fields)

    def result_arrays(self, results: list[Any]) -> dict[str, pa.Array]:
        return self.mapping.arrays(results)

    def results_from_table(self, table: pa.Table) -> dict[str, Any]:
        if table.num_rows == 0:
            return {}
        hashes = table.column("content_hash").to_pylist()
        return dict(zip(hashes, self.mapping.rows(table), strict=True))
