"""Robustness evaluation of collaborations: the protocol, tables, plots and the ``cda2 eval`` command."""
from __future__ import annotations

from .robustness import (ATTACK_GROUPS, DEFAULT_EPS, EvalConfig, EvalReport, evaluate_robustness,
                         select_subset)

__all__ = ["ATTACK_GROUPS", "DEFAULT_EPS", "EvalConfig", "EvalReport", "evaluate_robustness",
           "select_subset"]
