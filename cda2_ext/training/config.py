"""Training configuration of CDA² (Algorithm 1), with the defaults and where they come from.

Sources: the paper (P) and, where it is silent, the authors' later Synergy-of-Experts code
(SoE, github.com/cuis15/synergy-of-experts: ``main.py`` / ``run.sh``).

=================  ==============  =====================================================
option             default         source
=================  ==============  =====================================================
num_models (M)     3               P, Sec. 4.1 (three ResNet-20 sub-models)
depth              20              P, Sec. 4.1 (ResNet-20)
eps                0.03            P, Sec. 4.3 (L-inf, images in [0, 1])
alpha              0.01            SoE ``--wbox_lr 0.01``
steps              10              PGD-10 for training (SoE trains with PGD, P is silent)
epochs             100             P, Table 4 ("100 epochs")
batch_size         128             SoE ``--batch_size 128``
lr / momentum / wd 0.1 / 0.9 / 1e-4  SoE ``--lr_expert`` / ``--momentum`` / ``--weight_decay``
schedule           multistep       SoE: x0.1 at epochs 50 and 75 (here: at 50% and 75%)
sigma              1.0             SoE ``--tempC 1.0`` (P leaves sigma open)
bce_weight         1.0             SoE ``--adaptivetrainlambda 1.0``
phases             adversarial     P, Sec. 3.2: "In our implementation, the natural data
                                   training of the collaboration is not necessary"
=================  ==============  =====================================================

``phases``: ``adversarial`` (Alg. 1 lines 12-19), ``natural`` (lines 2-10), ``both`` (per batch:
a natural-phase update, then an adversarial-phase update), or ``standard`` (no attack: surrogate +
BCE on clean images; with ``num_models=1`` this is plain cross-entropy training - Table 6).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from ..models.collaboration import SCORES, CollaborationConfig
from ..models.resnet import PPD_INPUTS, valid_depth
from ..errors import ConfigError

__all__ = ["TrainConfig", "PHASES", "SCHEDULES", "DATASETS"]

PHASES = ("adversarial", "natural", "both", "standard")
SCHEDULES = ("multistep", "cosine", "constant")
DATASETS = ("cifar10", "synthetic")



@dataclass
class TrainConfig:
    """All options of a training run (serialised to JSON beside every checkpoint)."""

    # model
    num_models: int = 3
    depth: int = 20
    ppd_input: str = "features"
    # objective (Algorithm 1)
    phases: str = "adversarial"
    sigma: float = 1.0
    bce_weight: float = 1.0
    select_score: str = "ppd"        # how the adversarial phase picks the attacked sub-model
    # PGD used for training
    eps: float = 0.03
    alpha: float = 0.01
    steps: int = 10
    random_start: bool = True
    # optimisation
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "multistep"
    milestones: Tuple[float, ...] = (0.5, 0.75)   # fractions of `epochs` (multistep)
    gamma: float = 0.1
    # data
    dataset: str = "cifar10"
    data_dir: Optional[str] = None
    train_limit: Optional[int] = None  # use only the first N training images
    test_limit: Optional[int] = None
    augment: bool = True
    # run
    out_dir: str = "runs/cda2"
    seed: int = 0
    device: str = "auto"
    unfused: bool = False
    progress: bool = True
    eval_every: int = 1                # clean test accuracy every N epochs (0: never)
    eval_batch_size: int = 500
    num_classes: int = 10

    def validate(self) -> "TrainConfig":
        """Raise :class:`ConfigError` (one line) for the first unusable option."""
        def bad(name: str, msg: str) -> None:
            raise ConfigError(f"{name}: {msg}, got {getattr(self, name)!r}")

        if not isinstance(self.num_models, int) or self.num_models < 1:
            bad("num_models", "the number of sub-models M must be an integer >= 1")
        if not valid_depth(self.depth):
            bad("depth", "must be 2 or 6n+2 (8, 14, 20, 32, ...)")
        if self.ppd_input not in PPD_INPUTS:
            bad("ppd_input", f"must be one of {PPD_INPUTS}")
        if self.phases not in PHASES:
            bad("phases", f"must be one of {PHASES}")
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma > 0):
            bad("sigma", "the soft-min temperature must be > 0")
        if not self.bce_weight >= 0:
            bad("bce_weight", "must be >= 0")
        if self.select_score not in SCORES:
            bad("select_score", f"must be one of {SCORES}")
        if not self.eps >= 0:
            bad("eps", "must be >= 0")
        if not self.alpha >= 0:
            bad("alpha", "must be >= 0")
        if self.steps < 0:
            bad("steps", "must be >= 0")
        if self.epochs < 1:
            bad("epochs", "must be >= 1")
        if self.batch_size < 1:
            bad("batch_size", "must be >= 1")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"must be one of {SCHEDULES}")
        if self.dataset not in DATASETS:
            bad("dataset", f"must be one of {DATASETS}")
        for name in ("train_limit", "test_limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                bad(name, "must be >= 1")
        if self.device not in ("auto", "cpu") and not self.device.startswith(("cuda", "mps")):
            bad("device", "must be 'auto', 'cpu', 'cuda[:N]' or 'mps'")
        return self

    def model_config(self) -> CollaborationConfig:
        """The :class:`CollaborationConfig` of the model this run trains."""
        return CollaborationConfig(num_models=self.num_models, depth=self.depth,
                                   num_classes=self.num_classes, ppd_input=self.ppd_input)

    def lr_at(self, epoch: int) -> float:
        """Learning rate of (0-based) ``epoch``; a pure function, so resuming needs no state."""
        if self.schedule == "cosine":
            return 0.5 * self.lr * (1.0 + math.cos(math.pi * epoch / self.epochs))
        if self.schedule == "multistep":
            passed = sum(epoch >= round(f * self.epochs) for f in self.milestones)
            return self.lr * self.gamma ** passed
        return self.lr

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"train config: unknown keys {sorted(unknown)}")
        d = dict(d)
        if "milestones" in d:
            d["milestones"] = tuple(d["milestones"])
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

