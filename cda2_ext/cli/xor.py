"""``cda2 xor``: the XOR experiment of Section 4.2 (Figure 4), seconds on a CPU."""
from __future__ import annotations

import argparse

from ..jobs.xor import XorJob

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``cda2 xor``."""
    p = sub.add_parser("xor", help="XOR experiment (Sec. 4.2, Fig. 4): ensemble vs collaboration",
                       description="Train two linear sub-models on the 4-Gaussian XOR problem as an "
                       "ensemble (averaged predictions) and as a collaboration (soft-min surrogate + PPD "
                       "heads, Algorithm 2 at inference); print both test accuracies and draw Figure 4.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    XorJob.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``cda2 xor``: see :meth:`XorJob.run`."""
    return XorJob.from_args(args).run()
