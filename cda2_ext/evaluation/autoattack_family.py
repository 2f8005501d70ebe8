"""The AutoAttack family of ``cda2 eval`` (``--attack autoattack``): AutoAttack "standard" from
its reference implementation (:mod:`cda2_ext.attacks.autoattack`, an optional extra), as one row
that joins the worst case. Where the package is missing, :func:`prepare_autoattack` says so in
one line and the family is skipped.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..attacks.autoattack import autoattack, autoattack_missing
from ..attacks.whitebox import EnsembleLogits
from .context import EvalContext, Outcome, is_collaboration
from .rows import AUTOATTACK, autoattack_row

__all__ = ["prepare_autoattack", "run_autoattack", "autoattack_units"]


#: AutoAttack's targeted attacks aim at the 9 highest other classes: K must be at least this.
_MIN_CLASSES = 10


def prepare_autoattack(ctx: EvalContext) -> Optional[str]:
    """Why AutoAttack cannot run here (its optional package is missing, or a model has fewer
    than 10 classes), or ``None``."""
    missing = autoattack_missing()
    if missing or not ctx.targets or ctx.n == 0:
        return missing or None
    with torch.no_grad():
        k = min(int(target(ctx.x[:1]).shape[-1]) for target in ctx.targets.values())
    if k < _MIN_CLASSES:
        return (f"AutoAttack not run: its targeted attacks use {_MIN_CLASSES - 1} target classes, "
                f"and the models here have {k} classes.")
    return None


def run_autoattack(ctx: EvalContext, eps: float) -> List[Outcome]:
    """AutoAttack "standard" against each model's hard output and, for a collaboration, against
    its ensemble output; every point judged by the hard output, robust only if both runs fail.
    Details: each run's accuracy, AutoAttack's own warnings and its time."""
    out = []
    for name, target in ctx.targets.items():
        net = ctx.models[name]
        attacked = {"hard": target}
        if is_collaboration(net):
            attacked["ensemble"] = EnsembleLogits(net)
        oks, details = [], {}
        for which, model in attacked.items():
            r = autoattack(model, ctx.x, ctx.y, eps, judge=target, batch_size=ctx.cfg.batch_size,
                           seed=ctx.generator(AUTOATTACK, which, eps).initial_seed() % 2 ** 31)
            ok = r.correct.cpu() & ctx.clean_ok[name]
            oks.append(ok)
            details[which] = {"accuracy": round(ok.float().mean().item(), 4), "flags": r.flags,
                              "seconds": round(r.seconds, 2)}
            ctx.progress.step(f"{name} autoattack ({which}) eps={eps:g}")
        out.append(Outcome(name, autoattack_row(), torch.stack(oks).all(0), details))
    return out


def autoattack_units(ctx: EvalContext) -> int:
    """Progress steps per radius: one run per model, two (hard, ensemble) per collaboration."""
    return sum(2 if is_collaboration(m) else 1 for m in ctx.models.values())
