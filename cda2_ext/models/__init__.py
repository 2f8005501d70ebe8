"""Dual-head sub-models and the M-way collaboration of CDA²."""
from __future__ import annotations

from .architectures import (ARCHITECTURES, Architecture, copies_of, import_constructor,
                            named_architectures)
from .classifier import CollaborationLogits, EnsembleLogits, SubModelLogits, as_model_fn
from .collaboration import (ARCHS, SCORES, Collaboration, CollaborationConfig, Predictions,
                            collaborate, ensemble_probs, majority_vote, predict_from_outputs,
                            selection_score)
from .copies import CopiesTrunk
from .resnet import (CIFAR10_MEAN, CIFAR10_STD, PPD_INPUTS, DualHeadNet, PackedBasicBlock,
                     PackedConv2d, PackedLinear, PackedLinearTrunk, PackedResNetTrunk, valid_depth)
from .wide_resnet import WideResNet, wide_resnet_16_4

__all__ = [
    "ARCHS", "SCORES", "Collaboration", "CollaborationConfig", "Predictions",
    "collaborate", "ensemble_probs", "majority_vote", "predict_from_outputs", "selection_score",
    "CIFAR10_MEAN", "CIFAR10_STD", "PPD_INPUTS", "DualHeadNet", "PackedBasicBlock", "PackedConv2d",
    "PackedLinear", "PackedLinearTrunk", "PackedResNetTrunk", "valid_depth",
    "ARCHITECTURES", "Architecture", "copies_of", "import_constructor", "named_architectures",
    "CopiesTrunk", "WideResNet", "wide_resnet_16_4",
    "CollaborationLogits", "EnsembleLogits", "SubModelLogits", "as_model_fn",
]
