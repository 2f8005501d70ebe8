"""Adversarial attacks: batched L-inf attacks built on the fused sign step.

* :mod:`.engine` - the one sign-step attack loop (:func:`~.engine.sign_attack`), losses (CE, CW,
  DLR, margin), restarts and per-sample worst-case bookkeeping, shared by everything below, and
  :class:`~.engine.AttackResult`, what every evaluation attack returns.
* :mod:`.registry` - every evaluation attack by name, one face:
  ``ATTACKS[name](model, x_nat, target, eps, **options) -> AttackResult``.
* :mod:`.training` - Algorithm 1's PGD (per-sub-model variants, attacks on the collaboration).
* :mod:`.whitebox` - the paper's PGD protocol. Every attack takes an images -> logits function;
  a collaboration is attacked through its Algorithm-2 decision, and the adapters that make it a
  classifier (hard / soft / BPDA selection, the ensemble, one sub-model) are in
  :mod:`cda2_ext.models.classifier`.
* :mod:`.adaptive` - attacks on the PPD selection (CE, DLR, decision margin), registered by name.
* :mod:`.apgd` - Auto-PGD (the AutoAttack schedule) on any objective or model function.
* :mod:`.decision` - Algorithm 2's decision margin, its (sub-model, class) targets, and the
  selection scale the adaptive attacks' temperatures follow.
* :mod:`.autoattack` - AutoAttack "standard" through its reference implementation (optional extra).
* :mod:`.transfer` - MI-PGD, M-DI2-FGSM and SGM from surrogate models; shareable transfer sets.
* :mod:`.square` - the Square attack (queries outputs only).

A new gradient attack is an *objective* (``x [G, B, ...] -> (loss [G, B], logits)``) handed to
:func:`~.engine.sign_attack` (or :func:`~.apgd.apgd`); see :mod:`.engine`.
"""
from __future__ import annotations

from .engine import AttackResult, Objective, sign_attack
from .training_pgd import collaboration_pgd, per_model_pgd

__all__ = ["AttackResult", "Objective", "sign_attack", "per_model_pgd", "collaboration_pgd"]
