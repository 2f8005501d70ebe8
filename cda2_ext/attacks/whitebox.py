"""White-box PGD with the paper's protocol, and the models it attacks.

The protocol of Section 4.3 (after Yang et al. 2020, DVERGE): L-inf PGD, 50 steps, 5 random
starts, step ``eps/5``, cross-entropy; a sample counts as robust only if it survives every
restart (the per-sample worst case is kept, see :mod:`~cda2_ext.attacks.engine`).

Attacks here take any *model function* ``images [N, C, H, W] -> logits [N, K]``. A collaboration
(``x -> (logits [M, N, K], ppd_logit [M, N])``, e.g. :class:`~cda2_ext.models.Collaboration`) is
turned into one by :class:`CollaborationLogits`:

* ``selection="hard"`` (default, Algorithm 2): the logits of the sub-model with the highest PPD,
  via the fused ``collaborative_select`` - the gradient flows through the selected sub-model only
  (the argmax itself has no gradient). This is what the paper attacks.
* ``"soft"``: ``log sum_m softmax(s / T)_m softmax(z_m)`` - the selection relaxed to a mixture.
* ``"bpda"``: the hard answer in the forward pass, the soft selection's gradient in the backward
  pass (straight-through estimator of the argmax).

``"soft"``/``"bpda"`` are the adaptive attacks of :mod:`~cda2_ext.attacks.adaptive`; they need the
gradient of the PPD heads, which the model detaches for training, so the wrapper switches that
detach off while it runs (:func:`ppd_gradients`). :class:`EnsembleLogits` is the plain ensemble
(log of the averaged probabilities, as in the DVERGE code), used for surrogates.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.collaboration import selection_score
from ..runtime import FUSED, OpsBackend, backend_of, eval_mode
from .engine import (AttackResult, ModelFn, check_attack_args, model_objective, per_sample_loss,
                     run_restarts, sign_attack)

__all__ = ["SELECTIONS", "ppd_gradients", "CollaborationLogits", "EnsembleLogits", "SubModelLogits",
           "as_model_fn", "PGDConfig", "pgd_attack", "predict_correct"]

SELECTIONS = ("hard", "soft", "bpda")


@contextlib.contextmanager
def ppd_gradients(module: object) -> Iterator[None]:
    """Let gradients reach the input through the PPD heads while inside the block.

    Training detaches the PPD head's input (``detach_ppd``) so only the BCE trains it; for an
    attacker that detach is gradient masking, so attacks on the selection switch it off. Every
    submodule with a ``detach_ppd`` attribute is restored afterwards.
    """
    mods = [m for m in module.modules() if hasattr(m, "detach_ppd")] if isinstance(module, nn.Module) else []
    saved = [m.detach_ppd for m in mods]
    for m in mods:
        m.detach_ppd = False
    try:
        yield
    finally:
        for m, s in zip(mods, saved):
            m.detach_ppd = s


def _soft_weights(s: Tensor, temperature: float) -> Tensor:
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    return torch.softmax(s.float() / temperature, dim=0)  # [M, N]


class CollaborationLogits(nn.Module):
    """A collaboration as a model function ``x [N, C, H, W] -> logits [N, K]``.

    Args:
        net: ``x -> (logits [M, N, K], ppd_logit [M, N])``.
        selection: ``"hard"`` | ``"soft"`` | ``"bpda"`` (see the module docstring).
        temperature: of the softmax over selection scores (``soft``/``bpda``).
        score: Algorithm 2's selection score, ``"ppd"`` (paper) or ``"soe"``.
        backend: the operator module of the selection; default: the one ``net`` was built with.

    :meth:`outputs` returns ``(attack_logits, hard_logits, logits, score)`` from one forward pass,
    so attacks can differentiate the relaxed output while judging the real one.
    """

    def __init__(self, net: nn.Module, selection: str = "hard", temperature: float = 1.0,
                 score: str = "ppd", backend: Optional[OpsBackend] = None) -> None:
        super().__init__()
        if selection not in SELECTIONS:
            raise ValueError(f"selection: expected one of {SELECTIONS}, got {selection!r}")
        self.net, self.selection, self.temperature = net, selection, float(temperature)
        self.score = score
        self.backend = backend if backend is not None else backend_of(net)

    def outputs(self, x: Tensor, score_grad: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(attack_logits [N, K], hard_logits [N, K], logits [M, N, K], score [M, N])``.

        The selection scores carry gradients to the input (through the PPD heads) for the relaxed
        selections and, with ``score_grad``, for the hard one too (the decision-margin attacks);
        the hard logits never carry any through the argmax.
        """
        wants = score_grad or self.selection != "hard"
        ctx = ppd_gradients(self.net) if wants else contextlib.nullcontext()
        with ctx:
            logits, ppd = self.net(x)
        s = selection_score(logits, ppd, self.score)
        _, hard = self.backend.collaborative_select(s.detach().to(logits.dtype), logits)
        if self.selection == "hard":
            return hard, hard, logits, s
        w = _soft_weights(s, self.temperature)
        if self.selection == "soft":
            logp = torch.log_softmax(logits.float(), -1)  # [M, N, K]
            return torch.logsumexp(logp + torch.log(w.clamp_min(1e-30)).unsqueeze(-1), 0), hard, logits, s
        # bpda: value = hard (w - w.detach() is exactly 0); gradient wrt the selection = soft's.
        soft_term = ((w - w.detach()).unsqueeze(-1) * logits.float()).sum(0)
        return hard.float() + soft_term, hard, logits, s

    def forward(self, x: Tensor) -> Tensor:
        return self.outputs(x)[0]


class EnsembleLogits(nn.Module):
    """``log(mean_m softmax(z_m))`` of a collaboration's sub-models (the DVERGE ensemble output)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        logits, _ = self.net(x)
        M = logits.shape[0]
        return torch.logsumexp(torch.log_softmax(logits.float(), -1), 0) - torch.log(
            torch.tensor(float(M), device=logits.device))


class SubModelLogits(nn.Module):
    """Sub-model ``m`` of a collaboration alone."""

    def __init__(self, net: nn.Module, m: int) -> None:
        super().__init__()
        self.net, self.m = net, int(m)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[0][self.m]


def as_model_fn(model: Any, mode: str = "collaboration", score: str = "ppd",
                backend: Optional[OpsBackend] = None) -> ModelFn:
    """A model function for ``model``: a collaboration-like module (returns a tuple) is wrapped
    as ``mode`` = ``"collaboration"`` (hard selection) | ``"ensemble"``; anything else is returned
    unchanged (it must already map images to logits). ``backend``: of the selection (default:
    the model's own)."""
    wrapped = isinstance(model, (CollaborationLogits, EnsembleLogits, SubModelLogits))
    if wrapped or not (isinstance(model, nn.Module) and hasattr(model, "num_models")):
        return model
    if mode == "collaboration":
        return CollaborationLogits(model, "hard", score=score, backend=backend)
    if mode == "ensemble":
        return EnsembleLogits(model)
    raise ValueError(f"mode: expected 'collaboration' or 'ensemble', got {mode!r}")


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
        model: images -> logits (wrap a collaboration with :class:`CollaborationLogits`).
        x_nat: ``[B, C, H, W]`` in ``[lo, hi]``; target ``[B]``.
        eps: L-inf radius. config: :class:`PGDConfig` (paper protocol by default).
        only_correct: do not attack samples the model already gets wrong (they stay wrong).
        generator: the RNG the restarts' seeds are drawn from (reproducible runs).

    Returns:
        Folded :class:`~cda2_ext.attacks.engine.AttackResult` (``x_adv [B, ...]``, ``correct [B]``).
    """
    cfg = (config or PGDConfig()).validate()
    check_attack_args(x_nat, target, eps, cfg.steps)
    alpha = cfg.alpha_factor * eps
    with eval_mode(model):
        start_ok = predict_correct(model, x_nat, target) if only_correct else None

        def once(idx: Tensor, x0: Tensor) -> AttackResult:
            obj = model_objective(model, target[idx], cfg.loss)
            return sign_attack(obj, x_nat[idx], target[idx], eps, alpha, cfg.steps, x_init=x0,
                               lo=lo, hi=hi, last_iterate=cfg.last_iterate, backend=backend)

        return run_restarts(once, x_nat, target, eps, cfg.restarts, random_start=cfg.random_start,
                            initially_correct=start_ok, lo=lo, hi=hi, generator=generator, backend=backend)
