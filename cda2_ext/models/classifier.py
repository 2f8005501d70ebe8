"""A collaboration as a classifier: modules that map images to ``[B, K]`` logits.

Every attack in :mod:`cda2_ext.attacks`, and torchattacks, AutoAttack and RobustBench, expect a
model ``x [B, C, H, W] -> logits [B, K]``. A collaboration (``x -> (logits [M, B, K], ppd_logit
[M, B])``, e.g. :class:`~cda2_ext.models.Collaboration`) is not one; these adapters make it one:

* :class:`CollaborationLogits` -- Algorithm 2's answer, the logits of the sub-model the selection
  score picks (``selection="hard"``, what the paper attacks), or the selection relaxed for the
  adaptive attacks (``"soft"``, ``"bpda"``);
* :class:`EnsembleLogits` -- the plain ensemble, ``log mean_m softmax(z_m)`` (the DVERGE output);
* :class:`SubModelLogits` -- one sub-model alone.

``Collaboration.as_classifier(score=...)`` and ``Collaboration.as_ensemble_classifier()`` build
the first two; :func:`as_model_fn` is the rule every attack applies to the model it is given (a
collaboration is attacked through its Algorithm-2 decision).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from ..runtime import OpsBackend, backend_of
from .selection import selection_score

__all__ = ["SELECTIONS", "ppd_gradients", "is_collaboration", "CollaborationLogits", "EnsembleLogits",
           "SubModelLogits", "as_model_fn"]

#: How :class:`CollaborationLogits` turns the selection into one answer.
SELECTIONS = ("hard", "soft", "bpda")


def is_collaboration(model: object) -> bool:
    """A collaboration-like module (``x -> (logits [M, B, K], ppd_logit [M, B])``, with
    ``num_models``), as opposed to a classifier ``x -> logits [B, K]``."""
    return isinstance(model, nn.Module) and hasattr(model, "num_models")


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
    """A collaboration as a classifier ``x [N, C, H, W] -> logits [N, K]``.

    Args:
        net: ``x -> (logits [M, N, K], ppd_logit [M, N])``.
        selection: ``"hard"`` (Algorithm 2: the logits of the sub-model with the highest score,
            through the fused ``collaborative_select``; the gradient flows through the selected
            sub-model only, the argmax itself has none), ``"soft"`` (``log sum_m softmax(s /
            T)_m softmax(z_m)``, the selection relaxed to a mixture) or ``"bpda"`` (the hard
            answer forward, the soft selection's gradient backward). ``"soft"`` and ``"bpda"``
            need the gradient of the PPD heads, which the model detaches for training, so the
            adapter switches that detach off while it runs (:func:`ppd_gradients`).
        temperature: ``T`` of the softmax over selection scores (``soft``/``bpda``).
        score: Algorithm 2's selection score, a name of
            :data:`~cda2_ext.models.selection.SCORES` (``"ppd"``, the paper's, by default).
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
    """``log(mean_m softmax(z_m))`` of a collaboration's sub-models (the DVERGE ensemble output):
    a classifier ``x -> [N, K]`` whose argmax is the ensemble's averaged-probability answer."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        logits, _ = self.net(x)
        M = logits.shape[0]
        return torch.logsumexp(torch.log_softmax(logits.float(), -1), 0) - torch.log(
            torch.tensor(float(M), device=logits.device))


class SubModelLogits(nn.Module):
    """Sub-model ``m`` of a collaboration alone, as a classifier ``x -> [N, K]``."""

    def __init__(self, net: nn.Module, m: int) -> None:
        super().__init__()
        self.net, self.m = net, int(m)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[0][self.m]


def as_model_fn(model: Any, mode: str = "collaboration", score: str = "ppd",
                backend: Optional[OpsBackend] = None) -> Any:
    """A classifier for ``model``: a collaboration (:func:`is_collaboration`) is wrapped as
    ``mode`` = ``"collaboration"`` (Algorithm 2 with ``score``, hard selection) | ``"ensemble"``;
    anything else (an adapter already, or any images -> logits function) is returned unchanged.
    ``backend``: of the selection (default: the model's own)."""
    if not is_collaboration(model):
        return model
    if mode == "collaboration":
        return CollaborationLogits(model, "hard", score=score, backend=backend)
    if mode == "ensemble":
        return EnsembleLogits(model)
    raise ValueError(f"mode: expected 'collaboration' or 'ensemble', got {mode!r}")
