"""JSON round trips of the option dataclasses (model and training configs in checkpoints)."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, Mapping, Type, TypeVar

__all__ = ["from_record", "to_record"]

T = TypeVar("T")


def to_record(obj: Any, later: Iterable[str] = ()) -> Dict[str, Any]:
    """``dataclasses.asdict(obj)`` without the ``later`` fields (those added after checkpoints
    existed) where they hold their default: a run that does not use them writes the record
    earlier versions wrote, and can still read. :func:`from_record` fills them back in."""
    record = dataclasses.asdict(obj)
    defaults = {f.name: f.default for f in dataclasses.fields(obj)}
    for name in later:
        if record[name] == defaults[name]:
            del record[name]
    return record


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
