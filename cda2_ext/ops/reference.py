"""The fused operators' math in plain PyTorch.

This module is three things at once:

* the oracle the tests compare the C++/CUDA kernels against,
* the "unfused" path that benchmarks and ``--unfused`` training run in the same process,
* the fallback :mod:`cda2_ext.ops` uses where the compiled extension is missing.

Every function here has the same signature and semantics as its twin in :mod:`cda2_ext.ops`
(argument checks included), written the way a careful PyTorch user would write it, with no
attempt at speed beyond avoiding obviously wasted work. Shapes follow ``docs/design.md``:
``logits [M,B,K]``, ``ppd_logit [M,B]``, ``target [B]``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _checks

__all__ = [
    "CollabLoss",
    "collaboration_loss",
    "ppd_bce",
    "pgd_sign_step_",
    "pgd_random_start",
    "random_start_from_seed",
    "collaborative_select",
    "hash_uniform",
]


class CollabLoss(NamedTuple):
    """Outputs of :func:`collaboration_loss`.

    Attributes:
        loss: the soft-min surrogate ``L`` of Eq. 7, reduced over the batch as asked
            (``[B]`` for ``reduction="none"``).
        ce: per-sub-model cross-entropy ``[M, B]``.
        weights: assignment weights ``softmax_m(-ce / sigma)`` ``[M, B]``; ``dL/dce = weights``.
        p_true: probability of the true label ``exp(-ce)`` ``[M, B]`` (the PPD head's target).
    """

    loss: Tensor
    ce: Tensor
    weights: Tensor
    p_true: Tensor


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types accumulate (and report statistics) in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _reduce(x: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    return x


def collaboration_loss(logits: Tensor, target: Tensor, sigma: float = 1.0,
                       reduction: str = "mean") -> CollabLoss:
    """Soft-min over sub-models of the per-sample cross-entropy (Eq. 7 of the paper).

    ``L[b] = -sigma * log(sum_m exp(-ce[m,b] / sigma))`` with ``ce[m,b]`` the cross-entropy of
    sub-model ``m`` on sample ``b``. ``min_m ce - sigma ln M <= L <= min_m ce`` (Eq. 8), so small
    ``sigma`` trains only the best-performing sub-model of each sample.

    Args:
        logits: ``[M, B, K]`` label-head logits of all sub-models (float16/bfloat16/float32/float64).
        target: ``[B]`` int64 labels in ``[0, K)``.
        sigma: temperature, ``> 0``.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` over the batch for ``loss``.

    Returns:
        :class:`CollabLoss` ``(loss, ce, weights, p_true)``; all differentiable w.r.t. ``logits``.
        Statistics are float32 for half-precision logits.
    """
    _checks.collab_loss_args(logits, target, sigma, reduction)
    _checks.labels_in_range(target, logits.shape[-1])
    z = logits.to(_stat_dtype(logits.dtype))
    logp = torch.log_softmax(z, dim=-1)
    ce = -logp.gather(-1, target.expand(z.shape[0], -1).unsqueeze(-1)).squeeze(-1)
    a = ce / (-sigma)
    loss = torch.logsumexp(a, dim=0) * (-sigma)
    weights = torch.softmax(a, dim=0)
    p_true = torch.exp(-ce)
    return CollabLoss(_reduce(loss, reduction), ce, weights, p_true)


def ppd_bce(ppd_logit: Tensor, target_prob: Tensor, reduction: str = "mean") -> Tensor:
    """Binary cross-entropy between the PPD head and the true-label probability (Alg. 1 l. 7/18).

    ``bce = softplus(s) - t * s`` with ``s = ppd_logit`` and ``t = target_prob``; the target is
    treated as a constant (no gradient flows into it), as the paper detaches ``p_y``.

    Args:
        ppd_logit: ``[M, B]`` PPD-head outputs before the sigmoid.
        target_prob: ``[M, B]`` targets in ``[0, 1]`` (usually ``CollabLoss.p_true``).
        reduction: ``"mean"`` (over all ``M*B``) | ``"sum"`` | ``"none"``.
    """
    _checks.ppd_bce_args(ppd_logit, target_prob, reduction)
    s = ppd_logit.to(_stat_dtype(ppd_logit.dtype))
    t = target_prob.detach().to(s.dtype)
    # BCE-with-logits is softplus(s) - t*s computed stably (F.softplus's threshold would cut
    # exp(-s) off for s > 20, an error of ~1e-9 that float64 tests see).
    bce = torch.nn.functional.binary_cross_entropy_with_logits(s, t, reduction="none")
    return _reduce(bce, reduction)


def pgd_sign_step_(x_adv: Tensor, grad: Tensor, x_nat: Tensor, eps: float, alpha: float,
                   lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """One projected L-inf sign step, in place: ``x <- clip_box(clip_ball(x + alpha*sign(g)))``.

    Args:
        x_adv: ``[M, B, C, H, W]`` (one variant per sub-model) or ``[B, C, H, W]``; updated in place.
        grad: gradient of the attack loss w.r.t. ``x_adv``, same shape.
        x_nat: the natural images ``[B, C, H, W]`` (broadcast over ``M``) or ``x_adv``'s shape.
        eps: L-inf radius, ``>= 0``. alpha: step size, ``>= 0``. lo, hi: the box, ``lo <= hi``.

    Returns:
        ``x_adv``.
    """
    _checks.sign_step_args(x_adv, grad, x_nat, eps, alpha, lo, hi)
    x_adv.add_(grad.sign() * alpha)
    torch.minimum(torch.maximum(x_adv, x_nat - eps), x_nat + eps, out=x_adv)
    return x_adv.clamp_(lo, hi)


# ---------------------------------------------------------------------------------------------
# Counter-based uniform noise. The fused random start hashes (seed, element index) instead of
# drawing from a stateful generator, so the same seed gives the same start on CPU and CUDA and
# this plain-PyTorch twin reproduces the kernels bit for bit. The hash constants are below 2**31
# so that every product fits in int64 without wrapping.
_M32 = 0xFFFFFFFF
_C1 = 0x7FEB352D
_C2 = 0x045D9F3B


def _mix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def hash_uniform(seed: int, numel: int, device: torch.device | str = "cpu") -> Tensor:
    """Uniform float32 numbers in ``[0, 1)`` on a 2**-24 grid, one per index ``0..numel-1``.

    ``u[i] = (h(seed, i) >> 8) * 2**-24`` with ``h`` the two-round 32-bit hash the kernels use.
    """
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    h = _mix32((idx & _M32) ^ k0)
    h = _mix32(h ^ (idx >> 32) ^ k1)
    return (h >> 8).to(torch.float32) * (2.0 ** -24)


def random_start_from_seed(x_nat: Tensor, eps: float, lo: float, hi: float, seed: int,
                           num_models: Optional[int] = None) -> Tensor:
    """``clamp(x_nat + eps * (2u - 1), lo, hi)`` with ``u`` from :func:`hash_uniform`."""
    _checks.random_start_args(x_nat, eps, lo, hi, num_models)
    seed = _checks.seed(seed)
    shape = x_nat.shape if num_models is None else (num_models, *x_nat.shape)
    numel = 1
    for s in shape:
        numel *= s
    u = hash_uniform(seed, numel, x_nat.device).to(x_nat.dtype).reshape(shape)
    noise = (u * 2 - 1) * eps
    return (x_nat + noise).clamp_(lo, hi)


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A 62-bit seed from torch's RNG (so ``torch.manual_seed`` makes random starts repeatable)."""
    return int(torch.randint(0, 2 ** 62, (), generator=generator, dtype=torch.int64).item())


def pgd_random_start(x_nat: Tensor, eps: float, lo: float = 0.0, hi: float = 1.0,
                     num_models: Optional[int] = None, seed: Optional[int] = None,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """A random start in the eps-ball around ``x_nat``, clipped to the box.

    Args:
        x_nat: ``[B, C, H, W]`` natural images.
        eps: radius ``>= 0``; lo, hi: the box.
        num_models: if given, return ``[num_models, B, C, H, W]`` (independent noise per sub-model).
        seed: the noise seed, an integer in ``[0, 2**63)``; drawn from torch's RNG
            (``generator``) when ``None``.
    """
    if seed is None:
        seed = draw_seed(generator)
    return random_start_from_seed(x_nat, eps, lo, hi, seed, num_models)


def collaborative_select(ppd_logit: Tensor, logits: Tensor) -> Tuple[Tensor, Tensor]:
    """Algorithm 2: each sample is answered by the sub-model with the highest PPD score.

    Args:
        ppd_logit: ``[M, B]`` selection scores (PPD logits, or any score where higher is better).
        logits: ``[M, B, K]``.

    Returns:
        ``(index [B] int64, chosen [B, K])``; ties go to the lowest index, NaN counts as highest
        (``torch.argmax``'s rules). ``chosen`` is differentiable w.r.t. ``logits``.
    """
    _checks.select_args(ppd_logit, logits)
    index = ppd_logit.argmax(dim=0)
    chosen = logits.gather(0, index.view(1, -1, 1).expand(1, -1, logits.shape[-1])).squeeze(0)
    return index, chosen
