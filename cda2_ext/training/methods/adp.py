"""ADP: Adaptive Diversity Promoting regularisation (Pang et al., "Improving Adversarial
Robustness via Promoting Ensemble Diversity", ICML 2019).

Per batch, with ``p_m = softmax(z_m)`` the sub-models' probabilities::

    L = sum_m CE(z_m, y)  -  alpha * H(mean_m p_m)  -  beta * log det(N N^T + delta I)

* ``H(p) = -sum_k p_k log(p_k + 1e-20)``, the entropy of the ensemble's prediction (averaged over
  the batch);
* ``N [M, K-1]`` per sample: row m is ``p_m`` without the true class ("non-maximal" predictions),
  scaled to unit L2 norm, so ``det(N N^T)`` is the squared volume they span - large when the
  sub-models disagree on the wrong classes (averaged over the batch);
* every CE is a batch mean; the log-det is computed in float64 (a Gram matrix with a 1e-6 ridge
  loses its small eigenvalues in float32; the M x M matrices cost nothing).

Hyperparameters and where they come from (ADP paper; DVERGE's ``arguments.py``/``train/train_adp.py``,
github.com/zjysteven/DVERGE, the code the CDA² paper's baselines were run with):

* alpha (``--adp-alpha``) 2.0 and beta (``--adp-beta``) 0.5: the ADP paper's ADP_{2,0.5} setting;
  DVERGE ``--alpha 2.0 --beta 0.5``;
* entropy log offset 1e-20 (DVERGE ``log_offset``) and log-det ridge 1e-6 (DVERGE
  ``det_offset``): numerical guards, constants here;
* Adam, lr 1e-3, weight decay 1e-4, eps 1e-7: DVERGE ``train_adp.py``;
* 200 epochs, x0.1 at epochs 100 and 150, batch 128: DVERGE ``arguments.py``.

``--adv`` (ADP combined with adversarial training, as in the ADP paper's adversarial-training
experiments; DVERGE ``--plus-adv``): adds
``sum_m CE(f_m(x~), y)`` with ``x~`` the training PGD on the averaged ensemble (this project's
``eps``/``alpha``/``steps``; DVERGE's code uses 8/255, 2/255, 10 steps). Clean and adversarial
images go through one forward pass (``[x; x~]``), so BatchNorm sees them in one batch where
DVERGE's code runs two passes.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor, nn

from ...runtime import FUSED, OpsBackend
from .base import Tally
from .ensemble import BASELINE_SCHEDULE, EnsembleMethod, per_model_ce

__all__ = ["ADP", "adp_loss", "non_true_probs", "LOG_OFFSET", "DET_OFFSET"]

LOG_OFFSET = 1e-20   # inside the entropy's log (DVERGE ``log_offset``)
DET_OFFSET = 1e-6    # ridge added to the Gram matrix before the log-det (DVERGE ``det_offset``)


def non_true_probs(probs: Tensor, target: Tensor) -> Tensor:
    """``[M, B, K-1]``: each sub-model's probabilities of the classes other than ``target [B]``,
    in class order."""
    M, B, K = probs.shape
    k = torch.arange(K - 1, device=probs.device).expand(B, K - 1)
    idx = k + (k >= target.unsqueeze(1)).long()          # skip the true class
    return probs.gather(-1, idx.expand(M, B, K - 1))


def adp_loss(logits: Tensor, target: Tensor, alpha: float, beta: float,
             backend: OpsBackend = FUSED) -> Tuple[Tensor, Dict[str, Tensor]]:
    """ADP's loss (see the module docstring) of ``logits [M, B, K]``; returns ``(loss, terms)``
    with terms ``ce`` (``[M]``), ``entropy`` and ``log_det`` (batch means)."""
    if logits.shape[-1] < 3:
        raise ValueError("ADP needs at least 3 classes (the non-true predictions span K-1 >= 2 dims)")
    ce = per_model_ce(logits, target, backend).mean(1)
    z = logits if logits.dtype == torch.float64 else logits.float()
    p = torch.softmax(z, -1)
    p_bar = p.mean(0)
    entropy = -(p_bar * torch.log(p_bar + LOG_OFFSET)).sum(-1).mean()
    n = nn.functional.normalize(non_true_probs(p, target).double(), dim=-1).transpose(0, 1)
    gram = n @ n.transpose(1, 2)                                # [B, M, M]
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    log_det = torch.logdet(gram + DET_OFFSET * eye).mean().to(ce.dtype)
    loss = ce.sum() - alpha * entropy - beta * log_det
    return loss, {"ce": ce.detach(), "entropy": entropy.detach(), "log_det": log_det.detach()}


class ADP(EnsembleMethod):
    """ADP (see the module docstring for the formula and the source of every default)."""

    name = "adp"
    defaults = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4, "batch_size": 128,
                **BASELINE_SCHEDULE}
    terms = ("ce", "entropy", "log_det", "adv_ce")
    min_models = 2

    def step(self, x: Tensor, y: Tensor, tallies: Dict[str, Tally]) -> Dict[str, Tensor]:
        t, cfg, B = self.trainer, self.trainer.config, y.shape[0]

        def clean_loss(logits: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
            return adp_loss(logits, y, cfg.adp_alpha, cfg.adp_beta, t.backend)

        if not cfg.adv:
            return {"adp": self._train(x, clean_loss, tallies["train"], B, slice(None), None, y)}
        x_adv = self.adversarial(x, y)

        def loss_of(logits: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
            loss, terms = clean_loss(logits[:, :B])
            adv_ce = per_model_ce(logits[:, B:], y, t.backend).mean(1).sum()
            terms["adv_ce"] = adv_ce.detach()
            return loss + adv_ce, terms

        return {"adp": self._train(torch.cat([x, x_adv]), loss_of, tallies["train"], B,
                                   slice(0, B), slice(B, 2 * B), y.repeat(2))}
