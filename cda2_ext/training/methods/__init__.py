"""Training methods: each an objective plugged into the one trainer (see :mod:`.base`).

* ``cda2`` - Algorithm 1 of the paper (:mod:`.cda2`).
"""
from __future__ import annotations

from typing import Dict, Type

from .base import Method, Tally
from .cda2 import CDA2

__all__ = ["METHODS", "Method", "Tally", "method_class"]

#: ``--method`` name -> class. A new method registers here.
METHODS: Dict[str, Type[Method]] = {cls.name: cls for cls in (CDA2,)}


def method_class(name: str) -> Type[Method]:
    """The method called ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method: expected one of {tuple(METHODS)}, got {name!r}") from None
