"""How CDA² shares each training sample among its M sub-models: the label-path loss, one record
per weighting.

Two weightings are registered in :data:`WEIGHTINGS` (``TrainConfig.weights``, ``--weights``):

* ``"softmin"`` (the paper, Eq. 7): ``L = -sigma * log sum_j exp(-CE_j / sigma)``, whose gradient
  weights sub-model ``j`` by ``softmax_j(-CE_j / sigma)``. At ``sigma = 1`` a sub-model whose CE is
  a few nats above the best one gets almost nothing, so each sample trains mostly its best
  sub-model (the fused ``collaboration_loss``).
* ``"detector"`` (the authors' latest code, Synergy-of-Experts ``models/model_rectified_v2.py``,
  "adaptative training"): ``L = mean_b sum_j w_j CE_j`` with ``w = softmax_j(temp_c * d_j)``
  detached, where ``d_j = max_k softmax(z_j)_k * sigmoid(s_j)`` is sub-model ``j``'s detector
  (the ``"soe"`` selection score). Since ``d`` lies in [0, 1], at ``temp_c = 1`` every weight
  stays within ``[1/(1 + (M-1)e), e/(e + M-1)]`` (0.16-0.58 for M = 3): every sub-model trains on
  every sample, the one that would be selected a little more.

Both give every sample a total weight of 1 over the sub-models. The PPD head's BCE target is the
true-label probability ``p_y = softmax(temp_true * z)_y`` (detached); ``temp_true = 1`` is the
paper's ``p_y`` (the authors' ``--tempC_trueonly``, default 1).

**A new weighting** is one :class:`Weighting` added to :data:`WEIGHTINGS` (``WEIGHTINGS.add``):
its name, its ``--help`` line, its docs source, the :class:`WeightParam` s it reads and its
function. ``TrainConfig`` validation (choices, each parameter's bounds, refusing a parameter the
chosen weighting does not read), ``cda2 train``'s options and ``--help`` and the docs table of
defaults (:func:`docs_rows`, checked against docs/training.md by a test) all read it. A parameter
is an option stored in every checkpoint's config, so a *new* parameter is also a ``TrainConfig``
field, declared as ``name: float = PARAM.default`` (``python_tests/test_weighting.py`` checks that
every parameter is one); a weighting may also read an existing one (``SIGMA``, ``TEMP_C``).

Why no fused op for ``"detector"``: it adds a softmax over M values per sample and a weighted sum
to the fused per-sample cross-entropy it reuses; the training step's profile is dominated by the
convolutions (``benchmarks/step_parts.py``), so fusing it would not move the step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Tuple

import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.collaboration import selection_score
from ..registry import Registry
from ..runtime import FUSED, OpsBackend

__all__ = ["WEIGHTINGS", "Weighting", "WeightParam", "LabelPath", "SIGMA", "TEMP_C",
           "weighting_params", "weights_help", "param_help", "docs_rows", "Weighted", "detector",
           "detector_weights", "weighted_loss", "true_label_prob"]


@dataclass(frozen=True)
class WeightParam:
    """One number a weighting reads: a ``TrainConfig`` field and a ``cda2 train`` option.

    Attributes:
        name: the ``TrainConfig`` field, checkpoint JSON key and keyword of the weighting's
            function (``"temp_c"``); the flag is ``--`` + the name with dashes (``--temp-c``).
        default: its value where not given (the ``TrainConfig`` field's default reads it).
        low, strict: the bound: ``value > low`` (``strict``) or ``value >= low``; always finite.
        what: what it is, for the one-line error (``"the soft-min temperature"``).
        help: its ``--help`` line (the weightings that read it are prefixed).
        source: where the default comes from, for the docs table.
        symbol: how the docs table names it (default: its flag in backquotes).
    """

    name: str
    default: float
    low: float
    strict: bool
    what: str
    help: str
    source: str
    symbol: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def rule(self) -> str:
        """The bound as the error message states it."""
        return f"{self.what} must be finite and {'>' if self.strict else '>='} {self.low:g}"

    def check(self, v: Any) -> float:
        """``v`` if it is a finite number within the bound, else a one-line
        :class:`~cda2_ext.errors.ConfigError` naming the parameter (the one check of it:
        ``TrainConfig`` and ``cda2 xor --sigma`` call this)."""
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not (number and math.isfinite(v) and (v > self.low if self.strict else v >= self.low)):
            raise ConfigError(f"{self.name}: {self.rule}, got {v!r}")
        return v


class LabelPath:
    """What a weighting sees of one training forward: ``logits [M, B, K]``, ``ppd_logit
    [M, B]``, labels ``target [B]`` and the ops ``backend``; :meth:`fused` is the fused
    ``collaboration_loss`` (computed once per ``sigma``), whose ``ce`` every weighting reuses."""

    def __init__(self, logits: Tensor, ppd_logit: Tensor, target: Tensor,
                 backend: OpsBackend) -> None:
        self.logits, self.ppd_logit, self.target, self.backend = logits, ppd_logit, target, backend
        self._fused: Dict[float, Any] = {}

    def fused(self, sigma: float = 1.0) -> Any:
        """``backend.collaboration_loss(logits, target, sigma)``: ``.loss`` (Eq. 7, batch mean),
        ``.ce`` (per-sub-model cross-entropy ``[M, B]``), ``.weights`` (Eq. 7's shares),
        ``.p_true`` (``exp(-ce)``)."""
        if sigma not in self._fused:
            self._fused[sigma] = self.backend.collaboration_loss(self.logits, self.target, sigma)
        return self._fused[sigma]

    def p_true(self, temp_true: float) -> Tensor:
        """The PPD head's BCE target ``softmax(temp_true * z)_y`` ``[M, B]``, detached (at
        ``temp_true = 1`` the fused op's ``p_true``, as every run has used)."""
        if temp_true == 1.0:
            # exp(-ce) does not depend on sigma: any fused result already computed will do
            out = next(iter(self._fused.values())) if self._fused else self.fused()
            return out.p_true.detach()
        return true_label_prob(self.logits, self.target, temp_true)


#: A weighting's function: ``(path, **its parameters) -> (loss, ce, weights)``: the batch mean
#: of the weighted loss (0-d, differentiable), the per-sub-model cross-entropy ``[M, B]``
#: (differentiable) and each sub-model's share of each sample ``[M, B]`` (detached, summing to 1
#: over ``M``).
WeightFn = Callable[..., Tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class Weighting:
    """One way of sharing a sample among the sub-models.

    Attributes:
        name: its ``--weights`` name. help: one line for ``--help`` (what it is, its source).
        source: its cell in the docs table of defaults (where it comes from).
        params: the parameters its function reads (keywords of ``fn``); every other weighting
            parameter must keep its default when this weighting is chosen.
        fn: see :data:`WeightFn`.
    """

    name: str
    help: str
    source: str
    params: Tuple[WeightParam, ...]
    fn: WeightFn

    def reads(self, name: str) -> bool:
        return any(p.name == name for p in self.params)


def _stat(t: Tensor) -> Tensor:
    """float64 stays float64 (the tests' oracle precision); anything else computes in float32."""
    return t if t.dtype == torch.float64 else t.float()


def detector(logits: Tensor, ppd_logit: Tensor) -> Tensor:
    """The authors' detector ``max_k softmax(z)_k * sigmoid(s)``, ``[M, B]`` in [0, 1]: the
    ``"soe"`` selection score the collaboration answers by."""
    return selection_score(logits, ppd_logit, "soe")


def detector_weights(logits: Tensor, ppd_logit: Tensor, temp_c: float) -> Tensor:
    """``softmax_j(temp_c * detector_j)`` over the sub-models, ``[M, B]``, detached."""
    return torch.softmax(temp_c * detector(logits.detach(), ppd_logit.detach()), dim=0)


def true_label_prob(logits: Tensor, target: Tensor, temp_true: float) -> Tensor:
    """``softmax(temp_true * z)_y`` ``[M, B]`` in the logits' statistics dtype, detached."""
    z = _stat(logits.detach())
    logp = torch.log_softmax(temp_true * z, dim=-1)
    return logp.gather(-1, target.expand(z.shape[0], -1).unsqueeze(-1)).squeeze(-1).exp()


def _softmin(path: LabelPath, sigma: float) -> Tuple[Tensor, Tensor, Tensor]:
    out = path.fused(sigma)
    return out.loss, out.ce, out.weights.detach()


def _detector(path: LabelPath, temp_c: float) -> Tuple[Tensor, Tensor, Tensor]:
    out = path.fused()
    w = detector_weights(path.logits, path.ppd_logit, temp_c).to(out.ce.dtype)
    return (w * out.ce).sum(0).mean(), out.ce, w


#: Eq. 7's temperature.
SIGMA = WeightParam(
    "sigma", 1.0, 0.0, True, "the soft-min temperature",
    "soft-min temperature of the surrogate (Eq. 7), > 0",
    "the paper leaves σ open; the authors' older code (\"old loss_base training\" in the same "
    "file) weights by softmax(−CE), an implicit σ = 1. (SoE's `--tempC` is *not* σ: it is "
    "`--temp-c`.)", symbol="σ (`--sigma`)")
#: The temperature of the authors' detector weights.
TEMP_C = WeightParam(
    "temp_c", 1.0, 0.0, False, "the detector temperature",
    "temperature of the weights' softmax", "SoE `--tempC 1.`")

#: Every weighting, by name; the first is the default (the paper's).
WEIGHTINGS: Registry[Weighting] = Registry("weights")
WEIGHTINGS.add(Weighting(
    "softmin", "Eq. 7, the paper", "the paper's Eq. 7", (SIGMA,), _softmin))
WEIGHTINGS.add(Weighting(
    "detector", "the authors' latest code: softmax of --temp-c x max-prob x sigmoid(PPD), "
    "detached, weighting each sub-model's CE",
    "the authors' latest code (SoE `models/model_rectified_v2.py`, \"adaptative training\": "
    "weights softmax_j(tempC · maxprob_j · sigmoid(s_j)), detached)", (TEMP_C,), _detector))


def weighting_params() -> Tuple[WeightParam, ...]:
    """Every parameter of a registered weighting, once each, in registration order (a parameter
    two weightings read must be the same declaration: one default, one bound)."""
    seen: Dict[str, WeightParam] = {}
    for w in WEIGHTINGS.values():
        for p in w.params:
            if seen.setdefault(p.name, p) != p:
                raise ValueError(f"weights: {w.name} declares parameter {p.name!r} unlike "
                                 f"{[v.name for v in WEIGHTINGS.values() if v.reads(p.name)][0]}")
    return tuple(seen.values())


def _readers(name: str) -> List[str]:
    return [w.name for w in WEIGHTINGS.values() if w.reads(name)]


def weights_help() -> str:
    """``--weights``' help: every registered weighting and its line (read when the parser is
    built, so a weighting added before appears)."""
    return "how each sample is shared among the sub-models: " + " | ".join(
        f"{w.name} ({w.help})" for w in WEIGHTINGS.values())


def param_help(p: WeightParam) -> str:
    """A parameter's ``--help`` line, naming the weightings that read it."""
    return f"--weights {'|'.join(_readers(p.name))}: {p.help}"


def docs_rows() -> List[str]:
    """The rows of docs/training.md's table of defaults (option | default | source) that the
    weightings make: ``--weights`` and then each parameter."""
    first = next(iter(WEIGHTINGS.values()))
    names = "\\|".join(WEIGHTINGS)
    sources = "; ".join(f"`{w.name}`: {w.source}" for w in WEIGHTINGS.values())
    rows = [f"| `--weights {names}` | {first.name} | {sources} |"]
    for p in weighting_params():
        only = "" if _readers(p.name) == [first.name] else \
            f" (`--weights {'|'.join(_readers(p.name))}` only)"
        rows.append(f"| {p.symbol or f'`{p.flag}`'} | {p.default!r} | {p.source}{only} |")
    return rows


class Weighted(NamedTuple):
    """The label-path loss of one training forward and what the tallies and the BCE need.

    Attributes:
        loss: the batch mean of the weighted loss (0-d, differentiable w.r.t. the logits).
        ce: per-sub-model cross-entropy ``[M, B]`` (differentiable).
        weights: each sub-model's share of each sample ``[M, B]``; sums to 1 over ``M``.
        p_true: the PPD head's target, the true-label probability at ``temp_true`` ``[M, B]``,
            detached.
    """

    loss: Tensor
    ce: Tensor
    weights: Tensor
    p_true: Tensor


def weighted_loss(logits: Tensor, ppd_logit: Tensor, target: Tensor, weights: str = "softmin", *,
                  temp_true: float = 1.0, backend: OpsBackend = FUSED,
                  **params: float) -> Weighted:
    """The label-path loss of ``logits [M, B, K]`` (PPD logits ``[M, B]``, labels ``[B]``) by
    the weighting named ``weights`` (one of :data:`WEIGHTINGS`), at its ``params`` (by name,
    e.g. ``sigma=0.5``; those not given take their defaults; one the weighting does not read is
    a ``ValueError``). ``backend`` computes the per-sample cross-entropy (fused or reference).
    """
    rule = WEIGHTINGS.get_or_raise(weights)
    unread = [k for k in params if not rule.reads(k)]
    if unread:
        raise ValueError(f"{unread[0]}: is not read with weights {weights!r}")
    path = LabelPath(logits, ppd_logit, target, backend)
    loss, ce, w = rule.fn(path, **{p.name: params.get(p.name, p.default) for p in rule.params})
    return Weighted(loss, ce, w, path.p_true(temp_true))
