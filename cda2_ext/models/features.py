"""Every sub-model's intermediate features at a chosen layer, from the packed model in one pass.

DVERGE (Yang et al., NeurIPS 2020) distils each sub-model's *non-robust features* at a layer
picked at random each epoch. Its ResNet numbers the layers of a depth-``d`` CIFAR ResNet
``1 .. d`` (``get_features`` in ``models/resnet.py`` of github.com/zjysteven/DVERGE) and always
reads them **before the ReLU**:

* layer 1: the stem's BatchNorm output;
* layers ``2 .. d-1``, two per basic block ``k = (layer - 2) // 2`` (in forward order): the odd
  one of the pair is the block's first BatchNorm output, the even one the block's output before
  its final ReLU (second BatchNorm + shortcut);
* layer ``d``: the logits.

:func:`packed_features` reads these from a :class:`~cda2_ext.models.Collaboration` without
touching its modules' code: forward hooks on the named sub-modules of the trunk capture the
packed activation (``[B, M*C, H, W]``, sub-model ``m`` in channels ``m*C:(m+1)*C``) and stop the
forward pass right there (nothing after the layer is computed). The result is ``[M, B, D]``:
sub-model ``m``'s flattened features of its input (``x [B, ...]`` shared or ``x [M, B, ...]``,
one input per sub-model, as for the model itself), differentiable w.r.t. ``x`` and the weights.

Depends only on the trunk's attribute names (``stem[1]``, ``blocks[k].bn1``/``bn2``/
``shortcut``) and the channel-packed activation layout of :mod:`cda2_ext.models.resnet`.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor, nn

__all__ = ["feature_layers", "packed_features"]


class _Captured(Exception):
    """Raised by the capturing hook to end the forward pass once the features are in hand."""


def feature_layers(model: nn.Module) -> int:
    """How many feature layers ``model`` (a ResNet :class:`Collaboration`) has: its depth."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "arch", None) != "resnet":
        raise ValueError("model: feature layers are defined for ResNet collaborations only")
    return int(cfg.depth)


def _unpack(h: Tensor, num_models: int) -> Tensor:
    """Channel-packed ``[B, M*C, ...]`` -> ``[M, B, C*...]``."""
    B = h.shape[0]
    return h.reshape(B, num_models, -1).transpose(0, 1)


def packed_features(model: nn.Module, x: Tensor, layer: int) -> Tensor:
    """Features ``[M, B, D]`` of every sub-model at DVERGE's ``layer`` (1-based, before ReLU).

    Args:
        model: a ResNet :class:`~cda2_ext.models.Collaboration` (its mode - train/eval - is used
            as it is; attacks wrap this in :func:`~cda2_ext.runtime.eval_mode`).
        x: ``[B, C, H, W]`` shared or ``[M, B, C, H, W]`` one input per sub-model, in [0, 1].
        layer: ``1 .. depth`` (see the module docstring); ``depth`` gives the logits.
    """
    depth = feature_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= depth:
        raise ValueError(f"layer: expected an integer in [1, {depth}], got {layer!r}")
    M = model.num_models
    if layer == depth:
        return model(x)[0]
    trunk = model.net.trunk
    got: Dict[str, Tensor] = {}
    hooks: List[torch.utils.hooks.RemovableHandle] = []

    def keep(name: str, stop: bool):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            got[name] = output
            if stop:
                raise _Captured
        return hook

    if layer == 1:
        hooks.append(trunk.stem[1].register_forward_hook(keep("out", True)))
    else:
        block = trunk.blocks[(layer - 2) // 2]
        if (layer - 2) % 2 == 0:      # after the block's first conv + BN
            hooks.append(block.bn1.register_forward_hook(keep("out", True)))
        else:                         # the block's output before its final ReLU
            hooks.append(block.register_forward_pre_hook(
                lambda module, inputs: got.__setitem__("in", inputs[0])))
            hooks.append(block.bn2.register_forward_hook(keep("bn2", False)))
            if block.shortcut is not None:
                hooks.append(block.shortcut.register_forward_hook(keep("shortcut", False)))
            hooks.append(block.register_forward_hook(keep("block", True)))
    try:
        model(x)
    except _Captured:
        pass
    finally:
        for h in hooks:
            h.remove()
    if "out" in got:
        return _unpack(got["out"], M)
    residual = got["shortcut"] if "shortcut" in got else got["in"]
    return _unpack(got["bn2"] + residual, M)
