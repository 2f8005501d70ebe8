"""Data parallelism across processes with ``torch.distributed`` (launched by ``torchrun``).

The contract is *one process = one shard of every global batch*:

* every rank draws the same global batch (same generator, same permutation, same augmentation and
  PGD random starts - all drawn for the global batch) and keeps its contiguous slice
  (:meth:`DistContext.shard`), so a run's randomness does not depend on the world size;
* the model is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` for the training
  forward/backward (gradients are averaged across ranks while the backward runs); the PGD attacks
  use the unwrapped module (input gradients only, nothing to synchronise);
* BatchNorm normalises over each process's shard unless ``sync_bn``: then :class:`SyncBatchNorm2d`
  normalises over the global batch on any device (torch's own ``nn.SyncBatchNorm`` refuses CPU
  tensors, and the CPU + gloo path is what CI can run). With ``sync_bn`` a run on W processes
  follows the same trajectory as one process with the same global batch, up to float rounding;
* rank 0 alone writes checkpoints, metrics and logs; the others wait at a barrier;
* a job ends with :meth:`DistContext.close` on every rank (:meth:`Trainer.close
  <cda2_ext.training.trainer.Trainer.close>` when a trainer holds the model): a barrier, then the
  process group is destroyed while the interpreter is still whole (see ``close`` for why this
  matters);
* a process that ends mid-job (killed, out of memory, its machine gone) breaks every other rank's
  next collective with a backend error (gloo: "Connection reset by peer"); :meth:`DistContext.lost_peer`
  tells such an error from others and names the lost rank where it can be known (the other one of
  two), and :meth:`DistContext.abandon` lets go of the broken group, so that the command ends with
  one line on every rank (:class:`~cda2_ext.errors.LostPeerError`) instead of a traceback.

:func:`from_environment` reads torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); a
plain ``python``/``cda2`` start is world size 1 and touches nothing of ``torch.distributed``.
"""
from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import ConfigError, LostPeerError, one_line

__all__ = ["DistContext", "from_environment", "SyncBatchNorm2d", "convert_sync_batchnorm"]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job.

    Attributes:
        rank, world_size: this process's index and the number of processes.
        local_rank: index on this node (picks ``cuda:local_rank``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        """The global batch must split into equal shards (each rank's mean is then the same
        weight of the global mean, which is what averaging the gradients assumes)."""
        if self.enabled and batch_size % self.world_size:
            raise ConfigError(f"batch_size: the global batch ({batch_size}) must be a multiple of "
                              f"the number of processes ({self.world_size})")

    def shard(self, t: Tensor) -> Tensor:
        """This rank's contiguous slice of a global batch (dim 0; ``t`` itself when alone)."""
        if not self.enabled:
            return t
        n = t.shape[0]
        if n % self.world_size:
            raise ValueError(f"a batch of {n} does not split into {self.world_size} equal shards")
        k = n // self.world_size
        return t[self.rank * k:(self.rank + 1) * k]

    def sum(self, t: Tensor) -> Tensor:
        """``t`` summed over ranks, in place (a no-op alone)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Leave the job: wait for every rank, then destroy the process group (a no-op alone, or
        when the group is already gone). Call it on every rank once the last collective is done,
        and only after dropping whatever else holds the group (a ``DistributedDataParallel``
        wrapper: its reducer keeps a reference; :meth:`Trainer.close
        <cda2_ext.training.trainer.Trainer.close>` drops the trainer's, then calls this).

        Why both steps: the gloo backend runs every collective on its own worker threads, and a
        worker may release the tensors of a finished collective after the caller's ``wait()`` has
        returned; in torch 2.13 releasing a tensor that has a Python object takes the GIL. A
        group still alive when the interpreter shuts down therefore has threads that may ask for
        the GIL during finalisation; Python ends such a thread with ``pthread_exit`` inside a
        C++ destructor, and the process aborts ("terminate called without an active exception",
        SIGABRT) - at random, depending on how the threads were scheduled. Destroying the group
        here joins those threads (torch releases the GIL while it does) before any of that. The
        barrier first makes every rank finish its last collective before any rank tears its
        connections down, so no process leaves while a peer still needs it.
        """
        if not (self.enabled and dist.is_available() and dist.is_initialized()):
            return
        dist.barrier()
        dist.destroy_process_group()

    def lost_peer(self, err: BaseException) -> Optional[LostPeerError]:
        """A one-line :class:`LostPeerError` when ``err`` says that another process of the job
        ended or stopped answering (``None`` for any other error, and when alone).

        The backends do not say which rank was lost; with two processes it is the other one, with
        more the message says that a peer was lost.
        """
        if not (self.enabled and _lost_connection(err)):
            return None
        who = (f"rank {1 - self.rank}" if self.world_size == 2 else
               "a peer process (its rank cannot be told from here)")
        return LostPeerError(f"rank {self.rank} of {self.world_size} lost {who}: "
                             f"{_backend_reason(err)}")

    def abandon(self) -> None:
        """Let go of a process group broken by a lost peer: destroy it without the barrier of
        :meth:`close`, which would wait for (or fail on) the lost rank. Never raises."""
        if not (self.enabled and dist.is_available() and dist.is_initialized()):
            return
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the group is broken; leaving is all that is left to do
            pass

    def device(self, requested: torch.device) -> torch.device:
        """One GPU per process: ``cuda:local_rank`` when the run is on CUDA."""
        if self.enabled and requested.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return requested


#: What the backends' errors say when a peer went away: its connection broke or it stopped
#: answering (gloo: "Read error ...: Connection reset by peer", "Connection closed by peer";
#: NCCL: "remote process exited", watchdog timeouts).
_LOST = re.compile(r"connection (reset|closed|refused)|closed by peer|broken pipe|remote process"
                   r"|timed out|timeout|socket", re.IGNORECASE)
_BACKEND = re.compile(r"gloo|nccl|c10d|process ?group|distributed", re.IGNORECASE)


def _lost_connection(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because a peer is gone."""
    text = str(err)
    if isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and bool(_BACKEND.search(text)) and bool(_LOST.search(text))


def _backend_reason(err: BaseException) -> str:
    """The backend's reason without its source location (``[.../pair.cc:537] ``) or advice."""
    text = re.sub(r"^\s*\[[^\]]*\]\s*", "", one_line(err, limit=400))
    return text.split(". ")[0].rstrip(".")


def from_environment(backend: Optional[str] = None) -> DistContext:
    """The job's :class:`DistContext`; initialises the default process group under torchrun.

    ``backend``: ``"nccl"`` for CUDA, ``"gloo"`` for CPU; ``None`` picks by device availability.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        # Before the group exists: DistributedDataParallel's constructor imports
        # torch.distributed.nn, whose functions take ``group=group.WORLD`` as a default argument.
        # Imported after init_process_group, those defaults hold the default group for the rest
        # of the process, so DistContext.close() could not free it (nor join its threads).
        # Imported now, they hold None (= the default group when called).
        importlib.import_module("torch.distributed.nn")
        dist.init_process_group(backend=backend)
    return DistContext(rank, world, local)


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is again an all-reduce of the incoming gradients: the
    global statistics depend on every rank's inputs, so every rank's loss reaches every input."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # type: ignore[override]
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics cover the global batch, on CPU or CUDA.

    One all-reduce per layer carries ``[sum, sum of squares, count]`` per channel; outside
    training, or alone, it is exactly :class:`~torch.nn.BatchNorm2d`.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        C = x.shape[1]
        xf = x.float()
        n = torch.full((1,), float(x.numel() // C), device=x.device)
        stats = _SumAcrossRanks.apply(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), n]))
        count = stats[-1]
        mean = stats[:C] / count
        var = (stats[C:2 * C] / count - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * unbiased)
        y = (xf - mean.view(1, C, 1, 1)) * torch.rsqrt(var.view(1, C, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` (packed ones included) in ``module`` by
    :class:`SyncBatchNorm2d`, keeping its parameters and running statistics (state-dict keys are
    unchanged)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SyncBatchNorm2d):
            sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats).to(
                device=child.weight.device if child.affine else None)
            sync.load_state_dict(child.state_dict())
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module
