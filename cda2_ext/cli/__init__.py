"""The ``cda2`` command.

Subcommands (``cda2 COMMAND --help`` for each):

* ``cda2 xor`` - the XOR experiment of Section 4.2 (Figure 4), seconds on a CPU.
* ``cda2 train`` - Algorithm 1 on CIFAR-10 (or a synthetic set), with checkpoints and ``--resume``.
* ``cda2 eval-clean`` (alias ``cda2 predict``) - clean accuracy of a checkpoint's collaboration,
  ensemble and sub-models, and how often each sub-model is chosen, as JSON.
* ``cda2 eval`` - robustness under white-box, adaptive, transfer and query attacks
  (:mod:`cda2_ext.evaluation`): the paper's tables, CSV/JSON and a plot.
* ``cda2 reproduce`` - one of the paper's experiments end to end at a budget (small: a CPU;
  paper: the paper's setting), its table beside the paper's numbers (:mod:`cda2_ext.reproduce`).
* ``cda2 compare`` - finished runs (any ``--method``) side by side in the paper's layout, with
  their training cost, from their ``cda2 eval`` results.

Each subcommand is a module of this package with a ``register(subparsers)`` function that adds
its parser and sets ``func``; a new subcommand is a new module whose ``register`` is appended to
:data:`COMMANDS`. Expected failures (any :class:`~cda2_ext.errors.Cda2Error`: bad options, missing
data or checkpoints) exit with status 2 and one ``cda2: error: ...`` line, no traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List, Optional, Sequence

from .. import __version__
from ..errors import Cda2Error
from . import compare, eval_clean, eval_robustness, reproduce, train, xor

__all__ = ["main", "build_parser", "COMMANDS"]


# ----- entry point ------------------------------------------------------------------------------
COMMANDS: List[Callable[[argparse._SubParsersAction], None]] = [
    xor.register, train.register, eval_clean.register, eval_robustness.register,
    reproduce.register,
    compare.register,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``cda2`` parser with every registered subcommand."""
    p = argparse.ArgumentParser(prog="cda2", description="CDA²: Collaborate to Defend against "
                                "Adversarial Attacks - train and use collaborations of dual-head models.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``cda2`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Cda2Error as err:
        print(f"cda2: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cda2: interrupted (the last completed epoch's checkpoint is kept)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whoever read our output left (`cda2 reproduce ... --dry-run | head`): stop quietly like
        # other command-line tools, and point stdout at /dev/null so that Python's own flush at
        # exit does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141

