"""WideResNet (Zagoruyko & Komodakis, BMVC 2016) as one sub-model's trunk: images -> features.

The widely used CIFAR model of the robustness literature (WRN-28-10, WRN-34-10 in adversarial
training, WRN-16-4 where compute is short). Pre-activation basic blocks (BN-ReLU-conv, twice) in
three groups of ``(depth - 4) / 6`` blocks with ``16k, 32k, 64k`` channels (``k`` the widening
factor), the second and third starting with stride 2, a 1x1 convolution on the shortcut where the
shape changes, then BN-ReLU and global average pooling: ``feature_dim = 64k`` features. No
dropout (the paper's CIFAR default without it). Convolutions are He-initialised (fan out), as in
the authors' code.

It is an ordinary single-model ``nn.Module``; a collaboration runs ``M`` copies of it as a loop
(:mod:`cda2_ext.models.copies`; registered as ``arch="wrn16-4"`` in
:mod:`cda2_ext.models.architectures`). The blocks keep the names the transfer attacks' SGM looks
for (``shortcut``, ``bn2``), so a WideResNet surrogate takes the skip-gradient method too.
"""
from __future__ import annotations

import torch.nn.functional as Fn
from torch import Tensor, nn

__all__ = ["WideResNet", "wide_resnet_16_4"]


class _WideBlock(nn.Module):
    """Pre-activation basic block: ``x + conv2(relu(bn2(conv1(relu(bn1(x))))))``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.shortcut = (None if in_ch == out_ch and stride == 1
                         else nn.Conv2d(in_ch, out_ch, 1, stride, 0, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        o = Fn.relu(self.bn1(x))
        y = self.conv2(Fn.relu(self.bn2(self.conv1(o))))
        # where the shape changes, the projection reads the pre-activated input (as the authors')
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen`` on ``[B, in_channels, H, W]`` images -> ``[B, 64 * widen]``.

    Args:
        depth: ``6n + 4`` (16, 22, 28, 34, 40).
        widen: the widening factor ``k`` (WRN-16-4: 4).
        in_channels: image channels (3).
    """

    def __init__(self, depth: int = 16, widen: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth: a WideResNet has 6n+4 layers (16, 22, 28, ...), got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        blocks, in_ch = [], 16
        for group, out_ch in enumerate(widths):
            for i in range(n):
                blocks.append(_WideBlock(in_ch, out_ch, 2 if group > 0 and i == 0 else 1))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_ch)
        self.feature_dim = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        h = Fn.relu(self.bn(self.blocks(self.stem(x))))
        return Fn.adaptive_avg_pool2d(h, 1).flatten(1)


def wide_resnet_16_4() -> WideResNet:
    """WRN-16-4 (2.7M parameters): the constructor behind ``arch="wrn16-4"``."""
    return WideResNet(16, 4)
