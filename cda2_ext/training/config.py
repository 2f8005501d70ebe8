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
weights, sigma,    softmin, 1.0,   the weightings' records, each with its parameters, defaults
temp_c             1.0             and sources: :data:`~cda2_ext.training.weighting.WEIGHTINGS`
temp_true          1.0             SoE ``--tempC_trueonly 1.`` (the BCE target's temperature)
bce_weight         1.0             SoE ``--adaptivetrainlambda 1.``
phases             adversarial     P, Sec. 3.2: "In our implementation, the natural data
                                   training of the collaboration is not necessary"
random_start       on              Madry PGD (P: "the PGD method"); SoE's default run: off
pgd_bn             eval            ours (the attack sees the model as inference does); SoE: train
clean_weight       0               P, Alg. 1 (no clean term); SoE adds soft-min+BCE on clean: 1
ppd_grad           head            P, Alg. 1 l. 7 ("update module g"); SoE: BCE trains the trunk
ppd_loss           paper           P, Alg. 1 (BCE of g vs p_y); SoE: BCE of maxprob*sigmoid(s)
=================  ==============  =====================================================

Beyond the paper: ``arch`` (default ``resnet``; ``wrn16-4``, or ``package.module:function``, a
user's constructor: :mod:`cda2_ext.models.architectures`), ``dataset="imagefolder"`` (an image
folder of any K and image size, whose K - ``num_classes`` - and, unless given, per-channel
``mean``/``std`` the trainer takes from the training split and stores with the run).

``phases``: ``adversarial`` (Alg. 1 lines 12-19), ``natural`` (lines 2-10), ``both`` (per batch:
a natural-phase update, then an adversarial-phase update), or ``standard`` (no attack: surrogate +
BCE on clean images; with ``num_models=1`` this is plain cross-entropy training - Table 6).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ..ops import _checks
from .. import limits
from ..storage.records import from_record, to_record
from ..errors import CheckpointError, ConfigError
from ..data import IMAGE_DATASETS
from ..models.architectures import ARCHITECTURES, check_arch_name
from ..models.collaboration import SCORES, CollaborationConfig
from ..models.resnet import PPD_INPUTS, valid_depth
from .methods import METHODS
from .weighting import SIGMA, TEMP_C, WEIGHTINGS, weighting_params

__all__ = ["TrainConfig", "PHASES", "SCHEDULES", "DATASETS", "NONFINITE", "AMP", "OPTIMIZERS",
           "METHOD_OPTIONS", "method_options", "RESUMABLE_CHANGES"]

#: Options that may differ between the run that wrote a checkpoint and the run resuming it: they
#: change where/how fast/how long the run goes, not the training trajectory (on_nonfinite only
#: matters once a loss is non-finite, and a run stopped by one may resume skipping such batches).
RESUMABLE_CHANGES = frozenset({"epochs", "device", "unfused", "progress", "eval_every",
                               "eval_batch_size", "data_dir", "out_dir", "on_nonfinite"})

PHASES = ("adversarial", "natural", "both", "standard")
SCHEDULES = ("multistep", "cosine", "constant")
DATASETS = IMAGE_DATASETS
#: What a non-finite loss does: stop the run (keeping the last finite checkpoint) or skip that update.
NONFINITE = ("stop", "skip")
OPTIMIZERS = ("sgd", "adam")
#: Mixed precision of the forward passes (losses and the fused ops stay in fp32).
AMP = ("none", "bf16", "fp16")
# ----- CDA²'s choices the paper leaves open: what the BCE trains and fits, BN in training PGD -----
PPD_GRADS = ("head", "trunk")
PPD_LOSSES = ("paper", "soe")
PGD_BN_MODES = ("eval", "train")
# ----- the baseline methods' options -----
_ENSEMBLES = ("ensemble", "adp", "gal", "dverge")
#: Method-specific options -> the methods that read them; any other method refuses a non-default value.
#: (CDA²'s weightings and their parameters are CDA²'s too: :func:`method_options` adds them.)
METHOD_OPTIONS: Dict[str, Tuple[str, ...]] = {
    "phases": ("cda2",), "weights": ("cda2",), "temp_true": ("cda2",), "bce_weight": ("cda2",), "select_score": ("cda2",),
    "clean_weight": ("cda2",), "ppd_grad": ("cda2",), "ppd_loss": ("cda2",),
    "adv": _ENSEMBLES, "adp_alpha": ("adp",), "adp_beta": ("adp",), "gal_coeff": ("gal",),
    "gal_noise": ("gal",), "init_from": ("dverge",), "distill_eps": ("dverge",),
    "distill_alpha": ("dverge",), "distill_steps": ("dverge",), "distill_layer": ("dverge",),
    "dverge_coeff": ("dverge",),
}


def method_options() -> Dict[str, Tuple[str, ...]]:
    """:data:`METHOD_OPTIONS` plus every registered weighting's parameters (read by CDA² only),
    read at validation time so that a weighting added later is known too."""
    return {**METHOD_OPTIONS, **{p.name: ("cda2",) for p in weighting_params()}}


@dataclass
class TrainConfig:
    """All options of a training run (serialised to JSON beside every checkpoint)."""

    # what is trained (cda2_ext.training.methods)
    method: str = "cda2"
    # model
    num_models: int = 3
    depth: int = 20
    ppd_input: str = "features"
    arch: str = "resnet"             # a built-in architecture, or your own package.module:function
    # objective (Algorithm 1)
    phases: str = "adversarial"
    # how samples are shared (training/weighting.py: WEIGHTINGS) and the weightings' parameters,
    # one field each (a checkpoint's JSON key), their defaults the records' own
    weights: str = "softmin"         # Eq. 7 | the authors' "detector"
    sigma: float = SIGMA.default     # softmin's temperature
    temp_c: float = TEMP_C.default   # detector's temperature
    temp_true: float = 1.0           # temperature of p_y, the PPD head's BCE target
    bce_weight: float = 1.0
    select_score: str = "ppd"        # how the adversarial phase picks the attacked sub-model
    # PGD used for training
    eps: float = 0.03
    alpha: float = 0.01
    steps: int = 10
    random_start: bool = True
    # ----- choices the paper leaves open (docs/training.md) --------------------
    # Defaults follow the paper's Algorithm 1; the authors' Synergy-of-Experts code does otherwise.
    clean_weight: float = 0.0        # + W x (surrogate + BCE) on the clean batch (authors' code: 1)
    ppd_grad: str = "head"           # the BCE trains the PPD head only | also the "trunk" (authors)
    ppd_loss: str = "paper"          # BCE of sigmoid(s) | of maxprob*sigmoid(s) ("soe", authors)
    pgd_bn: str = "eval"             # BatchNorm mode during the training PGD: eval | train (authors)
    # ----- end of the issue-13 block ------------------------------------------------------------
    # optimisation
    epochs: int = 100
    batch_size: int = 128
    optimizer: str = "sgd"             # sgd | adam (momentum is SGD's)
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
    # the normalisation inside the model; None: CIFAR-10's (cifar10, synthetic), or computed once
    # from the training split (imagefolder) and stored here
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    # run
    out_dir: str = "runs/cda2"
    seed: int = 0
    device: str = "auto"
    unfused: bool = False
    progress: bool = True
    eval_every: int = 1                # clean test accuracy every N epochs (0: never)
    eval_batch_size: int = 500
    num_classes: int = 10
    on_nonfinite: str = "stop"         # a non-finite loss: "stop" the run, or "skip" that update
    # speed and scale
    amp: str = "none"                  # mixed precision of the forward passes: none | bf16 | fp16
    sync_bn: bool = False              # BatchNorm over the global batch in a multi-process run
    # ----- baseline methods (ensemble, adp, gal, dverge) -----------------------------------------
    # Read only by the methods named in METHOD_OPTIONS; each method's docstring cites its values.
    adv: bool = False                  # ensemble/adp/gal: + PGD of the averaged ensemble; dverge: +AdvT
    adp_alpha: float = 2.0             # ADP: weight of the ensemble entropy
    adp_beta: float = 0.5              # ADP: weight of the log-det of non-true predictions
    gal_coeff: float = 0.5             # GAL: weight of the gradient-coherence term
    gal_noise: float = 0.045           # GAL: std of the Gaussian noise added to half the images
    init_from: Optional[str] = None    # DVERGE: run folder of the trained ensemble to start from
    distill_eps: float = 0.07          # DVERGE: feature-distillation radius
    distill_alpha: float = 0.007       # DVERGE: feature-distillation step
    distill_steps: int = 10            # DVERGE: feature-distillation steps
    distill_layer: Optional[int] = None  # DVERGE: fixed layer (1..depth); None: random per epoch
    dverge_coeff: float = 1.0          # DVERGE+AdvT: weight of the distillation loss

    def validate(self) -> "TrainConfig":
        """Raise :class:`ConfigError` (one line, naming the option) for the first unusable option.

        Numbers must be finite and of the right kind (a stored config may hold anything). Radii
        and steps are in the units of images in [0, 1], so ``eps``/``alpha`` above 1 mean nothing
        and are refused; the attack phases need ``steps >= 1`` (``phases="standard"`` trains
        without an attack); a batch needs 2 images, as BatchNorm cannot train on one.
        """
        def bad(name: str, msg: str) -> None:
            raise ConfigError(f"{name}: {msg}, got {getattr(self, name)!r}")

        def number(name: str, ok: Callable[[Any], bool], msg: str, integer: bool = False,
                   optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            kinds = (int,) if integer else (int, float)
            if isinstance(v, bool) or not isinstance(v, kinds) or not (math.isfinite(v) and ok(v)):
                bad(name, msg)

        def choice(name: str, options: Tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                bad(name, f"must be one of {options}")

        number("num_models", lambda v: v >= 1, "the number of sub-models M must be an integer >= 1",
               integer=True)
        number("depth", valid_depth, "must be 2 or 6n+2 (8, 14, 20, 32, ...)", integer=True)
        check_arch_name(self.arch)  # its form only: a config never imports a user's constructor
        if self.arch in ARCHITECTURES and ARCHITECTURES[self.arch].input_dims != 3:
            bad("arch", "takes vectors (the XOR experiment), not images")
        if self.arch != "resnet" and self.depth != TrainConfig.depth:
            bad("depth", f"is read by arch 'resnet' only, and this run's arch is {self.arch!r}")
        if self.method == "dverge" and self.arch != "resnet":
            bad("arch", "method dverge distils the layers of the ResNet: it needs arch 'resnet'")
        choice("ppd_input", PPD_INPUTS)
        choice("phases", PHASES)
        self._validate_weighting(bad)
        number("temp_true", lambda v: v > 0, "the BCE target's temperature must be finite and > 0")
        number("bce_weight", lambda v: v >= 0, "must be finite and >= 0")
        choice("select_score", SCORES)
        limits.radius("eps", self.eps)
        number("alpha", lambda v: 0 <= v <= 1, "the PGD step must lie in [0, 1] (images are in [0, 1])")
        number("clean_weight", lambda v: v >= 0 and (v == 0 or self.phases != "standard"),
               "must be finite and >= 0 (and 0 with phases 'standard', which trains on the clean "
               "batch already)")
        choice("ppd_grad", PPD_GRADS)
        choice("ppd_loss", PPD_LOSSES)
        choice("pgd_bn", PGD_BN_MODES)
        number("steps", lambda v: v >= (0 if self.phases == "standard" else 1),
               "the attack phases need an integer >= 1 PGD steps (phases 'standard' trains "
               "without an attack)", integer=True)
        number("epochs", lambda v: v >= 1, "must be an integer >= 1", integer=True)
        number("batch_size", lambda v: v >= 2, "must be an integer >= 2 (BatchNorm cannot train on "
               "one image)", integer=True)
        number("lr", lambda v: v > 0, "must be finite and > 0")
        number("momentum", lambda v: 0 <= v < 1, "must lie in [0, 1)")
        number("weight_decay", lambda v: v >= 0, "must be finite and >= 0")
        choice("schedule", SCHEDULES)
        number("gamma", lambda v: v > 0, "must be finite and > 0")
        choice("dataset", DATASETS)
        number("train_limit", lambda v: v >= 2, "must be an integer >= 2 (BatchNorm cannot train "
               "on one image)", integer=True, optional=True)
        number("test_limit", lambda v: v >= 1, "must be an integer >= 1", integer=True, optional=True)
        try:
            _checks.seed(self.seed)
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None
        if not (isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device)):
            bad("device", "must be 'auto', 'cpu' or 'cuda[:N]'")
        number("eval_every", lambda v: v >= 0, "must be an integer >= 0", integer=True)
        number("eval_batch_size", lambda v: v >= 1, "must be an integer >= 1", integer=True)
        choice("on_nonfinite", NONFINITE)
        choice("method", tuple(METHODS))
        choice("amp", AMP)
        choice("optimizer", OPTIMIZERS)
        if not isinstance(self.sync_bn, bool):
            bad("sync_bn", "must be true or false")
        # ----- the baseline methods' options -----
        if not isinstance(self.adv, bool):
            bad("adv", "must be true or false")
        for name in ("adp_alpha", "adp_beta", "gal_coeff", "gal_noise", "dverge_coeff"):
            number(name, lambda v: v >= 0, "must be finite and >= 0")
        limits.radius("distill_eps", self.distill_eps)
        number("distill_alpha", lambda v: 0 <= v <= 1, "the step must lie in [0, 1]")
        number("distill_steps", lambda v: v >= 1, "must be an integer >= 1", integer=True)
        number("distill_layer", lambda v: 1 <= v <= self.depth, f"must be an integer in "
               f"[1, depth={self.depth}] (or unset: a random layer each epoch)", integer=True,
               optional=True)
        if self.init_from is not None and not (isinstance(self.init_from, str) and self.init_from):
            bad("init_from", "must be a run folder or checkpoint path")
        self._validate_bounds(bad)
        need = getattr(METHODS[self.method], "min_models", 1)  # diversity terms need pairs
        if self.num_models < need:
            bad("num_models", f"method {self.method} needs at least {need} sub-models")
        defaults = TrainConfig()
        for name, readers in method_options().items():
            if self.method not in readers and getattr(self, name) != getattr(defaults, name):
                bad(name, f"only method(s) {', '.join(readers)} read it, and this run's method is "
                    f"{self.method}")
        return self

    def _validate_weighting(self, bad: Callable[[str, str], None]) -> None:
        """``weights`` names a registered weighting; every weighting parameter lies within its
        record's bound; one the chosen weighting does not read keeps its default (all from
        :data:`~cda2_ext.training.weighting.WEIGHTINGS`, so a new weighting needs no edit here)."""
        if self.weights not in WEIGHTINGS:
            bad("weights", f"must be one of {WEIGHTINGS!r}")
        chosen = WEIGHTINGS[self.weights]
        for p in weighting_params():
            if not hasattr(self, p.name):  # a record's mistake, named before anything reads it
                raise ConfigError(f"weights: {p.name!r}, a parameter of weights "
                                  f"{[w for w in WEIGHTINGS if WEIGHTINGS[w].reads(p.name)]}, is "
                                  "no TrainConfig field (add it: name: float = PARAM.default)")
            p.check(getattr(self, p.name))
            if not chosen.reads(p.name) and getattr(self, p.name) != p.default:
                bad(p.name, f"is not read with weights {self.weights!r}")

    def _validate_bounds(self, bad: Callable[[str, str], None]) -> None:
        """The checks a config read back from a checkpoint needs beyond the options' own: sane
        maxima of every count (:mod:`cda2_ext.limits`; a typo or a damaged file, not a plan),
        the schedule's milestones, and the kind of every flag and path (JSON may hold anything)."""
        for name, hi in (("num_models", limits.MODELS), ("depth", limits.DEPTH),
                         ("steps", limits.ITERATIONS), ("epochs", limits.ITERATIONS),
                         ("batch_size", limits.ITEMS), ("train_limit", limits.ITEMS),
                         ("test_limit", limits.ITEMS), ("eval_every", limits.ITERATIONS),
                         ("eval_batch_size", limits.ITEMS), ("distill_steps", limits.ITERATIONS)):
            if getattr(self, name) is not None and getattr(self, name) > hi:
                bad(name, f"must be at most {hi} (cda2_ext.limits: larger is a typo, not a run)")
        v = self.num_classes
        if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= limits.CLASSES:
            bad("num_classes", f"must be an integer in [2, {limits.CLASSES}]")
        m = self.milestones
        if not (isinstance(m, tuple) and len(m) <= 100 and all(
                isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f <= 1 for f in m)):
            bad("milestones", "must be a list of at most 100 fractions of the epochs in [0, 1]")
        for name in ("random_start", "augment", "unfused", "progress"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be true or false")
        if not (isinstance(self.out_dir, str) and self.out_dir):
            bad("out_dir", "must be a folder path")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            bad("data_dir", "must be a folder path (or unset)")
        if (self.mean is None) != (self.std is None):
            bad("mean" if self.mean is None else "std", "mean and std are given together or not at all")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, tuple) and len(v) == 3 and all(
                    isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)
                    and (name == "mean" or c > 0) for c in v)):
                bad(name, "must be 3 finite numbers, one per RGB channel of images in [0, 1]"
                    + (", each > 0" if name == "std" else ""))

    @classmethod
    def for_method(cls, method: str = "cda2", **given: Any) -> "TrainConfig":
        """The config of a ``method`` run: ``given`` options, then the method's own defaults
        (its class's ``defaults``, e.g. Adam 1e-3 for ADP/GAL, 200 epochs for the baselines; each
        cited in the method's docstring), then this class's (CDA²'s). Not validated."""
        if method not in METHODS:
            raise ConfigError(f"method: must be one of {tuple(METHODS)}, got {method!r}")
        own = dict(getattr(METHODS[method], "defaults", {}))
        return cls(**{**own, **given, "method": method})

    def model_config(self, image_size: Optional[Tuple[int, int]] = None) -> CollaborationConfig:
        """The :class:`CollaborationConfig` of the model this run trains, on images of
        ``image_size`` (``(H, W)``, the data's). The size is recorded (and then checked on every
        input) for an image folder and for any architecture but the ResNet, which pools any size:
        a CIFAR-10 ResNet run's model config stays the one earlier versions wrote and read."""
        if self.dataset != "imagefolder" and self.arch == "resnet":
            image_size = None
        norm = {} if self.mean is None else {"mean": self.mean, "std": self.std}
        return CollaborationConfig(num_models=self.num_models, arch=self.arch, depth=self.depth,
                                   num_classes=self.num_classes, ppd_input=self.ppd_input,
                                   detach_ppd=self.ppd_grad == "head", image_size=image_size,
                                   **norm)

    def lr_at(self, epoch: int) -> float:
        """Learning rate of (0-based) ``epoch``; a pure function, so resuming needs no state."""
        if self.schedule == "cosine":
            return 0.5 * self.lr * (1.0 + math.cos(math.pi * epoch / self.epochs))
        if self.schedule == "multistep":
            passed = sum(epoch >= round(f * self.epochs) for f in self.milestones)
            return self.lr * self.gamma ** passed
        return self.lr

    def to_dict(self) -> Dict[str, Any]:
        """The options as JSON; the options added for other data and models (``arch``, ``mean``,
        ``std``) only where set, so a CIFAR-10 ResNet run's checkpoint is the one earlier
        versions wrote (and read)."""
        return to_record(self, later=("arch", "mean", "std"))

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        return from_record(cls, d, "train config", ConfigError)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], source: object) -> "TrainConfig":
        """The training config stored in a checkpoint's metadata, validated like the command
        line's options, or a one-line :class:`CheckpointError` naming ``source`` (the file) when
        it is missing, damaged or unusable."""
        d = meta.get("config")
        if not isinstance(d, dict):
            raise CheckpointError(f"{source} has no training config in its metadata")
        try:  # the same rules as the command line's options, before anything uses it
            return cls.from_dict(d).validate()
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{source} has a damaged training config: {err}") from None

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def resume_conflicts(self, other: "TrainConfig | Mapping[str, Any]") -> List[str]:
        """The options (sorted) in which ``other`` - a config, or just some options - differs from
        this one beyond :data:`RESUMABLE_CHANGES`: a run of ``self`` cannot continue as ``other``."""
        mine = dataclasses.asdict(self)  # every field: to_dict leaves defaults of some out
        theirs = dataclasses.asdict(other) if isinstance(other, TrainConfig) else dict(other)
        return sorted(k for k, v in theirs.items() if k not in RESUMABLE_CHANGES and mine.get(k) != v)

