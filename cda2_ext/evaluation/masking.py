"""The gradient-masking checks printed after ``cda2 eval``'s table, one function per check.

Each check reads one model's :class:`Evidence` and returns its sentences (``OK``/``WARNING``/
``NOTE`` ``[model]: ...``), in the spirit of AutoAttack's warnings. Adding a check: write
``check_x(ev) -> List[str]`` and append it to :data:`CHECKS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor

from .config import EvalConfig
from .family import attack_groups
from .rows import ADAPTIVE_WORST, WORST, Role, Row, pgd_row

__all__ = ["Evidence", "Check", "CHECKS", "check_sanity", "check_budget", "check_monotone",
           "check_black_box", "check_adaptive_gain", "check_square_budget", "check_autoattack",
           "check_temperatures", "masking_checks"]


@dataclass(frozen=True)
class Evidence:
    """What the checks know about one model.

    Attributes:
        model: its name. rows: ``{row: {eps: Tensor[n] bool}}`` per-sample robust flags (with the
            worst case). details: the report's details (``sanity``, ``square``, ...).
        config: the evaluation's configuration. n: number of evaluated samples.
    """

    model: str
    rows: Mapping[Row, Mapping[float, Tensor]]
    details: Mapping[str, Any]
    config: EvalConfig
    n: int


Check = Callable[[Evidence], List[str]]


def _acc(ok: Tensor) -> float:
    return ok.float().mean().item()


def check_sanity(ev: Evidence) -> List[str]:
    """PGD at a huge radius (the ``sanity`` probe) must bring accuracy near 0."""
    sanity = ev.details.get("sanity", {}).get("accuracy", {})
    if ev.model not in sanity:
        return []
    a, cfg = sanity[ev.model], ev.config
    if a <= cfg.sanity_max_acc:
        return [f"OK [{ev.model}]: PGD at eps={cfg.sanity_eps:g} leaves {100 * a:.1f}% accuracy "
                "(near 0, as it must at a radius this large)."]
    return [f"WARNING [{ev.model}]: PGD at eps={cfg.sanity_eps:g} still leaves {100 * a:.1f}% "
            f"accuracy (> {100 * cfg.sanity_max_acc:.0f}%); at this radius any image can be "
            "changed beyond recognition, so the attack is not working: gradient masking or "
            "too small a budget. Do not trust the robust accuracies below."]


def check_monotone(ev: Evidence) -> List[str]:
    """No row's accuracy may grow with eps (beyond one sample)."""
    out: List[str] = []
    tol = 1.0 / max(ev.n, 1)
    for row, d in ev.rows.items():
        eps_sorted = sorted(d)
        for e0, e1 in zip(eps_sorted, eps_sorted[1:]):
            a0, a1 = _acc(d[e0]), _acc(d[e1])
            if a1 > a0 + tol:
                out.append(f"WARNING [{ev.model}]: {row.label} accuracy rises from {100 * a0:.1f}% at "
                           f"eps={e0:g} to {100 * a1:.1f}% at eps={e1:g}; a stronger attack at the "
                           "larger radius would do at least as well, so the attack is not converging.")
    return out


def _black_box_rows(rows: Mapping[Row, object]) -> List[Row]:
    """The black-box rows, family by family in registry order."""
    black = [r for r in rows if r.role is Role.BLACK_BOX]
    return sorted(black, key=lambda r: attack_groups().index(r.family))


def check_black_box(ev: Evidence) -> List[str]:
    """White-box attacks (together) must not be weaker than a transfer or query attack."""
    out: List[str] = []
    white = [d for r, d in ev.rows.items() if r.role is Role.WHITE_BOX]
    for row in _black_box_rows(ev.rows):
        label = row.short
        for e, bb_ok in ev.rows[row].items():
            wb = [w[e] for w in white if e in w]
            if not wb:
                continue
            wb_ok = torch.stack(wb).all(0)
            only_bb = int((wb_ok & ~bb_ok).sum())
            wa, ba = _acc(wb_ok), _acc(bb_ok)
            if wa > ba:
                out.append(f"WARNING [{ev.model}]: at eps={e:g} the white-box attacks leave "
                           f"{100 * wa:.1f}% but the {label} attack only {100 * ba:.1f}% "
                           f"({only_bb} samples broken by {label} and not by any white-box "
                           "attack): white-box gradients are "
                           "misleading (gradient masking); the worst case over all attacks is the "
                           "number to report.")
            else:
                out.append(f"OK [{ev.model}]: at eps={e:g} white-box ({100 * wa:.1f}%) is not weaker "
                           f"than {label} ({100 * ba:.1f}%); {only_bb} samples were broken only by "
                           f"{label}.")
    return out


def check_adaptive_gain(ev: Evidence) -> List[str]:
    """Samples the adaptive attacks break and plain PGD does not: evidence that PGD through the
    selected sub-model alone overstates robustness."""
    pgd = ev.rows.get(pgd_row(ev.config.pgd))
    adaptive = ev.rows.get(ADAPTIVE_WORST)
    if pgd is None or adaptive is None:
        return []
    out: List[str] = []
    for e in sorted(pgd):
        if e not in adaptive:
            continue
        p_ok, a_ok = pgd[e], adaptive[e]
        extra = int((p_ok & ~a_ok).sum())
        if extra > 0:
            out.append(f"NOTE [{ev.model}]: at eps={e:g} the adaptive attacks break {extra} samples "
                       f"that plain PGD does not (PGD {100 * _acc(p_ok):.1f}% -> "
                       f"worst {100 * _acc(p_ok & a_ok):.1f}%): PGD through the "
                       "selected sub-model alone overstates robustness.")
    return out


def check_square_budget(ev: Evidence) -> List[str]:
    """Samples that survived Square only because its query budget ran out."""
    return [f"NOTE [{ev.model}]: Square at eps={e}: {d['out_of_budget']} of {ev.n} samples survived "
            f"only until the budget of {d['budget']} queries ran out."
            for e, d in ev.details.get("square", {}).get(ev.model, {}).items() if d["out_of_budget"]]


def check_budget(ev: Evidence) -> List[str]:
    """The budget check (Carlini et al. 2019, "On Evaluating Adversarial Robustness"): the
    strongest gradient attack, re-run with twice the steps and restarts on the samples every
    attack left standing, must break none of them; where it breaks any, the evaluation has not
    converged (they count in the worst case, but a larger budget may break more)."""
    out: List[str] = []
    for e, d in ev.details.get("budget", {}).get(ev.model, {}).items():
        if not d["standing"]:
            out.append(f"OK [{ev.model}]: budget check at eps={e}: no sample left standing, nothing to re-run.")
            continue
        what = (f"{d['attack']} re-run with twice the steps and restarts ({d['steps']} steps x "
                f"{d['restarts']} restarts) on the {d['standing']} samples still standing")
        if d["fell"]:
            out.append(f"WARNING [{ev.model}]: not converged at eps={e}: {what} broke {d['fell']} more; "
                       "they count in the worst case, but a larger budget may break more still.")
        else:
            out.append(f"OK [{ev.model}]: budget check at eps={e}: {what} broke none of them.")
    return out


def _at(rows: Mapping[float, Tensor], e: str) -> Tensor:
    """The flags of radius ``e`` as the details spell it (``f"{eps:g}"``)."""
    return next(ok for eps, ok in rows.items() if f"{eps:g}" == e)


def check_autoattack(ev: Evidence) -> List[str]:
    """AutoAttack's accuracy on each attacked output, beside the worst case over all attacks,
    and AutoAttack's own warnings."""
    out: List[str] = []
    worst = ev.rows.get(WORST)
    for e, runs in ev.details.get("autoattack", {}).get(ev.model, {}).items():
        leaves = " and ".join(f"{100 * r['accuracy']:.1f}% attacking the {w} output" for w, r in runs.items())
        line = f"NOTE [{ev.model}]: AutoAttack (standard) at eps={e} leaves {leaves}"
        if worst is not None:
            line += f" (worst case over all attacks: {100 * _acc(_at(worst, e)):.1f}%)"
        flags = list(dict.fromkeys(f for r in runs.values() for f in r["flags"]))
        out.append(line + (f"; AutoAttack warned: {' | '.join(flags)}" if flags else "."))
    return out


def check_temperatures(ev: Evidence) -> List[str]:
    """The temperatures the adaptive attacks used, and the selection scale they follow."""
    t = ev.details.get("temperatures", {}).get(ev.model)
    if not t:
        return []
    soft = ", ".join(f"{T:.3g} ({rule if 'gap' in rule else 'fixed'})"
                     for rule, T in ((label[len("soft(T="):-1], T) for label, T in t["soft"].items()))
    return [f"NOTE [{ev.model}]: selection scale g = {t['selection_gap']:.3g} (median gap between the "
            f"two highest selection scores over the {ev.n} samples); temperatures used: soft selection "
            f"{soft or 'none'}; BPDA {t['bpda']:.3g}."]


#: The checks, in the order their sentences are printed for each model.
CHECKS: Tuple[Check, ...] = (check_sanity, check_budget, check_monotone, check_black_box,
                             check_adaptive_gain, check_square_budget, check_autoattack,
                             check_temperatures)


def masking_checks(evidence: Sequence[Evidence], checks: Sequence[Check] = CHECKS) -> List[str]:
    """Every check's sentences, model by model."""
    return [line for ev in evidence for check in checks for line in check(ev)]
