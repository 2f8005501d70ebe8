"""``cda2 train``: Algorithm 1 on CIFAR-10 (or a synthetic set), with checkpoints and ``--resume``
(the options and the run itself: :class:`~cda2_ext.jobs.train.TrainJob`)."""
from __future__ import annotations

import argparse

from ..jobs.train import TrainJob

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``cda2 train``."""
    p = sub.add_parser("train", help="train a CDA² collaboration (Algorithm 1)",
                       description="Train M dual-head sub-models with Algorithm 1. Defaults follow the "
                       "paper (M=3, ResNet-20, eps=0.03, 100 epochs, adversarial phase only) and, where "
                       "it is silent, the authors' Synergy-of-Experts code (SGD 0.1/0.9/1e-4, batch 128, "
                       "x0.1 at 50%/75%, PGD step 0.01, sigma 1). Writes a checkpoint after every epoch. "
                       "--method ensemble|adp|gal|dverge trains the ensemble defenses the paper compares "
                       "with, each with its own defaults where an option is not given (the DVERGE "
                       "authors' code: 200 epochs, x0.1 at 100/150; ensemble/dverge SGD 0.1, adp/gal "
                       "Adam 1e-3); the defaults shown below are CDA²'s.")
    TrainJob.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``cda2 train``: train (or resume) a run and print its final metrics as JSON."""
    return TrainJob.from_args(args).run()
