"""Auto-PGD (Croce & Hein 2020), L-inf: the step-size schedule of the AutoAttack code on the
fused sign step.

:func:`apgd` is one APGD run of any *objective* (see :mod:`~cda2_ext.attacks.engine`), used by the
adaptive attacks on a collaboration (:mod:`~cda2_ext.attacks.adaptive`: ``apgd-ce``, ``apgd-dlr``
and the APGD forms of the decision-margin attacks); :func:`apgd_attack` is APGD with restarts
against any images -> logits function, the ``apgd`` entry of
:data:`~cda2_ext.attacks.registry.ATTACKS`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..models.classifier import as_model_fn
from ..runtime import FUSED, OpsBackend, eval_mode
from .engine import (AttackResult, ModelFn, Objective, check_attack_args, flatten_copies,
                     model_objective, new_best, project_, run_restarts, update_best)
from .whitebox import predict_correct

__all__ = ["apgd", "apgd_attack"]


def _grouped_sign_step_(x: Tensor, grad: Tensor, x_nat: Tensor, eps: float, step: Tensor,
                        lo: float, hi: float, backend: OpsBackend) -> None:
    """Fused sign step with a per-sample step size: one fused call per distinct step size.

    APGD halves step sizes per sample, so there are only a handful of distinct values (2*eps/2^k);
    grouping keeps the fused kernel (scalar alpha) instead of re-implementing the step.
    """
    for value in torch.unique(step).tolist():
        idx = (step == value).nonzero().squeeze(1)
        if idx.numel() == x.shape[0]:
            backend.pgd_sign_step_(x, grad, x_nat, eps, value, lo, hi)
            return
        part = x[idx]
        backend.pgd_sign_step_(part, grad[idx], x_nat[idx], eps, value, lo, hi)
        x[idx] = part


def apgd(objective: Objective, x_nat: Tensor, target: Tensor, eps: float, steps: int, *,
         x_init: Optional[Tensor] = None, rho: float = 0.75, momentum: float = 0.75,
         lo: float = 0.0, hi: float = 1.0, backend: OpsBackend = FUSED) -> AttackResult:
    """Auto-PGD (Croce & Hein 2020), L-inf, one run; the schedule of the AutoAttack code.

    Step size starts at ``2 eps`` per sample and is halved at checkpoints (the first after
    ``0.22 * steps`` iterations, then shorter intervals, never below ``0.06 * steps``) where fewer
    than ``rho`` of the steps since the last checkpoint increased the loss, or where the step was
    not reduced last time and the best loss did not improve; a halved sample restarts from its
    best point. Steps mix the new sign step with the last move (``momentum`` 0.75).

    ``G`` copies of the batch (e.g. one per target of a multi-targeted objective) run as one
    batch of ``G * B`` independent APGD runs: every copy of every sample has its own step size
    and checkpoints, as if run one after another, with one forward/backward per iteration.

    Args:
        objective: as in :mod:`~cda2_ext.attacks.engine`, called on ``[G, B, ...]``; its logits
            are required (APGD keeps the best point).
        x_init: ``[G, B, ...]`` start (default ``x_nat``, ``G = 1``).

    Returns:
        ``AttackResult`` with ``x_adv [G, B, ...]``: the worst case over all iterates per copy.
    """
    x_nat = x_nat.detach()
    x0 = (x_nat.unsqueeze(0) if x_init is None else x_init).detach()
    if x0.shape[1:] != x_nat.shape:
        raise ValueError(f"x_init: expected [G, {', '.join(map(str, x_nat.shape))}], got {list(x0.shape)}")
    G, B = x0.shape[:2]
    copies = x0.shape[:2]
    x = flatten_copies(x0).clone()  # [G*B, ...]: each row one independent run
    x_ref = flatten_copies(x_nat.unsqueeze(0).expand(G, *x_nat.shape))

    def evaluate(xc: Tensor, with_grad: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        with torch.enable_grad() if with_grad else torch.no_grad():
            xg = xc.view(*copies, *xc.shape[1:]).requires_grad_(with_grad)
            loss, logits = objective(xg)
            if logits is None:
                raise ValueError("apgd: the objective must report the evaluated model's logits")
            g = flatten_copies(torch.autograd.grad(loss.sum(), xg)[0]) if with_grad else None
        return loss.detach().reshape(G * B).float(), logits.detach(), g

    best = new_best(x0)
    loss, logits, grad = evaluate(x, steps > 0)
    update_best(best, x.view_as(x0), logits, target)
    if steps == 0:
        return best
    n2, nmin, decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    runs = G * B  # every copy of every sample is a run of its own
    step = torch.full((runs,), 2.0 * eps, device=x.device)
    x_max, loss_max, grad_max = x.clone(), loss.clone(), grad.clone()
    history = torch.empty(steps + 1, runs, device=x.device)
    history[0] = loss
    x_old = x.clone()
    k, counter = n2, 0
    loss_max_last = loss_max.clone()
    reduced_last = torch.zeros(runs, dtype=torch.bool, device=x.device)
    for i in range(steps):
        a = momentum if i > 0 else 1.0
        z = x.clone()
        _grouped_sign_step_(z, grad, x_ref, eps, step, lo, hi, backend)
        x_new = x + a * (z - x) + (1 - a) * (x - x_old)
        project_(x_new, x_ref, eps, lo, hi)
        x_old, x = x, x_new
        loss, logits, g = evaluate(x, i < steps - 1)
        update_best(best, x.view_as(x0), logits, target)
        history[i + 1] = loss
        up = loss > loss_max
        x_max[up], loss_max[up] = x[up], loss[up]
        if g is not None:
            grad = g
            grad_max[up] = g[up]
        counter += 1
        if counter == k and i < steps - 1:
            increases = (history[i + 2 - k:i + 2] > history[i + 1 - k:i + 1]).sum(0)
            oscillating = increases.double() <= k * rho
            stalled = ~reduced_last & (loss_max_last >= loss_max)
            reduce = oscillating | stalled
            reduced_last, loss_max_last = reduce, loss_max.clone()
            if reduce.any():
                step[reduce] /= 2.0
                x[reduce] = x_max[reduce]
                grad[reduce] = grad_max[reduce]
            k, counter = max(k - decr, nmin), 0
    return best


def apgd_attack(model: ModelFn, x_nat: Tensor, target: Tensor, eps: float, steps: int = 100,
                loss: str = "ce", restarts: int = 1, *, only_correct: bool = True,
                lo: float = 0.0, hi: float = 1.0, generator: Optional[torch.Generator] = None,
                backend: OpsBackend = FUSED) -> AttackResult:
    """APGD with ``loss`` (``"ce"`` or ``"dlr"``) against any model function; worst case over
    ``restarts`` fused random starts (a collaboration: its Algorithm-2 decision, see
    :func:`~cda2_ext.models.classifier.as_model_fn`). Returns a folded result (``x_adv [B, ...]``)."""
    check_attack_args(x_nat, target, eps, steps)
    model = as_model_fn(model)
    with eval_mode(model):
        start_ok = predict_correct(model, x_nat, target) if only_correct else None

        def once(idx: Tensor, x0: Tensor) -> AttackResult:
            obj = model_objective(model, target[idx], loss)
            return apgd(obj, x_nat[idx], target[idx], eps, steps, x_init=x0, lo=lo, hi=hi, backend=backend)

        return run_restarts(once, x_nat, target, eps, restarts, initially_correct=start_ok,
                            lo=lo, hi=hi, generator=generator, backend=backend)
