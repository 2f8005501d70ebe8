"""CUDA graphs for the training attacks (opt-in: ``CDA2_CUDA_GRAPHS=1``).

A PGD-10 step of a ResNet-20 collaboration launches thousands of small kernels; at the paper's
batch sizes a GPU finishes most of them faster than Python launches them. A CUDA graph records
the launches of one whole attack once and replays them with one call. What that needs, and why
the training attacks can have it:

* no host read of device data and no data-dependent shape inside (see
  :func:`~cda2_ext.runtime.sync_free`, which :func:`~cda2_ext.runtime.cuda_graphs` requires);
* inputs at fixed addresses: each call copies its tensors into the graph's own;
* no randomness inside: the random start is drawn before, from the trainer's generator;
* no side effects that a warm-up run would repeat: only attacks with BatchNorm in eval mode are
  graphed (in train mode every forward moves the running statistics);
* weights read where they live: the frozen snapshot folds BatchNorm into the convolutions inside
  the recorded function, reading the parameters in place, so a replay after an optimiser step
  (which updates them in place) sees the new weights;
* no autocast (its weight cache is not capturable): under ``amp`` the attacks run as they are.

:class:`GraphedFunction` falls back to calling the function where graphs do not apply (not CUDA,
setting off), so the same code runs everywhere and is checked on a CPU by calling through.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Hashable, List, Tuple

import torch
from torch import Tensor

from ..runtime import cuda_graphs

__all__ = ["GraphedFunction", "graphed"]

#: Untimed runs before a capture (on a side stream, as torch.cuda.graph's documentation asks):
#: lazy initialisation (cuBLAS/cuDNN handles, autotuning) must not happen while recording.
WARMUP = 2

_Signature = Tuple[Tuple[torch.Size, torch.dtype, torch.device], ...]


class GraphedFunction:
    """``fn(*tensors) -> Tensor``, replayed from one CUDA graph per input signature.

    ``fn`` must be a pure function of its tensor inputs and of state read in place (see the
    module docstring). Called where :func:`~cda2_ext.runtime.cuda_graphs` is off for the inputs'
    device, it is ``fn`` itself.
    """

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn = fn
        self._graphs: Dict[_Signature, Tuple[List[Tensor], Tensor, Any]] = {}

    def __call__(self, *inputs: Tensor) -> Tensor:
        if not (cuda_graphs(inputs[0].device) and not torch.is_autocast_enabled("cuda")):
            return self.fn(*inputs)
        key = tuple((t.shape, t.dtype, t.device) for t in inputs)
        if key not in self._graphs:
            self._graphs[key] = self._capture(inputs)
        static_in, static_out, graph = self._graphs[key]
        for dst, src in zip(static_in, inputs):
            dst.copy_(src)
        graph.replay()
        return static_out.clone()  # the next replay overwrites static_out

    def _capture(self, inputs: Tuple[Tensor, ...]) -> Tuple[List[Tensor], Tensor, Any]:
        static_in = [t.detach().clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self.fn(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.fn(*static_in)
        return static_in, static_out, graph


# One set of graphs per (model, attack settings), forgotten with the model.
_CACHE: "weakref.WeakKeyDictionary[Any, Dict[Hashable, GraphedFunction]]" = (
    weakref.WeakKeyDictionary())


def graphed(owner: Any, key: Hashable, make: Callable[[], Callable[..., Tensor]]) -> GraphedFunction:
    """The :class:`GraphedFunction` of ``owner`` (e.g. the model) for ``key`` (the attack's
    settings), made from ``make()`` on first use."""
    per_owner = _CACHE.setdefault(owner, {})
    if key not in per_owner:
        per_owner[key] = GraphedFunction(make())
    return per_owner[key]
