"""What a training method is: an objective plugged into the one :class:`~cda2_ext.training.Trainer`.

The trainer owns everything that does not depend on the objective - data order and augmentation,
the optimiser and its schedule, mixed precision, data parallelism, non-finite-loss handling,
checkpoints, resume and logging. A method owns one batch's work: which inputs to make (an attack,
a distillation, nothing), which loss to minimise, and what to count. Its
:meth:`Method.step` calls :meth:`Trainer.update` once per optimisation step with a closure that
runs the training forward pass and returns the loss, so every method gets the same safety and
speed features for free.

A new method is a subclass with a ``name`` registered in :data:`cda2_ext.training.methods.METHODS`.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, ContextManager, Dict, Iterable, List, Optional, Protocol, Tuple

import torch
from torch import Tensor, nn

from ...models.collaboration import Collaboration
from ...runtime import OpsBackend
from ..nonfinite import fused_optimizer

__all__ = ["Method", "Tally", "TrainerView"]


class Tally:
    """Per-epoch running sums kept on the device (no sync per step), summed over processes at
    the end of the epoch. Values are float64 tensors of any shape; ``n`` counts samples.

    What a step adds after an update counts only if that update was applied: the trainer calls
    :meth:`count_only_if` with the update's device-side verdict, so a skipped update leaves no
    trace in the tallies without the host having to know."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: Dict[str, Tensor] = {}
        self._only_if: Optional[Tensor] = None

    def count_only_if(self, applied: Optional[Tensor]) -> None:
        """From now on, add values only where the 0-d bool ``applied`` holds (``None``: always)."""
        self._only_if = applied

    def add(self, key: str, value: Tensor | float | int) -> None:
        if isinstance(value, Tensor):
            v = value.detach().to(device=self.device, dtype=torch.float64)
        else:  # a fill on the device, not a copy from the host (which would synchronise a GPU)
            v = torch.full((), float(value), dtype=torch.float64, device=self.device)
        if self._only_if is not None:
            v = torch.where(self._only_if, v, 0.0)
        self.sums[key] = self.sums[key] + v if key in self.sums else v.clone()

    def add_counts(self, key: str, index: Tensor, n: int) -> None:
        """Add the histogram of ``index`` (values in ``[0, n)``) as ``[n]`` counts: what
        ``torch.bincount(index, minlength=n)`` gives, without the host read of ``index.max()``
        it makes on a GPU."""
        self.add(key, (index.reshape(-1, 1) == torch.arange(n, device=index.device)).sum(0))

    def get(self, key: str, default: float = 0.0) -> Tensor:
        return self.sums.get(key, torch.tensor(default, dtype=torch.float64))

    def mean(self, key: str, per: str = "n") -> Any:
        """``sum[key] / sum[per]`` as a Python number or list (0 when nothing was counted)."""
        n = float(self.get(per)) if per in self.sums else 0.0
        v = self.get(key).double() / max(n, 1.0)
        return v.item() if v.dim() == 0 else v.tolist()


class TrainerView(Protocol):
    """What a method uses of the :class:`~cda2_ext.training.Trainer` it runs in. The trainer
    imports the methods, so they see it through this face rather than importing it back."""

    #: the run's :class:`~cda2_ext.training.config.TrainConfig` (not named here: the config
    #: imports the methods for their defaults)
    config: Any
    model: Collaboration
    #: the model as the training forward pass calls it (wrapped for data parallelism)
    train_forward: nn.Module
    generator: torch.Generator
    backend: OpsBackend
    epoch: int

    def log(self, line: str) -> None: ...

    def autocast(self) -> ContextManager[Any]: ...

    def random_start(self, x: Tensor, copies: Optional[int]) -> Optional[Tensor]: ...

    def update(self, loss_fn: Callable[[], Tuple[Tensor, Any]], phase: str, tally: "Tally"
               ) -> Tuple[Tensor, Any]: ...


class Method:
    """Base class of the training methods (see the module docstring).

    Attributes:
        name: the ``--method`` value.
        trainer: the trainer this method runs in, as far as a method sees it
            (:class:`TrainerView`).
    """

    name: ClassVar[str] = ""
    #: Every parameter gets a gradient from every update (CDA² trains both heads). A method that
    #: leaves some unused (e.g. an ensemble ignores the PPD heads) says False, so that
    #: DistributedDataParallel does not wait for their gradients.
    uses_every_parameter: ClassVar[bool] = True

    def __init__(self, trainer: TrainerView) -> None:
        self.trainer = trainer

    def make_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The optimiser (default: ``config.optimizer`` with ``lr``, ``momentum``,
        ``weight_decay``); the trainer sets each epoch's learning rate from the schedule."""
        cfg = self.trainer.config
        if cfg.optimizer == "adam":
            return fused_optimizer(torch.optim.Adam, params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return fused_optimizer(torch.optim.SGD, params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)

    def tally_keys(self) -> List[str]:
        """The tallies one epoch keeps (a fresh :class:`Tally` each)."""
        return ["train"]

    def step(self, x: Tensor, y: Tensor, tallies: Dict[str, Tally]) -> Dict[str, Tensor]:
        """Train on one batch ``x [B, C, H, W]`` in [0, 1] (augmented; this process's shard),
        ``y [B]``; return each loss computed (0-d tensors, for progress and callbacks)."""
        raise NotImplementedError

    def epoch_metrics(self, tallies: Dict[str, Tally]) -> Dict[str, Any]:
        """The epoch's metrics from the (process-summed) tallies; must include ``"loss"``,
        ``"clean_acc"`` and ``"adv_acc"`` (``None`` where no adversarial batch was trained)."""
        raise NotImplementedError

    def summary(self, metrics: Dict[str, Any]) -> List[str]:
        """Extra parts of the one-line epoch summary."""
        return []
