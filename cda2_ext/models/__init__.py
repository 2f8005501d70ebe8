"""Dual-head sub-models and the M-way collaboration of CDA²."""
from __future__ import annotations

from .collaboration import (ARCHS, SCORES, Collaboration, CollaborationConfig, Predictions,
                            collaborate, ensemble_probs, majority_vote, predict_from_outputs,
                            selection_score)
from .resnet import (CIFAR10_MEAN, CIFAR10_STD, PPD_INPUTS, DualHeadNet, PackedBasicBlock,
                     PackedConv2d, PackedLinear, PackedLinearTrunk, PackedResNetTrunk, valid_depth)

__all__ = [
    "ARCHS", "SCORES", "Collaboration", "CollaborationConfig", "Predictions",
    "collaborate", "ensemble_probs", "majority_vote", "predict_from_outputs", "selection_score",
    "CIFAR10_MEAN", "CIFAR10_STD", "PPD_INPUTS", "DualHeadNet", "PackedBasicBlock", "PackedConv2d",
    "PackedLinear", "PackedLinearTrunk", "PackedResNetTrunk", "valid_depth",
]
