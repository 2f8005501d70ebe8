"""Selection scores: how Algorithm 2 picks which sub-model answers, one record each.

A score maps one forward pass's ``(logits [M, B, K], ppd_logit [M, B])`` to ``[M, B]``; the
sub-model with the highest score answers. Every score here is label-free (it never sees the
true label), so each is a rule a deployed collaboration could use. ``--score`` (``cda2 eval``,
``cda2 eval-clean``), ``--select-score`` (``cda2 train``), the rule report of ``cda2 eval-clean
--rules all`` and the adaptive attacks all read :data:`SCORES`: a new rule is one
:class:`SelectionScore` added there (``SCORES.add(...)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..registry import Registry

__all__ = ["SelectionScore", "SCORES", "selection_score", "score_help"]


@dataclass(frozen=True)
class SelectionScore:
    """One selection rule.

    Attributes:
        name: its ``--score`` name. label: what reports call it. help: one line for ``--help``
            and the docs table (where the rule comes from).
        fn: ``(logits, ppd_logit) -> [M, B]``, higher answers; ``logits`` arrive in float32 or
            float64 (the tests' oracle precision is kept), ``ppd_logit`` likewise.
        uses_ppd: whether it reads the PPD head (a run without a trained head should not use it).
    """

    name: str
    label: str
    help: str
    fn: Callable[[Tensor, Tensor], Tensor]
    uses_ppd: bool = False


def _probs(z: Tensor) -> Tensor:
    return torch.softmax(z, dim=-1)


def _margin(z: Tensor, s: Tensor) -> Tensor:
    top2 = _probs(z).topk(min(2, z.shape[-1]), dim=-1).values
    return top2[..., 0] - (top2[..., 1] if top2.shape[-1] > 1 else 0.0)


def _neg_entropy(z: Tensor, s: Tensor) -> Tensor:
    logp = torch.log_softmax(z, dim=-1)
    return (logp.exp() * logp).sum(-1)  # -H(p): the least uncertain sub-model scores highest


#: Every selection rule, by name. The first is the paper's (Algorithm 2).
SCORES: Registry[SelectionScore] = Registry("score")
for _rule in (
    SelectionScore("ppd", "PPD (Algorithm 2)",
                   "the PPD head's logit: the paper's Algorithm 2", lambda z, s: s, uses_ppd=True),
    SelectionScore("soe", "the authors' detector",
                   "max-prob x sigmoid(PPD): the authors' Synergy-of-Experts code",
                   lambda z, s: _probs(z).amax(-1) * torch.sigmoid(s), uses_ppd=True),
    SelectionScore("maxprob", "max-probability",
                   "the most confident sub-model (no PPD head)", lambda z, s: _probs(z).amax(-1)),
    SelectionScore("margin", "margin",
                   "the largest top-1 minus top-2 probability (no PPD head)", _margin),
    SelectionScore("entropy", "minimum entropy",
                   "the lowest entropy of the predicted distribution (no PPD head)", _neg_entropy),
):
    SCORES.add(_rule)


def selection_score(logits: Tensor, ppd_logit: Tensor, score: str = "ppd") -> Tensor:
    """The ``[M, B]`` score Algorithm 2 maximises over sub-models, by the rule named ``score``
    (one of :data:`SCORES`; an unknown name is a ``ValueError`` naming the choices).

    ``"ppd"`` returns the PPD logit itself (sigmoid is monotone, so the argmax is the paper's).
    The others compute in float32, or float64 where the input is float64.
    """
    rule = SCORES.get_or_raise(score)
    if rule.name == "ppd":
        return ppd_logit
    z = logits if logits.dtype == torch.float64 else logits.float()
    s = ppd_logit if ppd_logit.dtype == torch.float64 else ppd_logit.float()
    return rule.fn(z, s)


def score_help(what: str = "Algorithm 2's selection score") -> str:
    """``--help`` text naming every registered score and its source (read at parser build time,
    so a score added before the parser is built appears)."""
    return what + ": " + "; ".join(f"{r.name}: {r.help}" for r in SCORES.values())
