"""The attack families of ``cda2 eval`` and the probes behind its checks, each a small runner.

Adding a family: write ``run_x(ctx, eps) -> List[Outcome]`` (attack every model of ``ctx`` at
``eps``; its rows are :class:`~cda2_ext.evaluation.rows.Row` s) and add one
:class:`~cda2_ext.evaluation.family.AttackFamily` to :data:`FAMILIES`, declaring the
:class:`~cda2_ext.evaluation.family.FamilyParam` s it reads; ``--attack``, its options, ``--help``,
``EvalConfig`` validation, the docs table and the worst case pick it up from there. Its randomness
comes from ``ctx.generator(name, eps, batch)``, so results do not depend on which other families
ran.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..attacks.adaptive import AdaptiveConfig, adaptive_attacks
from ..attacks.apgd import apgd_attack
from ..attacks.decision import Temperatures
from ..attacks.engine import AttackResult, merge_worst
from ..attacks.square import square_attack
from ..attacks.transfer import (TransferSet, all_variants_correct, generate_transfer_set,
                                transfer_correct)
from ..attacks.whitebox import PGDConfig, pgd_attack
from .autoattack_family import autoattack_units, prepare_autoattack, run_autoattack
from .context import EvalContext, Outcome, Probe, is_collaboration
from .family import FAMILIES, AttackFamily, FamilyParam
from .rows import (ADAPTIVE, ADAPTIVE_WORST, AUTOATTACK, BUDGET, BUDGET_CHECK, PGD, SQUARE, TRANSFER,
                   Role, Row, adaptive_row, pgd_row, square_row, transfer_row, worst_case)

__all__ = ["FAMILIES", "PROBES", "run_pgd", "run_adaptive", "run_transfer", "run_square",
           "run_sanity", "run_budget_check"]


# ----- white-box PGD -------------------------------------------------------------------------------
def run_pgd(ctx: EvalContext, eps: float) -> List[Outcome]:
    """PGD on each model's hard output (``cfg.pgd``: the paper's 50 steps x 5 restarts, CE)."""
    cfg, row = ctx.cfg, pgd_row(ctx.cfg.pgd)
    out = []
    for name, target in ctx.targets.items():
        oks = ctx.over_batches(f"{name} pgd eps={eps:g}", lambda b, s, target=target: pgd_attack(
            target, ctx.x[s], ctx.y[s], eps, cfg.pgd, generator=ctx.generator(PGD, eps, b),
            backend=ctx.backend).correct.cpu())
        out.append(Outcome(name, row, torch.cat(oks)))
    return out


# ----- adaptive attacks on the selection ------------------------------------------------------------
def _adaptive_results(ctx: EvalContext, name: str, x: Tensor, y: Tensor, eps: float,
                      cfg: AdaptiveConfig, tag: Tuple[object, ...],
                      temperatures: Optional[Temperatures] = None) -> Dict[str, AttackResult]:
    """``cfg``'s attacks on images ``x``: every adaptive attack on a collaboration (at the
    temperatures chosen for it on the whole subset), APGD only on a plain model function;
    ``"worst"`` is their per-sample worst case. ``tag`` (e.g. the batch index) keys the seeds."""
    net = ctx.models[name]
    if is_collaboration(net):
        seed = ctx.generator(ADAPTIVE, *tag).initial_seed()
        return adaptive_attacks(net, x, y, eps, cfg, seed=int(seed), backend=ctx.backend,
                                temperatures=temperatures or ctx.temperatures_for(name))
    res = {}
    for loss in ("ce", "dlr"):
        if f"apgd-{loss}" in cfg.attacks:
            res[f"apgd-{loss}"] = apgd_attack(
                ctx.targets[name], x, y, eps, cfg.apgd_steps, loss, cfg.apgd_restarts,
                generator=ctx.generator(f"apgd-{loss}", eps, *tag), backend=ctx.backend)
    if res:
        res["worst"] = merge_worst(list(res.values()))
    return res


def _adaptive_batch(ctx: EvalContext, name: str, eps: float, b: int, s: slice) -> Dict[str, Tensor]:
    """``{attack: correct}`` of one batch (see :func:`_adaptive_results`)."""
    res = _adaptive_results(ctx, name, ctx.x[s], ctx.y[s], eps, ctx.cfg.adaptive, (b,))
    return {k: r.correct.cpu() for k, r in res.items()}


def run_adaptive(ctx: EvalContext, eps: float) -> List[Outcome]:
    """The adaptive attacks (one row each) and their worst case (:data:`ADAPTIVE_WORST`)."""
    out = []
    for name in ctx.targets:
        parts: Dict[str, List[Tensor]] = {}
        for res in ctx.over_batches(f"{name} adaptive eps={eps:g}",
                                    lambda b, s, name=name: _adaptive_batch(ctx, name, eps, b, s)):
            for k, ok in res.items():
                parts.setdefault(k, []).append(ok)
        out += [Outcome(name, ADAPTIVE_WORST if k == "worst" else adaptive_row(k), torch.cat(v))
                for k, v in parts.items()]
    return out


# ----- transfer attacks from hold-out surrogates ----------------------------------------------------
def prepare_transfer(ctx: EvalContext) -> Optional[str]:
    """Given transfer sets must be of this run's samples; without surrogates or sets, skip."""
    for e, ts in ctx.transfer_sets.items():
        if ts.indices is not None and ts.indices.tolist() != ctx.indices.tolist():
            raise ValueError(f"transfer set for eps={e:g} was made on other test samples "
                             "(use the same --seed and --n-samples as when it was generated)")
    if not (ctx.surrogates or ctx.transfer_sets):
        return ("transfer attack not run: no surrogate and no transfer set given, so the white-box "
                "vs transfer check was skipped.")
    return None


def _make_transfer_set(ctx: EvalContext, eps: float) -> TransferSet:
    """Attack the surrogates batch by batch; save the set where asked."""
    cfg = ctx.cfg
    for s_model in ctx.surrogates.values():
        if isinstance(s_model, nn.Module):
            s_model.to(ctx.device).eval()
    pieces = ctx.over_batches(f"transfer eps={eps:g}", lambda b, s: generate_transfer_set(
        ctx.surrogates, ctx.x[s], ctx.y[s], eps, cfg.transfer,
        seed=int(ctx.generator(TRANSFER, b).initial_seed()), indices=ctx.indices[s],
        backend=ctx.backend, extra_config={"eval_seed": cfg.seed}), steps=len(ctx.surrogates))
    tset = TransferSet.concat(pieces)
    tset.config["n_samples"] = cfg.n_samples
    if ctx.save_transfer_dir is not None:
        p = tset.save(Path(ctx.save_transfer_dir) / f"transfer_eps{eps:g}.safetensors")
        ctx.log(f"saved transfer set ({len(tset.names)} variants x {ctx.n} images): {p}")
    return tset


def run_transfer(ctx: EvalContext, eps: float) -> List[Outcome]:
    """The given set for ``eps`` (else one generated from the surrogates); a sample is robust
    only if every variant is classified correctly. Details: per-variant accuracy."""
    tset = ctx.transfer_sets.get(eps)
    if tset is None and not ctx.surrogates:
        ctx.log(f"transfer: no set for eps={eps:g} among the given files; skipped at this eps")
        return []
    if tset is None:
        tset = _make_transfer_set(ctx, eps)
    row = transfer_row(len(tset.names))
    out = []
    for name, target in ctx.targets.items():
        corr = transfer_correct(target, tset, ctx.cfg.batch_size)
        per_variant = {v: round(corr[i].float().mean().item(), 4) for i, v in enumerate(tset.names)}
        out.append(Outcome(name, row, all_variants_correct(corr), per_variant))
    return out


def _transfer_units(ctx: EvalContext) -> int:
    return len(ctx.batches) * len(ctx.surrogates)


# ----- Square (query-only) ---------------------------------------------------------------------------
def run_square(ctx: EvalContext, eps: float) -> List[Outcome]:
    """Square with its ``queries`` per sample. Details: the queries used and how many samples
    survived only because the budget ran out."""
    queries, p_init = ctx.cfg.option(SQUARE, "queries"), ctx.cfg.option(SQUARE, "p_init")
    row = square_row(queries)
    out = []
    for name, target in ctx.targets.items():
        def one(b: int, s: slice, target=target) -> Tuple[Tensor, Tensor, Tensor]:
            r = square_attack(target, ctx.x[s], ctx.y[s], eps, queries, p_init=p_init,
                              generator=ctx.generator(SQUARE, eps, b), backend=ctx.backend)
            return r.correct.cpu(), r.queries.cpu(), r.out_of_budget.cpu()
        ok, q, oob = (torch.cat(t) for t in zip(*ctx.over_batches(f"{name} square eps={eps:g}", one)))
        out.append(Outcome(name, row, ok, {
            "budget": queries, "mean_queries": round(q.float().mean().item(), 1),
            "max_queries": int(q.max()), "out_of_budget": int(oob.sum())}))
    return out


def _square_radii(ctx: EvalContext) -> Sequence[float]:
    return ctx.cfg.option(SQUARE, "eps")


# ----- probes ---------------------------------------------------------------------------------------
def run_sanity(ctx: EvalContext) -> None:
    """PGD (one start, ``cfg.pgd.steps`` steps) at the huge radius ``cfg.sanity_eps``, where
    accuracy must reach about 0: ``details["sanity"]``."""
    cfg = ctx.cfg
    eps = float(cfg.sanity_eps or 0.0)
    scfg = PGDConfig(steps=cfg.pgd.steps, restarts=1, alpha_factor=cfg.pgd.alpha_factor, loss=cfg.pgd.loss)
    acc: Dict[str, float] = {}
    for name, target in ctx.targets.items():
        oks = ctx.over_batches(f"{name} sanity eps={eps:g}", lambda b, s, target=target: pgd_attack(
            target, ctx.x[s], ctx.y[s], eps, scfg, generator=ctx.generator("sanity", b),
            backend=ctx.backend).correct.cpu())
        acc[name] = (torch.cat(oks) & ctx.clean_ok[name]).float().mean().item()
    ctx.details["sanity"] = {"eps": cfg.sanity_eps, "steps": cfg.pgd.steps, "accuracy": acc}


def _strongest(rows: Dict[Row, Dict[float, Tensor]], eps: float) -> Optional[Row]:
    """The gradient attack with a budget to double (PGD or one adaptive attack) that left the
    fewest samples robust at ``eps``; the first in row order on ties."""
    candidates = [r for r, d in rows.items() if eps in d
                  and (r.family == PGD or (r.family == ADAPTIVE and r.role is Role.PART))]
    return min(candidates, key=lambda r: int(rows[r][eps].sum()), default=None)


#: One attack run on a batch: ``(images, labels, batch index) -> AttackResult``.
BatchAttack = Callable[[Tensor, Tensor, int], AttackResult]


def _doubled(ctx: EvalContext, name: str, row: Row, eps: float) -> Tuple[Dict[str, int], BatchAttack]:
    """``row``'s attack with twice the steps and restarts: ``(budget, attack)``, its random
    starts drawn apart from the first run's."""
    if row.family == PGD:
        p = ctx.cfg.pgd
        pc = dataclasses.replace(p, steps=2 * p.steps, restarts=2 * p.restarts)
        return {"steps": pc.steps, "restarts": pc.restarts}, lambda x, y, b: pgd_attack(
            ctx.targets[name], x, y, eps, pc, generator=ctx.generator(BUDGET, PGD, eps, b),
            backend=ctx.backend)
    a, attack, temps = ctx.cfg.adaptive, row.short, None
    if is_collaboration(ctx.models[name]):
        t = ctx.temperatures_for(name)
        soft = tuple(st for st in t.soft if st[0] == attack)
        if soft:  # one soft-selection run: the "soft" attack at that temperature only
            attack, temps = "soft", dataclasses.replace(t, soft=soft)
    ac = dataclasses.replace(a, attacks=(attack,), steps=2 * a.steps, restarts=2 * a.restarts,
                             apgd_steps=2 * a.apgd_steps, apgd_restarts=2 * a.apgd_restarts)
    steps, restarts = ac.budget(attack)
    return {"steps": steps, "restarts": restarts}, lambda x, y, b: _adaptive_results(
        ctx, name, x, y, eps, ac, (BUDGET, eps, b), temps)[row.short]


def _rerun(ctx: EvalContext, attack: BatchAttack, idx: Tensor) -> Tensor:
    """``attack`` on samples ``idx``, batch by batch: their robust flags (CPU)."""
    oks = []
    for b, start in enumerate(range(0, int(idx.numel()), ctx.cfg.batch_size)):
        sel = idx[start:start + ctx.cfg.batch_size].to(ctx.x.device)
        oks.append(attack(ctx.x[sel], ctx.y[sel], b).correct.cpu())
    return torch.cat(oks)


def run_budget_check(ctx: EvalContext) -> None:
    """The budget check (Carlini et al. 2019): per model and radius, the strongest gradient attack
    re-run with twice the steps and restarts on the samples every row left standing. Its row
    (:data:`~cda2_ext.evaluation.rows.BUDGET_CHECK`) joins the worst case; ``details["budget"]``
    says which attack, its budget, how many stood and how many more fell."""
    for name in ctx.targets:
        rows = ctx.flags.get(name, {})
        standing_at = worst_case(rows)
        for eps in ctx.cfg.eps:
            row = _strongest(rows, eps)
            if row is None:
                continue
            t0 = time.perf_counter()
            standing = standing_at[eps]
            idx = standing.nonzero().squeeze(1)
            budget, attack = _doubled(ctx, name, row, eps)
            survived = standing.clone()
            if idx.numel():
                survived[idx] = _rerun(ctx, attack, idx)
            ctx.progress.step(f"{name} budget check eps={eps:g}")
            ctx.record(BUDGET, eps, [Outcome(name, BUDGET_CHECK, survived, {
                "attack": row.label, **budget, "standing": int(idx.numel()),
                "fell": int((standing & ~survived).sum()), "seconds": round(time.perf_counter() - t0, 2)})])


# The built-in attack families, in the order they run at each radius (and their rows first appear).
# The options of the three with a typed configuration (PGDConfig, AdaptiveConfig, TransferConfig,
# also the attacks' Python API) are EvalConfig fields; the others declare theirs here.
FAMILIES.add(AttackFamily(PGD, run_pgd, "PGD on each model's hard output (--steps, --restarts, "
                          "--last-iterate)"))
FAMILIES.add(AttackFamily(ADAPTIVE, run_adaptive, "the adaptive attacks on the selection and their "
                          "worst case (--adaptive-attacks and the options after it)"))
FAMILIES.add(AttackFamily(TRANSFER, run_transfer, "transfer from hold-out surrogates (--surrogate or "
                          "--transfer-set, --transfer-preset)", units=_transfer_units,
                          prepare=prepare_transfer, details=True))
FAMILIES.add(AttackFamily(SQUARE, run_square, "the Square attack, query-only", params=(
    FamilyParam("queries", 5000, "Square attack query budget per sample", flag="--queries"),
    FamilyParam("eps", (0.03,), "radii at which Square runs (Table 3: 0.03)", flag="--square-eps"),
    FamilyParam("p_init", 0.8, "Square's initial fraction of pixels changed per query", low=1e-6,
                high=1.0)), radii=_square_radii, details=True))
FAMILIES.add(AttackFamily(AUTOATTACK, run_autoattack, "AutoAttack standard (an optional extra: pip "
                          "install 'cda2_ext[autoattack]')", in_all=False, units=autoattack_units,
                          prepare=prepare_autoattack, details=True))

#: Measurements after the sweep: the masking probe, then the budget check (whose row joins the
#: worst case, so it runs on what every family left standing).
PROBES: Tuple[Probe, ...] = (
    Probe("sanity", run_sanity, active=lambda ctx: bool(ctx.cfg.sanity_eps)),
    Probe(BUDGET, run_budget_check, active=lambda ctx: bool({PGD, ADAPTIVE} & set(ctx.cfg.attacks)),
          units=lambda ctx: len(ctx.targets) * len(ctx.cfg.eps)),
)
