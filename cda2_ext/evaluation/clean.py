"""Clean-accuracy evaluation of a collaboration (``cda2 eval-clean`` / per-epoch test metrics)."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ..data import to_float
from ..models.collaboration import Collaboration, predict_from_outputs
from ..runtime import eval_mode

__all__ = ["evaluate_clean"]


@torch.no_grad()
def evaluate_clean(model: Collaboration, images: Tensor, labels: Tensor, batch_size: int = 500,
                   score: str = "ppd", device: Optional[torch.device | str] = None) -> Dict[str, Any]:
    """Accuracy of the collaboration (Algorithm 2), the ensemble and each sub-model, in eval mode.

    Args:
        model: the collaboration (its mode is restored afterwards).
        images: ``uint8`` or float ``[N, C, H, W]`` (float: already in [0, 1]); labels ``[N]``.
        score: Algorithm 2's selection score, ``"ppd"`` (paper) or ``"soe"``.

    Returns:
        ``{"n", "collaboration", "ensemble", "vote", "submodels": [M], "oracle",
        "selected": [M] fractions, "score"}`` where ``ensemble`` averages probabilities, ``vote``
        is Eq. 1's majority, ``oracle`` counts samples some sub-model gets right (the bound of
        Proposition 1) and ``selected`` is how often each sub-model answers.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    M = model.num_models
    n = int(labels.shape[0])
    hits = {"collaboration": 0, "ensemble": 0, "vote": 0, "oracle": 0}
    sub_hits = torch.zeros(M, dtype=torch.int64)
    chosen = torch.zeros(M, dtype=torch.int64)
    with eval_mode(model):
        for i in range(0, n, batch_size):
            x = to_float(images[i:i + batch_size].to(device))
            y = labels[i:i + batch_size].to(device)
            logits, ppd = model(x)
            p = predict_from_outputs(logits, ppd, score, model.backend)
            hits["collaboration"] += int((p.collaboration == y).sum())
            hits["ensemble"] += int((p.ensemble == y).sum())
            hits["vote"] += int((p.vote == y).sum())
            correct = p.per_model == y
            hits["oracle"] += int(correct.any(0).sum())
            sub_hits += correct.sum(1).cpu()
            chosen += torch.bincount(p.selected, minlength=M).cpu()
    denom = max(n, 1)
    out: Dict[str, Any] = {"n": n, "score": score}
    out.update({k: v / denom for k, v in hits.items()})
    out["submodels"] = (sub_hits.double() / denom).tolist()
    out["selected"] = (chosen.double() / denom).tolist()
    return out
