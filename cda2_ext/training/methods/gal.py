"""GAL: Gradient Alignment Loss (Kariyappa & Qureshi, "Improving Adversarial Robustness of
Ensembles with Diversity Training", arXiv:1901.09981, 2019).

Per batch, with ``g_m(x) = d CE(f_m(x), y) / dx`` sub-model m's input gradient::

    L = (1/M) sum_m CE(f_m(x), y)  +  coeff * mean_b log( sum_{i<j} exp(cos(g_i(x_b), g_j(x_b))) + 1e-20 )

The coherence term penalises aligned input gradients (a perturbation that fools one sub-model
then fools the others less). It is differentiated through the input gradients, i.e. a double
backward: each sub-model's gradient is taken w.r.t. its own copy of the batch (``x [M, B, ...]``,
one packed forward for all M), with ``create_graph=True``, and the loss's backward then goes
through it. CEs are batch means (the coherence is scale-free, so the input gradients may be of
the per-sample sum); one forward gives both the CE and the input gradients, where DVERGE's code
runs a second forward on detached inputs for the CE (same values and gradients).

Hyperparameters and where they come from (GAL paper; DVERGE's ``arguments.py``,
``train/train_gal.py``, ``utils.py``, github.com/zjysteven/DVERGE, the code the CDA² paper's
baselines were run with):

* coeff (``--gal-coeff``) 0.5: DVERGE ``--lambda 0.5``;
* training images get Gaussian noise, std (``--gal-noise``) 0.045, each image with probability
  0.5, unclipped: DVERGE ``utils.AddGaussianNoise(0., 0.045)`` (GAL paper's noise augmentation);
* Adam, lr 1e-3, weight decay 1e-4, eps 1e-7: DVERGE ``train_gal.py``;
* 200 epochs, x0.1 at epochs 100 and 150, batch 128: DVERGE ``arguments.py``.

Deviation: DVERGE builds GAL's ResNets with leaky ReLU (slope 0.1); the packed model here uses
ReLU. The double backward still reaches every weight (an input gradient is a product of weights
and ReLU masks), the masks just have zero slope where the leaky ones have 0.1.

``--adv`` (DVERGE ``--plus-adv``): adds ``(1/M) sum_m CE(f_m(x~), y)`` with ``x~`` the training
PGD on the averaged ensemble, in the same forward pass (``[x; x~]`` along the batch). The CDA²
paper notes that "GAL is hard to optimize in adversarial training" (Sec. 4.4).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as Fn
from torch import Tensor

from .base import Tally
from .ensemble import BASELINE_SCHEDULE, EnsembleMethod, per_model_ce

__all__ = ["GAL", "gal_loss", "pairwise_cosines", "LOG_OFFSET"]

LOG_OFFSET = 1e-20   # inside the coherence's log (DVERGE ``log_offset``)


def pairwise_cosines(grads: Tensor) -> Tensor:
    """``[B, M(M-1)/2]``: cosine similarity of every pair ``i < j`` (row-major) of the
    per-sample vectors ``grads [M, B, D]``."""
    M = grads.shape[0]
    unit = Fn.normalize(grads, dim=-1, eps=1e-12)
    sims = torch.einsum("ibd,jbd->bij", unit, unit)
    i, j = torch.triu_indices(M, M, 1, device=grads.device)
    return sims[:, i, j]


def gal_loss(logits: Tensor, x_in: Tensor, target: Tensor, coeff: float,
             clean: slice = slice(None)) -> Tuple[Tensor, Dict[str, Tensor]]:
    """GAL's loss (see the module docstring) of ``logits [M, N, K]`` computed from ``x_in
    [M, N', ...]`` (sub-model m read ``x_in[m]``; ``N'`` is the ``clean`` part of the batch axis
    and the gradients are taken w.r.t. it). Returns ``(loss, terms)`` with terms ``ce`` (``[M]``,
    batch means over ``clean``) and ``coherence``."""
    M = logits.shape[0]
    z = logits[:, clean]
    z = z if z.dtype == torch.float64 else z.float()
    K = z.shape[-1]
    # plain cross-entropy: the double backward needs its graph (the fused op is first-order)
    ce = Fn.cross_entropy(z.reshape(-1, K), target.repeat(M), reduction="none").view(M, -1)
    (g,) = torch.autograd.grad(ce.sum(), x_in, create_graph=True)
    cos = pairwise_cosines(g.flatten(2))
    coherence = torch.log(cos.exp().sum(-1) + LOG_OFFSET).mean()
    ce_mean = ce.mean(1)
    loss = ce_mean.sum() / M + coeff * coherence
    return loss, {"ce": ce_mean.detach(), "coherence": coherence.detach()}


class GAL(EnsembleMethod):
    """GAL (see the module docstring for the formula and the source of every default)."""

    name = "gal"
    defaults = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4, "batch_size": 128,
                **BASELINE_SCHEDULE}
    terms = ("ce", "coherence", "adv_ce")
    min_models = 2

    def noisy(self, x: Tensor) -> Tensor:
        """``x`` with N(0, gal_noise^2) added to each image with probability 1/2 (drawn from
        the trainer's generator, so a resumed run draws the same noise)."""
        std, g = self.trainer.config.gal_noise, self.trainer.generator
        if std == 0:
            return x
        pick = torch.rand(x.shape[0], generator=g) < 0.5
        noise = torch.randn(x.shape, generator=g) * std
        return x + (noise * pick.view(-1, *[1] * (x.dim() - 1))).to(x.device, x.dtype)

    def step(self, x: Tensor, y: Tensor, tallies: Dict[str, Tally]) -> Dict[str, Tensor]:
        t, cfg, B = self.trainer, self.trainer.config, y.shape[0]
        M = t.model.num_models
        x = self.noisy(x)
        x_adv = self.adversarial(x, y) if cfg.adv else None
        # one copy of the batch per sub-model, so that each input gradient is that sub-model's own
        x_in = x.unsqueeze(0).expand(M, *x.shape).clone().requires_grad_(True)
        inputs = x_in if x_adv is None else torch.cat([x_in, x_adv.unsqueeze(0).expand(M, *x.shape)], 1)

        def loss_of(logits: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
            loss, terms = gal_loss(logits, x_in, y, cfg.gal_coeff, slice(0, B))
            if x_adv is not None:
                adv_ce = per_model_ce(logits[:, B:], y, t.backend).mean(1).sum() / M
                terms["adv_ce"] = adv_ce.detach()
                loss = loss + adv_ce
            return loss, terms

        adv_part = None if x_adv is None else slice(B, 2 * B)
        y_acc = y if x_adv is None else y.repeat(2)
        return {"gal": self._train(inputs, loss_of, tallies["train"], B, slice(0, B), adv_part, y_acc)}
