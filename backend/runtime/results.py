"""JSON round trip for result dataclasses whose fields are numbers, strings, lists, dicts
and numpy arrays. Arrays are written as nested lists and read back as float32/int arrays."""

from __future__ import annotations

import dataclasses
import json
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


class JsonResult:
    """Mixin for result dataclasses: ``to_dict``/``to_json`` and ``from_dict``/``from_json``."""

    def to_dict(self) -> dict:
        return to_plain(self)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls: type[T], data: dict) -> T:
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if hints.get(f.name) is np.ndarray:
                value = np.asarray(value, dtype=np.float32 if _has_float(value) else None)
            kwargs[f.name] = value
        return cls(**kwargs)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.from_dict(json.loads(text))


def _has_float(value: Any) -> bool:
    array = np.asarray(value)
    return array.dtype.kind == "f"
