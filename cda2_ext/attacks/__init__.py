"""Adversarial attacks: batched L-inf attacks built on the fused sign step.

* :mod:`.pgd` - the PGD used for training (per-sub-model variants, attacks on the collaboration).
* :mod:`.engine` - the one sign-step attack loop, losses (CE, CW, DLR, margin), restarts and
  per-sample worst-case bookkeeping, shared by everything below.
* :mod:`.whitebox` - the paper's PGD protocol; :class:`CollaborationLogits` makes a collaboration an
  images -> logits function (hard / soft / BPDA selection).
* :mod:`.adaptive` - attacks on the PPD selection and APGD (CE, DLR).
* :mod:`.transfer` - MI-PGD, M-DI2-FGSM and SGM from surrogate models; shareable transfer sets.
* :mod:`.square` - the Square attack (queries outputs only).
"""
from __future__ import annotations

from .pgd import (LossFn, collaboration_loss_fn, collaboration_pgd, eval_mode, per_model_loss,
                  per_model_pgd, pgd)

__all__ = ["LossFn", "pgd", "per_model_loss", "collaboration_loss_fn", "per_model_pgd",
           "collaboration_pgd", "eval_mode"]
