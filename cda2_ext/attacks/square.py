"""Square attack, L-inf (Andriushchenko et al. 2020): a score-based black-box attack.

Random search over perturbations at the corners of the eps-ball: start from vertical stripes of
``+-eps``, then repeatedly redraw one random square window (side shrinking with the iteration
count, AutoAttack's ``p`` schedule) to ``+-eps`` per channel and keep the change if the margin
loss ``z_y - max_{k != y} z_k`` went down. Each candidate is written into ``x_nat``'s ball with the
fused sign step (``x_best + 2 eps * sign(window)`` projected), so it never leaves the ball.

Black-box by construction: the model is only called through :class:`QueryCounter`, under
``torch.no_grad()`` with inputs that carry no gradient, and every image passed counts as one query
of its sample. A sample stops as soon as it is misclassified; a sample whose queries reach the
budget while still correct is reported in ``out_of_budget`` - it survived *this budget*, which is
weaker evidence than surviving the attack. Differences from the reference code: windows and
signs are drawn per sample (not one per batch), and the clean check counts as a query.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..models.classifier import as_model_fn
from ..runtime import FUSED, OpsBackend, eval_mode
from .engine import AttackResult, ModelFn, check_attack_args, margin

__all__ = ["SquareResult", "QueryCounter", "square_p_schedule", "square_attack"]


@dataclass(kw_only=True)
class SquareResult(AttackResult):
    """Outcome of :func:`square_attack`: a folded :class:`~cda2_ext.attacks.engine.AttackResult`
    (``x_adv [B, C, H, W]``, the best point found; its ``margin`` and ``correct``, ``[B]``) plus
    what a query budget adds.

    Attributes:
        queries: ``[B]`` model queries spent per sample (never above the budget).
        out_of_budget: ``[B]`` still correct when the budget ran out.
    """

    queries: Tensor
    out_of_budget: Tensor


class QueryCounter:
    """Wraps a model so it can only be *queried*: outputs only, no gradients, every row counted."""

    def __init__(self, model: ModelFn) -> None:
        self.model = model
        self.total = 0

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        self.total += int(x.shape[0])
        return self.model(x.detach()).detach()


def square_p_schedule(p_init: float, it: int, n_queries: int) -> float:
    """Fraction of pixels the window covers at iteration ``it`` (AutoAttack's schedule, with the
    iteration rescaled to a 10000-query budget)."""
    it = int(it / max(n_queries, 1) * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
                       (6000, 128), (8000, 256)):
        if it <= bound:
            return p_init / div
    return p_init / 512


@torch.no_grad()
def square_attack(model: ModelFn, x_nat: Tensor, target: Tensor, eps: float, n_queries: int = 5000,
                  *, p_init: float = 0.8, lo: float = 0.0, hi: float = 1.0,
                  generator: Optional[torch.Generator] = None, backend: OpsBackend = FUSED) -> SquareResult:
    """Untargeted L-inf Square attack with a budget of ``n_queries`` model calls per sample.

    Args:
        model: images -> logits; only its outputs are used (a collaboration: its Algorithm-2
            decision, see :func:`~cda2_ext.models.classifier.as_model_fn`).
        x_nat: ``[B, C, H, W]`` in ``[lo, hi]``; target ``[B]``.
        eps: L-inf radius. n_queries: per-sample budget, including the clean check (>= 1).
        p_init: initial window area fraction (AutoAttack's L-inf default 0.8).
        generator: CPU RNG for the windows and signs (reproducible runs).
    """
    check_attack_args(x_nat, target, eps)
    if n_queries < 1:
        raise ValueError(f"n_queries: must be >= 1, got {n_queries}")
    query = QueryCounter(as_model_fn(model))
    x_nat = x_nat.detach()
    B, C, H, W = x_nat.shape
    dev = x_nat.device
    queries = torch.zeros(B, dtype=torch.long, device=dev)

    def ask(idx: Tensor, x: Tensor) -> Tensor:
        queries[idx] += 1
        return margin(query(x).float(), target[idx])

    def rand_sign(*shape: int) -> Tensor:
        return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(dev, x_nat.dtype)

    with eval_mode(model):
        all_idx = torch.arange(B, device=dev)
        x_best = x_nat.clone()
        m_best = ask(all_idx, x_nat)
        # Samples already misclassified need no attack; the rest start from random stripes.
        idx = (m_best <= 0).nonzero().squeeze(1)
        if idx.numel() and n_queries > 1 and eps > 0:
            stripes = rand_sign(idx.numel(), C, 1, W).expand(-1, C, H, W)
            x0 = x_nat[idx].clone()
            backend.pgd_sign_step_(x0, stripes.contiguous(), x_nat[idx], eps, eps, lo, hi)
            m0 = ask(idx, x0)
            x_best[idx], m_best[idx] = x0, m0
        n_feat = C * H * W
        for it in range(n_queries):
            active = ((m_best <= 0) & (queries < n_queries)).nonzero().squeeze(1)
            if active.numel() == 0 or eps == 0:
                break
            n = active.numel()
            p = square_p_schedule(p_init, it, n_queries)
            # the window is square: it must fit the shorter side of a non-square image
            side = min(H, W)
            s = min(max(int(round(math.sqrt(p * n_feat / C))), 1), side - 1 if side > 1 else 1)
            top = torch.randint(0, H - s + 1, (n,), generator=generator).to(dev)
            left = torch.randint(0, W - s + 1, (n,), generator=generator).to(dev)
            rows = torch.arange(H, device=dev)
            cols = torch.arange(W, device=dev)
            win = (((rows >= top[:, None]) & (rows < top[:, None] + s))[:, :, None]
                   & ((cols >= left[:, None]) & (cols < left[:, None] + s))[:, None, :])  # [n, H, W]
            win = win.unsqueeze(1).to(x_nat.dtype)
            xb, xn = x_best[active], x_nat[active]
            # Redraw the signs where the window would not change the image (it already sits at
            # those corners): that query would be wasted. A few tries, as the reference code loops.
            signs = rand_sign(n, C, 1, 1)
            for _ in range(10):
                cand = xb.clone()
                backend.pgd_sign_step_(cand, win * signs, xn, eps, 2 * eps, lo, hi)
                same = ((cand - xb).abs() * win).flatten(1).amax(1) < 1e-7
                if not same.any():
                    break
                signs = torch.where(same.view(n, 1, 1, 1), rand_sign(n, C, 1, 1), signs)
            # Our margin is max_other - z_y (the negative of the paper's loss): larger is better.
            m_new = ask(active, cand)
            better = m_new > m_best[active]
            upd = active[better]
            x_best[upd], m_best[upd] = cand[better], m_new[better]
    correct = m_best <= 0
    return SquareResult(x_best, m_best, correct, queries=queries,
                        out_of_budget=correct & (queries >= n_queries))
