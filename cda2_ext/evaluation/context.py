"""What an attack family gets and gives back: the shared :class:`EvalContext`, the
:class:`Outcome` of one row, and the :class:`Probe` records of the checks (the family record
itself, :class:`~cda2_ext.evaluation.family.AttackFamily`, is in :mod:`.family`).

A family's runner has one signature, ``run(ctx, eps) -> List[Outcome]``: it attacks every model
of ``ctx`` at radius ``eps`` and returns one per-sample robust flag vector per (model, row). The
protocol (:func:`~cda2_ext.evaluation.robustness.evaluate_robustness`) does the rest: clean
masking, timing, details, the worst case and the checks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import (Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple,
                    TypeVar)

import torch
from torch import Tensor

from ..attacks.decision import Temperatures, selection_gap
from ..attacks.engine import derive_generator
from ..attacks.transfer import TransferSet
from ..attacks.whitebox import ModelFn
from ..models.classifier import is_collaboration  # re-exported: the families ask it of each model
from ..runtime import FUSED, OpsBackend
from .config import EvalConfig
from .family import model_batches
from .rows import Row

__all__ = ["Progress", "Flags", "EvalContext", "Outcome", "Runner", "Probe", "is_collaboration"]

R = TypeVar("R")

#: One model's per-sample robust flags: ``{row: {eps: Tensor[n] bool}}`` (CPU).
Flags = Dict[Row, Dict[float, Tensor]]


class Progress:
    """A tqdm bar over attack batches (or nothing when disabled)."""

    def __init__(self, total: int = 0, enabled: bool = False) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc="eval", unit="batch", dynamic_ncols=True)

    def step(self, desc: str) -> None:
        if self.bar is not None:
            self.bar.set_description(desc[:60])
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class EvalContext:
    """Everything an attack family needs, built once per evaluation.

    Attributes:
        cfg: the validated :class:`~cda2_ext.evaluation.EvalConfig`.
        models: ``{name: model}`` as given (collaborations or plain model functions).
        targets: ``{name: x -> logits}``: each model's hard output (Algorithm 2 for collaborations).
        x, y: the evaluated subset, on the device. indices: its test-set indices (CPU).
        batches: ``(batch index, slice)`` pairs over the subset; the index seeds the batch's attacks.
        clean_ok: ``{name: Tensor[n] bool}`` (CPU): correct on clean inputs.
        flags: ``{name: Flags}``: what :meth:`record` kept so far (probes may read it).
        surrogates, transfer_sets, save_transfer_dir: the transfer family's inputs.
        details: extras written by probes (e.g. ``details["sanity"]``); families return theirs.
        log: where one-line notes go. progress: the batch progress bar.
        temperatures: each collaboration's :class:`~cda2_ext.attacks.decision.Temperatures`,
            chosen once on the whole subset (:meth:`temperatures_for`).
    """

    cfg: "EvalConfig"
    models: Mapping[str, Any]
    targets: Mapping[str, ModelFn]
    x: Tensor
    y: Tensor
    indices: Tensor
    batches: List[Tuple[int, slice]]
    backend: OpsBackend = FUSED
    device: torch.device = torch.device("cpu")
    clean_ok: Dict[str, Tensor] = field(default_factory=dict)
    flags: Dict[str, Flags] = field(default_factory=dict)
    surrogates: Mapping[str, ModelFn] = field(default_factory=dict)
    transfer_sets: Mapping[float, TransferSet] = field(default_factory=dict)
    save_transfer_dir: Optional[Path] = None
    details: Dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = print
    progress: Progress = field(default_factory=Progress)
    temperatures: Dict[str, Temperatures] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of evaluated samples."""
        return int(self.y.shape[0])

    def generator(self, *keys: object) -> torch.Generator:
        """The attack randomness for ``keys`` (e.g. attack name, eps, batch), from the run's seed."""
        return derive_generator(self.cfg.seed, *keys)

    def temperatures_for(self, model: str) -> Temperatures:
        """The adaptive attacks' temperatures for collaboration ``model``, chosen from its
        selection scale on the whole evaluated subset (so every batch and radius uses the same
        ones); the first call measures it and reports it in ``details["temperatures"]``."""
        if model not in self.temperatures:
            gap = selection_gap(self.models[model], self.x, self.cfg.score, self.cfg.batch_size)
            t = self.temperatures[model] = self.cfg.adaptive.choose_temperatures(gap)
            self.details.setdefault("temperatures", {})[model] = t.to_dict()
        return self.temperatures[model]

    def record(self, family: str, eps: float, outcomes: Sequence["Outcome"]) -> None:
        """Keep ``outcomes`` at ``eps``: a sample counts as robust only if also clean-correct;
        details go to ``details[family][model][f"{eps:g}"]``."""
        for o in outcomes:
            ok = o.correct.cpu() & self.clean_ok[o.model]
            self.flags.setdefault(o.model, {}).setdefault(o.row, {})[eps] = ok
            if o.details is not None:
                self.details.setdefault(family, {}).setdefault(o.model, {})[f"{eps:g}"] = o.details

    def over_batches(self, desc: str, attack: Callable[[int, slice], R], steps: int = 1) -> List[R]:
        """``[attack(b, s) for (b, s) in batches]``, advancing the progress bar ``steps`` per batch."""
        out = []
        for b, s in self.batches:
            out.append(attack(b, s))
            for _ in range(steps):
                self.progress.step(desc)
        return out


@dataclass
class Outcome:
    """One row of one model at one radius: ``correct[i]`` is True where sample ``i`` survived
    (the protocol ANDs it with clean correctness); ``details`` go to the report under the family's
    name, model and radius."""

    model: str
    row: Row
    correct: Tensor
    details: Optional[Dict[str, Any]] = None


#: An attack family's runner: attack every model at radius ``eps``.
Runner = Callable[[EvalContext, float], List[Outcome]]


@dataclass(frozen=True)
class Probe:
    """A measurement run once after the sweep, for the checks (e.g. PGD at a huge radius); it
    writes ``ctx.details[name]`` and is timed under ``name``.

    Attributes:
        active: whether the configuration asks for it. units: its progress steps.
    """

    name: str
    run: Callable[[EvalContext], None]
    active: Callable[[EvalContext], bool]
    units: Callable[[EvalContext], int] = model_batches
