"""Attacking Algorithm 2's decision itself: its margin, its targets and the scale of its scores.

The collaboration answers with the sub-model whose selection score ``s`` is highest
(:func:`~cda2_ext.models.collaboration.selection_score`). The hard answer is wrong exactly when some
sub-model ``j`` both **wins the selection** and **is wrong**:

* ``lead_j = s_j - max_{i != j} s_i > 0`` (:func:`selection_lead`), and
* ``w_j = max_{k != y} z_jk - z_jy > 0`` (its margin of the best wrong class over the label).

So the *decision margin* ``D = max_j min(lead_j / g, w_j)`` (:func:`decision_margin`) is positive
exactly when the hard answer is wrong (up to exact ties), and an attack that maximises it attacks
the decision rather than a sub-model's loss or a relaxation of the argmax. Its multi-targeted form
(:func:`targeted_decision_margin`) gives each copy of a sample one pair (sub-model ``j``, wrong
class ``c``): ``D_jc = min(lead_j / g, z_jc - z_jy)``; the hard answer is wrong exactly when some
pair's ``D_jc > 0``, so a sample survives only if every pair's copy fails. The pairs are taken per
sample at the clean point (:func:`wrong_class_targets`: each sub-model's ``top`` highest wrong
classes, or all ``K - 1``), and run as ``[G, B, ...]`` copies (``G = M * top``) of one batch.

``g`` is the model's *selection scale* (:func:`selection_gap`): the median gap between the two
highest selection scores on the evaluated samples. Dividing the lead by it makes the weakest-link
``min`` compare the two conditions in units the model itself uses (a PPD lead of 0.1 is large for
a model whose typical gap is 0.05 and negligible for one whose typical gap is 10), and makes the
attack - like the temperatures chosen from the same scale (:class:`Temperatures`) - invariant to a
rescaling of the PPD logits, which does not change Algorithm 2's answer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..models.collaboration import selection_score
from ..runtime import eval_mode
from .engine import Objective, flatten_copies, margin

__all__ = ["selection_lead", "decision_margin", "targeted_decision_margin", "wrong_class_targets",
           "selection_gap", "Temperatures", "choose_temperatures", "decision_objective"]


def selection_lead(s: Tensor) -> Tensor:
    """``lead_j = s_j - max_{i != j} s_i`` for scores ``s [M, ...]``; ``+inf`` when ``M == 1``.

    Positive exactly for the sub-model Algorithm 2 selects (zero for tied leaders). Differentiable
    (through the top-two scores).
    """
    M = s.shape[0]
    if M == 1:
        return torch.full_like(s, math.inf)
    top = s.topk(2, dim=0)
    best_other = torch.where(torch.arange(M, device=s.device).view(M, *[1] * (s.dim() - 1))
                             == top.indices[0], top.values[1], top.values[0])
    return s - best_other


def _check_gap(gap: float) -> float:
    gap = float(gap)
    if not (math.isfinite(gap) and gap > 0):
        raise ValueError(f"gap: the selection scale must be a finite number > 0, got {gap}")
    return gap


def decision_margin(logits: Tensor, s: Tensor, target: Tensor, gap: float = 1.0) -> Tensor:
    """``max_j min(lead_j / gap, w_j)``: positive exactly when Algorithm 2's answer is wrong.

    Args:
        logits: ``[M, ..., K]`` the sub-models' logits. s: ``[M, ...]`` selection scores.
        target: ``[...]`` labels. gap: the selection scale (:func:`selection_gap`), ``> 0``.

    Returns:
        ``[...]`` float32, differentiable with respect to ``logits`` and ``s``.
    """
    gap = _check_gap(gap)
    lead = selection_lead(s.float()) / gap
    w = margin(logits.float(), target.expand(logits.shape[:-1]))
    return torch.minimum(lead, w).amax(0)


def targeted_decision_margin(logits: Tensor, s: Tensor, target: Tensor, models: Tensor,
                             classes: Tensor, gap: float = 1.0) -> Tensor:
    """Copy ``g`` scores the pair (``models[g]``, ``classes[g]``): ``min(lead_j / gap, z_jc - z_jy)``.

    Args:
        logits: ``[M, G, B, K]`` the sub-models' logits for ``G`` copies of ``B`` samples.
        s: ``[M, G, B]`` selection scores. target: ``[B]`` labels.
        models: ``[G]`` sub-model of each copy. classes: ``[G, B]`` wrong class of each copy and
            sample (see :func:`wrong_class_targets`). gap: the selection scale, ``> 0``.

    Returns:
        ``[G, B]`` float32; the hard answer is wrong exactly when some copy's value is ``> 0``
        (given all ``K - 1`` classes per sub-model).
    """
    gap = _check_gap(gap)
    M, G, B, K = logits.shape
    if models.shape != (G,) or classes.shape != (G, B):
        raise ValueError(f"models [G={G}] and classes [G, B={B}] must match the copies, got "
                         f"{list(models.shape)} and {list(classes.shape)}")
    copy = torch.arange(G, device=logits.device)
    lead = (selection_lead(s.float()) / gap)[models, copy]  # [G, B]
    z = logits.float()[models, copy]  # [G, B, K]
    y = target.expand(G, B)
    w = z.gather(-1, classes.unsqueeze(-1)).squeeze(-1) - z.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return torch.minimum(lead, w)


def wrong_class_targets(logits: Tensor, target: Tensor,
                        top: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """The (sub-model, wrong class) pairs of the multi-targeted decision attack, per sample.

    Args:
        logits: ``[M, B, K]`` at the clean point. target: ``[B]``.
        top: wrong classes per sub-model, the ``top`` highest-scoring ones of that sub-model for
            that sample (``None``: all ``K - 1``).

    Returns:
        ``(models [G], classes [G, B])`` with ``G = M * top``, ordered sub-model-major.
    """
    M, B, K = logits.shape
    T = K - 1 if top is None else int(top)
    if not 1 <= T <= K - 1:
        raise ValueError(f"top: wrong classes per sub-model must be in [1, {K - 1}], got {top}")
    wrong = logits.detach().float().scatter(-1, target.view(1, B, 1).expand(M, B, 1), -math.inf)
    classes = wrong.topk(T, dim=-1).indices  # [M, B, T]
    classes = classes.permute(0, 2, 1).reshape(M * T, B)
    models = torch.arange(M, device=logits.device).repeat_interleave(T)
    return models, classes


@torch.no_grad()
def selection_gap(net: nn.Module, x: Tensor, score: str = "ppd", batch_size: int = 256) -> float:
    """The selection scale of a collaboration on images ``x``: the median over samples of the gap
    between the two highest selection scores, ``s_(1) - s_(2)``.

    Falls back to the mean gap where more than half the samples tie (median 0), and to 1 where
    every sample ties or ``M == 1`` (there is then no selection whose scale could matter).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    gaps = []
    with eval_mode(net):
        for i in range(0, x.shape[0], batch_size):
            logits, ppd = net(x[i:i + batch_size])
            s = selection_score(logits, ppd, score).float()
            if s.shape[0] < 2:
                return 1.0
            top = s.topk(2, dim=0).values
            gaps.append((top[0] - top[1]).double().cpu())
    if not gaps:
        raise ValueError("x: no samples to measure the selection scale on")
    g = torch.cat(gaps)
    g = g[torch.isfinite(g)]
    for value in ((g.median() if g.numel() else None), (g.mean() if g.numel() else None)):
        if value is not None and value.item() > 0:
            return float(value.item())
    return 1.0


@dataclass(frozen=True)
class Temperatures:
    """The temperatures the adaptive attacks used, and the scale they were chosen from.

    Attributes:
        gap: the selection scale (:func:`selection_gap`): also the unit of the decision margin's
            lead.
        soft: ``(row label, T)`` per soft-selection run, e.g. ``("soft(T=gap)", 0.11)``,
            ``("soft(T=0.25*gap)", 0.0275)`` or a fixed ``("soft(T=1)", 1.0)``.
        bpda: the temperature of BPDA's (and ``ppd-push``'s) backward soft selection.
    """

    gap: float
    soft: Tuple[Tuple[str, float], ...]
    bpda: float

    def to_dict(self) -> Dict[str, Any]:
        return {"selection_gap": self.gap, "soft": dict(self.soft), "bpda": self.bpda}


def _fraction_label(f: float) -> str:
    return "soft(T=gap)" if f == 1 else f"soft(T={f:g}*gap)"


def choose_temperatures(gap: float, fractions: Sequence[float] = (1.0, 0.25),
                        fixed: Sequence[float] = (), bpda: Optional[float] = None) -> Temperatures:
    """Temperatures that follow the spread of the model's own selection scores.

    The soft selection ``softmax(s / T)`` tracks Algorithm 2 only where ``T`` is small against the
    score gaps, and gives a useful gradient towards the runner-up only where it is not much
    smaller. For two close contenders the winner's weight is ``sigmoid(gap_i / T)``, so

    * ``T = gap`` (fraction 1, the median gap ``g``): on the median sample the winner keeps ~0.73
      of the weight - the relaxation still sees which sub-model is next and its gradient
      ``w(1 - w) / T`` is near its largest; samples with smaller gaps (those a small push flips)
      are smoother still;
    * ``T = gap / 4`` (fraction 0.25): on every sample with at least the median gap the winner
      keeps ``>= sigmoid(4) ~ 0.98`` of the weight, so the relaxed output is the hard answer
      there and the attack follows the real decision; only samples within a quarter of the
      typical gap are still mixed, which are exactly the ones whose selection can flip.

    A fixed ``T = 1`` is neither: on a model whose typical gap is 0.1 it is ten gaps wide, and
    ``softmax`` is nearly uniform (an ensemble, not the selection). BPDA's backward pass uses
    ``T = gap`` (its forward pass is exact; sharper temperatures saturate the gradient on most
    samples). Because every temperature is a multiple of ``g``, scaling the PPD logits by any
    ``c > 0`` scales the temperatures by ``c`` and leaves the attacks unchanged.

    Args:
        gap: the selection scale (:func:`selection_gap`), ``> 0``.
        fractions: soft-selection temperatures as multiples of ``gap`` (labelled ``soft(T=gap)``,
            ``soft(T=0.25*gap)``).
        fixed: absolute temperatures the user names (labelled ``soft(T=1)``), run as well.
        bpda: an absolute BPDA temperature (``None``: ``gap``).
    """
    gap = _check_gap(gap)
    for t in (*fractions, *fixed, *(() if bpda is None else (bpda,))):
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperatures: every temperature and fraction must be a finite number > 0, "
                             f"got {t}")
    soft = tuple((_fraction_label(f), gap * f) for f in fractions)
    soft += tuple((f"soft(T={t:g})", float(t)) for t in fixed)
    labels = [label for label, _ in soft]
    if len(set(labels)) != len(labels):
        raise ValueError(f"temperatures: repeated soft-selection run {labels}")
    return Temperatures(gap, soft, gap if bpda is None else float(bpda))


def decision_objective(model: Any, target: Tensor, gap: float,
                       targets: Optional[Tuple[Tensor, Tensor]] = None) -> Objective:
    """The decision-margin objective on candidates ``[G, B, ...]``, judged by the hard answer.

    Args:
        model: a :class:`~cda2_ext.models.classifier.CollaborationLogits` (its ``outputs`` with
            ``score_grad=True`` lets gradients through the PPD heads).
        target: ``[B]`` labels. gap: the selection scale, ``> 0``.
        targets: ``(models [G], classes [G, B])`` from :func:`wrong_class_targets` for the
            multi-targeted form (then ``G`` must equal ``len(models)``); ``None``: the plain
            :func:`decision_margin` on every copy.
    """
    _check_gap(gap)

    def objective(x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        G, B = x.shape[:2]
        _, hard, logits, s = model.outputs(flatten_copies(x), score_grad=True)
        M, K = logits.shape[0], logits.shape[-1]
        logits, s = logits.view(M, G, B, K), s.view(M, G, B)
        if targets is None:
            value = decision_margin(logits, s, target.expand(G, B), gap)
        else:
            value = targeted_decision_margin(logits, s, target, targets[0], targets[1], gap)
        return value, hard.detach().view(G, B, -1)

    return objective
