"""``cda2 eval``: robustness of trained collaborations under white-box, adaptive, transfer and
query attacks (Section 4.3-4.4 of the paper), as a table, CSV/JSON and a plot.

Example, the paper's
protocol on 1000 test images::

    cda2 eval --checkpoint runs/cda2 --attack all --surrogate runs/base3 runs/base5 runs/base8 \\
        --transfer-preset table5 --out runs/cda2/eval

and a quick CPU check::

    cda2 eval --checkpoint runs/cda2 --attack all --surrogate runs/base3 --n-samples 100 \\
        --eps 0.01 0.03 0.05 --steps 10 --restarts 1 --apgd-steps 10 --transfer-steps 10 \\
        --queries 200 --out /tmp/eval
"""
from __future__ import annotations

import argparse

from ..jobs.evaluate import EvalJob

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``cda2 eval``."""
    p = sub.add_parser(
        "eval", help="robust accuracy under PGD, adaptive, transfer and Square attacks",
        description="Evaluate checkpoints on a seeded random subset of the test set: clean accuracy "
        "and robust accuracy per eps under white-box PGD (paper protocol: 50 steps x 5 restarts, "
        "step eps/5, CE), adaptive attacks on the PPD selection (soft selection at temperatures "
        "that follow the model's selection-score gaps, every sub-model, PPD push, BPDA, APGD-CE/DLR, "
        "the decision margin with sign steps and APGD, plain and multi-targeted), transfer attacks "
        "from hold-out surrogates (MI-PGD, M-DI2-FGSM, SGM; robust only if every variant is "
        "classified correctly), Square (query-only) and, when named and installed, AutoAttack "
        "standard. Prints the table (methods x eps), the budget check (the strongest attack again "
        "with twice the steps and restarts) and gradient-masking checks; writes "
        "robustness.{json,csv,png} to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    EvalJob.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``cda2 eval``: see :meth:`EvalJob.run`."""
    return EvalJob.from_args(args).run()
