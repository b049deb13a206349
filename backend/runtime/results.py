"""JSON round trip for result dataclasses whose fields are numbers, strings, lists, dicts,
numpy arrays and other result dataclasses. Arrays are written as nested lists and read back
as arrays wherever the field's type hint says so, also inside dicts, lists and optionals
(``dict[str, dict[str, np.ndarray]]``, ``np.ndarray | None``, ``list[SomeRecord]``)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T", bound="JsonResult")


def to_plain(value: Any) -> Any:
    """Numpy arrays and scalars, dataclasses, tuples -> JSON-ready Python values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def from_plain(value: Any, hint: Any) -> Any:
    """Rebuild arrays and records from JSON values following the type ``hint``."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if hint is np.ndarray:
        array = np.asarray(value)
        return array.astype(np.float32) if array.dtype.kind == "f" else array
    if origin in (typing.Union, types.UnionType):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        return from_plain(value, options[0]) if len(options) == 1 else value
    if origin is dict and isinstance(value, dict):
        _, value_hint = typing.get_args(hint) or (Any, Any)
        return {k: from_plain(v, value_hint) for k, v in value.items()}
    if origin is list and isinstance(value, list):
        (item_hint,) = typing.get_args(hint) or (Any,)
        return [from_plain(v, item_hint) for v in value]
    if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return _build(hint, value)
    return value


def _build(cls: type, data: dict) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {
        f.name: from_plain(data[f.name], hints.get(f.name, Any)) for f in dataclasses.fields(cls) if f.name in data
    }
    return cls(**kwargs)


class JsonResult:
    """Mixin for result dataclasses: ``to_dict``/``to_json`` and ``from_dict``/``from_json``."""

    def to_dict(self) -> dict:
        return to_plain(self)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls: type[T], data: dict) -> T:
        return _build(cls, data)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.from_dict(json.loads(text))
