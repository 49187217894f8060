"""Strict JSON types for config sections and option dataclasses: pydantic's lax mode would read `top_k: true`
as 1 and `chat: 1.0` as true; a field takes only the JSON types it declares."""

from __future__ import annotations

from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import field_validator
from pydantic_core import PydanticCustomError

_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _scalar_kinds(annotation: object) -> set[object]:
    """The JSON scalar types `annotation` declares; "other" where it takes more (a model, a path, Any)."""
    if annotation in _SCALARS:
        return {annotation}
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return {type(arg) for arg in args}
    if origin is Annotated:
        return _scalar_kinds(args[0])
    if origin in (Union, UnionType):
        return set().union(*(_scalar_kinds(arg) for arg in args))
    return set() if annotation is type(None) else {"other"}


def _refused(value: object, kinds: set[object], numbers_as_text: bool) -> str | None:
    """Why `value` does not fit the declared kinds, where pydantic's lax mode would convert it: true read as 1,
    1.0 or "yes" as true, "3" or 3.0 as 3."""
    kind = type(value)
    if kind not in _SCALARS or kind in kinds or (kind is int and float in kinds):
        return None
    if kind is str and numbers_as_text and (int in kinds or float in kinds):
        return None
    if kind is bool and (int in kinds or float in kinds):
        return "must be a number, not true or false"
    if "other" in kinds:
        return None
    wanted = " or ".join(_SCALARS[k] for k in _SCALARS if k in kinds)
    return f"must be {wanted}, not {_SCALARS[kind]}" if wanted else None


def json_types_as_declared(numbers_as_text: bool = False) -> Any:
    """A validator for a model's or options dataclass's fields: a value whose JSON type the field does not declare
    is refused where pydantic's lax mode would convert it (`top_k: true` read as 1, `chat: 1.0` as true). Each
    class takes its own: `_types = json_types_as_declared()`. `numbers_as_text` lets a string through to a
    numeric field for pydantic to parse: the YAML config's, where PyYAML reads `1e-3` as the string "1e-3"."""

    def refuse(cls: Any, value: Any, info: Any) -> Any:
        field = cls.__pydantic_fields__.get(info.field_name)
        why = None if field is None else _refused(value, _scalar_kinds(field.annotation), numbers_as_text)
        if why is not None:
            raise PydanticCustomError("json_type_not_declared", "{why}", {"why": why})
        return value

    return field_validator("*", mode="before")(classmethod(refuse))
