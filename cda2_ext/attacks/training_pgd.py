"""The PGD of Algorithm 1 (training), as two objectives for the one sign-step loop.

Both attacks are :func:`~cda2_ext.attacks.engine.sign_attack` (the loop that evaluation uses too)
with ``track_worst=False`` - training follows the paper and trains on the last iterate - and a
fused random start drawn from the trainer's generator:

* :func:`per_model_pgd` - ``x_adv [M, B, C, H, W]``, variant ``m`` fed to sub-model ``m`` only and
  scored by m's cross-entropy (:func:`per_model_ce_objective`). Sub-model m's output depends
  on ``x_adv[m]`` alone, so the gradient of the summed losses w.r.t. ``x_adv[m]`` is exactly
  ``m``'s own gradient: the M attacks of Alg. 1 lines 3-4 advance together, one forward, one
  backward and one fused sign step over ``[M, B, ...]`` per step. The M variants are the
  engine's copy axis ``G``.
* :func:`collaboration_pgd` - the cross-entropy of the sub-model the collaboration selects
  (Algorithm 2) on a shared ``x_adv [B, C, H, W]`` (Alg. 1 line 17,
  :func:`selected_ce_objective`); the gradient flows through ``collaborative_select`` into the
  chosen logits.

BatchNorm during the attack (``bn``, :func:`attack_mode`): ``"eval"`` (default) uses the running
statistics, so the attack sees the model as inference does and neither depends on the other
images of the batch nor moves the statistics; ``"train"`` is what the authors' code does (the
whole step runs in train mode): batch statistics, and every attack step's forward pass also
updates the running statistics. The paper says neither. Random start: on by default (Madry et
al.'s PGD; the authors' default run starts at the clean image, ``random_start=False``).
Gradients are taken w.r.t. the input only, so no ``.grad`` is left on parameters.

Opt-in (``CDA2_CUDA_GRAPHS=1``): on a GPU, an attack with BatchNorm in eval mode is replayed from a
CUDA graph (:mod:`.graphs`) - the same function, recorded once per shape.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from ..models.collaboration import collaborate
from ..runtime import FUSED, OpsBackend, cuda_graphs, eval_mode
from .engine import Objective, ce_loss, sign_attack
from .graphs import graphed

__all__ = ["BN_MODES", "attack_mode", "per_model_ce_objective", "selected_ce_objective",
           "per_model_pgd", "collaboration_pgd"]

#: BatchNorm mode of the model during the training attack (see the module docstring).
BN_MODES = ("eval", "train")


@contextlib.contextmanager
def attack_mode(model: nn.Module, bn: str = "eval") -> Iterator[None]:
    """The model's mode while the training PGD runs (``bn`` in :data:`BN_MODES`), restored after."""
    if bn == "eval":
        with eval_mode(model):
            yield
        return
    if bn != "train":
        raise ValueError(f"bn: expected one of {BN_MODES}, got {bn!r}")
    was = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was)


def _attacked(model: nn.Module, bn: str) -> nn.Module:
    """What the attack differentiates: in eval mode, ``model.frozen()`` where offered (the same
    function and input gradient with less work: BatchNorm folded, zero-gradient samples skipped,
    :mod:`cda2_ext.models.layouts`), else the model itself."""
    frozen = getattr(model, "frozen", None)
    return frozen() if bn == "eval" and callable(frozen) else model


def per_model_ce_objective(model: nn.Module, target: Tensor) -> Objective:
    """``x [M, B, ...] -> (CE of sub-model m at x[m] [M, B], logits [M, B, K])``."""
    def objective(x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        logits, _ = model(x)  # [M, B, K]; sub-model m reads x[m] only
        return ce_loss(logits, target.expand(logits.shape[:2])), logits.detach()
    return objective


def selected_ce_objective(model: nn.Module, target: Tensor, score: str = "ppd",
                            backend: OpsBackend = FUSED) -> Objective:
    """``x [1, B, ...] -> (CE of Algorithm 2's answer [1, B], its logits [1, B, K])``."""
    def objective(x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        logits, ppd = model(x[0])
        _, chosen = collaborate(logits, ppd, score, backend)
        chosen = chosen.unsqueeze(0)
        return ce_loss(chosen, target.unsqueeze(0)), chosen.detach()
    return objective


def _start(x_nat: Tensor, eps: float, copies: Optional[int], random_start: bool, lo: float,
           hi: float, generator: Optional[torch.Generator], backend: OpsBackend) -> Tensor:
    """``[copies or 1, B, ...]``: the fused uniform start in the ball, or ``x_nat`` itself."""
    if random_start and eps > 0:
        x0 = backend.pgd_random_start(x_nat, eps, lo, hi, num_models=copies, generator=generator)
    else:
        x0 = x_nat.expand(copies or 1, *x_nat.shape) if copies else x_nat
    return x0 if copies else x0.unsqueeze(0)


def _per_model_attack(model: nn.Module, eps: float, alpha: float, steps: int, lo: float, hi: float,
                      backend: OpsBackend, bn: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``(x_nat, target, x0 [M, B, ...]) -> x_adv``: the M per-model PGDs from ``x0``."""
    def attack(x_nat: Tensor, target: Tensor, x0: Tensor) -> Tensor:
        return sign_attack(per_model_ce_objective(_attacked(model, bn), target), x_nat, target,
                           eps, alpha, steps, x_init=x0, lo=lo, hi=hi, track_worst=False,
                           backend=backend).x_adv
    return attack


def _collaboration_attack(model: nn.Module, eps: float, alpha: float, steps: int, lo: float,
                          hi: float, score: str, backend: OpsBackend, bn: str
                          ) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``(x_nat, target, x0 [1, B, ...]) -> x_adv [B, ...]``: PGD on the collaboration's answer."""
    def attack(x_nat: Tensor, target: Tensor, x0: Tensor) -> Tensor:
        objective = selected_ce_objective(_attacked(model, bn), target, score, backend)
        return sign_attack(objective, x_nat, target, eps, alpha, steps, x_init=x0, lo=lo, hi=hi,
                           track_worst=False, backend=backend).x_adv[0]
    return attack


def _run(model: nn.Module, bn: str, make: Callable[..., Callable[[Tensor, Tensor, Tensor], Tensor]],
         settings: Tuple[Any, ...], x_nat: Tensor, target: Tensor, x0: Tensor) -> Tensor:
    """``make(model, *settings)(x_nat, target, x0)`` in the attack's mode; replayed from a CUDA graph
    where :func:`~cda2_ext.runtime.cuda_graphs` allows and BatchNorm is in eval mode (a warm-up or
    replay in train mode would move the running statistics): :mod:`.graphs`."""
    with attack_mode(model, bn):
        if bn == "eval" and cuda_graphs(x_nat.device):
            attack = graphed(model, (make, *settings), lambda: make(model, *settings))
        else:
            attack = make(model, *settings)
        return attack(x_nat, target, x0)


def per_model_pgd(model: nn.Module, x_nat: Tensor, target: Tensor, eps: float, alpha: float,
                  steps: int, *, random_start: bool = True, lo: float = 0.0, hi: float = 1.0,
                  generator: Optional[torch.Generator] = None, x_init: Optional[Tensor] = None,
                  backend: OpsBackend = FUSED, bn: str = "eval") -> Tensor:
    """M PGD variants at once, ``x_adv[m]`` attacking sub-model ``m`` (Alg. 1 lines 3-4).

    ``model`` must expose ``num_models`` and accept ``[M, B, C, H, W]``. ``x_init``: the start
    ``[M, B, ...]`` (e.g. this process's slice of a global random start), instead of drawing one.
    ``bn``: BatchNorm mode during the attack (:func:`attack_mode`).
    Returns the detached ``[M, B, C, H, W]``.
    """
    x_nat = x_nat.detach()
    x0 = x_init if x_init is not None else _start(x_nat, eps, model.num_models, random_start, lo,
                                                  hi, generator, backend)
    return _run(model, bn, _per_model_attack, (eps, alpha, steps, lo, hi, backend, bn), x_nat,
                target, x0)


def collaboration_pgd(model: nn.Module, x_nat: Tensor, target: Tensor, eps: float, alpha: float,
                      steps: int, *, score: str = "ppd", random_start: bool = True,
                      lo: float = 0.0, hi: float = 1.0, generator: Optional[torch.Generator] = None,
                      x_init: Optional[Tensor] = None, backend: OpsBackend = FUSED,
                      bn: str = "eval") -> Tensor:
    """PGD against the collaboration's own answer (Alg. 1 line 17). Returns ``[B, C, H, W]``.

    ``x_init``: the start ``[B, ...]``, instead of drawing one. ``bn``: see :func:`attack_mode`."""
    x_nat = x_nat.detach()
    x0 = (x_init.unsqueeze(0) if x_init is not None
          else _start(x_nat, eps, None, random_start, lo, hi, generator, backend))
    return _run(model, bn, _collaboration_attack, (eps, alpha, steps, lo, hi, score, backend, bn),
                x_nat, target, x0)
