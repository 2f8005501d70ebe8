"""Training methods: each an objective plugged into the one trainer (see :mod:`.base`).

* ``cda2`` - Algorithm 1 of the paper (:mod:`.cda2`).
* ``ensemble`` - independent sub-models on their own cross-entropy, ``--adv`` for PGD training of
  the averaged ensemble (:mod:`.ensemble`): the hold-out surrogates of the transfer tables.
* ``adp`` - Pang et al. (2019), ensemble entropy + log-det diversity (:mod:`.adp`).
* ``gal`` - Kariyappa & Qureshi (2019), input-gradient alignment loss (:mod:`.gal`).
* ``dverge`` - Yang et al. (2020), cross training on feature-distilled images (:mod:`.dverge`).

A method class may set ``defaults`` (a dict of ``TrainConfig`` fields), which
:meth:`~cda2_ext.training.TrainConfig.for_method` applies where the user gives no value.
"""
from __future__ import annotations

from typing import Dict, Type

from .adp import ADP
from .base import Method, Tally
from .cda2 import CDA2
from .dverge import DVERGE
from .ensemble import Ensemble
from .gal import GAL

__all__ = ["METHODS", "Method", "Tally", "method_class"]

#: ``--method`` name -> class. A new method registers here.
METHODS: Dict[str, Type[Method]] = {cls.name: cls for cls in (CDA2, Ensemble, ADP, GAL, DVERGE)}


def method_class(name: str) -> Type[Method]:
    """The method called ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method: expected one of {tuple(METHODS)}, got {name!r}") from None
