"""Evaluating collaborations: clean accuracy and robustness under attacks (the ``cda2 eval``
protocol, its tables, plots and gradient-masking checks).

Layout: :mod:`.config` (what defines a run), :mod:`.families` (the attack families and probes,
one runner each, registered in ``FAMILIES``; the optional AutoAttack family's runner in
:mod:`.autoattack`), :mod:`.rows` (what a table row is), :mod:`.robustness` (the protocol: the
loop over the registry), :mod:`.masking` (the checks, one function each), :mod:`.report` (table,
CSV, JSON, PNG), :mod:`.clean` (clean accuracy).
"""
from __future__ import annotations

from .clean import evaluate_clean
from .config import ATTACK_GROUPS, DEFAULT_ATTACKS, DEFAULT_EPS, EvalConfig, select_subset
from .report import EvalReport
from .robustness import evaluate_robustness

__all__ = ["evaluate_clean", "ATTACK_GROUPS", "DEFAULT_ATTACKS", "DEFAULT_EPS", "EvalConfig",
           "EvalReport", "evaluate_robustness", "select_subset"]
