"""How CDA² shares each training sample among its M sub-models: the label-path loss.

Two weightings, ``TrainConfig.weights``:

* ``"softmin"`` (the paper, Eq. 7): ``L = -sigma * log sum_j exp(-CE_j / sigma)``, whose gradient
  weights sub-model ``j`` by ``softmax_j(-CE_j / sigma)``. At ``sigma = 1`` a sub-model whose CE is
  a few nats above the best one gets almost nothing, so each sample trains mostly its best
  sub-model (the fused ``collaboration_loss``).
* ``"detector"`` (the authors' latest code, Synergy-of-Experts ``models/model_rectified_v2.py``,
  "adaptative training"): ``L = mean_b sum_j w_j CE_j`` with ``w = softmax_j(temp_c * d_j)``
  detached, where ``d_j = max_k softmax(z_j)_k * sigmoid(s_j)`` is sub-model ``j``'s detector
  (the ``"soe"`` selection score). Since ``d`` lies in [0, 1], at ``temp_c = 1`` every weight
  stays within ``[1/(1 + (M-1)e), e/(e + M-1)]`` (0.16-0.58 for M = 3): every sub-model trains on
  every sample, the one that would be selected a little more.

Both give every sample a total weight of 1 over the sub-models. The PPD head's BCE target is the
true-label probability ``p_y = softmax(temp_true * z)_y`` (detached); ``temp_true = 1`` is the
paper's ``p_y`` (the authors' ``--tempC_trueonly``, default 1).

Why no fused op for ``"detector"``: it adds a softmax over M values per sample and a weighted sum
to the fused per-sample cross-entropy it reuses; the training step's profile is dominated by the
convolutions (``benchmarks/step_parts.py``), so fusing it would not move the step.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..models.collaboration import selection_score
from ..runtime import FUSED, OpsBackend

__all__ = ["WEIGHTINGS", "Weighted", "detector", "detector_weights", "weighted_loss",
           "true_label_prob"]

WEIGHTINGS = ("softmin", "detector")


class Weighted(NamedTuple):
    """The label-path loss of one training forward and what the tallies and the BCE need.

    Attributes:
        loss: the batch mean of the weighted loss (0-d, differentiable w.r.t. the logits).
        ce: per-sub-model cross-entropy ``[M, B]`` (differentiable).
        weights: each sub-model's share of each sample ``[M, B]``; sums to 1 over ``M``.
        p_true: the PPD head's target, the true-label probability at ``temp_true`` ``[M, B]``,
            detached.
    """

    loss: Tensor
    ce: Tensor
    weights: Tensor
    p_true: Tensor


def _stat(t: Tensor) -> Tensor:
    """float64 stays float64 (the tests' oracle precision); anything else computes in float32."""
    return t if t.dtype == torch.float64 else t.float()


def detector(logits: Tensor, ppd_logit: Tensor) -> Tensor:
    """The authors' detector ``max_k softmax(z)_k * sigmoid(s)``, ``[M, B]`` in [0, 1]: the
    ``"soe"`` selection score the collaboration answers by."""
    return selection_score(logits, ppd_logit, "soe")


def detector_weights(logits: Tensor, ppd_logit: Tensor, temp_c: float) -> Tensor:
    """``softmax_j(temp_c * detector_j)`` over the sub-models, ``[M, B]``, detached."""
    return torch.softmax(temp_c * detector(logits.detach(), ppd_logit.detach()), dim=0)


def true_label_prob(logits: Tensor, target: Tensor, temp_true: float) -> Tensor:
    """``softmax(temp_true * z)_y`` ``[M, B]`` in the logits' statistics dtype, detached."""
    z = _stat(logits.detach())
    logp = torch.log_softmax(temp_true * z, dim=-1)
    return logp.gather(-1, target.expand(z.shape[0], -1).unsqueeze(-1)).squeeze(-1).exp()


def weighted_loss(logits: Tensor, ppd_logit: Tensor, target: Tensor, weights: str = "softmin", *,
                  sigma: float = 1.0, temp_c: float = 1.0, temp_true: float = 1.0,
                  backend: OpsBackend = FUSED) -> Weighted:
    """The label-path loss of ``logits [M, B, K]`` (PPD logits ``[M, B]``, labels ``[B]``).

    ``weights="softmin"``: Eq. 7 at ``sigma`` (the fused ``collaboration_loss``);
    ``"detector"``: the authors' detector-weighted cross-entropy at ``temp_c``. See the module
    docstring. ``backend`` computes the per-sample cross-entropy (fused or reference).
    """
    out = backend.collaboration_loss(logits, target, sigma)
    p_true = out.p_true.detach() if temp_true == 1.0 else true_label_prob(logits, target, temp_true)
    if weights == "softmin":
        return Weighted(out.loss, out.ce, out.weights.detach(), p_true)
    if weights == "detector":
        w = detector_weights(logits, ppd_logit, temp_c).to(out.ce.dtype)
        return Weighted((w * out.ce).sum(0).mean(), out.ce, w, p_true)
    raise ValueError(f"weights: expected one of {WEIGHTINGS}, got {weights!r}")
