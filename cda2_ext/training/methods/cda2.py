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

The PPD heads read detached features, so one backward of ``surrogate + bce_weight * bce`` gives
Algorithm 1's two separate updates (BCE -> PPD heads only, surrogate -> everything else).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor

from ...attacks.training import collaboration_pgd, per_model_pgd
from ...models.collaboration import collaborate
from ...runtime import eval_mode
from .base import Method, Tally

__all__ = ["CDA2"]

_PHASES = ("natural", "adversarial", "standard")


class CDA2(Method):
    """Algorithm 1 of the paper (see the module docstring)."""

    name = "cda2"

    def tally_keys(self) -> List[str]:
        return [*_PHASES, "clean"]

    def step(self, x: Tensor, y: Tensor, tallies: Dict[str, Tally]) -> Dict[str, Tensor]:
        t = self.trainer
        cfg, model, M = t.config, t.model, t.model.num_models
        atk = dict(random_start=cfg.random_start, generator=t.generator, backend=t.backend)
        losses: Dict[str, Tensor] = {}
        if cfg.phases in ("natural", "both"):
            with t.autocast():
                x_adv = per_model_pgd(model, x, y, cfg.eps, cfg.alpha, cfg.steps,
                                      x_init=t.random_start(x, M), **atk)  # [M, B, ...]
            # every sub-model x every variant
            losses["natural"] = self._update(x_adv.reshape(-1, *x.shape[1:]), y.repeat(M),
                                             tallies["natural"], "natural")
        if cfg.phases in ("adversarial", "both"):
            with t.autocast():
                x_adv = collaboration_pgd(model, x, y, cfg.eps, cfg.alpha, cfg.steps,
                                          score=cfg.select_score, x_init=t.random_start(x, None),
                                          **atk)
            losses["adversarial"] = self._update(x_adv, y, tallies["adversarial"], "adversarial")
        if cfg.phases == "standard":
            losses["standard"] = self._update(x, y, tallies["standard"], "standard")
        else:  # clean accuracy of the collaboration on this batch, as it will be evaluated
            with torch.no_grad(), eval_mode(model), t.autocast():
                logits, ppd = model(x)
                _, chosen = collaborate(logits.float(), ppd.float(), "ppd", t.backend)
            tallies["clean"].add("correct", (chosen.argmax(-1) == y).sum())
            tallies["clean"].add("n", y.shape[0])
        return losses

    def _update(self, x: Tensor, y: Tensor, tally: Tally, phase: str) -> Tensor:
        """One optimiser step on surrogate + weighted BCE of the training forward at ``x``."""
        t = self.trainer
        cfg, backend = t.config, t.backend

        def loss_fn() -> Tuple[Tensor, Any]:
            logits, ppd = t.train_forward(x)
            logits, ppd = logits.float(), ppd.float()  # the fused ops accumulate in fp32
            out = backend.collaboration_loss(logits, y, cfg.sigma)
            bce = backend.ppd_bce(ppd, out.p_true)
            return out.loss + cfg.bce_weight * bce, (out, bce, logits.detach(), ppd.detach())

        loss, aux = t.update(loss_fn, phase, tally)
        if aux is not None:
            out, bce, logits, ppd = aux
            with torch.no_grad():
                index, chosen = collaborate(logits, ppd, "ppd", backend)
                n, M = y.shape[0], logits.shape[0]
                tally.add("n", n)
                tally.add("surrogate", out.loss * n)
                tally.add("bce", bce * n)
                tally.add("correct", (chosen.argmax(-1) == y).sum())
                tally.add("ce", out.ce.sum(1))
                tally.add("assign", torch.bincount(out.weights.argmax(0), minlength=M))
                tally.add("select", torch.bincount(index, minlength=M))
        return loss

    def epoch_metrics(self, tallies: Dict[str, Tally]) -> Dict[str, Any]:
        cfg = self.trainer.config
        trained = {k: tallies[k] for k in _PHASES if float(tallies[k].get("n")) > 0}
        phases = {k: {"surrogate": s.mean("surrogate"), "bce": s.mean("bce"), "acc": s.mean("correct"),
                      "ce": s.mean("ce"), "assign_hist": s.mean("assign"),
                      "select_hist": s.mean("select"), "samples": int(s.get("n"))}
                  for k, s in trained.items()}
        m: Dict[str, Any] = {"surrogate": sum(p["surrogate"] for p in phases.values()),
                             "bce": sum(p["bce"] for p in phases.values())}
        m["loss"] = m["surrogate"] + cfg.bce_weight * m["bce"]
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
