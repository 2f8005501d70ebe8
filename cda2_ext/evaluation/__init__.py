"""Evaluating collaborations: clean accuracy and robustness under attacks (the ``cda2 eval``
protocol, its tables, plots and gradient-masking checks).

Layout: :mod:`.config` (what defines a run), :mod:`.family` (the attack family record and its
registry ``FAMILIES``), :mod:`.families` (the built-in families and probes, one runner each; the
optional AutoAttack family's runner in :mod:`.autoattack_family`), :mod:`.rows` (what a table row
is), :mod:`.robustness` (the protocol: the loop over the registry), :mod:`.masking` (the checks,
one function each), :mod:`.report` (table, CSV, JSON, PNG), :mod:`.clean` (clean accuracy).
"""
from __future__ import annotations

from .clean import evaluate_clean
from .config import DEFAULT_EPS, EvalConfig, select_subset
from .family import FAMILIES, AttackFamily, FamilyParam, attack_groups, default_attacks
from .report import EvalReport
from .robustness import evaluate_robustness

__all__ = ["evaluate_clean", "FAMILIES", "AttackFamily", "FamilyParam", "attack_groups",
           "default_attacks", "DEFAULT_EPS", "EvalConfig", "EvalReport", "evaluate_robustness",
           "select_subset"]
