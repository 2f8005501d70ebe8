"""The rows of a robustness table: what each one is, as data, so no code parses display names.

A :class:`Row` carries the attack family it came from, its :class:`Role` (which decides how the
worst case and the gradient-masking checks treat it) and its display ``label`` (the table's,
CSV's and JSON's key). The constructors below are the only place labels are spelled.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Dict, List, Mapping

import torch
from torch import Tensor

from ..attacks.whitebox import PGDConfig

__all__ = ["Role", "Row", "PGD", "ADAPTIVE", "TRANSFER", "SQUARE", "AUTOATTACK", "BUDGET", "pgd_row",
           "adaptive_row", "ADAPTIVE_WORST", "transfer_row", "square_row", "autoattack_row",
           "BUDGET_CHECK", "WORST", "worst_case"]

#: Attack family names: the ``--attack`` groups and the keys of ``details`` and ``seconds``.
PGD, ADAPTIVE, TRANSFER, SQUARE, AUTOATTACK = "pgd", "adaptive", "transfer", "square", "autoattack"
#: The budget check's probe (its row, details and seconds).
BUDGET = "budget"


class Role(enum.Enum):
    """How a row enters the worst case and the checks."""

    #: Gradients of the evaluated model itself: the reference the black-box rows are checked against.
    WHITE_BOX = "white-box"
    #: Transfer or query attacks: one beating the white-box rows is a sign of gradient masking.
    BLACK_BOX = "black-box"
    #: One member of a group whose worst case is a row of its own (left out of :data:`WORST`).
    PART = "part"
    #: The per-sample worst case over every row that is not a :attr:`PART`.
    WORST = "worst"


@dataclass(frozen=True)
class Row:
    """One table row.

    Attributes:
        family: the attack family that produced it (:data:`PGD`, ... or ``"worst"``).
        role: see :class:`Role`.
        label: the display name, also the row's key in the report, CSV and JSON.
        short: the attack's name in check messages (black-box rows: ``"transfer"``, ``"Square"``).
    """

    family: str
    role: Role
    label: str
    short: str = ""


def pgd_row(cfg: PGDConfig) -> Row:
    """``PGD-{steps}x{restarts} ({loss})``, with ``, last iterate`` under that protocol."""
    judged = ", last iterate" if cfg.last_iterate else ""
    return Row(PGD, Role.WHITE_BOX, f"PGD-{cfg.steps}x{cfg.restarts} ({cfg.loss}{judged})", "PGD")


def adaptive_row(attack: str) -> Row:
    """One adaptive attack, ``adaptive: {attack}`` (e.g. ``soft(T=1)``), part of :data:`ADAPTIVE_WORST`."""
    return Row(ADAPTIVE, Role.PART, f"adaptive: {attack}", attack)


#: The per-sample worst case over the adaptive attacks.
ADAPTIVE_WORST = Row(ADAPTIVE, Role.WHITE_BOX, "adaptive (worst)", "adaptive")


def transfer_row(n_variants: int) -> Row:
    """``transfer (all {n} variants)``: robust only if every variant is classified correctly."""
    return Row(TRANSFER, Role.BLACK_BOX, f"transfer (all {n_variants} variants)", "transfer")


def square_row(queries: int) -> Row:
    """``Square-{queries}``."""
    return Row(SQUARE, Role.BLACK_BOX, f"Square-{queries}", "Square")


def autoattack_row(version: str = "standard") -> Row:
    """``AutoAttack ({version})``: robust only if the sample survives AutoAttack on the hard
    selection and on the ensemble output (both judged by the evaluated model)."""
    return Row(AUTOATTACK, Role.WHITE_BOX, f"AutoAttack ({version})", "AutoAttack")


#: The strongest gradient attack re-run with twice the steps and restarts on the samples every
#: other row left standing: robust only if it survives that too (so its accuracy is the new worst).
BUDGET_CHECK = Row(BUDGET, Role.WHITE_BOX, "budget check (strongest, 2x steps+restarts)", "budget check")

#: The per-sample worst case over every attack that ran at a radius.
WORST = Row("worst", Role.WORST, "worst case (all attacks)")


def worst_case(rows: Mapping[Row, Mapping[float, Tensor]]) -> Dict[float, Tensor]:
    """Per radius, robust only where every row (but the parts of a group, and a worst case
    already there) says robust."""
    by_eps: Dict[float, List[Tensor]] = {}
    for row, d in rows.items():
        if row.role in (Role.PART, Role.WORST):
            continue  # a part is contained in its group's worst-case row
        for e, ok in d.items():
            by_eps.setdefault(e, []).append(ok)
    return {e: torch.stack(v).all(0) for e, v in by_eps.items()}
