"""The robustness evaluation protocol behind ``cda2 eval``: every registered attack family at
every radius, the per-sample worst case, the report and the gradient-masking checks.

Protocol (Section 4.3-4.4 of the paper, Yang et al. 2020):

* a seeded random subset of the test set (default 1000 images), the same for every model;
* an eps sweep (default 0.01 ... 0.07, images in [0, 1]) and clean accuracy;
* per eps: white-box PGD (50 steps x 5 restarts, step eps/5, CE), the adaptive attacks on the
  selection (each, and their worst case; temperatures chosen once per model from its selection
  scale on the subset), transfer attacks from hold-out surrogates (robust only if every variant is
  classified correctly), Square (5000 queries, by default at eps = 0.03 only as in Table 3),
  AutoAttack "standard" where asked for and installed; and the per-sample worst case over
  everything that ran at that eps;
* after the sweep, the budget check (Carlini et al. 2019): the strongest gradient attack again
  with twice the steps and restarts on the samples still standing; what falls joins the worst case
  and the checks say "not converged".

Every attack draws its randomness from ``derive_generator(seed, attack, eps, batch)``, so a run is
reproducible from the seed and does not depend on which other attacks were selected. Samples the
model gets wrong on clean inputs count as not robust and are not attacked.

The pieces: :mod:`~cda2_ext.evaluation.families` (the attack families and probes, one runner
each), :mod:`~cda2_ext.evaluation.rows` (what a row is), :mod:`~cda2_ext.evaluation.masking`
(the checks), :mod:`~cda2_ext.evaluation.report` (table, CSV, JSON, PNG).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ..attacks.transfer import TransferSet
from ..attacks.whitebox import as_model_fn, predict_correct
from ..data import to_float
from ..runtime import ops_backend
from .config import DEFAULT_EPS, EvalConfig, select_subset
from .context import EvalContext, Progress
from .family import AttackFamily
from .families import FAMILIES, PROBES
from .masking import Evidence, masking_checks
from .report import EvalReport
from .rows import WORST, worst_case

__all__ = ["DEFAULT_EPS", "EvalConfig", "EvalReport", "select_subset",
           "evaluate_robustness"]

def _schedule(ctx: EvalContext, families: List[AttackFamily]) -> Dict[float, List[AttackFamily]]:
    """``{eps: families that run there}``: the sweep's radii first, then any a family adds (Square)."""
    plan: Dict[float, List[AttackFamily]] = {e: [] for e in ctx.cfg.eps}
    for fam in families:  # in registry order, so each radius runs its families in that order
        for e in dict.fromkeys(fam.radii(ctx)):
            plan.setdefault(e, []).append(fam)
    return plan


def evaluate_robustness(models: Mapping[str, Any], images: Tensor, labels: Tensor,
                        config: Optional[EvalConfig] = None, *,
                        surrogates: Optional[Mapping[str, Callable[[Tensor], Tensor]]] = None,
                        transfer_sets: Optional[Mapping[float, TransferSet]] = None,
                        save_transfer_dir: Optional[Union[str, Path]] = None,
                        device: Optional[Union[str, torch.device]] = None,
                        log: Callable[[str], None] = print) -> EvalReport:
    """Evaluate ``models`` under the configured attacks on a seeded test subset.

    Args:
        models: ``{name: model}``: collaborations (``x -> (logits, ppd_logit)``, attacked through
            Algorithm 2 and with the adaptive attacks) or plain model functions
            (``x -> logits``; "adaptive" then means APGD only).
        images: the whole test split, ``uint8`` or float in [0, 1], ``[N, C, H, W]``; labels ``[N]``.
        surrogates: ``{name: model function}`` for the transfer attacks (hold-out ensembles).
        transfer_sets: precomputed sets ``{eps: TransferSet}`` to evaluate instead of generating
            (their samples must be this run's subset).
        save_transfer_dir: write every generated set there as ``transfer_eps{eps}.safetensors``.
        log: where one-line notes go (skipped attacks, saved files).
    """
    cfg = config or EvalConfig()  # an EvalConfig checks itself when it is built
    t_start = time.perf_counter()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    backend = ops_backend(fused=not cfg.unfused)
    idx = select_subset(int(labels.shape[0]), cfg.n_samples, cfg.seed, cfg.subset)
    x, y = to_float(images[idx]).to(dev), labels[idx].to(dev)
    n = int(y.shape[0])
    ctx = EvalContext(
        cfg=cfg, models=models,
        targets={name: as_model_fn(m, "collaboration", cfg.score, backend) for name, m in models.items()},
        x=x, y=y, indices=idx, batches=[(i, slice(i, min(i + cfg.batch_size, n)))
                                        for i in range(0, n, cfg.batch_size)],
        backend=backend, device=dev, surrogates=dict(surrogates or {}),
        transfer_sets=dict(transfer_sets or {}),
        save_transfer_dir=Path(save_transfer_dir) if save_transfer_dir is not None else None, log=log)
    report = EvalReport(cfg.to_dict(), idx.tolist())
    for m in models.values():
        if isinstance(m, nn.Module):
            m.to(dev).eval()
    families = []
    for fam in (f for f in FAMILIES.values() if f.name in cfg.attacks):
        reason = fam.prepare(ctx)  # may raise on bad inputs, before any attack runs
        if reason is None:
            families.append(fam)
        else:
            report.checks.append(f"NOTE: {reason}")
    probes = [p for p in PROBES if p.active(ctx)]
    ctx.details = {"seconds": {}, **{f.name: {} for f in FAMILIES.values() if f.details}}
    plan = _schedule(ctx, families)
    ctx.progress = Progress(sum(f.units(ctx) for fs in plan.values() for f in fs)
                            + sum(p.units(ctx) for p in probes), cfg.progress)
    ctx.flags = {name: {} for name in models}  # every model gets a report entry, rows or not

    def timed(key: str, t0: float) -> None:
        seconds = ctx.details["seconds"]
        seconds[key] = round(seconds.get(key, 0.0) + time.perf_counter() - t0, 2)

    try:
        for name, target in ctx.targets.items():
            with torch.no_grad():
                ctx.clean_ok[name] = torch.cat([predict_correct(target, x[s], y[s]).cpu()
                                                for _, s in ctx.batches])
            report.clean[name] = ctx.clean_ok[name].float().mean().item()
        for eps, runs in plan.items():
            for fam in runs:
                t0 = time.perf_counter()
                ctx.record(fam.name, eps, fam.run(ctx, eps))
                timed(fam.name, t0)
        for probe in probes:
            t0 = time.perf_counter()
            probe.run(ctx)
            timed(probe.name, t0)
    finally:
        ctx.progress.close()

    for name, rows in ctx.flags.items():
        if len(rows) > 1:
            rows[WORST] = worst_case(rows)
        report.add_model(name, rows)
    report.details = ctx.details
    report.checks += masking_checks([Evidence(name, rows, ctx.details, cfg, n)
                                     for name, rows in ctx.flags.items()])
    report.seconds = time.perf_counter() - t_start
    return report
