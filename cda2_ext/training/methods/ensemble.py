"""The plain ensemble baseline, and what every ensemble method (ADP, GAL, DVERGE) shares.

**ensemble** (``--method ensemble``): each of the M sub-models is trained on its own
cross-entropy, ``L = sum_m mean_b CE(f_m(x_b), y_b)`` - the sum, not the mean, because DVERGE's
``train/train_baseline.py`` steps one optimiser per sub-model on its own loss, which for disjoint
parameters is one step on the sum. These are the hold-out *baseline ensembles* the transfer
attacks of the paper's Tables 2 and 5 are generated on (3, 5 and 8 ResNet-20 sub-models), and
the starting point of DVERGE.

``--adv``: PGD adversarial training of the *averaged* ensemble (DVERGE's ``train/train_adv.py``):
the attack maximises the cross-entropy of the ensemble output ``log(mean_m softmax(z_m))``, and
every sub-model is trained on the resulting ``x~`` only. The attack is this project's training PGD
(``eps``/``alpha``/``steps``, fused random start and sign step on the engine's loop, model in eval
mode), the same one CDA² trains with, so adversarially trained methods are compared like for like.

Defaults (applied by :meth:`~cda2_ext.training.TrainConfig.for_method` where not given):
SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 128, 200 epochs, x0.1 at epochs 100 and 150 -
DVERGE's ``arguments.py`` (``--lr 0.1 --epochs 200 --sch-intervals 100 150 --lr-gamma 0.1``)
and ``utils.get_optimizers`` (github.com/zjysteven/DVERGE), as used for the baselines of
Yang et al., "DVERGE: Diversifying Vulnerabilities for Enhanced Robust Generation of Ensembles",
NeurIPS 2020, which the CDA² paper follows (Sec. 4.3).

An ensemble predicts by the mean of the sub-models' probabilities (and by vote); it has no
selection, so its PPD heads are never trained (``uses_every_parameter = False``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ...attacks.engine import ce_loss, sign_attack
from ...runtime import FUSED, OpsBackend, eval_mode
from ..nonfinite import fused_optimizer
from .base import Method, Tally

__all__ = ["EnsembleMethod", "Ensemble", "ensemble_log_probs", "per_model_ce", "ensemble_ce_loss",
           "ensemble_pgd", "baseline_optimizer", "BASELINE_SCHEDULE", "ADAM_EPS"]

#: DVERGE's schedule for every baseline: 200 epochs, x0.1 at 100 and 150 (fractions of ``epochs``).
BASELINE_SCHEDULE: Dict[str, Any] = {"epochs": 200, "schedule": "multistep",
                                     "milestones": (0.5, 0.75), "gamma": 0.1}
#: ``optim.Adam(..., eps=1e-7)`` of DVERGE's ``train_adp.py`` / ``train_gal.py``.
ADAM_EPS = 1e-7


# ----- the ensemble's math -------------------------------------------------------------------------
def ensemble_log_probs(logits: Tensor) -> Tensor:
    """``log(mean_m softmax(z_m))`` ``[..., B, K]`` of ``logits [M, ..., B, K]`` (DVERGE's
    ``models/ensemble.py``, in log space so it never underflows)."""
    M = logits.shape[0]
    return torch.logsumexp(torch.log_softmax(logits.float(), -1), 0) - math.log(M)


def per_model_ce(logits: Tensor, target: Tensor, backend: OpsBackend = FUSED) -> Tensor:
    """Per-sample cross-entropy of every sub-model, ``[M, N]`` (fp32 or fp64), from ``logits
    [M, N, K]`` and ``target [N]``: the ``ce`` output of the fused collaboration loss (one pass
    over all M sub-models, forward and backward)."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    return backend.collaboration_loss(z, target, 1.0).ce


def ensemble_ce_loss(logits: Tensor, target: Tensor, backend: OpsBackend = FUSED
                     ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The ensemble baseline's loss ``sum_m mean_b CE(z_m, y)`` and its terms."""
    ce = per_model_ce(logits, target, backend).mean(1)  # [M]
    return ce.sum(), {"ce": ce.detach()}


def ensemble_pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int, *,
                 x_init: Optional[Tensor] = None, random_start: bool = True,
                 generator: Optional[torch.Generator] = None,
                 backend: OpsBackend = FUSED) -> Tensor:
    """PGD on the cross-entropy of the averaged ensemble (DVERGE's ``Linf_PGD`` on ``Ensemble``),
    on the engine's sign-step loop; the model in eval mode, the last iterate returned
    (``[B, C, H, W]``, detached). ``x_init``: the start ``[B, ...]`` (default: a fused uniform
    start drawn from ``generator``, or ``x`` without ``random_start``)."""
    x = x.detach()
    if x_init is None:
        x_init = (backend.pgd_random_start(x, eps, 0.0, 1.0, generator=generator)
                  if random_start and eps > 0 else x)

    def objective(xa: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        logits, _ = model(xa[0])
        return ce_loss(ensemble_log_probs(logits), y).unsqueeze(0), None

    with eval_mode(model):
        return sign_attack(objective, x, y, eps, alpha, steps, x_init=x_init.unsqueeze(0),
                           track_worst=False, backend=backend).x_adv[0]


def baseline_optimizer(params: Iterable[nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
    """``config.optimizer`` with ``lr``/``weight_decay`` (and SGD's ``momentum``); Adam with
    DVERGE's ``eps=1e-7`` (ADP and GAL)."""
    if cfg.optimizer == "adam":
        return fused_optimizer(torch.optim.Adam, params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               eps=ADAM_EPS)
    return fused_optimizer(torch.optim.SGD, params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


#: ``logits [M, N, K] -> (loss, {term: value})``: a method's loss of the training forward.
LossOf = Callable[[Tensor], Tuple[Tensor, Dict[str, Tensor]]]


# ----- the common base -----------------------------------------------------------------------------
class EnsembleMethod(Method):
    """Base of the ensemble methods: M sub-models trained on one loss of their logits.

    Subclasses set ``defaults`` (the options :meth:`TrainConfig.for_method` fills in, each cited in
    the subclass's docstring), ``terms`` (the names of the loss terms they report) and implement
    :meth:`step`: make the inputs, then :meth:`_train` (one update). One tally, ``train``: the loss
    and its terms per sample, the ensemble's accuracy on the clean and (with an attack) adversarial
    images, and the trainer's count of skipped updates.
    """

    uses_every_parameter = False   # the PPD heads stay untouched
    #: ``TrainConfig`` fields this method sets when the user does not (``for_method``).
    defaults: ClassVar[Dict[str, Any]] = {}
    #: The loss terms (keys of the ``terms`` dict of the loss), averaged per epoch.
    terms: ClassVar[Tuple[str, ...]] = ("ce",)
    #: Minimum number of sub-models (a diversity term needs pairs); checked by ``TrainConfig``.
    min_models: ClassVar[int] = 1

    def make_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return baseline_optimizer(params, self.trainer.config)

    def tally_keys(self) -> List[str]:
        return ["train"]

    def adversarial(self, x: Tensor, y: Tensor) -> Tensor:
        """``x~ [B, ...]``: the training PGD on the averaged ensemble (``--adv``)."""
        t = self.trainer
        cfg = t.config
        with t.autocast():
            return ensemble_pgd(t.model, x, y, cfg.eps, cfg.alpha, cfg.steps,
                                x_init=t.random_start(x, None), random_start=cfg.random_start,
                                generator=t.generator, backend=t.backend)

    def _train(self, inputs: Tensor, loss_of: LossOf, tally: Tally, n: int,
               clean: Optional[slice], adv: Optional[slice], y_acc: Tensor) -> Tensor:
        """One update on ``loss_of(logits) -> (loss, terms)`` of the training forward at
        ``inputs``; tallies the loss and terms per sample (``n`` samples) and the ensemble's
        accuracy on the ``clean``/``adv`` slices of the batch axis (labels ``y_acc``)."""
        t = self.trainer

        def loss_fn() -> Tuple[Tensor, Any]:
            logits, _ = t.train_forward(inputs)
            loss, terms = loss_of(logits)
            return loss, (terms, logits.detach())

        loss, aux = t.update(loss_fn, self.name, tally)
        # a skipped update returns its aux too: what is tallied then counts for nothing
        terms, logits = aux
        with torch.no_grad():
            tally.add("n", n)
            tally.add("loss", loss * n)
            for k, v in terms.items():
                tally.add(k, v * n)
            pred = ensemble_log_probs(logits).argmax(-1)
            for key, part in (("clean", clean), ("adv", adv)):
                if part is not None:
                    tally.add(f"{key}_correct", (pred[part] == y_acc[part]).sum())
                    tally.add(f"{key}_n", y_acc[part].numel())
        return loss

    def _clean_accuracy(self, x: Tensor, y: Tensor, tally: Tally) -> None:
        """The ensemble's accuracy on the clean batch, as it will be evaluated (eval mode), for
        methods whose update does not see the clean batch."""
        t = self.trainer
        with torch.no_grad(), eval_mode(t.model), t.autocast():
            logits, _ = t.model(x)
        tally.add("clean_correct", (ensemble_log_probs(logits).argmax(-1) == y).sum())
        tally.add("clean_n", y.shape[0])

    def epoch_metrics(self, tallies: Dict[str, Tally]) -> Dict[str, Any]:
        s = tallies["train"]
        m: Dict[str, Any] = {"loss": s.mean("loss")}
        for k in self.terms:  # a term the run never computed (e.g. adv_ce without --adv) is absent
            if k in s.sums:
                m[k] = s.mean(k)
        m["clean_acc"] = s.mean("clean_correct", "clean_n")
        m["adv_acc"] = s.mean("adv_correct", "adv_n") if "adv_n" in s.sums else None
        m["samples"] = int(s.get("n"))
        return m

    def summary(self, metrics: Dict[str, Any]) -> List[str]:
        parts: List[str] = []
        if "test" in metrics:
            parts.append(f"test ens {100 * metrics['test']['ensemble']:.1f}%")
        for k in self.terms:
            v = metrics.get(k)
            if isinstance(v, list):
                parts.append(f"{k} " + "/".join(f"{a:.3f}" for a in v))
            elif v is not None:
                parts.append(f"{k} {v:.4f}")
        return parts


class Ensemble(EnsembleMethod):
    """Independent sub-models, each on its own cross-entropy; ``--adv`` trains them on PGD of
    the averaged ensemble (see the module docstring for the sources of every default)."""

    name = "ensemble"
    defaults = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
                "batch_size": 128, **BASELINE_SCHEDULE}

    def step(self, x: Tensor, y: Tensor, tallies: Dict[str, Tally]) -> Dict[str, Tensor]:
        t, B = self.trainer, y.shape[0]
        loss_of = lambda logits: ensemble_ce_loss(logits, y, t.backend)  # noqa: E731
        if not t.config.adv:
            return {"ensemble": self._train(x, loss_of, tallies["train"], B, slice(None), None, y)}
        x_adv = self.adversarial(x, y)
        self._clean_accuracy(x, y, tallies["train"])
        return {"ensemble": self._train(x_adv, loss_of, tallies["train"], B, None, slice(None), y)}
