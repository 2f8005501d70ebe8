"""cda2_ext: CDA² (Collaborate to Defend against Adversarial Attacks) with fused C++/CUDA ops.

``cda2_ext.ops`` holds the fused operators (``cda2_ext.ops.reference`` their plain-PyTorch twins).
"""
from __future__ import annotations

from . import ops
from .ops import reference
from .ops import (
    BUILD_INFO,
    HAS_EXTENSION,
    CollabLoss,
    collaboration_loss,
    collaborative_select,
    pgd_random_start,
    pgd_sign_step_,
    ppd_bce,
)

__version__ = "0.1.0"

__all__ = [
    "ops", "reference", "BUILD_INFO", "HAS_EXTENSION", "CollabLoss", "collaboration_loss",
    "collaborative_select", "pgd_random_start", "pgd_sign_step_", "ppd_bce", "__version__",
]
