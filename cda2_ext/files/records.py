"""JSON round trips of the option dataclasses (model and training configs in checkpoints)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Type, TypeVar

__all__ = ["from_record"]

T = TypeVar("T")


def from_record(cls: Type[T], record: Mapping[str, Any], what: str,
                error: Type[Exception] = ValueError) -> T:
    """``cls(**record)`` for a dataclass ``cls``, strictly: unknown keys raise ``error`` naming
    ``what`` (a typo, or a file of another version, should not pass silently), and lists are
    turned back into the tuples that JSON could not keep."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(record) - set(fields)
    if unknown:
        raise error(f"{what}: unknown keys {sorted(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}
    return cls(**values)
