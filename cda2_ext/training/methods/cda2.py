"""CDA² (Algorithm 1): the soft-min surrogate over sub-models plus the PPD-head BCE.

Per batch ``(x, y)``, depending on ``TrainConfig.phases``:

* **natural** (lines 2-10): ``per_model_pgd`` makes the M variants ``x~^{θ_i}`` at once
  (``[M, B, C, H, W]``); they are flattened to one shared batch of ``M*B`` images so that *every*
  sub-model scores *every* variant in one forward (``logits [M, M*B, K]``); the loss is the
  soft-min surrogate (Eq. 7) averaged over variants and samples + ``bce_weight`` x the PPD BCE
  against ``p_y`` (lines 6-9). One optimiser step.
* **adversarial** (lines 12-19): ``collaboration_pgd`` attacks the collaboration's own answer
  (the highest-PPD sub-model, gradient through ``collaborative_select``); surrogate + BCE on that
  ``x~``. One optimiser step. This is the default: the paper's implementation uses this phase alone.
* **both**: a natural-phase step, then an adversarial-phase step on the same batch.
* **standard**: no attack; surrogate + BCE on the clean batch (Table 6's standard training).

With ``ppd_grad="head"`` (default) the PPD heads read detached features, so one backward of
``surrogate + bce_weight * bce`` gives Algorithm 1's two separate updates (BCE -> PPD heads only,
surrogate -> everything else).

Choices the paper leaves open, each an option (defaults: the paper; see ``TrainConfig``):

* ``weights="detector"``: the label path minimises the authors' detector-weighted cross-entropy
  instead of Eq. 7's soft-min (:mod:`~cda2_ext.training.weighting`); the tallies' ``surrogate``
  is then that loss.

* ``clean_weight W``: every update also minimises ``W x (surrogate + bce_weight x BCE)`` on the
  clean batch (its own forward pass), as the authors' code does with W = 1 (``loss_soft +
  adv_loss_soft``); Algorithm 1 has no such term.
* ``ppd_grad="trunk"``: the BCE also trains the shared layers (the model does not detach the
  PPD head's input), as in the authors' code.
* ``ppd_loss="soe"``: the authors' BCE, fitted by ``maxprob x sigmoid(s)`` - the score
  ``select_score="soe"`` selects by - instead of by ``sigmoid(s)`` (:func:`soe_ppd_bce`).
* ``pgd_bn``: BatchNorm mode during the training PGD (:func:`~cda2_ext.attacks.training_pgd.attack_mode`).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as Fn
from torch import Tensor

from ...attacks.training_pgd import collaboration_pgd, per_model_pgd
from ...models.collaboration import collaborate
from ..weighting import WEIGHTINGS, weighted_loss
from .base import Method, Tally

__all__ = ["CDA2", "soe_ppd_bce"]

_PHASES = ("natural", "adversarial", "standard")


def _log1mexp(a: Tensor) -> Tensor:
    """``log(1 - exp(a))`` for ``a < 0``, accurate at both ends (Maechler's switch at -ln 2)."""
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def soe_ppd_bce(logits: Tensor, ppd_logit: Tensor, target_prob: Tensor, target: Tensor,
                label_grad: bool) -> Tensor:
    """The authors' (Synergy-of-Experts) PPD BCE, mean over ``[M, B]``.

    The detector ``d = max_k softmax(z)_k x sigmoid(s)`` - the ``"soe"`` selection score - is fitted
    to ``t = p_y`` (``target_prob``, detached) by ``-(t log d + (1 - t) log(1 - d))``, in log space
    (``log d = log maxprob + logsigmoid(s)``) with the logs floored at -100 like ``nn.BCELoss``.
    ``label_grad``: the max-prob factor passes gradients to the label path where the sub-model's
    prediction is wrong (the authors' code detaches it where it is right); ``False`` detaches it
    everywhere, so only the PPD path learns from this loss.

    Args:
        logits: ``[M, B, K]``; ppd_logit: ``[M, B]``; target_prob: ``[M, B]`` in [0, 1];
            target: ``[B]`` labels.
    """
    log_max, pred = torch.log_softmax(logits.float(), -1).max(-1)      # [M, B]
    if label_grad:
        log_max = torch.where(pred == target, log_max.detach(), log_max)
    else:
        log_max = log_max.detach()
    # d < 1 in exact arithmetic; keep log d off 0 so that log(1 - d) and its gradient stay finite
    log_d = (log_max + Fn.logsigmoid(ppd_logit.float())).clamp_max(-1e-12)
    t = target_prob.detach().to(log_d.dtype)
    return -(t * log_d.clamp_min(-100.0) + (1 - t) * _log1mexp(log_d).clamp_min(-100.0)).mean()


class CDA2(Method):
    """Algorithm 1 of the paper (see the module docstring)."""

    name = "cda2"

    def tally_keys(self) -> List[str]:
        return [*_PHASES, "clean"]

    def step(self, x: Tensor, y: Tensor, tallies: Dict[str, Tally]) -> Dict[str, Tensor]:
        t = self.trainer
        cfg, model, M = t.config, t.model, t.model.num_models
        atk = dict(random_start=cfg.random_start, generator=t.generator, backend=t.backend,
                   bn=cfg.pgd_bn)
        # the clean batch of the authors' clean term (None: Algorithm 1, no such term)
        clean = (x, y) if cfg.clean_weight > 0 and cfg.phases != "standard" else None
        losses: Dict[str, Tensor] = {}
        if cfg.phases in ("natural", "both"):
            with t.autocast():
                x_adv = per_model_pgd(model, x, y, cfg.eps, cfg.alpha, cfg.steps,
                                      x_init=t.random_start(x, M), **atk)  # [M, B, ...]
            # every sub-model x every variant
            losses["natural"] = self._update(x_adv.reshape(-1, *x.shape[1:]), y.repeat(M),
                                             tallies["natural"], "natural", clean)
        if cfg.phases in ("adversarial", "both"):
            with t.autocast():
                x_adv = collaboration_pgd(model, x, y, cfg.eps, cfg.alpha, cfg.steps,
                                          score=cfg.select_score, x_init=t.random_start(x, None),
                                          **atk)
            losses["adversarial"] = self._update(x_adv, y, tallies["adversarial"], "adversarial",
                                                 clean)
        if cfg.phases == "standard":
            losses["standard"] = self._update(x, y, tallies["standard"], "standard")
        else:  # clean accuracy of the collaboration on this batch, as it will be evaluated
            with torch.no_grad(), t.autocast():
                logits, ppd = model.frozen()(x)  # eval mode, BatchNorm folded
                _, chosen = collaborate(logits.float(), ppd.float(), cfg.select_score, t.backend)
            tallies["clean"].add("correct", (chosen.argmax(-1) == y).sum())
            tallies["clean"].add("n", y.shape[0])
        return losses

    def _terms(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Any, Tensor, Tensor, Tensor]:
        """``(label loss + bce_weight x BCE, the weighted loss's terms, BCE, logits, ppd)`` of the
        training forward at ``x`` (logits and ppd detached); the label loss is ``cfg.weights``'
        (:func:`~cda2_ext.training.weighting.weighted_loss`)."""
        t = self.trainer
        cfg, backend = t.config, t.backend
        logits, ppd = t.train_forward(x)
        logits, ppd = logits.float(), ppd.float()  # the fused ops accumulate in fp32
        rule = WEIGHTINGS[cfg.weights]  # its parameters are config fields of the same names
        out = weighted_loss(logits, ppd, y, cfg.weights, temp_true=cfg.temp_true, backend=backend,
                            **{p.name: getattr(cfg, p.name) for p in rule.params})
        if cfg.ppd_loss == "soe":
            bce = soe_ppd_bce(logits, ppd, out.p_true, y, label_grad=cfg.ppd_grad == "trunk")
        else:
            bce = backend.ppd_bce(ppd, out.p_true)
        return out.loss + cfg.bce_weight * bce, out, bce, logits.detach(), ppd.detach()

    def _update(self, x: Tensor, y: Tensor, tally: Tally, phase: str,
                clean: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """One optimiser step on surrogate + weighted BCE of the training forward at ``x``, plus
        ``clean_weight`` x the same on the clean batch ``clean = (x, y)`` when given."""
        t = self.trainer
        cfg, backend = t.config, t.backend

        def loss_fn() -> Tuple[Tensor, Any]:
            loss, out, bce, logits, ppd = self._terms(x, y)
            clean_term = None
            if clean is not None:
                clean_term = self._terms(*clean)[0]
                loss = loss + cfg.clean_weight * clean_term
            return loss, (out, bce, logits, ppd, clean_term)

        loss, aux = t.update(loss_fn, phase, tally)
        # a skipped update returns its aux too: what is tallied then counts for nothing
        out, bce, logits, ppd, clean_term = aux
        with torch.no_grad():
            index, chosen = collaborate(logits, ppd, cfg.select_score, backend)
            n, M = y.shape[0], logits.shape[0]
            tally.add("n", n)
            tally.add("surrogate", out.loss * n)
            tally.add("bce", bce * n)
            if clean_term is not None:
                tally.add("clean_term", clean_term.detach() * n)
            tally.add("correct", (chosen.argmax(-1) == y).sum())
            tally.add("ce", out.ce.sum(1))
            tally.add_counts("assign", out.weights.argmax(0), M)
            tally.add_counts("select", index, M)
        return loss

    def epoch_metrics(self, tallies: Dict[str, Tally]) -> Dict[str, Any]:
        cfg = self.trainer.config
        trained = {k: tallies[k] for k in _PHASES if float(tallies[k].get("n")) > 0}
        phases = {k: {"surrogate": s.mean("surrogate"), "bce": s.mean("bce"),
                      "clean_term": s.mean("clean_term"), "acc": s.mean("correct"),
                      "ce": s.mean("ce"), "assign_hist": s.mean("assign"),
                      "select_hist": s.mean("select"), "samples": int(s.get("n"))}
                  for k, s in trained.items()}
        m: Dict[str, Any] = {"surrogate": sum(p["surrogate"] for p in phases.values()),
                             "bce": sum(p["bce"] for p in phases.values())}
        m["loss"] = m["surrogate"] + cfg.bce_weight * m["bce"]
        if cfg.clean_weight > 0:  # the authors' clean term
            m["clean_term"] = sum(p["clean_term"] for p in phases.values())
            m["loss"] += cfg.clean_weight * m["clean_term"]
        if "standard" in phases:
            m["clean_acc"], m["adv_acc"] = phases["standard"]["acc"], None
        else:
            m["clean_acc"] = tallies["clean"].mean("correct")
            n = sum(float(s.get("n")) for s in trained.values())
            m["adv_acc"] = sum(float(s.get("correct")) for s in trained.values()) / max(n, 1)
        n = max(sum(float(s.get("n")) for s in trained.values()), 1)
        M = self.trainer.model.num_models
        zero = torch.zeros(M, dtype=torch.float64)
        m["assign_hist"] = (sum((s.get("assign").cpu() for s in trained.values()), zero) / n).tolist()
        m["select_hist"] = (sum((s.get("select").cpu() for s in trained.values()), zero) / n).tolist()
        m["phases"] = phases
        return m

    def summary(self, metrics: Dict[str, Any]) -> List[str]:
        parts: List[str] = []
        if "test" in metrics:
            parts.append(f"test collab {100 * metrics['test']['collaboration']:.1f}% "
                         f"ens {100 * metrics['test']['ensemble']:.1f}%")
        parts.append("assign " + "/".join(f"{a:.2f}" for a in metrics["assign_hist"]))
        return parts
