"""The CDA² collaboration: M dual-head sub-models behind one call, and their predictions.

:class:`Collaboration` maps ``[B, C, H, W]`` (one input shared by all sub-models) or
``[M, B, C, H, W]`` (one variant per sub-model) to ``(logits [M, B, K], ppd_logit [M, B])`` in
one call, with the weights of all sub-models stored packed (:mod:`cda2_ext.models.resnet`) and run
either as packed grouped layers or as a loop over sub-models (``layout``,
:mod:`cda2_ext.models.layouts`). On top of that it offers the three ways to turn M answers into one:

* :meth:`Collaboration.collaborate` - Algorithm 2: the sub-model with the highest PPD answers
  (fused ``collaborative_select``). ``score="soe"`` ranks sub-models by
  ``max_k softmax(z)_k * sigmoid(ppd)`` instead, the rule of the authors' later
  Synergy-of-Experts code (Cui et al., NeurIPS 2022); the paper's rule is the default.
* :meth:`Collaboration.ensemble` - average of probabilities, or the majority vote of Eq. 1.
* each sub-model alone (``logits[m]``), all in :meth:`Collaboration.predict`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .. import limits
from ..errors import ConfigError
from ..storage.records import from_record, to_record
from ..runtime import FUSED, OpsBackend, ops_backend
from .classifier import CollaborationLogits, EnsembleLogits
from .layouts import LAYOUTS, EvalNet, FrozenNet, has_hooks, resolve_layout
from .selection import SCORES, selection_score
from .architectures import ARCHITECTURES, check_arch_name, import_path, resolve_architecture
from .resnet import CIFAR10_MEAN, CIFAR10_STD, PPD_INPUTS, DualHeadNet, valid_depth

__all__ = [
    "ARCHS", "SCORES", "CollaborationConfig", "Collaboration", "Predictions",
    "selection_score", "collaborate", "ensemble_probs", "majority_vote", "predict_from_outputs",
]

#: The built-in architectures (:data:`~cda2_ext.models.architectures.ARCHITECTURES`); a user's
#: own constructor is named ``package.module:function``.
ARCHS = tuple(ARCHITECTURES)


@dataclass
class CollaborationConfig:
    """Everything needed to rebuild a :class:`Collaboration` (stored beside checkpoints as JSON).

    Attributes:
        num_models: M, the number of sub-models (paper: 3).
        arch: a built-in architecture (:data:`ARCHS`: ``"resnet"``, the paper's; ``"linear"``,
            vectors, the XOR experiment; ``"wrn16-4"``) or ``"package.module:function"``, a
            user's constructor of one sub-model's trunk (:mod:`cda2_ext.models.architectures`:
            loading such a config needs that constructor named again).
        depth: ResNet depth, 2 or 6n+2 (paper: 20); read by ``arch="resnet"`` only.
        num_classes: K.
        in_channels: image channels (resnet) / input features (linear).
        ppd_input: PPD head input, ``"features"`` (default) or ``"logits"``; always detached
            when ``detach_ppd``.
        detach_ppd: keep the BCE out of the trunk (Algorithm 1 trains the two heads separately).
        normalize: apply ``mean``/``std`` inside the model (inputs are in [0, 1]).
        layout: how the ResNet trunk runs its packed weights - ``"packed"`` (grouped
            convolutions), ``"loop"`` (a loop over sub-models, channels-last) or ``"auto"``
            (loop on CPU, packed elsewhere); see :mod:`cda2_ext.models.layouts`. Speed only: the
            parameters, the state dict and the results do not depend on it. ResNet only: other
            architectures run their M copies as a loop.
        image_size: ``(H, W)`` of the images the model was built for, checked on every input
            when set (a run on an image folder, or of another architecture than the ResNet,
            records its data's); ``None``: any size (the ResNets pool adaptively; checkpoints
            from before this field). A user's trunk without a ``feature_dim``
            attribute needs it, to measure its feature size.
    """

    num_models: int = 3
    arch: str = "resnet"
    depth: int = 20
    num_classes: int = 10
    in_channels: int = 3
    ppd_input: str = "features"
    detach_ppd: bool = True
    normalize: bool = True
    mean: Tuple[float, ...] = field(default=CIFAR10_MEAN)
    std: Tuple[float, ...] = field(default=CIFAR10_STD)
    layout: str = "auto"
    image_size: Optional[Tuple[int, int]] = None

    def validate(self) -> "CollaborationConfig":
        """Raise ``ValueError`` with a one-line message for an unusable configuration.

        Counts are bounded (:mod:`cda2_ext.limits`): a config read back from a checkpoint may
        hold anything, and ``num_classes = 10**12`` would otherwise be an allocation of terabytes.
        """
        limits.count("num_models", self.num_models, 1, limits.MODELS)
        check_arch_name(self.arch)  # its form only: a user's constructor is never imported here
        limits.count("depth", self.depth, 2, limits.DEPTH)
        if self.arch == "resnet" and not valid_depth(self.depth):
            raise ValueError(f"depth: expected 2 or 6n+2 (8, 14, 20, 32, ...), got {self.depth}")
        limits.count("num_classes", self.num_classes, 2, limits.CLASSES)
        limits.count("in_channels", self.in_channels, 1, limits.CHANNELS)
        for name in ("detach_ppd", "normalize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        for name in ("mean", "std") if self.normalize else ():
            v = getattr(self, name)
            if not (isinstance(v, tuple) and len(v) == self.in_channels and all(
                    isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)
                    and (name == "mean" or c > 0) for c in v)):
                raise ValueError(f"{name}: expected {self.in_channels} finite numbers (one per "
                                 f"input channel{', > 0' if name == 'std' else ''}), got {v!r}")
        if self.ppd_input not in PPD_INPUTS:
            raise ValueError(f"ppd_input: expected one of {PPD_INPUTS}, got {self.ppd_input!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {self.layout!r}")
        size = self.image_size
        if size is not None and not (isinstance(size, tuple) and len(size) == 2):
            raise ValueError(f"image_size: expected (height, width), got {size!r}")
        for side in size or ():
            limits.count("image_size", side, 1, limits.IMAGE_SIDE)
        return self

    def to_dict(self) -> Dict[str, Any]:
        """The config as JSON; ``image_size`` only where set (checkpoints before it lack it)."""
        return to_record(self, later=("image_size",))

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "CollaborationConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo should not pass)."""
        return from_record(cls, d, "model config")


class Predictions(NamedTuple):
    """Hard predictions of one batch (all ``int64``).

    Attributes:
        collaboration: ``[B]`` labels of Algorithm 2 (with the requested score).
        selected: ``[B]`` index of the sub-model that answered.
        ensemble: ``[B]`` argmax of the mean probability.
        vote: ``[B]`` majority vote of Eq. 1.
        per_model: ``[M, B]`` each sub-model alone.
    """

    collaboration: Tensor
    selected: Tensor
    ensemble: Tensor
    vote: Tensor
    per_model: Tensor


def collaborate(logits: Tensor, ppd_logit: Tensor, score: str = "ppd",
                backend: OpsBackend = FUSED) -> Tuple[Tensor, Tensor]:
    """Algorithm 2 on precomputed outputs: ``(index [B], chosen_logits [B, K])``.

    Gradients flow into the chosen sub-model's logits (so PGD can attack the collaboration).
    """
    s = selection_score(logits, ppd_logit, score)
    if s.dtype != logits.dtype:  # the fused op wants one dtype; the score carries no gradient
        s = s.to(logits.dtype)
    return backend.collaborative_select(s, logits)


def ensemble_probs(logits: Tensor) -> Tensor:
    """Average of the sub-models' probabilities, ``[B, K]`` (differentiable)."""
    return torch.softmax(logits, dim=-1).mean(0)


def majority_vote(logits: Tensor) -> Tensor:
    """Eq. 1: the label most sub-models predict, ``[B]`` int64.

    Ties (e.g. M=2 disagreeing, or three-way splits) go to the tied label with the highest mean
    probability: adding ``0.5 * mean_prob`` (< 1) to the integer vote counts never overturns a
    count difference but orders equal counts.
    """
    M, B, K = logits.shape
    votes = torch.zeros(B, K, device=logits.device, dtype=torch.float32)
    votes.scatter_add_(1, logits.argmax(-1).t(), torch.ones(B, M, device=logits.device))
    return (votes + 0.5 * ensemble_probs(logits.detach().float())).argmax(-1)


@torch.no_grad()
def predict_from_outputs(logits: Tensor, ppd_logit: Tensor, score: str = "ppd",
                         backend: OpsBackend = FUSED) -> Predictions:
    """All hard predictions from one forward pass's ``(logits, ppd_logit)``."""
    index, chosen = collaborate(logits, ppd_logit, score, backend)
    return Predictions(chosen.argmax(-1), index, ensemble_probs(logits).argmax(-1),
                       majority_vote(logits), logits.argmax(-1))


class Collaboration(nn.Module):
    """M dual-head sub-models that answer together (CDA², Algorithms 1 and 2).

    ``forward(x)`` with ``x`` of shape ``[B, *input]`` (shared) or ``[M, B, *input]`` (one
    variant per sub-model; ``input`` is ``(C, H, W)`` for images, ``(F,)`` for vectors) returns
    ``(logits [M, B, K], ppd_logit [M, B])``. Image inputs are in [0, 1]; normalisation is inside.

    Args:
        config: the architecture (stored beside checkpoints); ``overrides`` replace its fields.
            ``arch`` may be a constructor of one sub-model's trunk (any ``nn.Module`` mapping
            images to a feature vector; M copies are built): its import path is recorded as
            ``config.arch``, and the label and PPD heads go on top.
        fused: run Algorithm 2's selection with the fused kernels (default) or, ``False``, their
            plain-PyTorch twins. How to compute, not what: it is not part of the config, and
            the math is the same. Read back as :attr:`backend`.
    """

    def __init__(self, config: Optional[CollaborationConfig] = None, *, fused: bool = True,
                 **overrides: Any) -> None:
        super().__init__()
        constructor = overrides.get("arch")
        if callable(constructor):  # the config keeps its name; the callable builds it
            overrides["arch"] = import_path(constructor)
        else:
            constructor = None
        cfg = dataclasses.replace(config or CollaborationConfig(), **overrides).validate()
        self.config = cfg
        self._backend = ops_backend(fused)
        #: What builds the trunk (:mod:`cda2_ext.models.architectures`).
        self.architecture = resolve_architecture(cfg.arch, constructor)
        self.input_dims = self.architecture.input_dims
        trunk = self.architecture.build(cfg)
        mean, std = (cfg.mean, cfg.std) if cfg.normalize else (None, None)
        self.net = DualHeadNet(trunk, cfg.num_classes, cfg.ppd_input, cfg.detach_ppd, mean, std)

    @classmethod
    def from_config(cls, config: CollaborationConfig | Dict[str, Any], *,
                    fused: bool = True) -> "Collaboration":
        """Build from a :class:`CollaborationConfig` or its ``to_dict()`` (e.g. checkpoint JSON)."""
        if isinstance(config, dict):
            config = CollaborationConfig.from_dict(config)
        return cls(config, fused=fused)

    @property
    def num_models(self) -> int:
        return self.config.num_models

    @property
    def backend(self) -> OpsBackend:
        """The operator module Algorithm 2 runs on (fixed at construction)."""
        return self._backend

    @property
    def layout(self) -> str:
        """The trunk's layout (``config.layout`` at construction); may be set at any time."""
        return getattr(self.net.trunk, "layout", self.config.layout)

    @layout.setter
    def layout(self, value: str) -> None:
        resolve_layout(value, torch.device("cpu"))  # validates
        self.config.layout = value
        if hasattr(self.net.trunk, "layout"):
            self.net.trunk.layout = value

    def frozen(self) -> "_Checked":
        """This collaboration's **eval-mode** function of its input, for attacks.

        Same contract as ``forward`` (``x -> (logits [M, B, K], ppd_logit [M, B])``, checked),
        differentiable w.r.t. ``x`` only. On the loop layout it is a :class:`FrozenNet` snapshot
        (BatchNorm folded, zero-gradient samples skipped in the backward): build it again after
        the parameters change. On the packed layout, or while a module hook is registered, it is
        the module itself run in eval mode; so it is under autocast, whose dtype rules the
        hand-written backward does not follow.
        """
        p = next(self.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        loop = (self.architecture.snapshot and resolve_layout(self.layout, device) == "loop"
                and not has_hooks(self.net)
                and not torch.is_autocast_enabled(device.type))
        inner = FrozenNet(self.net) if loop else EvalNet(self.net)
        return _Checked(self, inner)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        self.check_input(x)
        return self.net(x)

    def check_input(self, x: Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``[B, *input]`` or ``[M, B, *input]``."""
        d = x.dim() - self.input_dims
        if d not in (1, 2) or (d == 2 and x.shape[0] != self.num_models):
            raise ValueError(f"x: expected [B, *input] or [M={self.num_models}, B, *input] with "
                             f"{self.input_dims} input dims, got {list(x.shape)}")
        size = self.config.image_size
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            raise ConfigError(f"x: images of {x.shape[-2]}x{x.shape[-1]} pixels, but the model was "
                              f"built for {size[0]}x{size[1]} (its image_size)")

    def collaborate(self, x: Tensor, score: str = "ppd") -> Tuple[Tensor, Tensor]:
        """Algorithm 2: ``(index [B], chosen_logits [B, K])``; differentiable w.r.t. ``x``."""
        logits, ppd = self(x)
        return collaborate(logits, ppd, score, self.backend)

    def ensemble(self, x: Tensor, method: str = "mean") -> Tensor:
        """``"mean"``: averaged probabilities ``[B, K]``; ``"vote"``: Eq. 1 labels ``[B]``."""
        logits, _ = self(x)
        if method == "mean":
            return ensemble_probs(logits)
        if method == "vote":
            return majority_vote(logits)
        raise ValueError(f"method: expected 'mean' or 'vote', got {method!r}")

    def as_classifier(self, score: str = "ppd", selection: str = "hard",
                      temperature: float = 1.0) -> CollaborationLogits:
        """This collaboration as a classifier ``x [B, C, H, W] -> logits [B, K]``: Algorithm 2's
        answer, the logits of the sub-model that ``score`` picks (``selection="soft"`` /
        ``"bpda"`` relax the pick for adaptive attacks). What torchattacks, AutoAttack and
        RobustBench expect; see :class:`~cda2_ext.models.classifier.CollaborationLogits`."""
        return CollaborationLogits(self, selection, temperature, score)

    def as_ensemble_classifier(self) -> EnsembleLogits:
        """This collaboration's sub-models as a plain ensemble classifier ``x -> logits [B, K]``
        (``log`` of the averaged probabilities): the answer of :meth:`ensemble`."""
        return EnsembleLogits(self)

    @torch.no_grad()
    def predict(self, x: Tensor, score: str = "ppd") -> Predictions:
        """Hard predictions of the collaboration, the ensemble (both rules) and each sub-model."""
        logits, ppd = self(x)
        return predict_from_outputs(logits, ppd, score, self.backend)


class _Checked:
    """A :meth:`Collaboration.frozen` function with the collaboration's input check."""

    def __init__(self, model: Collaboration, fn: Union[FrozenNet, EvalNet]) -> None:
        self.model, self.fn, self.num_models = model, fn, model.num_models
        self.backend = model.backend

    def __call__(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        self.model.check_input(x)
        return self.fn(x)
