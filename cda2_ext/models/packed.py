"""The packed convolution, the one layer both :mod:`~cda2_ext.models.resnet` (which builds with it)
and :mod:`~cda2_ext.models.layouts` (whose loop layout runs its weights per sub-model) need.

It lives here, below both, so imports go one way: ``resnet -> layouts -> packed``. Import it from
:mod:`cda2_ext.models` or :mod:`cda2_ext.models.resnet` as before.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

__all__ = ["PackedConv2d"]


class PackedConv2d(nn.Module):
    """M independent bias-free ``Conv2d(in_ch, out_ch, k)`` run as one grouped convolution.

    Input ``[B, M*in_ch, H, W]`` (one slice per sub-model) or ``[B, in_ch, H, W]`` (shared by
    all sub-models); output ``[B, M*out_ch, H', W']``. Weight ``[M*out_ch, in_ch, k, k]``:
    rows ``m*out_ch:(m+1)*out_ch`` belong to sub-model ``m``.
    """

    def __init__(self, num_models: int, in_ch: int, out_ch: int, kernel_size: int,
                 stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.num_models, self.in_ch, self.out_ch = num_models, in_ch, out_ch
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(num_models * out_ch, in_ch, kernel_size, kernel_size))
        # He init with fan_out of ONE sub-model (k*k*out_ch), as the SoE/DVERGE ResNets do;
        # nn.init.kaiming_* would see the packed shape and shrink the std by sqrt(M).
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / (kernel_size * kernel_size * out_ch)))

    def forward(self, x: Tensor) -> Tensor:
        shared = x.shape[1] == self.in_ch and self.num_models > 1
        groups = 1 if shared else self.num_models
        return Fn.conv2d(x, self.weight, None, self.stride, self.padding, 1, groups)

    def extra_repr(self) -> str:
        return (f"num_models={self.num_models}, {self.in_ch}, {self.out_ch}, "
                f"kernel_size={self.weight.shape[-1]}, stride={self.stride}, padding={self.padding}")
