"""Adaptive attacks on the collaboration's selection, each registered by name.

Algorithm 2 answers with the sub-model whose PPD head is highest. That argmax has no gradient, so
plain PGD (gradient through the selected sub-model only) can report robustness that is only the
selection moving away from the attack path - gradient masking. These attacks target the
selection itself; a sample counts as robust only if it survives *all* of them
(:func:`adaptive_attacks` returns each one and their per-sample worst case):

``soft``      the selection relaxed to ``sum_m softmax(s/T)_m p_m`` and attacked end to end
              (one run per temperature; the temperatures follow the model's own selection-score
              gaps, see :func:`~cda2_ext.attacks.decision.choose_temperatures`).
``submodels`` every sub-model attacked separately (copy ``j`` of each sample follows sub-model
              ``j``'s cross-entropy); the collaboration must survive all M perturbations.
``ppd-push``  copy ``j`` maximises sub-model ``j``'s loss **plus** its PPD lead over the best other
              sub-model (capped), i.e. it tries to make a wrong sub-model win the selection - for
              every ``j``.
``bpda``      the hard answer forward, the soft selection's gradient backward (straight-through).
``apgd-ce`` / ``apgd-dlr``  APGD (:mod:`~cda2_ext.attacks.apgd`) with the cross-entropy / DLR loss
              against the collaboration's hard output.
``decision`` / ``apgd-decision``  the decision margin ``max_j min(lead_j / g, w_j)``, positive exactly
              when the hard answer is wrong (:mod:`~cda2_ext.attacks.decision`), with sign steps /
              APGD.
``decision-targeted`` / ``apgd-decision-targeted``  its multi-targeted form: one copy per
              (sub-model, wrong class) pair, ``min(lead_j / g, z_jc - z_jy)``, all pairs as
              ``[G, B, ...]`` copies of one batch (``G = M * decision_targets``).

All of them judge candidates by the real (hard) collaboration and keep the worst iterate per
sample; the relaxed outputs only steer the search. The ``submodels``/``ppd-push`` copies run as
one ``[M, B, C, H, W]`` batch through the fused sign step.

Each attack is one :class:`AdaptiveAttack` in :data:`ADAPTIVE_REGISTRY`: from what one call
shares (:class:`AdaptiveSetting`: the batch, the configuration, the temperatures, the hard
output) it makes its :class:`AdaptiveRun` s - an objective and its number of copies, run as
sign-step or APGD restarts - so a new adaptive attack is one function and one registry entry.

The temperatures and the decision margin's unit come from one number, the model's selection scale
``g`` (the median gap between its two highest selection scores on the evaluated samples,
:func:`~cda2_ext.attacks.decision.selection_gap`), so the attacks do not depend on how the PPD
logits happen to be scaled; :func:`adaptive_attacks` measures it on its batch unless given the
:class:`~cda2_ext.attacks.decision.Temperatures` measured on the whole evaluation subset.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from functools import cached_property, partial
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.classifier import CollaborationLogits
from ..runtime import OpsBackend, backend_of, eval_mode
from .apgd import apgd
from .decision import (Temperatures, choose_temperatures, decision_objective, selection_gap,
                       wrong_class_targets)
from .engine import (AttackResult, Objective, check_attack_args, derive_generator,
                     flatten_copies, merge_worst, per_sample_loss, run_restarts, sign_attack)
from .whitebox import predict_correct

__all__ = ["ADAPTIVE_ATTACKS", "DECISION_ATTACKS", "ADAPTIVE_REGISTRY", "AdaptiveAttack",
           "AdaptiveRun", "AdaptiveSetting", "AdaptiveConfig", "collaboration_objective",
           "adaptive_attacks", "adaptive_attack"]


# ----- the objectives on a collaboration ----------------------------------------------------------
def _diag_copies(t: Tensor, G: int) -> Tensor:
    """``t [M, G*B, ...]`` with ``G == M`` -> ``[G, B, ...]``: copy ``j`` seen by sub-model ``j``."""
    M = t.shape[0]
    t = t.reshape(M, G, -1, *t.shape[2:])
    idx = torch.arange(G, device=t.device)
    return t[idx, idx]


def collaboration_objective(model: CollaborationLogits, target: Tensor, mode: str = "output",
                            loss: str = "ce", push_weight: float = 1.0,
                            push_cap: float = 10.0) -> Objective:
    """Objectives on a collaboration for candidates ``[G, B, ...]``, judged by the hard answer.

    ``mode="output"``: ``loss`` of ``model``'s attack output (hard, soft or BPDA selection).
    ``mode="submodel"``: needs ``G == M``; copy ``j`` maximises sub-model ``j``'s loss.
    ``mode="push"``: as ``submodel`` plus ``push_weight * min(s_j - max_{i != j} s_i, push_cap)``
    on the selection scores ``s`` (``model`` should not be ``"hard"``, so the PPD heads pass
    gradients).
    """
    fn = per_sample_loss(loss)
    if mode not in ("output", "submodel", "push"):
        raise ValueError(f"mode: expected 'output', 'submodel' or 'push', got {mode!r}")

    def objective(x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        G, B = x.shape[:2]
        attack, hard, logits, s = model.outputs(flatten_copies(x))
        y = target.expand(G, B)
        if mode == "output":
            value = fn(attack.view(G, B, -1), y)
        else:
            if logits.shape[0] != G:
                raise ValueError(f"mode={mode!r} needs one copy per sub-model: G={G}, M={logits.shape[0]}")
            value = fn(_diag_copies(logits, G), y)
            if mode == "push":
                s_own = _diag_copies(s, G)  # [G, B]
                own = torch.eye(G, dtype=torch.bool, device=s.device).unsqueeze(-1)  # [M, G, 1]
                others = s.reshape(G, G, B).float().masked_fill(own, float("-inf")).amax(0)
                value = value + push_weight * (s_own.float() - others).clamp(max=push_cap)
        return value, hard.detach().view(G, B, -1)

    return objective


# ----- what one call's attacks share, and what each attack makes of it ----------------------------
@dataclass(frozen=True)
class AdaptiveRun:
    """One search of an adaptive attack: restarts of one objective, reported as one result.

    Attributes:
        label: its key in :func:`adaptive_attacks`' result (``"bpda"``, ``"soft(T=gap)"``, ...).
        objective: the objective for the samples still attacked, given their index ``[b]``.
        copies: ``G``, the copies of the batch it searches at once (one per sub-model, ...).
        seed_key: what its random starts are drawn by (``derive_generator(seed, key, eps)``);
            ``None``: the label.
    """

    label: str
    objective: Callable[[Tensor], Objective]
    copies: int = 1
    seed_key: Optional[str] = None


@dataclass(frozen=True)
class AdaptiveSetting:
    """What the adaptive attacks of one :func:`adaptive_attacks` call share.

    Attributes:
        net: the collaboration, ``x -> (logits [M, B, K], ppd_logit [M, B])``.
        x_nat, target: the batch ``[B, C, H, W]`` and its labels ``[B]``. eps: the radius.
        cfg: the validated configuration. temps: the temperatures and the selection scale.
        hard: Algorithm 2's answer as a model function, which judges every candidate.
        seed: keys every run's random starts. backend: the operators. lo, hi: the box.
        initially_correct: ``[B]`` the samples worth attacking (``None``: all).
    """

    net: nn.Module
    x_nat: Tensor
    target: Tensor
    eps: float
    cfg: AdaptiveConfig
    temps: Temperatures
    hard: CollaborationLogits
    seed: int
    backend: OpsBackend
    lo: float = 0.0
    hi: float = 1.0
    initially_correct: Optional[Tensor] = None

    def selection(self, kind: str, temperature: float) -> CollaborationLogits:
        """The collaboration as a model function with the ``kind`` selection at ``temperature``."""
        return CollaborationLogits(self.net, kind, temperature, self.cfg.score, self.backend)

    def on_output(self, model: CollaborationLogits, mode: str = "output",
                  loss: Optional[str] = None) -> Callable[[Tensor], Objective]:
        """:func:`collaboration_objective` of ``model`` (``loss`` default: ``cfg.loss``) for the
        samples still attacked."""
        cfg = self.cfg
        loss = cfg.loss if loss is None else loss
        return lambda idx: collaboration_objective(model, self.target[idx], mode, loss,
                                                   cfg.push_weight, cfg.push_cap)

    @cached_property
    def n_models(self) -> int:
        """``M``, from the output of one image (so any collaboration-like net will do)."""
        with torch.no_grad():
            return int(self.net(self.x_nat[:1])[0].shape[0])

    @cached_property
    def decision_targets(self) -> Tuple[Tensor, Tensor]:
        """``(models [G], classes [G, B])``: the (sub-model, wrong class) pairs of the
        multi-targeted decision attacks, the ``cfg.decision_targets`` highest-scoring wrong
        classes of each sub-model at the clean point (all where that is every wrong class)."""
        with torch.no_grad():
            clean = self.net(self.x_nat)[0]
        top, K = self.cfg.decision_targets, int(clean.shape[-1])
        return wrong_class_targets(clean, self.target, top if top is not None and top < K - 1 else None)

    def search(self, attack: str, run: AdaptiveRun) -> AttackResult:
        """``run``'s restarts with ``attack``'s search (sign steps or APGD) and budget
        (:meth:`AdaptiveConfig.budget`); the folded per-sample worst case."""
        cfg, eps, x_nat, target = self.cfg, self.eps, self.x_nat, self.target
        use_apgd = ADAPTIVE_REGISTRY[attack].apgd
        steps, restarts = cfg.budget(attack)

        def once(idx: Tensor, x0: Tensor) -> AttackResult:
            obj = run.objective(idx)
            if use_apgd:
                return apgd(obj, x_nat[idx], target[idx], eps, steps, x_init=x0, lo=self.lo,
                            hi=self.hi, backend=self.backend)
            return sign_attack(obj, x_nat[idx], target[idx], eps, cfg.alpha_factor * eps, steps,
                               x_init=x0, lo=self.lo, hi=self.hi, backend=self.backend)

        key = run.label if run.seed_key is None else run.seed_key
        return run_restarts(once, x_nat, target, eps, restarts, copies=run.copies,
                            initially_correct=self.initially_correct, lo=self.lo, hi=self.hi,
                            generator=derive_generator(self.seed, key, eps), backend=self.backend)


#: ``(setting, attack name) -> runs``: what a registered attack makes of one call's setting.
RunPlan = Callable[[AdaptiveSetting, str], List[AdaptiveRun]]


@dataclass(frozen=True)
class AdaptiveAttack:
    """A registered adaptive attack.

    Attributes:
        runs: its searches for one call (:data:`RunPlan`); ``soft`` makes one per temperature.
        apgd: they search with APGD (``apgd_steps``, ``apgd_restarts``) rather than sign steps
            (``steps``, ``restarts``, step ``alpha_factor * eps``).
    """

    runs: RunPlan
    apgd: bool = False


def _soft_seed_key(label: str, temperature: float) -> str:
    """The random-start key of a ``soft`` run: its label for a scale-relative temperature (so a
    model with rescaled PPD logits gets the same starts), ``soft{T}`` for a fixed one (the key
    fixed temperatures always had, so their runs reproduce earlier results)."""
    return label if "gap" in label else f"soft{temperature}"


def _soft(s: AdaptiveSetting, name: str) -> List[AdaptiveRun]:
    """The soft selection attacked end to end, one run per temperature."""
    return [AdaptiveRun(label, s.on_output(s.selection("soft", T)), seed_key=_soft_seed_key(label, T))
            for label, T in s.temps.soft]


def _submodels(s: AdaptiveSetting, name: str) -> List[AdaptiveRun]:
    """Copy ``j`` follows sub-model ``j``'s loss."""
    return [AdaptiveRun(name, s.on_output(s.hard, "submodel"), s.n_models)]


def _ppd_push(s: AdaptiveSetting, name: str) -> List[AdaptiveRun]:
    """Copy ``j`` follows sub-model ``j``'s loss plus its capped PPD lead (BPDA's gradient)."""
    return [AdaptiveRun(name, s.on_output(s.selection("bpda", s.temps.bpda), "push"), s.n_models)]


def _bpda(s: AdaptiveSetting, name: str) -> List[AdaptiveRun]:
    """The hard answer forward, the soft selection's gradient backward."""
    return [AdaptiveRun(name, s.on_output(s.selection("bpda", s.temps.bpda)))]


def _output_loss(s: AdaptiveSetting, name: str, *, loss: str) -> List[AdaptiveRun]:
    """``loss`` of the output ``cfg.apgd_selection`` names (the hard answer by default)."""
    kind = s.cfg.apgd_selection
    judge = s.hard if kind == "hard" else s.selection(kind, s.temps.bpda)
    return [AdaptiveRun(name, s.on_output(judge, loss=loss))]


def _decision(s: AdaptiveSetting, name: str, *, targeted: bool) -> List[AdaptiveRun]:
    """The decision margin; ``targeted``: one copy per (sub-model, wrong class) pair."""
    if not targeted:
        return [AdaptiveRun(name, lambda idx: decision_objective(s.hard, s.target[idx], s.temps.gap))]
    models, classes = s.decision_targets
    return [AdaptiveRun(name, lambda idx: decision_objective(
        s.hard, s.target[idx], s.temps.gap, (models, classes[:, idx])), len(models))]


#: The adaptive attacks by name, in the order they run (and their rows appear).
ADAPTIVE_REGISTRY: Mapping[str, AdaptiveAttack] = MappingProxyType({
    "soft": AdaptiveAttack(_soft),
    "submodels": AdaptiveAttack(_submodels),
    "ppd-push": AdaptiveAttack(_ppd_push),
    "bpda": AdaptiveAttack(_bpda),
    "apgd-ce": AdaptiveAttack(partial(_output_loss, loss="ce"), apgd=True),
    "apgd-dlr": AdaptiveAttack(partial(_output_loss, loss="dlr"), apgd=True),
    "decision": AdaptiveAttack(partial(_decision, targeted=False)),
    "decision-targeted": AdaptiveAttack(partial(_decision, targeted=True)),
    "apgd-decision": AdaptiveAttack(partial(_decision, targeted=False), apgd=True),
    "apgd-decision-targeted": AdaptiveAttack(partial(_decision, targeted=True), apgd=True),
})
ADAPTIVE_ATTACKS: Tuple[str, ...] = tuple(ADAPTIVE_REGISTRY)
#: The attacks on Algorithm 2's decision margin (:mod:`~cda2_ext.attacks.decision`).
DECISION_ATTACKS = ("decision", "decision-targeted", "apgd-decision", "apgd-decision-targeted")


# ----- configuration ------------------------------------------------------------------------------
@dataclass
class AdaptiveConfig:
    """Budgets and knobs of the adaptive attacks (defaults: the white-box protocol's budget).

    Attributes:
        attacks: which of :data:`ADAPTIVE_ATTACKS` to run.
        steps, restarts, alpha_factor, loss: the sign-gradient attacks (``soft``, ``submodels``,
            ``ppd-push``, ``bpda``, ``decision``, ``decision-targeted``): steps, random starts,
            step ``alpha_factor * eps``, loss (the decision attacks have their own loss).
        temperature_fractions: one ``soft`` run per temperature ``fraction * g``, ``g`` the
            model's selection scale (:func:`~cda2_ext.attacks.decision.choose_temperatures`
            argues the defaults).
        temperatures: one more ``soft`` run per fixed temperature the user names.
        bpda_temperature: the temperature of the backward pass of ``bpda`` and ``ppd-push``
            (``None``: ``g``).
        decision_targets: wrong classes per sub-model of the multi-targeted decision attacks,
            the highest-scoring ones at the clean point (``None``: all ``K - 1``).
        push_weight, push_cap: ``ppd-push`` adds ``push_weight * min(s_j - max_{i!=j} s_i, cap)``.
        apgd_steps, apgd_restarts: APGD's iterations (AutoAttack: 100) and random starts
            (``apgd-*`` attacks).
        apgd_selection: the collaboration output APGD differentiates (``"hard"``/``"bpda"``).
        score: Algorithm 2's selection score (``"ppd"`` | ``"soe"``).
    """

    attacks: Tuple[str, ...] = ADAPTIVE_ATTACKS
    steps: int = 50
    restarts: int = 1
    alpha_factor: float = 0.2
    loss: str = "ce"
    temperature_fractions: Tuple[float, ...] = (1.0, 0.25)
    temperatures: Tuple[float, ...] = ()
    bpda_temperature: Optional[float] = None
    decision_targets: Optional[int] = 3
    push_weight: float = 1.0
    push_cap: float = 10.0
    apgd_steps: int = 100
    apgd_restarts: int = 1
    apgd_selection: str = "hard"
    score: str = "ppd"

    def validate(self) -> "AdaptiveConfig":
        """Raise :class:`~cda2_ext.errors.ConfigError` (naming the field) for a setting no attack
        can run; ``self``."""
        bad = [a for a in self.attacks if a not in ADAPTIVE_REGISTRY]
        if bad:
            raise ConfigError(f"adaptive.attacks: unknown {bad}; expected some of {ADAPTIVE_ATTACKS}")
        bpda = () if self.bpda_temperature is None else (self.bpda_temperature,)
        for name, temps in (("temperature_fractions", self.temperature_fractions),
                            ("temperatures", self.temperatures), ("bpda_temperature", bpda)):
            if any(not (math.isfinite(t) and t > 0) for t in temps):
                raise ConfigError(f"adaptive.{name}: every value must be a finite number > 0, "
                                  f"got {getattr(self, name)!r}")
        if "soft" in self.attacks and not (self.temperature_fractions or self.temperatures):
            raise ConfigError("adaptive.temperatures: 'soft' needs at least one temperature or "
                              "temperature fraction")
        if self.decision_targets is not None and self.decision_targets < 1:
            raise ConfigError(f"adaptive.decision_targets: must be >= 1 (or None for all), "
                              f"got {self.decision_targets}")
        for name, low in (("steps", 0), ("restarts", 1), ("apgd_steps", 0), ("apgd_restarts", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"adaptive.{name}: must be >= {low}, got {getattr(self, name)}")
        per_sample_loss(self.loss, "adaptive.loss")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def budget(self, attack: str) -> Tuple[int, int]:
        """``(steps, restarts)`` of the registered attack ``attack``: APGD's budget where it
        searches with APGD, the sign-step attacks' otherwise."""
        if ADAPTIVE_REGISTRY[attack].apgd:
            return self.apgd_steps, self.apgd_restarts
        return self.steps, self.restarts

    def choose_temperatures(self, gap: float) -> Temperatures:
        """This configuration's temperatures for a model of selection scale ``gap``."""
        return choose_temperatures(gap, self.temperature_fractions, self.temperatures,
                                   self.bpda_temperature)


# ----- running them -------------------------------------------------------------------------------
def adaptive_attacks(net: nn.Module, x_nat: Tensor, target: Tensor, eps: float,
                     config: Optional[AdaptiveConfig] = None, *, seed: int = 0,
                     only_correct: bool = True, backend: Optional[OpsBackend] = None, lo: float = 0.0,
                     hi: float = 1.0, temperatures: Optional[Temperatures] = None) -> Dict[str, AttackResult]:
    """Run the adaptive attacks ``config.attacks`` (names of :data:`ADAPTIVE_REGISTRY`) against a
    collaboration ``net`` (``x -> (logits, ppd_logit)``).

    Returns ``{name: folded AttackResult}`` with one entry per run (``soft`` once per
    temperature, as ``soft(T=gap)``, ``soft(T=0.25*gap)``, ``soft(T=1)``, ...) and ``"worst"``,
    the per-sample worst case over all of them. Each run draws its random starts from
    ``derive_generator(seed, name, eps)``, so results do not depend on which other attacks ran.

    Args:
        temperatures: the temperatures and selection scale to use, e.g. chosen once for a whole
            evaluation subset (``config.choose_temperatures(selection_gap(net, x_all))``);
            default: chosen from this batch's selection scores.
    """
    cfg = (config or AdaptiveConfig()).validate()
    check_attack_args(x_nat, target, eps, cfg.steps)
    backend = backend if backend is not None else backend_of(net)
    hard = CollaborationLogits(net, "hard", score=cfg.score, backend=backend)
    out: Dict[str, AttackResult] = {}
    with eval_mode(net):
        start_ok = predict_correct(hard, x_nat, target) if only_correct else None
        temps = temperatures if temperatures is not None else cfg.choose_temperatures(
            selection_gap(net, x_nat, cfg.score))
        setting = AdaptiveSetting(net, x_nat, target, eps, cfg, temps, hard, seed, backend, lo, hi,
                                  start_ok)
        for name in cfg.attacks:
            for run in ADAPTIVE_REGISTRY[name].runs(setting, name):
                out[run.label] = setting.search(name, run)
    if out:
        out["worst"] = merge_worst(list(out.values()))
    return out


def adaptive_attack(net: nn.Module, x_nat: Tensor, target: Tensor, eps: float,
                    config: Optional[AdaptiveConfig] = None, *, attack: str,
                    **options: Any) -> AttackResult:
    """The one adaptive attack ``attack`` (a name of :data:`ADAPTIVE_REGISTRY`) with ``config``'s
    budgets, folded; for ``soft``, the per-sample worst case over its temperatures. ``options``:
    the keyword arguments of :func:`adaptive_attacks` (``seed``, ``temperatures``, ...)."""
    cfg = replace(config or AdaptiveConfig(), attacks=(attack,))
    return adaptive_attacks(net, x_nat, target, eps, cfg, **options)["worst"]
