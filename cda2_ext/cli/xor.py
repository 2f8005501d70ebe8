"""``cda2 xor``: the XOR experiment of Section 4.2 (Figure 4), seconds on a CPU."""
from __future__ import annotations

import argparse
import math

from .. import _checks, limits
from ..errors import CLIError
from ..plotting import figure_format
from ..run_dir import check_output
from ..xor import XorConfig, run_xor

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``cda2 xor``."""
    d = XorConfig()
    p = sub.add_parser("xor", help="XOR experiment (Sec. 4.2, Fig. 4): ensemble vs collaboration",
                       description="Train two linear sub-models on the 4-Gaussian XOR problem as an "
                       "ensemble (averaged predictions) and as a collaboration (soft-min surrogate + PPD "
                       "heads, Algorithm 2 at inference); print both test accuracies and draw Figure 4.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``cda2 xor``: train both models, print the accuracies, draw Figure 4."""
    if not (math.isfinite(args.sigma) and args.sigma > 0):
        raise CLIError(f"sigma: the soft-min temperature must be finite and > 0, got {args.sigma}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise CLIError(f"lr: must be finite and > 0, got {args.lr}")
    for flag, v, lo, hi in (("n-train", args.n_train, 4, limits.ITEMS // 100),
                            ("n-test", args.n_test, 4, limits.ITEMS // 100),
                            ("steps", args.steps, 0, limits.ITERATIONS)):
        limits.count(flag, v, lo, hi)
    try:
        _checks.seed(args.seed)
    except ValueError as err:
        raise CLIError(str(err)) from None
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
