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
data or checkpoints; and any ``OSError`` on a user's path: a name too long, no permission, a loop
of links, a full disk) exit with status 2 and one ``cda2: error: ...`` line, no traceback; a
malformed command line is two lines (the error, then which ``--help`` to read), also status 2.
Warnings are one ``cda2: warning: ...`` line each.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, Dict, List, NoReturn, Optional, Sequence

from .. import __version__
from ..storage.checkpoint import ALLOW_UNDIGESTED_ENV
from ..errors import Cda2Error, os_reason
from . import compare, eval_clean, eval_robustness, reproduce, train, xor

__all__ = ["main", "build_parser", "COMMANDS"]


# ----- entry point ------------------------------------------------------------------------------
COMMANDS: List[Callable[[argparse._SubParsersAction], None]] = [
    xor.register, train.register, eval_clean.register, eval_robustness.register,
    reproduce.register,
    compare.register,
]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are two lines - the error and which ``--help`` to read -
    instead of the whole usage (25 lines for ``cda2 train``), exit status 2 as argparse's.
    Subcommands' parsers are of this class too (``add_subparsers`` makes them so)."""

    #: The subcommands' parsers by name (set on the top parser by :func:`build_parser`).
    commands: Dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line_text(message)}\nsee {self.prog} --help\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        # argparse reports a subcommand's unknown options from the top parser ("see cda2
        # --help"); the subcommand's help is the one that lists the options meant.
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            chosen = self.commands.get(getattr(ns, "command", None) or "", self)
            chosen.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns


def build_parser() -> argparse.ArgumentParser:
    """The ``cda2`` parser with every registered subcommand."""
    p = _Parser(prog="cda2", description="CDA²: Collaborate to Defend against "
                "Adversarial Attacks - train and use collaborations of dual-head models.",
                epilog=f"Checkpoints carry a digest of their tensors and metadata; one written "
                f"before the metadata digest is refused unless {ALLOW_UNDIGESTED_ENV}=1 is set in "
                "the environment (it is then loaded unverified, with a warning).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    p.commands = dict(sub.choices)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``cda2`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():  # restores the caller's warning display afterwards
            warnings.showwarning = _show_warning
            return int(args.func(args) or 0)
    except Cda2Error as err:
        print(f"cda2: error: {_one_line_text(str(err))}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Whoever read our output left (`cda2 reproduce ... --dry-run | head`): stop quietly like
        # other command-line tools, and point stdout at /dev/null so that Python's own flush at
        # exit does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:
        # A path the system refuses (a name too long, no permission, a loop of links) or a full
        # disk, wherever it was met: the user's to fix, so one line naming the path and the reason.
        print(f"cda2: error: {_one_line_text(os_reason(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cda2: interrupted (the last completed epoch's checkpoint is kept)", file=sys.stderr)
        return 130


#: Characters that break a line (str.splitlines' set), shown escaped in messages.
_LINE_BREAKS = {c: repr(chr(c))[1:-1] for c in (0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x85,
                                                 0x2028, 0x2029)}


def _one_line_text(text: str) -> str:
    """A message as one line: a path or value given by the user may hold line breaks, which are
    shown escaped (``dir\\nname``), as Python would write them."""
    return text.translate(_LINE_BREAKS)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one ``cda2: warning: ...`` line (Python's default adds the source line)."""
    print(f"cda2: warning: {_one_line_text(str(message))}", file=file or sys.stderr)

