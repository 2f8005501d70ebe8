"""Adversarial attacks on collaborations (batched L-inf PGD for now)."""
from __future__ import annotations

from .pgd import (LossFn, collaboration_loss_fn, collaboration_pgd, eval_mode, per_model_loss,
                  per_model_pgd, pgd)

__all__ = ["LossFn", "pgd", "per_model_loss", "collaboration_loss_fn", "per_model_pgd",
           "collaboration_pgd", "eval_mode"]
