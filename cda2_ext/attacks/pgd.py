"""Batched L-inf PGD (Madry et al., 2018) for training and evaluating collaborations.

The core, :func:`pgd`, is model-agnostic: it maximises any ``loss_fn(x_adv) -> scalar`` over the
eps-ball with the fused sign step, so every attack is "a loss over a batch of candidate inputs".
Two loss builders cover Algorithm 1:

* :func:`per_model_loss` - ``x_adv [M, B, C, H, W]``, variant ``m`` fed to sub-model ``m`` only
  and scored by ``m``'s cross-entropy. Because sub-model ``m``'s output depends on ``x_adv[m]``
  alone, the gradient of the **sum** of the M losses w.r.t. ``x_adv[m]`` is exactly ``m``'s own
  gradient: all M attacks advance together with one forward, one backward and one fused sign
  step over ``[M, B, ...]`` (lines 3-4 of Algorithm 1).
* :func:`collaboration_loss_fn` - the cross-entropy of the sub-model the collaboration selects
  (highest PPD, Algorithm 2) on a shared ``x_adv [B, C, H, W]``; the gradient flows through
  ``collaborative_select`` into the chosen logits (line 17).

Conventions: losses are summed over the batch (the sign step ignores the scale, and a sum keeps
each sample's gradient independent of the batch size). The model is put in **eval mode** for the
attack (BatchNorm uses running statistics, so the attack neither depends on nor perturbs the
batch statistics of the training step) and restored afterwards. Gradients are taken with
``torch.autograd.grad`` w.r.t. the input only, so no ``.grad`` is left on parameters.
"""
from __future__ import annotations

from types import ModuleType
from typing import Callable, Optional

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from .. import ops
from ..models.collaboration import selection_score
from .engine import eval_mode

__all__ = ["LossFn", "pgd", "per_model_loss", "collaboration_loss_fn", "per_model_pgd",
           "collaboration_pgd", "eval_mode"]

LossFn = Callable[[Tensor], Tensor]


def pgd(loss_fn: LossFn, x_nat: Tensor, eps: float, alpha: float, steps: int, *,
        num_models: Optional[int] = None, random_start: bool = True, lo: float = 0.0,
        hi: float = 1.0, generator: Optional[torch.Generator] = None,
        F: ModuleType = ops) -> Tensor:
    """Projected sign-gradient ascent on ``loss_fn`` inside the L-inf eps-ball around ``x_nat``.

    Args:
        loss_fn: maps the current ``x_adv`` to a scalar to **maximise**.
        x_nat: ``[B, C, H, W]`` natural inputs in ``[lo, hi]``.
        eps, alpha, steps: radius, step size, number of steps (``steps=0`` returns the start).
        num_models: when given, optimise ``[num_models, B, C, H, W]`` variants at once (each
            starts from its own random point); ``x_nat`` is broadcast over that axis.
        random_start: start uniformly in the ball (``F.pgd_random_start``) instead of at ``x_nat``.
        generator: the RNG the random-start seed is drawn from (``None``: torch's global RNG).
        F: operator module, :mod:`cda2_ext.ops` (fused) or :mod:`cda2_ext.reference`.

    Returns:
        The detached adversarial inputs (``[B, ...]`` or ``[num_models, B, ...]``).
    """
    x_nat = x_nat.detach()
    if random_start and eps > 0:
        x_adv = F.pgd_random_start(x_nat, eps, lo, hi, num_models=num_models, generator=generator)
    elif num_models is not None:
        x_adv = x_nat.expand(num_models, *x_nat.shape).clone()
    else:
        x_adv = x_nat.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(x_adv)
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach()
        F.pgd_sign_step_(x_adv, grad, x_nat, eps, alpha, lo, hi)
    return x_adv.detach()


def per_model_loss(model: nn.Module, target: Tensor) -> LossFn:
    """Sum over sub-models ``m`` of ``CE(f_m(x_adv[m]), target)`` for ``x_adv [M, B, ...]``."""
    def loss_fn(x_adv: Tensor) -> Tensor:
        logits, _ = model(x_adv)  # [M, B, K]; sub-model m reads x_adv[m] only
        M, B, K = logits.shape
        return Fn.cross_entropy(logits.reshape(M * B, K), target.repeat(M), reduction="sum")
    return loss_fn


def collaboration_loss_fn(model: nn.Module, target: Tensor, score: str = "ppd",
                          F: ModuleType = ops) -> LossFn:
    """CE of the collaboration's answer (the highest-PPD sub-model's logits) on ``x_adv [B, ...]``."""
    def loss_fn(x_adv: Tensor) -> Tensor:
        logits, ppd = model(x_adv)
        s = selection_score(logits, ppd, score).to(logits.dtype)
        _, chosen = F.collaborative_select(s, logits)
        return Fn.cross_entropy(chosen, target, reduction="sum")
    return loss_fn


def per_model_pgd(model: nn.Module, x_nat: Tensor, target: Tensor, eps: float, alpha: float,
                  steps: int, *, random_start: bool = True, generator: Optional[torch.Generator] = None,
                  F: ModuleType = ops) -> Tensor:
    """M PGD variants at once, ``x_adv[m]`` attacking sub-model ``m`` (Alg. 1 lines 3-4).

    ``model`` must expose ``num_models`` and accept ``[M, B, C, H, W]``. Returns ``[M, B, C, H, W]``.
    """
    with eval_mode(model):
        return pgd(per_model_loss(model, target), x_nat, eps, alpha, steps,
                   num_models=model.num_models, random_start=random_start, generator=generator, F=F)


def collaboration_pgd(model: nn.Module, x_nat: Tensor, target: Tensor, eps: float, alpha: float,
                      steps: int, *, score: str = "ppd", random_start: bool = True,
                      generator: Optional[torch.Generator] = None, F: ModuleType = ops) -> Tensor:
    """PGD against the collaboration's own output (Alg. 1 line 17). Returns ``[B, C, H, W]``."""
    with eval_mode(model):
        return pgd(collaboration_loss_fn(model, target, score, F), x_nat, eps, alpha, steps,
                   random_start=random_start, generator=generator, F=F)
