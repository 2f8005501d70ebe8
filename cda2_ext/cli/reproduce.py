"""``cda2 reproduce EXPERIMENT --budget NAME``: one of the paper's experiments end to end.

Trains what the experiment needs (reusing finished runs in ``--out``, resuming interrupted ones),
evaluates, and writes ``reproduce_<experiment>_<budget>.{md,json,png}``: the table with the paper's
numbers beside the measured ones, the exact commands and the budget (:mod:`cda2_ext.reproduce`).
"""
from __future__ import annotations

import argparse

from ..errors import CLIError
from ..reproduce import BUDGETS, EXPERIMENTS, describe_all, plan_experiment, run_experiment

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``cda2 reproduce``."""
    p = sub.add_parser(
        "reproduce", help="run one of the paper's experiments and tabulate it beside the paper",
        description="Run an experiment of the paper as cda2 commands at a budget: 'small' fits a "
        "2-core CPU on the shared CIFAR-10 subset in minutes, 'cpu' (depth) all of CIFAR-10 in about "
        "an hour on 2 cores, 'converged' (depth) Table 6's depth-2 column at the paper's 100 "
        "epochs in about 1 h 45 min on 2 cores, 'gpu' one device call, 'paper' is the paper's "
        "setting (a GPU, full CIFAR-10 via --download or --data). Finished runs in --out are reused and interrupted "
        "ones resumed. Writes reproduce_<experiment>_<budget>.md (table: paper beside measured, "
        "notes, commands), .json (the same as data, with the budget) and .png (the figure, where the "
        "paper has one) to --results. Experiments: " + "; ".join(describe_all()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("experiment", choices=tuple(EXPERIMENTS), help="which experiment")
    p.add_argument("--budget", default="small", choices=BUDGETS, help="how much compute")
    p.add_argument("--out", default="runs/reproduce",
                   help="folder of the runs (OUT/<experiment>-<budget>/)")
    p.add_argument("--results", default=None, help="folder of the table, record and figure "
                   "(default: --out)")
    p.add_argument("--data", default=None, help="CIFAR-10 folder, image folder or zip for every "
                   "step (default: $CDA2_DATA, else ./data if it exists, then ~/.cache/cda2_ext/data)")
    p.add_argument("--download", action="store_true",
                   help="download CIFAR-10 into --data first if missing (default: $CDA2_DATA, "
                   "else ./data if it exists, else ~/.cache/cda2_ext/data)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--jobs", type=int, default=1, help="train up to N runs at once as child "
                   "processes (independent arms; e.g. the CPU's cores, or several runs per GPU)")
    p.add_argument("--force", action="store_true", help="rerun every step from scratch")
    p.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``cda2 reproduce``: plan (``--dry-run``) or run the experiment; print its table."""
    if not 1 <= args.jobs <= 64:
        raise CLIError(f"--jobs: must be an integer in [1, 64], got {args.jobs}")
    if args.dry_run:
        for step in plan_experiment(args.experiment, args.budget, args.out, data=args.data,
                                    download=args.download, device=args.device):
            print(step.command)
        return 0
    rec = run_experiment(args.experiment, args.budget, args.out, args.results, data=args.data,
                         download=args.download, device=args.device, force=args.force,
                         jobs=args.jobs)
    print(rec["table"])
    print()
    for note in rec["notes"]:
        print(f"- {note}")
    print(f"\n{len(rec['commands'])} commands, {rec['seconds']} s; wrote "
          f"{', '.join(rec['files'].values())}")
    return 0
