"""Pydantic models as typed Arrow columns: one column per field, nested models as structs.

:func:`model_mapping` walks a model's annotations once and fails with a :class:`ConfigError` naming
the field path (``Invoice.line_items[].meta``) when a type has no faithful Arrow form, so a bad
schema is caught before any request is paid for.
"""

from __future__ import annotations

import datetime as dt
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Context, Decimal
from enum import Enum
from typing import Any

import pyarrow as pa
from pydantic import BaseModel

from tasks.errors import ConfigError

__all__ = ["DEFAULT_DECIMAL", "ENUM_TYPE", "TIMESTAMP_TYPE", "FieldMapping", "ModelMapping", "model_mapping"]

ENUM_TYPE = pa.dictionary(pa.int32(), pa.string())
TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")
DEFAULT_DECIMAL = pa.decimal128(38, 9)
MAX_DECIMAL128_PRECISION = 38
_WIDE = Context(prec=MAX_DECIMAL128_PRECISION + 2)

Convert = Callable[[Any], Any]

_SCALARS: dict[type, pa.DataType] = {
    bool: pa.bool_(),
    int: pa.int64(),
    float: pa.float64(),
    str: pa.string(),
}
_UNMAPPABLE_HINT = (
    "Arrow columns need one type per field: use a nested pydantic model instead of a dict, a list "
    "instead of a set, and a single type (optionally | None) instead of a union"
)


@dataclass(frozen=True, slots=True)
class _Node:
    type: pa.DataType
    nullable: bool
    convert: Convert


@dataclass(frozen=True, slots=True)
class FieldMapping:
    """One top-level field: its output column and how a model value becomes an Arrow value."""

    name: str
    type: pa.DataType
    nullable: bool
    convert: Convert

    @property
    def arrow_field(self) -> pa.Field:
        return pa.field(self.name, self.type, nullable=self.nullable)


@dataclass(frozen=True, slots=True)
class ModelMapping:
    """How instances of ``model`` become rows of typed columns, and back."""

    model: type[BaseModel]
    fields: tuple[FieldMapping, ...]

    @property
    def arrow_fields(self) -> list[pa.Field]:
        return [f.arrow_field for f in self.fields]

    def row(self, instance: BaseModel) -> dict[str, Any]:
        """Plain Python values Arrow accepts (enum values, UTC datetimes, rescaled decimals).

        Raises ``ValueError`` for a value that doesn't fit its column (a decimal too large).
        """
        return {f.name: f.convert(getattr(instance, f.name)) for f in self.fields}

    def arrays(self, rows: list[dict[str, Any]]) -> dict[str, pa.Array]:
        return {f.name: _array([row[f.name] for row in rows], f.type) for f in self.fields}

    def rows(self, table: pa.Table) -> list[dict[str, Any]]:
        """The inverse of :meth:`arrays`: output rows read back as what :meth:`row` gives."""
        return table.select([f.name for f in self.fields]).to_pylist()


def model_mapping(model: type[BaseModel]) -> ModelMapping:
    """The column mapping of ``model``, or a :class:`ConfigError` naming the first unmappable field."""
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ConfigError(f"{model!r} is not a pydantic model: pass a subclass of pydantic.BaseModel")
    fields = []
    for name, node in _model_fields(model, model.__name__, (model,)):
        fields.append(FieldMapping(name=name, type=node.type, nullable=node.nullable, convert=node.convert))
    return ModelMapping(model=model, fields=tuple(fields))


def _model_fields(model: type[BaseModel], path: str, seen: tuple[type, ...]) -> list[tuple[str, _Node]]:
    out = []
    for name, info in model.model_fields.items():
        out.append((name, _node(info.annotation, list(info.metadata), f"{path}.{name}", seen)))
    return out


def _node(tp: Any, metadata: list[Any], path: str, seen: tuple[type, ...]) -> _Node:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        inner, *extra = typing.get_args(tp)
        return _node(inner, [*metadata, *extra], path, seen)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        present = [a for a in args if a is not type(None)]
        if len(present) != 1:
            raise _unmappable(path, tp, "a union of several types")
        inner = _node(present[0], metadata, path, seen)
        if len(present) == len(args):
            return inner
        return _Node(inner.type, True, _optional(inner.convert))
    if origin is typing.Literal:
        return _literal(typing.get_args(tp), path, tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        item = _node(item_tp, [], f"{path}[]", seen)
        convert = item.convert
        return _Node(pa.list_(pa.field("item", item.type, nullable=item.nullable)), False, _each(convert))
    if origin is not None:
        raise _unmappable(path, tp, f"a {getattr(origin, '__name__', origin)}")
    if isinstance(tp, type):
        return _class_node(tp, metadata, path, seen)
    raise _unmappable(path, tp, "an unsupported annotation")


def _class_node(tp: type, metadata: list[Any], path: str, seen: tuple[type, ...]) -> _Node:
    if issubclass(tp, BaseModel):
        if tp in seen:
            raise ConfigError(
                f"{path}: {tp.__name__} contains itself; Arrow has no recursive types, so give the nested "
                "level its own model without the self-reference"
            )
        children = _model_fields(tp, path, (*seen, tp))
        struct = pa.struct([pa.field(name, n.type, nullable=n.nullable) for name, n in children])
        converters = [(name, n.convert) for name, n in children]
        return _Node(struct, False, lambda v: {name: c(getattr(v, name)) for name, c in converters})
    if issubclass(tp, Enum):
        values = [m.value for m in tp]
        if all(isinstance(v, str) for v in values):
            return _Node(ENUM_TYPE, False, _enum_value)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return _Node(pa.int64(), False, _enum_value)
        raise _unmappable(path, tp, "an enum whose values are not all strings (or all integers)")
    if issubclass(tp, dt.datetime):
        return _Node(TIMESTAMP_TYPE, False, _utc)
    if issubclass(tp, dt.date):
        return _Node(pa.date32(), False, _identity)
    if issubclass(tp, Decimal):
        return _decimal(metadata, path)
    for base, arrow_type in _SCALARS.items():  # bool before int: bool is an int subclass
        if issubclass(tp, base) and not (base is int and issubclass(tp, bool)):
            return _Node(arrow_type, False, _identity)
    raise _unmappable(path, tp, f"type {tp.__name__}")


def _literal(values: tuple[Any, ...], path: str, tp: Any) -> _Node:
    if all(isinstance(v, str) for v in values):
        return _Node(ENUM_TYPE, False, _identity)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return _Node(pa.int64(), False, _identity)
    raise _unmappable(path, tp, "a Literal mixing value types")


def _decimal(metadata: list[Any], path: str) -> _Node:
    max_digits = next((m.max_digits for m in metadata if getattr(m, "max_digits", None) is not None), None)
    places = next((m.decimal_places for m in metadata if getattr(m, "decimal_places", None) is not None), None)
    if max_digits is None and places is None:
        arrow_type = DEFAULT_DECIMAL
    else:
        scale = places if places is not None else DEFAULT_DECIMAL.scale
        # max_digits counts every digit; without decimal_places they may all sit on either side.
        precision = max_digits + (0 if places is not None else scale) if max_digits is not None else 38
        precision = max(precision, scale, 1)
        if precision > MAX_DECIMAL128_PRECISION:
            raise ConfigError(
                f"{path}: max_digits={max_digits}, decimal_places={places} needs more than "
                f"{MAX_DECIMAL128_PRECISION} digits; lower max_digits or set decimal_places"
            )
        arrow_type = pa.decimal128(precision, scale)
    quantum = Decimal(1).scaleb(-arrow_type.scale)
    limit = Decimal(10) ** (arrow_type.precision - arrow_type.scale)

    def convert(value: Decimal) -> Decimal:
        value = Decimal(value)
        # Checked before rescaling: quantize itself fails past the decimal context's 28 digits.
        if not value.is_finite() or abs(value) >= limit:
            raise ValueError(f"{path}: {value} does not fit decimal({arrow_type.precision}, {arrow_type.scale})")
        return value.quantize(quantum, context=_WIDE)

    return _Node(arrow_type, False, convert)


def _unmappable(path: str, tp: Any, what: str) -> ConfigError:
    shown = getattr(tp, "__name__", None) if isinstance(tp, type) else None
    return ConfigError(f"{path}: {what} ({shown or tp}) has no Arrow column type. {_UNMAPPABLE_HINT}.")


def _array(values: list[Any], arrow_type: pa.DataType) -> pa.Array:
    plain = _without_dictionaries(arrow_type)
    array = pa.array(values, plain)
    return array if plain == arrow_type else array.cast(arrow_type)


def _without_dictionaries(t: pa.DataType) -> pa.DataType:
    """pa.array can't build dictionaries nested in structs or lists: build strings, then cast."""
    if pa.types.is_dictionary(t):
        return t.value_type
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_without_dictionaries(f.type)) for f in t])
    if pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_without_dictionaries(t.value_type)))
    return t


def _identity(value: Any) -> Any:
    return value


def _enum_value(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def _optional(convert: Convert) -> Convert:
    return lambda v: None if v is None else convert(v)


def _each(convert: Convert) -> Convert:
    return lambda v: [convert(x) for x in v]
