"""Every label-free way to turn M answers into one, scored on one run: ``cda2 eval-clean --rules``.

Where a collaboration loses to one model, the loss is either in its *experts* (no sub-model is
good enough) or in its *selector* (a good sub-model exists but the rule does not pick it). This
report separates the two on the same test images:

* every **rule** (the selection scores of :data:`~cda2_ext.models.selection.SCORES`: the PPD of
  Algorithm 2, the authors' detector, max-probability, margin, minimum entropy; and the
  combiners of :data:`COMBINERS`: the mean-probability ensemble and the vote);
* each **sub-model** alone, and the **best sub-model**, chosen on the fit half and reported on
  the other (choosing on the reported images would flatter it);
* the **oracle** (some sub-model is right: no rule can do better);
* a **fitted selector**: per sub-model, a small logistic model of "this sub-model is right" from
  its confidence features (max-prob, margin, -entropy, PPD logit, detector), fitted on the fit
  half; the most likely right sub-model answers. It is the ceiling of selecting by confidence.

The test images are split once by a fixed seed into a fit half and a reported half (a random
split, not the first half: a folder listed class by class would otherwise fit on other classes
than it reports on). Every number is on the reported half, and every difference carries its
*paired* standard error over the same images, ``std(a_i - b_i) / sqrt(n)``: both answers see
the same hard and easy images, so this is far tighter than ``sqrt(se_a² + se_b²)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import ConfigError
from .clean import collect_outputs  # re-exported: the report starts from it
from ..models.collaboration import ensemble_probs, majority_vote
from ..models.selection import SCORES, selection_score
from ..registry import Registry

__all__ = ["Combiner", "COMBINERS", "FEATURES", "SPLIT_SEED", "rule_names", "answers",
           "split_halves", "paired_difference", "fit_selector", "collect_outputs", "rule_report",
           "rule_table", "entry", "correct_from_bits", "paired_between"]

#: The seed of the fit / reported split (fixed, so every run of an experiment splits alike).
SPLIT_SEED = 0


@dataclass(frozen=True)
class Combiner:
    """A rule that combines all M answers rather than picking one sub-model.

    Attributes:
        name, label, help: as :class:`~cda2_ext.models.selection.SelectionScore`.
        fn: ``logits [M, B, K] -> labels [B]``.
    """

    name: str
    label: str
    help: str
    fn: Callable[[Tensor], Tensor]


#: The combiners, by name (a new one is one entry here).
COMBINERS: Registry[Combiner] = Registry("rule")
COMBINERS.add(Combiner("ensemble", "mean-probability ensemble",
                       "the argmax of the sub-models' mean probability",
                       lambda z: ensemble_probs(z).argmax(-1)))
COMBINERS.add(Combiner("vote", "vote", "Eq. 1's majority vote (ties: the higher mean probability)",
                       majority_vote))


def rule_names() -> Tuple[str, ...]:
    """Every label-free rule: the selection scores, then the combiners."""
    return SCORES.names() + COMBINERS.names()


def _label(name: str) -> str:
    return SCORES[name].label if name in SCORES else COMBINERS[name].label


def answers(logits: Tensor, ppd_logit: Tensor, rule: str) -> Tensor:
    """The ``[B]`` labels rule ``rule`` gives for ``(logits [M, B, K], ppd_logit [M, B])``."""
    if rule in COMBINERS:
        return COMBINERS[rule].fn(logits)
    index = selection_score(logits, ppd_logit, rule).argmax(0)
    return logits.argmax(-1).gather(0, index.unsqueeze(0)).squeeze(0)


#: The confidence features of the fitted selector, per sub-model, each ``[M, B]``.
FEATURES: Tuple[str, ...] = ("maxprob", "margin", "entropy", "ppd", "soe")


def _features(logits: Tensor, ppd_logit: Tensor) -> Tensor:
    """``[M, B, F]`` float64: the scores of :data:`FEATURES` (entropy enters as ``-H``)."""
    z, s = logits.double(), ppd_logit.double()
    return torch.stack([selection_score(z, s, f) for f in FEATURES], dim=-1)


def split_halves(n: int, seed: int = SPLIT_SEED) -> Tuple[Tensor, Tensor]:
    """``(fit, report)`` index tensors: a fixed random half of ``range(n)`` and the rest."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n // 2].sort().values, perm[n // 2:].sort().values


def paired_difference(a: Tensor, b: Tensor) -> Tuple[float, float]:
    """``(mean(a - b), its paired standard error)`` of two 0/1 correctness vectors over the same
    images (the se is 0 where they never differ)."""
    d = a.double() - b.double()
    n = d.numel()
    if n < 2:
        return float(d.mean()) if n else 0.0, math.inf
    return float(d.mean()), float(d.std(unbiased=True)) / math.sqrt(n)


def fit_selector(feats: Tensor, correct: Tensor, ridge: float = 1e-2,
                 iters: int = 50) -> Tuple[Tensor, Tensor, Tensor]:
    """Per sub-model, a ridge logistic regression of ``correct [M, n]`` on standardised
    ``feats [M, n, F]`` (Newton's method, float64, deterministic).

    Returns ``(weights [M, F + 1], mean [M, F], std [M, F])``: the last weight is the bias."""
    M, n, F = feats.shape
    mean = feats.mean(1)
    std = feats.std(1, unbiased=False).clamp_min(1e-12)
    weights = torch.zeros(M, F + 1, dtype=torch.float64)
    for m in range(M):
        X = torch.cat([(feats[m] - mean[m]) / std[m], torch.ones(n, 1, dtype=torch.float64)], 1)
        y = correct[m].double()
        w = torch.zeros(F + 1, dtype=torch.float64)
        reg = ridge * n * torch.eye(F + 1, dtype=torch.float64)
        reg[-1, -1] = 0.0  # the bias is not shrunk
        for _ in range(iters):
            p = torch.sigmoid(X @ w)
            grad = X.T @ (p - y) + reg @ w
            hess = (X.T * (p * (1 - p))) @ X + reg + 1e-9 * torch.eye(F + 1, dtype=torch.float64)
            step = torch.linalg.solve(hess, grad)
            w = w - step
            if float(step.abs().max()) < 1e-10:
                break
        weights[m] = w
    return weights, mean, std


def _fitted_answers(feats: Tensor, weights: Tensor, mean: Tensor, std: Tensor,
                    labels_per_model: Tensor) -> Tensor:
    """The fitted selector's ``[B]`` labels: the sub-model most likely to be right answers."""
    logit = (((feats - mean[:, None]) / std[:, None]) * weights[:, None, :-1]).sum(-1) \
        + weights[:, None, -1]
    return labels_per_model.gather(0, logit.argmax(0).unsqueeze(0)).squeeze(0)


def correct_from_bits(bits: str) -> Tensor:
    """A correctness vector back from the ``"0101..."`` string a report stores per image."""
    return torch.tensor([c == "1" for c in bits], dtype=torch.bool)


def _bits(correct: Tensor) -> str:
    return "".join("1" if c else "0" for c in correct.tolist())


def rule_report(logits: Tensor, ppd_logit: Tensor, labels: Tensor, own: str = "ppd",
                seed: int = SPLIT_SEED) -> Dict[str, Any]:
    """Score one run's outputs by every rule, sub-model, the half-chosen best sub-model, the
    oracle and the fitted selector (the module docstring says what each is).

    Args:
        logits: ``[M, N, K]`` of the N test images; ppd_logit ``[M, N]``; labels ``[N]``.
        own: the run's own rule (one of :func:`rule_names`): every difference is against it.
        seed: of the fit / reported split.

    Returns:
        ``{"n", "n_fit", "n_report", "split_seed", "own", "best_submodel", "entries": [...],
        "per_image": {name: "0101..."}}``; each entry has ``name``, ``kind`` (``rule``,
        ``submodel``, ``best``, ``oracle``, ``fitted``), ``label``, ``accuracy`` and ``se`` on the
        reported half, ``accuracy_all`` on all N, ``diff`` and ``diff_se`` (paired) against
        ``own``. ``per_image`` holds each entry's correctness on all N images, so differences
        between runs on the same images can be paired too.
    """
    if logits.dim() != 3 or ppd_logit.shape != logits.shape[:2] or labels.shape != logits.shape[1:2]:
        raise ConfigError(f"rules: expected logits [M, N, K], ppd [M, N], labels [N]; got "
                          f"{tuple(logits.shape)}, {tuple(ppd_logit.shape)}, {tuple(labels.shape)}")
    if own not in rule_names():
        raise ConfigError(f"score: expected one of {rule_names()}, got {own!r}")
    M, N, _ = logits.shape
    if N < 4:
        raise ConfigError(f"rules: need at least 4 test images to fit on half and report on the "
                          f"other, got {N}")
    fit, rep = split_halves(N, seed)
    labels = labels.to(logits.device)
    per_model = logits.argmax(-1)                                     # [M, N]
    sub_correct = per_model == labels                                 # [M, N]
    correct: Dict[str, Tuple[str, str, Tensor]] = {}                  # name -> (kind, label, [N])
    for name in rule_names():
        correct[name] = ("rule", _label(name), answers(logits, ppd_logit, name) == labels)
    for m in range(M):
        correct[f"submodel {m}"] = ("submodel", f"sub-model {m}", sub_correct[m])
    best = int(sub_correct[:, fit].double().mean(1).argmax())
    correct["best sub-model"] = ("best", f"best sub-model (sub-model {best}, chosen on the fit "
                                 "half)", sub_correct[best])
    correct["oracle"] = ("oracle", "oracle (some sub-model is right)", sub_correct.any(0))
    feats = _features(logits, ppd_logit)
    weights, mean, std = fit_selector(feats[:, fit], sub_correct[:, fit])
    correct["fitted selector"] = ("fitted", "fitted selector (logistic, fit half)",
                                  _fitted_answers(feats, weights, mean, std, per_model) == labels)
    own_rep = correct[own][2][rep]
    entries: List[Dict[str, Any]] = []
    for name, (kind, label, c) in correct.items():
        acc = float(c[rep].double().mean())
        diff, diff_se = paired_difference(c[rep], own_rep)
        entries.append({"name": name, "kind": kind, "label": label, "accuracy": acc,
                        "se": math.sqrt(max(acc * (1 - acc), 0.0) / rep.numel()),
                        "accuracy_all": float(c.double().mean()), "diff": diff, "diff_se": diff_se})
    return {"n": N, "n_fit": int(fit.numel()), "n_report": int(rep.numel()), "split_seed": seed,
            "own": own, "best_submodel": best, "features": list(FEATURES),
            "fitted_weights": weights.tolist(), "entries": entries,
            "per_image": {name: _bits(c.cpu()) for name, (_, _, c) in correct.items()}}


def rule_table(report: Dict[str, Any], title: Optional[str] = None) -> str:
    """The report as a text table: accuracy on the reported half and the paired difference."""
    own = report["own"]
    head = (f"{title}\n" if title else "") + (
        f"{report['n_report']} reported images (the other {report['n_fit']} fit the best "
        f"sub-model and the fitted selector); differences are against the run's own rule "
        f"({own}), ± one paired standard error, in points")
    rows = [("rule", "accuracy %", f"vs {own}")]
    for e in report["entries"]:
        mark = " (own)" if e["name"] == own else ""
        rows.append((e["label"] + mark, f"{100 * e['accuracy']:.2f} ± {100 * e['se']:.2f}",
                     "" if e["name"] == own else
                     f"{100 * e['diff']:+.2f} ± {100 * e['diff_se']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def entry(report: Dict[str, Any], name: str) -> Dict[str, Any]:
    """The entry called ``name`` of a report."""
    return next(e for e in report["entries"] if e["name"] == name)


def paired_between(a: Dict[str, Any], a_name: str, b: Dict[str, Any], b_name: str
                   ) -> Tuple[float, float]:
    """The paired difference (reported half) between entry ``a_name`` of report ``a`` and entry
    ``b_name`` of report ``b``, two runs scored on the same test images."""
    if a["n"] != b["n"] or a["split_seed"] != b["split_seed"]:
        raise ValueError("paired_between: the two reports are not on the same images")
    _, rep = split_halves(a["n"], a["split_seed"])
    ca = correct_from_bits(a["per_image"][a_name])[rep]
    cb = correct_from_bits(b["per_image"][b_name])[rep]
    return paired_difference(ca, cb)

