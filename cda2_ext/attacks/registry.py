"""Every evaluation attack by name, behind one face (as torchattacks has one class per attack).

``ATTACKS[name](model, x_nat, target, eps, **options) -> AttackResult``: ``model`` is what the
attack needs (an images -> logits function; a surrogate for the transfer methods; a
collaboration ``x -> (logits, ppd_logit)`` for the adaptive attacks), ``x_nat [B, C, H, W]`` in
``[0, 1]``, ``target [B]`` the labels, ``eps`` the L-inf radius, and the options are the attack's
own keyword arguments (its configuration, ``generator`` or ``seed``, ``backend``, ...). Every
entry returns an :class:`~cda2_ext.attacks.engine.AttackResult` (or a subclass that adds what
that attack alone knows: Square's queries, AutoAttack's warnings):

==========================================  ================================================
``pgd``                                     :func:`~cda2_ext.attacks.whitebox.pgd_attack`
``apgd``                                    :func:`~cda2_ext.attacks.apgd.apgd_attack`
``mi-pgd``, ``m-di2-fgsm``, ``sgm``         :func:`~cda2_ext.attacks.transfer.transfer_attack`
                                            (``x_adv [V, B, ...]``, nothing judged)
``square``                                  :func:`~cda2_ext.attacks.square.square_attack`
``autoattack``                              :func:`~cda2_ext.attacks.autoattack.autoattack`
the names of ``ADAPTIVE_REGISTRY``          :func:`~cda2_ext.attacks.adaptive.adaptive_attack`
==========================================  ================================================

``cda2 eval`` runs attack *families* (:data:`~cda2_ext.evaluation.families.FAMILIES`), each of
which calls these functions with the protocol's budgets and seeds.
"""
from __future__ import annotations

from functools import partial
from types import MappingProxyType
from typing import Callable, Dict, Iterable, Mapping, Tuple

from ..errors import ConfigError
from .adaptive import ADAPTIVE_ATTACKS, adaptive_attack
from .apgd import apgd_attack
from .autoattack import autoattack
from .engine import AttackResult
from .square import square_attack
from .transfer import TRANSFER_METHODS, transfer_attack
from .whitebox import pgd_attack

__all__ = ["Attack", "ATTACKS", "get_attack"]

#: ``(model, x_nat, target, eps, **options) -> AttackResult``; options by keyword only.
Attack = Callable[..., AttackResult]


def _unique(entries: Iterable[Tuple[str, Attack]]) -> Mapping[str, Attack]:
    """A read-only registry of ``entries``; a name given twice is a programming error."""
    out: Dict[str, Attack] = {}
    for name, attack in entries:
        if name in out:  # pragma: no cover - a registry edit
            raise RuntimeError(f"attack {name!r} registered twice")
        out[name] = attack
    return MappingProxyType(out)


#: The attacks by name (see the module docstring for what each one attacks).
ATTACKS: Mapping[str, Attack] = _unique([
    ("pgd", pgd_attack),
    ("apgd", apgd_attack),
    *((m, partial(transfer_attack, method=m)) for m in TRANSFER_METHODS),
    ("square", square_attack),
    ("autoattack", autoattack),
    *((a, partial(adaptive_attack, attack=a)) for a in ADAPTIVE_ATTACKS),
])


def get_attack(name: str) -> Attack:
    """The attack registered as ``name``; :class:`~cda2_ext.errors.ConfigError` naming the
    option ``attack`` for an unknown name."""
    try:
        return ATTACKS[name]
    except KeyError:
        raise ConfigError(f"attack: unknown {name!r}; expected one of {tuple(ATTACKS)}") from None
