"""Adversarial attacks: batched L-inf attacks built on the fused sign step.

* :mod:`.engine` - the one sign-step attack loop (:func:`~.engine.sign_attack`), losses (CE, CW,
  DLR, margin), restarts and per-sample worst-case bookkeeping, shared by everything below.
* :mod:`.training` - Algorithm 1's PGD (per-sub-model variants, attacks on the collaboration).
* :mod:`.whitebox` - the paper's PGD protocol; :class:`~.whitebox.CollaborationLogits` makes a
  collaboration an images -> logits function (hard / soft / BPDA selection).
* :mod:`.adaptive` - attacks on the PPD selection and APGD (CE, DLR, decision margin).
* :mod:`.decision` - Algorithm 2's decision margin, its (sub-model, class) targets, and the
  selection scale the adaptive attacks' temperatures follow.
* :mod:`.autoattack` - AutoAttack "standard" through its reference implementation (optional extra).
* :mod:`.transfer` - MI-PGD, M-DI2-FGSM and SGM from surrogate models; shareable transfer sets.
* :mod:`.square` - the Square attack (queries outputs only).

A new gradient attack is an *objective* (``x [G, B, ...] -> (loss [G, B], logits)``) handed to
:func:`~.engine.sign_attack` (or :func:`~.adaptive.apgd`); see :mod:`.engine`.
"""
from __future__ import annotations

from .engine import AttackResult, Objective, sign_attack
from .training import collaboration_pgd, per_model_pgd

__all__ = ["AttackResult", "Objective", "sign_attack", "per_model_pgd", "collaboration_pgd"]
