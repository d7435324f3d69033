"""Config dataclasses from dicts (config.json, YAML): unknown keys are an error naming them."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping, TypeVar

from cm3leon.errors import CM3LeonError

T = TypeVar("T")


def from_dict_strict(cls: type[T], d: Mapping[str, Any], what: str) -> T:
    """`cls(**d)`, refusing keys that are not fields of `cls` with a message naming them."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise CM3LeonError(f"{what}: unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**d)
