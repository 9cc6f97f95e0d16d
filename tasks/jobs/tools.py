"""`extract --via tools`: structure through function calling, and document triage over several schemas.

Each schema is offered as a function whose parameters are its JSON schema (in the chosen dialect); the
call's arguments are validated exactly like a json_schema reply (:meth:`ExtractJob.parse_json`), so a
server or model without ``response_format`` json_schema support still gives typed rows.

- One schema: its function is forced (``tool_choice`` names it); the output has the same typed columns
  as ``--via json_schema``.
- Several schemas (triage): the model must call one of them (``tool_choice: "required"``); the output
  has a ``kind`` column (the function called) and one struct column per schema, null where another was
  chosen.

A reply that calls no function, an unknown one, several, or passes arguments that are not valid for the
schema is asked once more (the engine's row retry), then kept in ``_errors/`` with the raw call.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from pydantic import BaseModel

from schemas.arrow import ModelMapping
from tasks.engine.job import RowFailure, result_schema
from tasks.errors import ConfigError
from tasks.jobs.extract import RESERVED_COLUMNS, ExtractJob
from tasks.jobs.text_chat import TextChatJob

__all__ = ["KIND_COLUMN", "ToolsExtractJob", "Triaged", "function_name"]

KIND_COLUMN = "kind"
VIAS = ("json_schema", "tools")


def function_name(model: type[BaseModel]) -> str:
    """The function (and, in triage, the column) a schema is offered as: its class name in snake_case."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", model.__name__).lower()
    return re.sub(r"[^a-z0-9_]", "_", snake)[:64]


def default_tools_prompt(names: list[str]) -> str:
    if len(names) == 1:
        return (
            f"Call the function {names[0]} with the fields found in the user's text; use null for an optional "
            "field the text does not state."
        )
    return (
        f"Decide which kind of document the user's text is ({', '.join(names)}) and call that one function with "
        "the fields found in the text; use null for an optional field the text does not state."
    )


@dataclass(frozen=True, slots=True)
class Triaged:
    kind: str
    row: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class ToolsExtractJob(TextChatJob):
    schemas: tuple[type[BaseModel], ...]

    branches: dict[str, ExtractJob] = field(init=False, repr=False, compare=False)
    tools: list[dict[str, Any]] = field(init=False, repr=False, compare=False)
    functions_sha256: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.schemas:
            raise ConfigError("--via tools needs at least one --schema MODULE:Model")
        branches: dict[str, ExtractJob] = {}
        for schema in self.schemas:
            name = function_name(schema)
            if name in branches:
                raise ConfigError(
                    f"--schema {branches[name].schema_ref} and {schema.__module__}:{schema.__qualname__} are both "
                    f"offered as function {name!r}: give the models different class names"
                )
            if len(self.schemas) > 1 and name in (KIND_COLUMN, *RESERVED_COLUMNS):
                raise ConfigError(
                    f"--schema {schema.__qualname__}: its column would be {name!r}, which the output already has; "
                    "rename the class"
                )
            branches[name] = ExtractJob(
                model=self.model,
                schema=schema,
                text_col=self.text_col,
                prompt=self.prompt,
                reasoning_effort=self.reasoning_effort,
                schema_dialect=self.schema_dialect,
            )
        tools = [
            {
                "type": "function",
                "function": {
                    "name": name,
                    "description": (branch.schema.__doc__ or f"The fields of a {branch.schema.__name__}.").strip(),
                    "parameters": branch.json_schema,
                    **({"strict": True} if branch.dialect.strict else {}),
                },
            }
            for name, branch in branches.items()
        ]
        blob = json.dumps(tools, sort_keys=True, separators=(",", ":"))
        object.__setattr__(self, "branches", branches)
        object.__setattr__(self, "tools", tools)
        object.__setattr__(self, "functions_sha256", hashlib.sha256(blob.encode()).hexdigest())
        object.__setattr__(self, "system_prompt", self.prompt or default_tools_prompt(list(branches)))

    @property
    def triage(self) -> bool:
        return len(self.branches) > 1

    @property
    def single(self) -> ExtractJob:
        """The first (without triage: the only) schema's job, whose columns the output then has."""
        return next(iter(self.branches.values()))

    @property
    def mapping(self) -> ModelMapping:
        """The single schema's columns (flows.jobs checks them against --id-col)."""
        return self.single.mapping

    @property
    def tool_choice(self) -> dict[str, Any] | str:
        if self.triage:
            return "required"
        return {"type": "function", "function": {"name": next(iter(self.branches))}}

    def parameters(self) -> dict[str, Any]:
        return {
            "text_col": self.text_col,
            "via": "tools",
            "schemas": {name: branch.schema_ref for name, branch in self.branches.items()},
            "functions_sha256": self.functions_sha256,
            "schema_dialect": self.schema_dialect,
            "schema_notes": {name: list(b.dialect.notes) for name, b in self.branches.items() if b.dialect.notes},
            "prompt": self.system_prompt,
            "reasoning_effort": self.reasoning_effort,
        }

    def hashed_fields(self) -> dict[str, Any]:
        return {"via": "tools", "functions_sha256": self.functions_sha256}

    def request_options(self) -> dict[str, Any]:
        return {"tools": self.tools, "tool_choice": self.tool_choice}

    def _parse(self, response: Any) -> dict[str, Any] | Triaged | RowFailure:
        choice = response.choices[0]
        calls = choice.message.tool_calls or []
        raw = json.dumps(
            [{"name": c.function.name, "arguments": c.function.arguments} for c in calls if c.function is not None]
        )
        if len(calls) != 1 or calls[0].function is None:
            content = choice.message.content
            said = f"; it said: {content[:200]!r}" if content else ""
            return RowFailure(
                "invalid_reply",
                f"the reply called {len(calls)} functions, one was asked for "
                f"(finish_reason {choice.finish_reason!r}){said}",
                raw_reply=raw if calls else content,
            )
        call = calls[0].function
        branch = self.branches.get(call.name)
        if branch is None:
            return RowFailure(
                "invalid_reply",
                f"the reply called function {call.name!r}, which was not offered (offered: {', '.join(self.branches)})",
                raw_reply=raw,
            )
        parsed = branch.parse_json(call.arguments or "", raw_reply=raw)
        if isinstance(parsed, RowFailure) or not self.triage:
            return parsed
        return Triaged(call.name, parsed)

    def output_schema(self, id_col: str, id_type: pa.DataType) -> pa.Schema:
        if not self.triage:
            return self.single.output_schema(id_col, id_type)
        own = [pa.field(KIND_COLUMN, pa.string())] + [
            pa.field(name, pa.struct(_struct_fields(b))) for name, b in self.branches.items()
        ]
        return result_schema(id_col, id_type, own)

    def result_arrays(self, results: list[Any]) -> dict[str, pa.Array]:
        if not self.triage:
            return self.single.result_arrays(results)
        arrays: dict[str, pa.Array] = {KIND_COLUMN: pa.array([r.kind for r in results], pa.string())}
        for name, branch in self.branches.items():
            chosen = [i for i, r in enumerate(results) if r.kind == name]
            columns = branch.mapping.arrays([results[i].row for i in chosen])
            struct = pa.StructArray.from_arrays(list(columns.values()), fields=_struct_fields(branch))
            where: list[int | None] = [None] * len(results)
            for j, i in enumerate(chosen):
                where[i] = j
            arrays[name] = struct.take(pa.array(where, pa.int64()))
        return arrays

    def results_from_table(self, table: pa.Table) -> dict[str, Any]:
        if not self.triage:
            return self.single.results_from_table(table)
        if table.num_rows == 0:
            return {}
        hashes = table.column("content_hash").to_pylist()
        kinds = table.column(KIND_COLUMN).to_pylist()
        values = {name: table.column(name).to_pylist() for name in self.branches if name in table.column_names}
        found = {}
        for i, (h, kind) in enumerate(zip(hashes, kinds, strict=True)):
            row = values.get(kind, [None] * len(hashes))[i]
            if row is not None:
                found[h] = Triaged(kind, row)
        return found


def _struct_fields(branch: ExtractJob) -> list[pa.Field]:
    """A schema's columns as the fields of its struct column. The struct is null where another schema was
    chosen, and Arrow then holds nulls in its children: the top-level fields are declared nullable (the
    model still checked every required value of a chosen row)."""
    return [f.with_nullable(True) for f in branch.mapping.arrow_fields]
