"""``cda2 xor`` as a job (the command: :mod:`cda2_ext.cli.xor`)."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from .. import limits
from ..errors import ConfigError
from ..plotting import figure_format
from ..storage.run_folder import check_output
from ..xor import XorConfig, run_xor
from ..training.weighting import SIGMA
from .base import Job, check_seed

__all__ = ["XorJob"]


@dataclass(frozen=True)
class XorJob(Job):
    """``cda2 xor`` as a typed request: its options by name (:meth:`Job.of`), run in this
    process by :meth:`run`."""

    command_name = "xor"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        """The arguments of ``cda2 xor``."""
        d = XorConfig()
        p.add_argument("--seed", type=int, default=d.seed, help="random seed (data and initialisation)")
        p.add_argument("--n-train", type=int, default=d.n_train, help="training points")
        p.add_argument("--n-test", type=int, default=d.n_test, help="test points")
        p.add_argument("--steps", type=int, default=d.steps, help="full-batch Adam steps")
        p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
        p.add_argument("--sigma", type=float, default=d.sigma, help="soft-min temperature of Eq. 7")
        p.add_argument("--figure", default="xor.png", help="PNG to write ('' for none)")
        p.add_argument("--json", default=None, help="also write the results as JSON here")
        p.add_argument("--unfused", action="store_true", help="use the plain-PyTorch reference ops")
        p.add_argument("--force", action="store_true",
                       help="overwrite an existing --figure / --json file (else refused before training)")

    def run(self) -> int:
        """``cda2 xor``: train both models, print the accuracies, draw Figure 4."""
        args = self.namespace()
        SIGMA.check(args.sigma)  # Eq. 7's temperature: the one rule training's --sigma has
        if not (math.isfinite(args.lr) and args.lr > 0):
            raise ConfigError(f"lr: must be finite and > 0, got {args.lr}")
        for flag, v, lo, hi in (("n-train", args.n_train, 4, limits.ITEMS // 100),
                                ("n-test", args.n_test, 4, limits.ITEMS // 100),
                                ("steps", args.steps, 0, limits.ITERATIONS)):
            limits.count(flag, v, lo, hi)
        check_seed(args.seed)
        cfg = XorConfig(n_train=args.n_train, n_test=args.n_test, steps=args.steps, lr=args.lr,
                        sigma=args.sigma, seed=args.seed, unfused=args.unfused)
        # Refuse to overwrite a user's files before any work starts (nothing is lost, nothing wasted).
        figure = check_output(args.figure, option="--figure", force=args.force) if args.figure else None
        if figure is not None:
            figure_format(figure, "--figure")
        json_path = check_output(args.json, option="--json", force=args.force) if args.json else None
        res = run_xor(cfg, figure=figure, json_path=json_path)
        print(f"XOR test accuracy: collaboration {100 * res.collaboration_acc:.1f}%  "
              f"ensemble {100 * res.ensemble_acc:.1f}%  "
              f"(sub-models {', '.join(f'{100 * a:.1f}%' for a in res.submodel_acc)}; "
              f"assigned {', '.join(f'{100 * a:.0f}%' for a in res.assignment)})  [{res.seconds:.1f}s]")
        if args.figure:
            print(f"figure: {args.figure}")
        return 0
