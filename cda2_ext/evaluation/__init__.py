"""Evaluating collaborations: clean accuracy and robustness under attacks (the ``cda2 eval``
protocol, its tables, plots and gradient-masking checks)."""
from __future__ import annotations

from .clean import evaluate_clean
from .robustness import (ATTACK_GROUPS, DEFAULT_EPS, EvalConfig, EvalReport, evaluate_robustness,
                         select_subset)

__all__ = ["evaluate_clean", "ATTACK_GROUPS", "DEFAULT_EPS", "EvalConfig", "EvalReport",
           "evaluate_robustness", "select_subset"]
