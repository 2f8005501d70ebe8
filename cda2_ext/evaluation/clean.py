"""Clean-accuracy evaluation of a collaboration (``cda2 eval-clean`` / per-epoch test metrics)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..data import to_float
from ..models.collaboration import Collaboration, predict_from_outputs
from ..runtime import FUSED, OpsBackend, eval_mode

__all__ = ["evaluate_clean", "collect_outputs", "clean_summary"]


@torch.no_grad()
def collect_outputs(model: Any, images: Tensor, batch_size: int,
                    device: torch.device) -> Tuple[Tensor, Tensor]:
    """``(logits [M, N, K], ppd_logit [M, N])`` of ``model`` over ``images``, float32 on the CPU
    (the caller puts the model in eval mode)."""
    zs: List[Tensor] = []
    ss: List[Tensor] = []
    for i in range(0, images.shape[0], batch_size):
        z, s = model(to_float(images[i:i + batch_size].to(device)))
        zs.append(z.float().cpu())
        ss.append(s.float().cpu())
    return torch.cat(zs, 1), torch.cat(ss, 1)


@torch.no_grad()
def clean_summary(logits: Tensor, ppd_logit: Tensor, labels: Tensor, score: str = "ppd",
                  backend: OpsBackend = FUSED) -> Dict[str, Any]:
    """The accuracies :func:`evaluate_clean` reports, from one pass's collected outputs."""
    M, n = logits.shape[0], int(labels.shape[0])
    labels = labels.to(logits.device)
    p = predict_from_outputs(logits, ppd_logit, score, backend)
    correct = p.per_model == labels
    denom = max(n, 1)
    out: Dict[str, Any] = {"n": n, "score": score}
    out.update({k: int((v == labels).sum()) / denom for k, v in
                (("collaboration", p.collaboration), ("ensemble", p.ensemble), ("vote", p.vote))})
    out["oracle"] = int(correct.any(0).sum()) / denom
    out["submodels"] = (correct.sum(1).double() / denom).tolist()
    out["selected"] = (torch.bincount(p.selected, minlength=M).double() / denom).tolist()
    return out


def evaluate_clean(model: Collaboration, images: Tensor, labels: Tensor, batch_size: int = 500,
                   score: str = "ppd", device: Optional[torch.device | str] = None) -> Dict[str, Any]:
    """Accuracy of the collaboration (Algorithm 2), the ensemble and each sub-model, in eval mode.

    Args:
        model: the collaboration (its mode is restored afterwards).
        images: ``uint8`` or float ``[N, C, H, W]`` (float: already in [0, 1]); labels ``[N]``.
        score: Algorithm 2's selection score (:data:`~cda2_ext.models.selection.SCORES`).

    Returns:
        ``{"n", "collaboration", "ensemble", "vote", "submodels": [M], "oracle",
        "selected": [M] fractions, "score"}`` where ``ensemble`` averages probabilities, ``vote``
        is Eq. 1's majority, ``oracle`` counts samples some sub-model gets right (the bound of
        Proposition 1) and ``selected`` is how often each sub-model answers.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with eval_mode(model):
        logits, ppd = collect_outputs(model, images, batch_size, device)
    return clean_summary(logits, ppd, labels, score, model.backend)
