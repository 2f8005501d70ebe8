"""White-box PGD with the paper's protocol.

The protocol of Section 4.3 (after Yang et al. 2020, DVERGE): L-inf PGD, 50 steps, 5 random
starts, step ``eps/5``, cross-entropy; a sample counts as robust only if it survives every
restart (the per-sample worst case is kept, see :mod:`~cda2_ext.attacks.engine`).

Attacks here take any *model function* ``images [N, C, H, W] -> logits [N, K]``. A collaboration
(``x -> (logits [M, N, K], ppd_logit [M, N])``, e.g. :class:`~cda2_ext.models.Collaboration`) is
attacked through its Algorithm-2 decision (:func:`~cda2_ext.models.classifier.as_model_fn`); the
classifier adapters (:class:`~cda2_ext.models.classifier.CollaborationLogits` with its hard, soft
and BPDA selections, :class:`~cda2_ext.models.classifier.EnsembleLogits`,
:class:`~cda2_ext.models.classifier.SubModelLogits`) live in :mod:`cda2_ext.models.classifier`
and are importable from here too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.classifier import (SELECTIONS, CollaborationLogits, EnsembleLogits, SubModelLogits,
                                 as_model_fn, ppd_gradients)
from ..runtime import FUSED, OpsBackend, eval_mode
from .engine import (AttackResult, ModelFn, check_attack_args, model_objective, per_sample_loss,
                     run_restarts, sign_attack)

__all__ = ["SELECTIONS", "ppd_gradients", "CollaborationLogits", "EnsembleLogits", "SubModelLogits",
           "as_model_fn", "PGDConfig", "pgd_attack", "predict_correct"]


@torch.no_grad()
def predict_correct(model: ModelFn, x: Tensor, target: Tensor) -> Tensor:
    """``[B]`` bool: ``model``'s argmax equals the label (model in eval mode)."""
    with eval_mode(model):
        return model(x).argmax(-1) == target


@dataclass
class PGDConfig:
    """The white-box PGD protocol (defaults: the paper's Section 4.3).

    Attributes:
        steps: PGD steps (50). restarts: random starts (5), worst case kept per sample.
        alpha_factor: step size as a fraction of eps (1/5). loss: ``"ce"`` | ``"cw"`` | ``"dlr"``.
        random_start: start uniformly in the ball (each restart draws its own start).
        last_iterate: judge each restart by its final iterate only, the published protocol
            (DVERGE's scripts); the default counts a sample as broken when any iterate broke it,
            which can only be stronger.
    """

    steps: int = 50
    restarts: int = 5
    alpha_factor: float = 0.2
    loss: str = "ce"
    random_start: bool = True
    last_iterate: bool = False

    def validate(self) -> "PGDConfig":
        """Raise :class:`~cda2_ext.errors.ConfigError` (naming the field) for a protocol no attack
        can run; ``self``."""
        for name, low in (("steps", 0), ("restarts", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"pgd.{name}: must be >= {low}, got {getattr(self, name)}")
        per_sample_loss(self.loss, "pgd.loss")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def pgd_attack(model: ModelFn, x_nat: Tensor, target: Tensor, eps: float,
               config: Optional[PGDConfig] = None, *, only_correct: bool = True,
               lo: float = 0.0, hi: float = 1.0, generator: Optional[torch.Generator] = None,
               backend: OpsBackend = FUSED) -> AttackResult:
    """L-inf PGD with restarts against a model function; per-sample worst case.

    Args:
        model: images -> logits; a collaboration is attacked through its Algorithm-2 decision
            (:func:`as_model_fn`; ``model.as_classifier(score=...)`` picks another rule).
        x_nat: ``[B, C, H, W]`` in ``[lo, hi]``; target ``[B]``.
        eps: L-inf radius. config: :class:`PGDConfig` (paper protocol by default).
        only_correct: do not attack samples the model already gets wrong (they stay wrong).
        generator: the RNG the restarts' seeds are drawn from (reproducible runs).

    Returns:
        Folded :class:`~cda2_ext.attacks.engine.AttackResult` (``x_adv [B, ...]``, ``correct [B]``).
    """
    cfg = (config or PGDConfig()).validate()
    check_attack_args(x_nat, target, eps, cfg.steps)
    model = as_model_fn(model)
    alpha = cfg.alpha_factor * eps
    with eval_mode(model):
        start_ok = predict_correct(model, x_nat, target) if only_correct else None

        def once(idx: Tensor, x0: Tensor) -> AttackResult:
            obj = model_objective(model, target[idx], cfg.loss)
            return sign_attack(obj, x_nat[idx], target[idx], eps, alpha, cfg.steps, x_init=x0,
                               lo=lo, hi=hi, last_iterate=cfg.last_iterate, backend=backend)

        return run_restarts(once, x_nat, target, eps, cfg.restarts, random_start=cfg.random_start,
                            initially_correct=start_ok, lo=lo, hi=hi, generator=generator, backend=backend)
