"""M copies of any single-model trunk, as one collaboration trunk: the plain loop.

The paper's ResNets are stored packed (:mod:`cda2_ext.models.resnet`) because every layer of
theirs is known. A trunk from elsewhere - a registered architecture such as WideResNet, or a
user's own constructor - is an ordinary ``nn.Module`` mapping one batch of images to one batch of
features, so :class:`CopiesTrunk` builds it ``M`` times (each copy initialised by its own call of
the constructor, under the run's seeded RNG) and runs the copies one after another. Its state dict
is the copies' own (``members.0.*``, ``members.1.*``, ...), and it has the contract the heads
need: ``num_models``, ``feature_dim`` and ``[B, *input]`` or ``[M, B, *input]`` ->
``[M, B, feature_dim]``.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, one_line

__all__ = ["CopiesTrunk"]


class CopiesTrunk(nn.Module):
    """``num_models`` copies of ``constructor()``, run as a loop over sub-models.

    Args:
        num_models: M.
        constructor: called once per copy, with no arguments; returns an ``nn.Module`` mapping
            images ``[B, C, H, W]`` in the model's normalised space to features ``[B, F]`` (any
            ``[B, ...]`` is flattened).
        name: the architecture's name, for messages.
        in_channels, image_size: the input the copies get; used to measure ``F`` with one
            forward pass of two blank images when the module does not say it itself (an integer
            ``feature_dim`` attribute, as :class:`~cda2_ext.models.wide_resnet.WideResNet` has).
    """

    def __init__(self, num_models: int, constructor: Callable[[], nn.Module], name: str,
                 in_channels: int = 3, image_size: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.num_models = num_models
        self.members = nn.ModuleList(_build(constructor, name) for _ in range(num_models))
        self.feature_dim = _feature_dim(self.members[0], name, in_channels, image_size)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, C, H, W]`` shared or ``[M, B, C, H, W]``; returns ``[M, B, feature_dim]``."""
        inputs = x.unbind(0) if x.dim() == 5 else [x] * self.num_models
        return torch.stack([m(xm).flatten(1) for m, xm in zip(self.members, inputs)])


def _build(constructor: Callable[[], nn.Module], name: str) -> nn.Module:
    """One copy, or a one-line :class:`ConfigError` naming the architecture (a user's constructor
    may raise anything, or return something that is not a module)."""
    try:
        module = constructor()
    except Exception as err:  # noqa: BLE001 - the user's code; its error becomes one line
        raise ConfigError(f"arch {name!r}: the constructor raised {type(err).__name__}: "
                          f"{one_line(err)}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"arch {name!r}: the constructor returned {type(module).__name__}, "
                          "not a torch.nn.Module")
    return module


def _feature_dim(module: nn.Module, name: str, in_channels: int,
                 image_size: Optional[Sequence[int]]) -> int:
    """``F``: the module's own ``feature_dim``, else measured on two blank images in eval mode
    (no BatchNorm statistics move; under ``torch.device("meta")`` nothing is computed at all)."""
    declared = getattr(module, "feature_dim", None)
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
        return declared
    if image_size is None:
        raise ConfigError(f"image_size: needed to measure the feature size of arch {name!r} (or "
                          "give its module an integer feature_dim attribute)")
    p = next(module.parameters(), None)
    probe = torch.zeros(2, in_channels, *image_size, device=p.device if p is not None else None)
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(probe)
    except Exception as err:  # noqa: BLE001 - the user's module on the run's image size
        raise ConfigError(f"arch {name!r}: its module fails on images of "
                          f"{image_size[0]}x{image_size[1]} ({type(err).__name__}: "
                          f"{one_line(err)})") from None
    finally:
        module.train(was)
    if not isinstance(out, Tensor) or out.dim() < 2 or out.shape[0] != 2 or out[0].numel() < 1:
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(f"arch {name!r}: its module must map images [B, C, H, W] to features "
                          f"[B, F], got {got} for B = 2")
    return int(out[0].numel())
