"""Adaptive attacks on the collaboration's selection, and APGD (Croce & Hein 2020).

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
``apgd-ce`` / ``apgd-dlr``  APGD with the cross-entropy / DLR loss against the collaboration's hard
              output (AutoAttack's step-size schedule, momentum 0.75, checkpoints).
``decision`` / ``apgd-decision``  the decision margin ``max_j min(lead_j / g, w_j)``, positive exactly
              when the hard answer is wrong (:mod:`~cda2_ext.attacks.decision`), with sign steps /
              APGD.
``decision-targeted`` / ``apgd-decision-targeted``  its multi-targeted form: one copy per
              (sub-model, wrong class) pair, ``min(lead_j / g, z_jc - z_jy)``, all pairs as
              ``[G, B, ...]`` copies of one batch (``G = M * decision_targets``).

All of them judge candidates by the real (hard) collaboration and keep the worst iterate per
sample; the relaxed outputs only steer the search. The ``submodels``/``ppd-push`` copies run as
one ``[M, B, C, H, W]`` batch through the fused sign step.

The temperatures and the decision margin's unit come from one number, the model's selection scale
``g`` (the median gap between its two highest selection scores on the evaluated samples,
:func:`~cda2_ext.attacks.decision.selection_gap`), so the attacks do not depend on how the PPD
logits happen to be scaled; :func:`adaptive_attacks` measures it on its batch unless given the
:class:`~cda2_ext.attacks.decision.Temperatures` measured on the whole evaluation subset.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..runtime import FUSED, OpsBackend, backend_of, eval_mode
from .decision import (Temperatures, choose_temperatures, decision_objective, selection_gap,
                       wrong_class_targets)
from .engine import (AttackResult, Objective, check_attack_args, derive_generator,
                     flatten_copies, merge_worst, model_objective, new_best, per_sample_loss,
                     project_, run_restarts, sign_attack, update_best)
from .whitebox import CollaborationLogits, ModelFn, predict_correct

__all__ = ["ADAPTIVE_ATTACKS", "DECISION_ATTACKS", "AdaptiveConfig", "collaboration_objective",
           "apgd", "apgd_attack", "adaptive_attacks"]

#: The attacks on Algorithm 2's decision margin (:mod:`~cda2_ext.attacks.decision`).
DECISION_ATTACKS = ("decision", "decision-targeted", "apgd-decision", "apgd-decision-targeted")
ADAPTIVE_ATTACKS = ("soft", "submodels", "ppd-push", "bpda", "apgd-ce", "apgd-dlr", *DECISION_ATTACKS)


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
        bad = [a for a in self.attacks if a not in ADAPTIVE_ATTACKS]
        if bad:
            raise ValueError(f"adaptive attacks: unknown {bad}; expected some of {ADAPTIVE_ATTACKS}")
        temps = (*self.temperature_fractions, *self.temperatures,
                 *(() if self.bpda_temperature is None else (self.bpda_temperature,)))
        if any(not (math.isfinite(t) and t > 0) for t in temps):
            raise ValueError(f"adaptive attacks: temperatures and temperature fractions must be finite "
                             f"and > 0, got {temps}")
        if "soft" in self.attacks and not (self.temperature_fractions or self.temperatures):
            raise ValueError("adaptive attacks: 'soft' needs at least one temperature or "
                             "temperature fraction")
        if self.decision_targets is not None and self.decision_targets < 1:
            raise ValueError(f"adaptive attacks: decision_targets must be >= 1 (or None for all), "
                             f"got {self.decision_targets}")
        if self.steps < 0 or self.apgd_steps < 0 or self.restarts < 1 or self.apgd_restarts < 1:
            raise ValueError("adaptive attacks: steps must be >= 0 and restarts >= 1")
        per_sample_loss(self.loss)
        return self

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def choose_temperatures(self, gap: float) -> Temperatures:
        """This configuration's temperatures for a model of selection scale ``gap``."""
        return choose_temperatures(gap, self.temperature_fractions, self.temperatures,
                                   self.bpda_temperature)


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


# ----- APGD ---------------------------------------------------------------------------------------
def _grouped_sign_step_(x: Tensor, grad: Tensor, x_nat: Tensor, eps: float, step: Tensor,
                        lo: float, hi: float, backend: OpsBackend) -> None:
    """Fused sign step with a per-sample step size: one fused call per distinct step size.

    APGD halves step sizes per sample, so there are only a handful of distinct values (2*eps/2^k);
    grouping keeps the fused kernel (scalar alpha) instead of re-implementing the step.
    """
    for value in torch.unique(step).tolist():
        idx = (step == value).nonzero().squeeze(1)
        if idx.numel() == x.shape[0]:
            backend.pgd_sign_step_(x, grad, x_nat, eps, value, lo, hi)
            return
        part = x[idx]
        backend.pgd_sign_step_(part, grad[idx], x_nat[idx], eps, value, lo, hi)
        x[idx] = part


def apgd(objective: Objective, x_nat: Tensor, target: Tensor, eps: float, steps: int, *,
         x_init: Optional[Tensor] = None, rho: float = 0.75, momentum: float = 0.75,
         lo: float = 0.0, hi: float = 1.0, backend: OpsBackend = FUSED) -> AttackResult:
    """Auto-PGD (Croce & Hein 2020), L-inf, one run; the schedule of the AutoAttack code.

    Step size starts at ``2 eps`` per sample and is halved at checkpoints (the first after
    ``0.22 * steps`` iterations, then shorter intervals, never below ``0.06 * steps``) where fewer
    than ``rho`` of the steps since the last checkpoint increased the loss, or where the step was
    not reduced last time and the best loss did not improve; a halved sample restarts from its
    best point. Steps mix the new sign step with the last move (``momentum`` 0.75).

    ``G`` copies of the batch (e.g. one per target of a multi-targeted objective) run as one
    batch of ``G * B`` independent APGD runs: every copy of every sample has its own step size
    and checkpoints, as if run one after another, with one forward/backward per iteration.

    Args:
        objective: as in :mod:`~cda2_ext.attacks.engine`, called on ``[G, B, ...]``; its logits
            are required (APGD keeps the best point).
        x_init: ``[G, B, ...]`` start (default ``x_nat``, ``G = 1``).

    Returns:
        ``AttackResult`` with ``x_adv [G, B, ...]``: the worst case over all iterates per copy.
    """
    x_nat = x_nat.detach()
    x0 = (x_nat.unsqueeze(0) if x_init is None else x_init).detach()
    if x0.shape[1:] != x_nat.shape:
        raise ValueError(f"x_init: expected [G, {', '.join(map(str, x_nat.shape))}], got {list(x0.shape)}")
    G, B = x0.shape[:2]
    copies = x0.shape[:2]
    x = flatten_copies(x0).clone()  # [G*B, ...]: each row one independent run
    x_ref = flatten_copies(x_nat.unsqueeze(0).expand(G, *x_nat.shape))

    def evaluate(xc: Tensor, with_grad: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        with torch.enable_grad() if with_grad else torch.no_grad():
            xg = xc.view(*copies, *xc.shape[1:]).requires_grad_(with_grad)
            loss, logits = objective(xg)
            if logits is None:
                raise ValueError("apgd: the objective must report the evaluated model's logits")
            g = flatten_copies(torch.autograd.grad(loss.sum(), xg)[0]) if with_grad else None
        return loss.detach().reshape(G * B).float(), logits.detach(), g

    best = new_best(x0)
    loss, logits, grad = evaluate(x, steps > 0)
    update_best(best, x.view_as(x0), logits, target)
    if steps == 0:
        return best
    n2, nmin, decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    runs = G * B  # every copy of every sample is a run of its own
    step = torch.full((runs,), 2.0 * eps, device=x.device)
    x_max, loss_max, grad_max = x.clone(), loss.clone(), grad.clone()
    history = torch.empty(steps + 1, runs, device=x.device)
    history[0] = loss
    x_old = x.clone()
    k, counter = n2, 0
    loss_max_last = loss_max.clone()
    reduced_last = torch.zeros(runs, dtype=torch.bool, device=x.device)
    for i in range(steps):
        a = momentum if i > 0 else 1.0
        z = x.clone()
        _grouped_sign_step_(z, grad, x_ref, eps, step, lo, hi, backend)
        x_new = x + a * (z - x) + (1 - a) * (x - x_old)
        project_(x_new, x_ref, eps, lo, hi)
        x_old, x = x, x_new
        loss, logits, g = evaluate(x, i < steps - 1)
        update_best(best, x.view_as(x0), logits, target)
        history[i + 1] = loss
        up = loss > loss_max
        x_max[up], loss_max[up] = x[up], loss[up]
        if g is not None:
            grad = g
            grad_max[up] = g[up]
        counter += 1
        if counter == k and i < steps - 1:
            increases = (history[i + 2 - k:i + 2] > history[i + 1 - k:i + 1]).sum(0)
            oscillating = increases.double() <= k * rho
            stalled = ~reduced_last & (loss_max_last >= loss_max)
            reduce = oscillating | stalled
            reduced_last, loss_max_last = reduce, loss_max.clone()
            if reduce.any():
                step[reduce] /= 2.0
                x[reduce] = x_max[reduce]
                grad[reduce] = grad_max[reduce]
            k, counter = max(k - decr, nmin), 0
    return best


def apgd_attack(model: ModelFn, x_nat: Tensor, target: Tensor, eps: float, steps: int = 100,
                loss: str = "ce", restarts: int = 1, *, only_correct: bool = True,
                lo: float = 0.0, hi: float = 1.0, generator: Optional[torch.Generator] = None,
                backend: OpsBackend = FUSED) -> AttackResult:
    """APGD with ``loss`` (``"ce"`` or ``"dlr"``) against any model function; worst case over
    ``restarts`` fused random starts. Returns a folded result (``x_adv [B, ...]``)."""
    check_attack_args(x_nat, target, eps, steps)
    with eval_mode(model):
        start_ok = predict_correct(model, x_nat, target) if only_correct else None

        def once(idx: Tensor, x0: Tensor) -> AttackResult:
            obj = model_objective(model, target[idx], loss)
            return apgd(obj, x_nat[idx], target[idx], eps, steps, x_init=x0, lo=lo, hi=hi, backend=backend)

        return run_restarts(once, x_nat, target, eps, restarts, initially_correct=start_ok,
                            lo=lo, hi=hi, generator=generator, backend=backend)


# ----- all adaptive attacks -----------------------------------------------------------------------
def _soft_seed_key(label: str, temperature: float) -> str:
    """The random-start key of a ``soft`` run: its label for a scale-relative temperature (so a
    model with rescaled PPD logits gets the same starts), ``soft{T}`` for a fixed one (the key
    fixed temperatures always had, so their runs reproduce earlier results)."""
    return label if "gap" in label else f"soft{temperature}"


def adaptive_attacks(net: nn.Module, x_nat: Tensor, target: Tensor, eps: float,
                     config: Optional[AdaptiveConfig] = None, *, seed: int = 0,
                     only_correct: bool = True, backend: Optional[OpsBackend] = None, lo: float = 0.0,
                     hi: float = 1.0, temperatures: Optional[Temperatures] = None) -> Dict[str, AttackResult]:
    """Run the adaptive attacks against a collaboration ``net`` (``x -> (logits, ppd_logit)``).

    Returns ``{name: folded AttackResult}`` with one entry per attack (``soft`` once per
    temperature, as ``soft(T=gap)``, ``soft(T=0.25*gap)``, ``soft(T=1)``, ...) and ``"worst"``,
    the per-sample worst case over all of them. Each attack draws its random starts from
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
    alpha = cfg.alpha_factor * eps
    out: Dict[str, AttackResult] = {}
    with eval_mode(net):
        start_ok = predict_correct(hard, x_nat, target) if only_correct else None
        temps = temperatures if temperatures is not None else cfg.choose_temperatures(
            selection_gap(net, x_nat, cfg.score))
        targeted = any(a.endswith("decision-targeted") for a in cfg.attacks)
        with torch.no_grad():  # sub-models (any collaboration-like net) and the targets' classes
            clean_logits = net(x_nat if targeted else x_nat[:1])[0]
        M, K = int(clean_logits.shape[0]), int(clean_logits.shape[-1])
        pairs = None
        if targeted:
            top = cfg.decision_targets  # None (all) where it asks for every wrong class or more
            pairs = wrong_class_targets(clean_logits, target, top if top is not None and top < K - 1 else None)

        def run(name: str, make_objective: Callable[[Tensor], Objective], copies: int,
                use_apgd: bool) -> AttackResult:
            """``name``'s restarts, each a sign-step or APGD run of ``make_objective(active)``."""
            def once(idx: Tensor, x0: Tensor) -> AttackResult:
                obj = make_objective(idx)
                if use_apgd:
                    return apgd(obj, x_nat[idx], target[idx], eps, cfg.apgd_steps, x_init=x0,
                                lo=lo, hi=hi, backend=backend)
                return sign_attack(obj, x_nat[idx], target[idx], eps, alpha, cfg.steps, x_init=x0,
                                   lo=lo, hi=hi, backend=backend)
            return run_restarts(once, x_nat, target, eps, cfg.apgd_restarts if use_apgd else cfg.restarts,
                                copies=copies, initially_correct=start_ok, lo=lo, hi=hi,
                                generator=derive_generator(seed, name, eps), backend=backend)

        def on_output(model: CollaborationLogits, mode: str = "output",
                      loss: str = cfg.loss) -> Callable[[Tensor], Objective]:
            return lambda idx: collaboration_objective(model, target[idx], mode, loss, cfg.push_weight,
                                                       cfg.push_cap)

        relaxed = CollaborationLogits(net, "bpda", temps.bpda, cfg.score, backend)
        for name in cfg.attacks:
            if name == "soft":
                for label, T in temps.soft:
                    soft = CollaborationLogits(net, "soft", T, cfg.score, backend)
                    out[label] = run(_soft_seed_key(label, T), on_output(soft), 1, False)
            elif name == "submodels":
                out[name] = run(name, on_output(hard, "submodel"), M, False)
            elif name == "ppd-push":
                out[name] = run(name, on_output(relaxed, "push"), M, False)
            elif name == "bpda":
                out[name] = run(name, on_output(relaxed), 1, False)
            elif name in ("apgd-ce", "apgd-dlr"):
                judge = hard if cfg.apgd_selection == "hard" else CollaborationLogits(
                    net, cfg.apgd_selection, temps.bpda, cfg.score, backend)
                out[name] = run(name, on_output(judge, loss=name.split("-", 1)[1]), 1, True)
            else:  # the decision-margin attacks
                is_targeted = name.endswith("targeted")

                def decision(idx: Tensor, is_targeted: bool = is_targeted) -> Objective:
                    sub = (pairs[0], pairs[1][:, idx]) if is_targeted else None
                    return decision_objective(hard, target[idx], temps.gap, sub)
                out[name] = run(name, decision, len(pairs[0]) if is_targeted else 1,
                                name.startswith("apgd-"))
    if out:
        out["worst"] = merge_worst(list(out.values()))
    return out
