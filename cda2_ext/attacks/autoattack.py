"""AutoAttack (Croce & Hein 2020) through its reference implementation, an optional extra.

AutoAttack "standard" - untargeted APGD-CE, APGD-T (9 target classes), FAB-T (9 target classes)
and Square (5000 queries), each run on the samples the previous ones left standing - is the
number RobustBench and most papers report, so ``cda2 eval --attack autoattack`` prints it as a row
of its own. It comes from the authors' code (fra31/auto-attack) as packaged on PyPI by
``pyautoattack`` (the attack modules unchanged, a keyword-only ``AutoAttack`` front end with
logging instead of prints): ``pip install 'cda2_ext[autoattack]'``. Nothing here imports it
unless :func:`autoattack` is called; :func:`autoattack_missing` says why it cannot run.

AutoAttack attacks an images -> logits function. For a collaboration that is either the hard
selection (:class:`~cda2_ext.models.classifier.CollaborationLogits`: the gradient flows through
the selected sub-model only, the argmax over PPD heads has none) or the ensemble output
(:class:`~cda2_ext.models.classifier.EnsembleLogits`); whichever was attacked, the points it
returns are judged by the model being evaluated (``judge``), so both runs can join the per-sample
worst case. AutoAttack knows nothing of the selection, so on a selection model it is a baseline
to compare with, not a bound: the adaptive attacks (:mod:`~cda2_ext.attacks.adaptive`) attack
the decision itself.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import torch
from torch import Tensor

from ..models.classifier import as_model_fn
from ..runtime import eval_mode
from .engine import AttackResult, ModelFn, check_attack_args, margin, project_

__all__ = ["AUTOATTACK_PACKAGE", "AUTOATTACK_INSTALL", "AutoAttackResult", "autoattack_missing",
           "autoattack"]

AUTOATTACK_PACKAGE = "pyautoattack"
AUTOATTACK_INSTALL = "pip install 'cda2_ext[autoattack]'"
_VERSIONS = ("standard", "plus")


def autoattack_missing() -> str:
    """``""`` when AutoAttack can run here, else one line saying why (and how to install it)."""
    if importlib.util.find_spec(AUTOATTACK_PACKAGE) is None:
        return (f"AutoAttack not run: the optional package {AUTOATTACK_PACKAGE} (the reference "
                f"implementation) is not installed; {AUTOATTACK_INSTALL}")
    return ""


@dataclass
class AutoAttackResult(AttackResult):
    """An :class:`~cda2_ext.attacks.engine.AttackResult` (folded, ``[B, ...]``, judged by the
    evaluated model) plus AutoAttack's own warnings ("flags": zero gradients, randomness, Square
    doing better than the gradient attacks, ...) and the time it took."""

    flags: List[str] = field(default_factory=list)
    seconds: float = 0.0


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg not in self.messages:
            self.messages.append(msg)


@contextlib.contextmanager
def _collect_flags(logger_name: str) -> Iterator[_Collect]:
    logger = logging.getLogger(logger_name)
    handler = _Collect()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def autoattack(model: ModelFn, x_nat: Tensor, target: Tensor, eps: float, *,
               judge: Optional[ModelFn] = None, version: str = "standard", seed: int = 0,
               batch_size: int = 250, only_correct: bool = True, lo: float = 0.0,
               hi: float = 1.0) -> AutoAttackResult:
    """AutoAttack ``version`` (L-inf, radius ``eps``) against ``model``, judged by ``judge``.

    Args:
        model: images ``[N, C, H, W]`` in [0, 1] -> logits ``[N, K]`` (an ``nn.Module`` or any
            callable; a collaboration: its Algorithm-2 decision, see
            :func:`~cda2_ext.models.classifier.as_model_fn`); AutoAttack's targeted attacks use
            9 target classes, so ``K >= 10``.
        judge: the evaluated model the returned points are scored by (default ``model``).
        version: ``"standard"`` (what RobustBench reports) or ``"plus"``.
        seed: AutoAttack's seed; the global RNG is restored afterwards.
        only_correct: samples ``judge`` gets wrong on clean inputs stay wrong.
        lo, hi: AutoAttack's box is [0, 1]; anything else is refused.

    Raises:
        ImportError: the optional package is not installed (see :func:`autoattack_missing`).
        ValueError: bad arguments, before any model call.
    """
    check_attack_args(x_nat, target, eps)
    if version not in _VERSIONS:
        raise ValueError(f"version: expected one of {_VERSIONS}, got {version!r}")
    if (lo, hi) != (0.0, 1.0):
        raise ValueError(f"lo, hi: AutoAttack works on images in [0, 1], got [{lo}, {hi}]")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    missing = autoattack_missing()
    if missing:
        raise ImportError(missing)
    from pyautoattack import AutoAttack  # the optional extra; imported only when used

    model = as_model_fn(model)
    judge = model if judge is None else as_model_fn(judge)
    x_nat = x_nat.detach()
    t0 = time.perf_counter()
    flags: List[str] = []
    with eval_mode(model), eval_mode(judge):
        if eps > 0:
            dev = x_nat.device
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), \
                    _collect_flags("auto-attack") as collected:
                adversary = AutoAttack(model, norm="Linf", eps=float(eps), version=version,
                                       seed=int(seed), device=dev)
                x_adv, _ = adversary.run_standard_evaluation(x_nat, target, batch_size=batch_size)
            flags = collected.messages
            # AutoAttack projects onto the ball itself; projecting again only guards against
            # float drift, so the row can never count a point outside the threat model.
            x_adv = project_(x_adv.detach().clone(), x_nat, float(eps), lo, hi)
        else:
            x_adv = x_nat.clone()
        with torch.no_grad():
            logits = torch.cat([judge(x_adv[i:i + batch_size]) for i in range(0, x_adv.shape[0], batch_size)])
            correct = logits.argmax(-1) == target
            m = margin(logits.float(), target)
            if only_correct:
                clean_ok = torch.cat([judge(x_nat[i:i + batch_size]).argmax(-1)
                                      for i in range(0, x_nat.shape[0], batch_size)]) == target
                correct &= clean_ok
    return AutoAttackResult(x_adv, m, correct, flags=flags, seconds=time.perf_counter() - t0)
