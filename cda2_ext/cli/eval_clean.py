"""``cda2 eval-clean`` (alias ``cda2 predict``): clean accuracy of a checkpoint's collaboration,
ensemble and sub-models, and how often each sub-model is chosen, as JSON."""
from __future__ import annotations

import argparse

from ..jobs.evaluate_clean import CleanEvalJob

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``cda2 eval-clean`` (alias ``cda2 predict``)."""
    p = sub.add_parser("eval-clean", aliases=["predict"],
                       help="clean accuracy of a trained collaboration, ensemble and sub-models",
                       description="Evaluate a checkpoint on clean test images: accuracy of the "
                       "collaboration (Algorithm 2), the ensemble (mean probability and majority vote) "
                       "and each sub-model, plus how often each sub-model is chosen. Prints JSON; with "
                       "--rules all, a table of every label-free rule instead (the JSON then goes "
                       "to --out).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    CleanEvalJob.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``cda2 eval-clean``: see :meth:`CleanEvalJob.run`."""
    return CleanEvalJob.from_args(args).run()
