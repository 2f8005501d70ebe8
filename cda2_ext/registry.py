"""Named records that extension points declare themselves in: one entry, one new rule.

A :class:`Registry` maps names to records (frozen dataclasses that carry their own help text and
function). Option checks, ``--help`` choices and the docs tables read the registry instead of
restating its names, so adding a record is the whole change. It is a read-only ``Mapping`` plus
:meth:`Registry.add`; ``name in registry`` and iteration (as argparse ``choices``) see records
added later too.
"""
from __future__ import annotations

from typing import Dict, Generic, Iterator, Mapping, Tuple, TypeVar

from .errors import ConfigError

__all__ = ["Registry"]

R = TypeVar("R")


class Registry(Mapping[str, R], Generic[R]):
    """Records of one kind by name, in the order they were added.

    Args:
        option: the option or argument that names a record (``"score"``), used in error messages.
    """

    #: How many records were added or removed in any registry so far: what a cache of anything
    #: built from the records (a command's parser) is keyed by.
    changes: int = 0

    def __init__(self, option: str) -> None:
        self.option = option
        self._items: Dict[str, R] = {}

    def add(self, record: R) -> R:
        """Register ``record`` under its ``name``; a second record of one name is an error (a
        silent replacement would change results without a trace). Returns ``record``."""
        name = getattr(record, "name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.option}: a record needs a non-empty str name, got {name!r}")
        if name in self._items:
            raise ValueError(f"{self.option}: {name!r} is registered already")
        self._items[name] = record
        Registry.changes += 1
        return record

    def remove(self, name: str) -> None:
        """Unregister ``name`` (tests that register a toy record clean up with this)."""
        del self._items[name]
        Registry.changes += 1

    def get_or_raise(self, name: str) -> R:
        """The record called ``name``, or a :class:`ConfigError` naming the option and choices."""
        if not isinstance(name, str) or name not in self._items:
            raise ConfigError(f"{self.option}: expected one of {self.names()}, got {name!r}")
        return self._items[name]

    def names(self) -> Tuple[str, ...]:
        """The registered names, in order."""
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:  # any value, hashable or not: no TypeError
        return isinstance(name, str) and name in self._items

    def __getitem__(self, name: str) -> R:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:  # error messages print the choices as a tuple, as before
        return repr(self.names())
