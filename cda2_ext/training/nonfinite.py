"""Never apply a non-finite update, without asking the device after every step.

The guarantee: an update whose loss is non-finite is never applied, and nothing
non-finite is saved. Checking that on the host costs a device synchronisation per update, which
on a GPU stalls the queue of kernels the host has launched ahead. :class:`UpdateGuard`
keeps the guarantee with no host read in the step:

* ``ok`` - the loss is finite on every process (summed over processes on the device, so all of
  them decide together) and, when the run stops on a non-finite loss, no earlier update since the
  last host read was non-finite - is a 0-d bool tensor on the device;
* the optimiser step is a no-op on the device where ``not ok``: the fused SGD/Adam kernels take a
  ``found_inf`` tensor (the mechanism ``torch.amp.GradScaler`` uses) and then change neither the
  parameters nor the momentum/moment buffers nor Adam's step count; with an fp16 gradient scaler,
  a non-finite loss is made one of the non-finite gradients the scaler already skips;
* BatchNorm's running statistics, which the forward pass moves, are put back where ``not ok``
  (``torch.where`` against a copy taken before the forward);
* the first non-finite update (which one, its loss) is recorded on the device and read by the
  host lazily (:meth:`UpdateGuard.first_failure`): the trainer reads it every
  ``Trainer.check_every`` steps and at the end of every epoch, before any checkpoint is written.

An optimiser that cannot skip on the device (neither fused SGD nor fused Adam/AdamW) is stepped
only after a host read of ``ok`` - the behaviour of a plain optimiser, one synchronisation per update.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .distributed import DistContext

__all__ = ["UpdateGuard", "device_skippable", "fused_optimizer"]

_FUSED_KINDS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def device_skippable(optimizer: torch.optim.Optimizer) -> bool:
    """True when ``optimizer.step()`` honours a ``found_inf`` tensor (torch's fused kernels) and
    its first step can be skipped exactly (SGD without dampening: see
    :meth:`UpdateGuard._prepare_state`)."""
    return (bool(getattr(optimizer, "_step_supports_amp_scaling", False))
            and not any(group.get("dampening", 0) for group in optimizer.param_groups))


def fused_optimizer(kind: type, params: List[nn.Parameter], **options: object
                    ) -> torch.optim.Optimizer:
    """``kind(params, **options)`` with torch's fused kernel where it has one for these parameters
    (one kernel per step on a GPU, and a step the device can skip: :class:`UpdateGuard`), else
    the default implementation."""
    params = list(params)
    fused = (issubclass(kind, _FUSED_KINDS) and bool(params)
             and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params))
    return kind(params, **options, fused=True) if fused else kind(params, **options)


class UpdateGuard:
    """Applies each optimiser update only where its loss is finite, decided on the device.

    Per update: :meth:`begin` before the forward pass, :meth:`decide` on the loss, the backward
    pass, then :meth:`step`. :meth:`first_failure` is the one host read, as rarely as wanted. The
    model and optimiser are passed per call (whatever the trainer holds then: a benchmark may swap
    them).

    Args:
        dist: the processes that decide together.
        stop: the run stops at the first non-finite loss (``on_nonfinite="stop"``): from then on
            every update is a no-op until the host reads :meth:`first_failure` and raises.
    """

    def __init__(self, dist: DistContext, stop: bool) -> None:
        self.dist, self.stop = dist, stop
        self._saved: List[Tensor] = []          # BatchNorm's buffers before this update's forward
        self._what: List[Any] = []              # what each update since the last read was
        self._first: Optional[Tensor] = None    # index into _what of the first non-finite one
        self._first_loss: Optional[Tensor] = None

    def begin(self, model: nn.Module) -> None:
        """Remember ``model``'s buffers (BatchNorm statistics: a few KB) before the forward."""
        buffers = list(model.buffers())
        if [b.shape for b in buffers] != [s.shape for s in self._saved]:
            self._saved = [b.detach().clone() for b in buffers]
        elif buffers:
            torch._foreach_copy_(self._saved, buffers)

    def decide(self, loss: Tensor, what: Any) -> Tensor:
        """``ok``: a 0-d bool on the device (see the module docstring). ``what`` describes this
        update for the message of a run that stops ("the adversarial loss ... at epoch 2, step
        5 of 9")."""
        value = loss.detach().reshape(())
        finite = torch.isfinite(value).to(torch.float32).reshape(1)
        ok = self.dist.sum(finite).reshape(()) == self.dist.world_size
        if not self.stop:  # skipping: nothing to report, the tallies count the skipped updates
            return ok
        if self._first is None:
            self._first = torch.full((), -1, dtype=torch.int64, device=value.device)
            self._first_loss = torch.zeros((), dtype=torch.float64, device=value.device)
        ok = ok & (self._first < 0)  # stopped: nothing after the first bad update is applied either
        new = (self._first < 0) & ~ok
        self._first.copy_(torch.where(new, len(self._what), self._first))
        self._first_loss.copy_(torch.where(new, value.to(torch.float64), self._first_loss))
        self._what.append(what)
        return ok

    def step(self, ok: Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler) -> None:
        """``optimizer``'s step (through ``scaler``) where ``ok``, else nothing, and ``model``'s
        buffers put back where not (gradients must be computed already)."""
        if not device_skippable(optimizer):   # a host read: one per update, as plain optimisers need
            if bool(ok):
                scaler.step(optimizer)
                scaler.update()
        elif scaler.is_enabled():  # fp16: the scaler skips on device when a gradient is not finite
            _prepare_state(optimizer)
            params = (p for group in optimizer.param_groups for p in group["params"])
            grad = next((p.grad for p in params if p.grad is not None), None)
            if grad is not None:
                grad.add_(torch.where(ok, 0.0, math.inf).to(grad.dtype))
            scaler.step(optimizer)
            scaler.update()
        else:
            _prepare_state(optimizer)
            optimizer.grad_scale = None  # type: ignore[attr-defined]
            optimizer.found_inf = (~ok).to(torch.float32)  # type: ignore[attr-defined]
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]
        for b, saved in zip(model.buffers(), self._saved):  # BatchNorm statistics back where not ok
            torch.where(ok, b, saved, out=b)

    def first_failure(self) -> Optional[Tuple[Any, float]]:
        """``(what, loss)`` of the first update with a non-finite loss since the last call, or
        ``None``; forgets them. One host read (a device synchronisation on a GPU); none, and always
        ``None``, when the run skips such updates instead of stopping."""
        if self._first is None or not self._what:
            return None
        index = int(self._first)
        found = (self._what[index], float(self._first_loss)) if index >= 0 else None
        self._first.fill_(-1)
        self._what.clear()
        return found


def _prepare_state(optimizer: torch.optim.Optimizer) -> None:
    """Make a fused step skippable from the first update on, and runnable after a load.

    Fused SGD creates its momentum buffers uninitialised on the first step and fills them in the
    kernel, which a skipped step never runs; zero buffers give the same first step
    (``momentum * 0 + grad``, without dampening: :func:`device_skippable`). Fused Adam wants its
    step counts on the parameters' device (a checkpoint keeps them on the CPU).
    """
    for group in optimizer.param_groups:
        sgd_momentum = isinstance(optimizer, torch.optim.SGD) and group.get("momentum", 0) != 0
        for p in group["params"]:
            state = optimizer.state[p]
            if sgd_momentum and state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            step = state.get("step")
            if isinstance(step, Tensor) and step.device != p.device:
                state["step"] = step.to(p.device)
