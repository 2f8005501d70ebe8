"""Dual-head CIFAR ResNets, stored *packed*: M sub-models live in one module.

Why packed. Algorithm 1 runs all M sub-models on every batch (and on every PGD step), so a
Python loop over sub-models would launch M times as many small kernels. Instead every layer keeps
the weights of all M sub-models side by side and runs them in **one** call:

* a convolution of M sub-models is one grouped convolution (``groups=M``) over the channel-packed
  activation ``[B, M*C, H, W]``; when all sub-models read the *same* image (the stem on a shared
  input) the same weight ``[M*C_out, C_in, k, k]`` is used with ``groups=1``, which equals M
  separate convolutions of one input and costs nothing extra;
* BatchNorm over ``M*C`` channels *is* M independent BatchNorms (statistics are per channel);
* a linear layer of M sub-models is one batched matmul (``baddbmm``) over ``[M, B, F]``.

This is the same lowering ``torch.func.vmap`` applies to convolutions, written out so that the
state dict stays plain tensors, BatchNorm running statistics update in place, and nothing depends
on functorch batching rules. A single model is simply ``num_models=1``.

Storage and execution are separate: the weights are always stored packed, but the trunk can also
*run* as a loop over sub-models on views of them (``layout="loop"``, what ``"auto"`` picks on every
device: oneDNN's grouped convolutions are slower on the CPU than M plain ones, and on an H200 the
packed layout lost up to 2.7x). See :mod:`cda2_ext.models.layouts`, which
also holds the frozen eval-mode snapshot the attacks differentiate.

Architectures (``depth``):

* ``6n+2`` (8, 14, 20, 32, 44, 56, ...): He et al. (2016) CIFAR ResNets with basic blocks,
  16/32/64 channels, 1x1-conv + BN projection shortcuts where the shape changes (as in the
  DVERGE / Synergy-of-Experts code the paper builds on), global average pooling -> 64 features.
  ResNet-20 is the paper's sub-model.
* ``2``: the "very shallow" model of Table 6 - one 3x3 conv (16 channels) + BN + ReLU, average
  pooling to 4x4 (8x8 windows on CIFAR), flattened to 256 features (the SoE code's ``depth=2`` shape), heads.
  This is a guess: the authors' code declares this shape (``fc`` of ``64 * 4`` inputs when
  ``n == 0``) but its ``forward`` cannot run it (``features`` is never assigned at ``n == 0``),
  and the paper does not describe the network.

Heads (:class:`DualHeadNet`): the label head is one linear layer to K logits; the PPD head is one
linear unit (sigmoid applied by the loss). **By default the PPD head reads the detached pooled
features** (``ppd_input="features"``), so only the BCE trains it and only the surrogate trains the
trunk and label head; ``ppd_input="logits"`` feeds it the detached logits instead.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from .layouts import has_hooks, loop_trunk_forward, resolve_layout
from .packed import PackedConv2d  # re-exported: it lives below layouts.py (no import circle)

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "PPD_INPUTS", "PackedConv2d", "PackedLinear", "PackedBatchNorm2d",
    "PackedBasicBlock", "PackedResNetTrunk", "PackedLinearTrunk", "DualHeadNet", "valid_depth",
    "packed_linear",
]

# Normalisation constants of the DVERGE / Synergy-of-Experts code (advertorch normaliser).
CIFAR10_MEAN: Tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: Tuple[float, float, float] = (0.2023, 0.1994, 0.2010)
PPD_INPUTS = ("features", "logits")


def valid_depth(depth: int) -> bool:
    """True for the supported depths: 2 (Table 6's shallow model) or 6n+2 with n >= 1."""
    return depth == 2 or (depth >= 8 and (depth - 2) % 6 == 0)


class PackedBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d(M*C)``: per-channel statistics make it M independent BatchNorms."""

    def __init__(self, num_models: int, channels: int) -> None:
        super().__init__(num_models * channels)


class PackedLinear(nn.Module):
    """M independent ``Linear(in_features, out_features)``: ``[M, B, in] -> [M, B, out]``.

    Initialised like ``nn.Linear`` (uniform in ``±1/sqrt(in_features)``) for each sub-model.
    """

    def __init__(self, num_models: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_models, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_models, out_features))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return packed_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"num_models={self.weight.shape[0]}, {self.in_features}, {self.out_features}"


def packed_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``x [M, B, in] @ weight[m].T + bias[m]`` for every sub-model ``m``: ``[M, B, out]``."""
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


class PackedBasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1-conv-BN shortcut, for M sub-models."""

    def __init__(self, num_models: int, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = PackedConv2d(num_models, in_ch, out_ch, 3, stride, 1)
        self.bn1 = PackedBatchNorm2d(num_models, out_ch)
        self.conv2 = PackedConv2d(num_models, out_ch, out_ch, 3, 1, 1)
        self.bn2 = PackedBatchNorm2d(num_models, out_ch)
        self.shortcut: Optional[nn.Sequential] = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(PackedConv2d(num_models, in_ch, out_ch, 1, stride, 0),
                                          PackedBatchNorm2d(num_models, out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = Fn.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + (x if self.shortcut is None else self.shortcut(x))
        return Fn.relu(out)


class PackedResNetTrunk(nn.Module):
    """Feature extractor of M CIFAR ResNets: images -> pooled features ``[M, B, F]``.

    Args:
        num_models: M.
        depth: 2 or 6n+2 (see the module docstring).
        in_channels: image channels (3).
        widths: channels of the three stages (16, 32, 64 for the standard CIFAR ResNets).
        layout: how the forward runs the packed weights (:data:`cda2_ext.models.layouts.LAYOUTS`):
            ``"packed"`` grouped convolutions, ``"loop"`` over sub-models, ``"auto"`` per device.
            An attribute that may change at any time; the parameters do not depend on it.
    """

    def __init__(self, num_models: int, depth: int = 20, in_channels: int = 3,
                 widths: Sequence[int] = (16, 32, 64), layout: str = "auto") -> None:
        super().__init__()
        if not valid_depth(depth):
            raise ValueError(f"depth: expected 2 or 6n+2 (8, 14, 20, 32, ...), got {depth}")
        resolve_layout(layout, torch.device("cpu"))  # validates the name
        self.num_models, self.depth, self.layout = num_models, depth, layout
        self.stem = nn.Sequential(PackedConv2d(num_models, in_channels, widths[0], 3, 1, 1),
                                  PackedBatchNorm2d(num_models, widths[0]), nn.ReLU())
        blocks = []
        if depth == 2:
            # Table 6's depth-2 model: conv + pool + heads. Pooling to a 4x4 map (8x8 windows on
            # 32x32 images; 256 features for 16 channels) lets the linear heads see where things are.
            self.pool: nn.Module = nn.AdaptiveAvgPool2d(4)
            self.feature_dim = widths[0] * 16
        else:
            n = (depth - 2) // 6
            in_ch = widths[0]
            for stage, out_ch in enumerate(widths):
                for i in range(n):
                    stride = 2 if (stage > 0 and i == 0) else 1
                    blocks.append(PackedBasicBlock(num_models, in_ch, out_ch, stride))
                    in_ch = out_ch
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.feature_dim = widths[-1]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, C, H, W]`` shared or ``[M, B, C, H, W]``; returns ``[M, B, feature_dim]``."""
        if resolve_layout(self.layout, x.device) == "loop" and not has_hooks(self):
            return loop_trunk_forward(self, x)
        if x.dim() == 5:  # one image per sub-model: pack the M axis into channels
            M, B = x.shape[:2]
            x = x.transpose(0, 1).reshape(B, M * x.shape[2], *x.shape[3:])
        h = self.pool(self.blocks(self.stem(x)))
        # [B, M*C, h, w] -> [M, B, C*h*w]; split the channels, not reshape(B, M, -1): B may be 0
        return h.unflatten(1, (self.num_models, -1)).flatten(2).transpose(0, 1)


class PackedLinearTrunk(nn.Module):
    """Identity "trunk" for linear sub-models on vectors (the XOR experiment of Section 4.2).

    ``[B, F]`` -> ``[M, B, F]`` (broadcast) or ``[M, B, F]`` unchanged; the heads make each
    sub-model ``f_m(x) = A_m x + b_m``.
    """

    def __init__(self, num_models: int, in_features: int) -> None:
        super().__init__()
        self.num_models, self.feature_dim = num_models, in_features

    def forward(self, x: Tensor) -> Tensor:
        return x.expand(self.num_models, *x.shape) if x.dim() == 2 else x


class DualHeadNet(nn.Module):
    """M packed dual-head sub-models: ``x -> (logits [M, B, K], ppd_logit [M, B])``.

    Args:
        trunk: maps inputs to features ``[M, B, trunk.feature_dim]``.
        num_classes: K.
        ppd_input: what the PPD head reads - ``"features"`` (default: the pooled features) or
            ``"logits"``. Either way it is **detached** when ``detach_ppd`` (default), so the PPD
            head is trained by the BCE alone and the label path by the surrogate alone, as in
            Algorithm 1 (lines 7 and 10 update different modules).
        mean, std: per-channel normalisation applied inside the model (inputs stay in [0, 1],
            so attacks and the eps-ball live in pixel space); ``None`` for no normalisation.
    """

    def __init__(self, trunk: nn.Module, num_classes: int, ppd_input: str = "features",
                 detach_ppd: bool = True, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        if ppd_input not in PPD_INPUTS:
            raise ValueError(f"ppd_input: expected one of {PPD_INPUTS}, got {ppd_input!r}")
        M = trunk.num_models
        self.num_models, self.num_classes = M, num_classes
        self.ppd_input, self.detach_ppd = ppd_input, detach_ppd
        self.trunk = trunk
        self.label_head = PackedLinear(M, trunk.feature_dim, num_classes)
        self.ppd_head = PackedLinear(M, trunk.feature_dim if ppd_input == "features" else num_classes, 1)
        self.normalize = mean is not None
        if self.normalize:
            assert std is not None
            self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std).view(-1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self.heads(self.trunk(self.normalise(x)))

    def normalise(self, x: Tensor) -> Tensor:
        """Pixels in [0, 1] -> the trunk's input (identity without ``mean``/``std``)."""
        return (x - self.mean) / self.std if self.normalize else x

    def heads(self, feats: Tensor, detach_weights: bool = False) -> Tuple[Tensor, Tensor]:
        """Features ``[M, B, F]`` -> ``(logits [M, B, K], ppd_logit [M, B])``.

        ``detach_weights``: no gradient to the heads' parameters (attacks differentiate w.r.t.
        the input only).
        """
        params = (self.label_head.weight, self.label_head.bias, self.ppd_head.weight,
                  self.ppd_head.bias)
        lw, lb, pw, pb = (p.detach() for p in params) if detach_weights else params
        logits = packed_linear(feats, lw, lb)
        ppd_in = feats if self.ppd_input == "features" else logits
        if self.detach_ppd:
            ppd_in = ppd_in.detach()
        return logits, packed_linear(ppd_in, pw, pb).squeeze(-1)
