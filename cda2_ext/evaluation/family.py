"""What an attack family of ``cda2 eval`` is, as a record, and the registry they declare
themselves in.

An :class:`AttackFamily` is one ``--attack`` group: its name, its one-line help (``--help`` and
the docs table read it), whether ``--attack all`` runs it, the :class:`FamilyParam` s it reads
(each a ``cda2 eval`` option with its default and bounds, stored in ``EvalConfig.options``), and
its runner ``run(ctx, eps) -> List[Outcome]``. :data:`FAMILIES` holds them in the order they run;
:mod:`~cda2_ext.evaluation.families` registers the built-in ones. ``EvalConfig`` validation, the
``--attack`` choices, the family options of ``cda2 eval`` and :func:`docs_rows` all read the
registry, so a new family is one ``FAMILIES.add(AttackFamily(...))`` and its test
(``python_tests/test_extension_records.py`` registers a toy one and runs it through the CLI).

This module sits below :mod:`~cda2_ext.evaluation.config` (which validates against the registry)
and imports nothing of the protocol.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

from .. import limits
from ..errors import ConfigError
from ..registry import Registry

#: What a runner gets: an :class:`~cda2_ext.evaluation.context.EvalContext` (named, not imported:
#: the context imports the config, which reads this registry, so the import would run upward).
EvalContext = Any
#: What a runner returns: a list of :class:`~cda2_ext.evaluation.context.Outcome`.
Outcomes = List[Any]

__all__ = ["FamilyParam", "AttackFamily", "FAMILIES", "attack_groups", "default_attacks",
           "attack_help", "docs_rows", "sweep_radii", "model_batches", "ready"]

#: A parameter's value: a count, a number, or a tuple of L-inf radii.
ParamValue = Union[int, float, Tuple[float, ...]]


@dataclass(frozen=True)
class FamilyParam:
    """One option an attack family reads: ``EvalConfig.options[family][name]``.

    The kind follows the default: an ``int`` is a count (an integer in ``[low, high]``), a
    ``float`` a number in ``[low, high]``, a ``tuple`` a list of L-inf radii (each checked by
    :func:`~cda2_ext.limits.radius`, at least one).

    Attributes:
        name: the key in the family's options and the keyword the runner reads.
        default: its value where not given.
        help: its ``--help`` line.
        low, high: the bounds of a count or number (a count's ``high`` defaults to
            :data:`~cda2_ext.limits.ITERATIONS`).
        flag: the ``cda2 eval`` option; default ``--{family}-{name}`` with dashes.
    """

    name: str
    default: ParamValue
    help: str
    low: float = 1
    high: float = limits.ITERATIONS
    flag: str = ""

    def option(self, family: str) -> str:
        """The name errors and ``EvalConfig`` use: ``{family}_{name}`` (``square_queries``)."""
        return f"{family}_{self.name}"

    def cli_flag(self, family: str) -> str:
        """The ``cda2 eval`` option that sets it."""
        return self.flag or "--" + self.option(family).replace("_", "-")

    @property
    def radii(self) -> bool:
        return isinstance(self.default, tuple)

    def check(self, family: str, value: Any) -> ParamValue:
        """``value`` in the parameter's kind, or :class:`~cda2_ext.errors.ConfigError` naming
        ``{family}_{name}`` and the option that sets it (``square_queries (--queries)``)."""
        name = f"{self.option(family)} ({self.cli_flag(family)})"
        if self.radii:
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ConfigError(f"{name}: expected a list of L-inf radii, got {value!r}")
            vals = tuple(limits.radius(name, v) for v in value)
            if not vals:
                raise ConfigError(f"{name}: needs at least one radius")
            return vals
        if isinstance(self.default, int) and not isinstance(self.default, bool):
            return limits.count(name, value, int(self.low), int(self.high))
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (ok and math.isfinite(value) and self.low <= value <= self.high):
            raise ConfigError(f"{name}: must be a number in [{self.low:g}, {self.high:g}], got {value!r}")
        return float(value)


def sweep_radii(ctx: EvalContext) -> Sequence[float]:
    """The configured eps sweep (the default radii of a family)."""
    return ctx.cfg.eps


def model_batches(ctx: EvalContext) -> int:
    """One progress step per model and batch (the default)."""
    return len(ctx.targets) * len(ctx.batches)


def ready(ctx: EvalContext) -> Optional[str]:
    """Nothing to check: the family can always run (the default)."""
    return None


@dataclass(frozen=True)
class AttackFamily:
    """A registered attack family (one ``--attack`` group).

    Attributes:
        name: the group name; also its key in ``details``, ``details["seconds"]`` and
            ``EvalConfig.options``.
        run: ``run(ctx, eps) -> List[Outcome]``: attack every model of ``ctx`` at ``eps`` (its
            parameters: ``ctx.cfg.option(name, param)``; its randomness:
            ``ctx.generator(name, eps, batch)``).
        help: its line in ``--attack``'s help and the docs table.
        in_all: whether ``--attack all`` (and the default configuration) runs it; an optional
            extra (AutoAttack) runs only when named.
        params: the options it reads, beyond the shared ones (``--eps``, ``--seed``, ...).
        radii: where it runs (default: the eps sweep).
        units: progress steps per radius.
        prepare: validates the family's inputs before any attack runs (raises ``ValueError``) and
            returns why it cannot run (a ``NOTE`` in the checks) or ``None``.
        details: whether its outcomes carry details; the report then has its key even when
            the family did not run (a fixed JSON layout).
    """

    name: str
    run: Callable[[EvalContext, float], Outcomes]
    help: str
    in_all: bool = True
    params: Tuple[FamilyParam, ...] = ()
    radii: Callable[[EvalContext], Sequence[float]] = sweep_radii
    units: Callable[[EvalContext], int] = model_batches
    prepare: Callable[[EvalContext], Optional[str]] = ready
    details: bool = False


#: The attack families by name, in the order they run at each radius (``--attack``).
FAMILIES: Registry[AttackFamily] = Registry("attacks")


def attack_groups() -> Tuple[str, ...]:
    """Every registered family's name, in order: the ``--attack`` groups."""
    return FAMILIES.names()


def default_attacks() -> Tuple[str, ...]:
    """What ``--attack all`` and the default ``EvalConfig`` run: the families ``in_all``."""
    return tuple(f.name for f in FAMILIES.values() if f.in_all)


def attack_help() -> str:
    """``--attack``'s help: every family and its line (read when the parser is built, so a
    family registered before appears)."""
    extra = [f.name for f in FAMILIES.values() if not f.in_all]
    rows = "; ".join(f"{f.name}: {f.help}" for f in FAMILIES.values())
    return (f"attack groups to run ({rows}); all: every group"
            + (f" but the optional {', '.join(extra)}, run only when named (e.g. --attack all "
               f"{extra[0]})" if extra else ""))


def _shown(value: ParamValue) -> str:
    """A default as it is typed on the command line (radii separated by spaces)."""
    return " ".join(f"{v:g}" for v in value) if isinstance(value, tuple) else f"{value:g}"


def docs_rows() -> List[str]:
    """The rows of docs/evaluation.md's table of attack families (``--attack`` | in ``all`` |
    options | what it runs), one per registered family."""
    rows = []
    for f in FAMILIES.values():
        opts = ", ".join(f"`{p.cli_flag(f.name)} {_shown(p.default)}`" for p in f.params) or "-"
        rows.append(f"| `{f.name}` | {'yes' if f.in_all else 'no'} | {opts} | {f.help} |")
    return rows
