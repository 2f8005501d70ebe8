"""Where and how the model runs: the operator backend, the device, and eval mode for attacks.

* :data:`FUSED` / :data:`REFERENCE` and :func:`ops_backend` - the one place where the fused
  kernels (:mod:`cda2_ext.ops`) or their plain-PyTorch twins (:mod:`cda2_ext.ops.reference`) are
  chosen. Both modules expose the same functions with the same signatures, so code that runs the
  CDA² operators calls ``backend.collaboration_loss(...)`` on the chosen one.

  One choice, three names, each at its own level: ``unfused`` is the user's option (``--unfused``
  and the field of the stored configs, kept so that earlier checkpoints load); ``fused=`` is the
  argument that builds a model (:class:`~cda2_ext.models.Collaboration`) from it; ``backend`` is
  the module chosen. The choice is made once, when the model is built, and travels with it as
  ``model.backend``: code that holds the model reads it there (:func:`backend_of`, also through a
  wrapper's ``.net``), and a function of bare tensors takes ``backend`` from its caller, with
  :data:`FUSED` as the default for a caller that has made no choice.
* :func:`resolve_device` - ``"auto"`` / ``"cpu"`` / ``"cuda[:N]"`` to a usable ``torch.device``.
* :func:`eval_mode` - BatchNorm on running statistics while an attack runs, restored afterwards.
* :func:`sync_free` - whether code on a device must avoid host reads of device data and
  data-dependent shapes (a GPU: yes), and :class:`HostReads`, which lists the ones that happen;
  :func:`cuda_graphs` - whether the training attacks replay CUDA graphs (opt-in).
"""
from __future__ import annotations

import contextlib
import os
import traceback
from types import ModuleType
from typing import Any, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import ops
from .ops import reference
from .errors import ConfigError

__all__ = ["OpsBackend", "FUSED", "REFERENCE", "ops_backend", "backend_of", "backend_name", "resolve_device",
           "eval_mode", "sync_free", "sync_free_mode", "cuda_graphs", "cuda_graphs_mode", "HostReads",
           "SYNC_FREE", "CUDA_GRAPHS"]

#: A module with the CDA² operator functions: :data:`FUSED` or :data:`REFERENCE`.
OpsBackend = ModuleType
FUSED: OpsBackend = ops
REFERENCE: OpsBackend = reference


def ops_backend(fused: bool = True) -> OpsBackend:
    """:data:`FUSED` (the compiled kernels, or their fallback where none is built) or
    :data:`REFERENCE` (the plain-PyTorch twins, the ``--unfused`` path)."""
    return FUSED if fused else REFERENCE


def backend_of(model: object) -> OpsBackend:
    """The backend ``model`` was built with (its ``backend`` attribute, as on
    :class:`~cda2_ext.models.Collaboration`, or that of the collaboration it wraps as ``.net``);
    :data:`FUSED` for anything that does not say."""
    for obj in (model, getattr(model, "net", None)):
        found = getattr(obj, "backend", None)
        if found is FUSED or found is REFERENCE:
            return found
    return FUSED


def backend_name(backend: OpsBackend) -> str:
    """``"fused"`` or ``"reference"``, for logs and results."""
    return "fused" if backend is FUSED else "reference"


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise ``torch.device(name)``, checked.

    Raises :class:`~cda2_ext.errors.ConfigError` (naming ``device``) for a malformed name or a
    device this machine does not have, before any work starts.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device: expected auto, cpu or cuda[:N], got {name!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: CUDA is not available on this machine, got {name!r}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {name!r} does not exist ({torch.cuda.device_count()} "
                              "CUDA device(s) here)")
    elif dev.type != "cpu":
        raise ConfigError(f"device: only cpu and cuda are supported, got {name!r}")
    return dev


@contextlib.contextmanager
def eval_mode(model: object) -> Iterator[None]:
    """Eval mode for every ``nn.Module`` reachable as ``model`` or ``model.net``/``model.model``,
    restored afterwards.

    Attacks run the model in eval mode so that BatchNorm uses running statistics: the attack
    then neither depends on nor perturbs the batch statistics of the training step.
    """
    mods = [m for m in (model, getattr(model, "net", None), getattr(model, "model", None))
            if isinstance(m, nn.Module)]
    states = [m.training for m in mods]
    for m in mods:
        m.eval()
    try:
        yield
    finally:
        for m, s in zip(mods, states):
            m.train(s)


# ----- host reads of device data -----------------------------------------------------------------
class _Switch:
    """An on/off setting with an automatic default: forced by a context (:meth:`forcing`), else by
    the environment variable ``env`` (``1``/``0``; unset or ``auto``: the default)."""

    def __init__(self, env: str) -> None:
        self.env = env
        self._context: Optional[bool] = None  # an attribute, not a ContextVar: torch.compile reads it

    def forced(self) -> Optional[bool]:
        """``True``/``False`` where forced, ``None`` for the default."""
        forced = self._context
        if forced is None:
            env = os.environ.get(self.env, "auto")
            forced = None if env == "auto" else env not in ("", "0")
        return forced

    @contextlib.contextmanager
    def forcing(self, enabled: Optional[bool] = True) -> Iterator[None]:
        """Inside, the setting is ``enabled`` (``None``: its default, from the environment)."""
        outer, self._context = self._context, enabled
        try:
            yield
        finally:
            self._context = outer


#: ``CDA2_SYNC_FREE``: see :func:`sync_free`; :func:`sync_free_mode` forces it in a context.
SYNC_FREE = _Switch("CDA2_SYNC_FREE")
#: ``CDA2_CUDA_GRAPHS``: see :func:`cuda_graphs`; :func:`cuda_graphs_mode` forces it in a context.
CUDA_GRAPHS = _Switch("CDA2_CUDA_GRAPHS")
sync_free_mode = SYNC_FREE.forcing
cuda_graphs_mode = CUDA_GRAPHS.forcing


def sync_free(device: torch.device) -> bool:
    """Whether work on ``device`` must not read device data on the host, nor take shapes from it.

    On a GPU a host read (``.item()``, ``nonzero``, a shape that depends on values) waits for every
    kernel queued before it, so the host stops launching ahead; CUDA graphs cannot hold one at all.
    On a CPU a host read costs nothing (the ops have run already), so code may use values to skip
    work there (the frozen snapshot's backward skips zero-gradient samples). Default: sync-free on
    every device but the CPU. ``CDA2_SYNC_FREE=1`` / ``0`` (or :func:`sync_free_mode`) force it
    everywhere / nowhere: ``1`` runs the GPU's code path on a CPU (the tests), ``0`` the
    host-reading path on a GPU (benchmarks).
    """
    forced = SYNC_FREE.forced()
    return device.type != "cpu" if forced is None else forced


def cuda_graphs(device: torch.device) -> bool:
    """Whether the training attacks replay CUDA graphs on ``device`` (opt-in: ``CDA2_CUDA_GRAPHS=1``
    or :func:`cuda_graphs_mode`; :mod:`cda2_ext.attacks.graphs`). Only ever on a CUDA device, and
    only where :func:`sync_free` holds (a graph cannot hold a host read): elsewhere the attacks
    run as they are, whatever the setting."""
    return bool(CUDA_GRAPHS.forced()) and device.type == "cuda" and sync_free(device)


#: Operators that read device data on the host on a GPU (each waits for the device): every
#: ``.item()``/``float()``/``bool()`` goes through ``_local_scalar_dense``; the others size their
#: output from the data (``bincount`` reads the maximum).
_HOST_READ_OPS = frozenset({"_local_scalar_dense", "nonzero", "bincount", "masked_select", "_unique",
                            "_unique2", "unique_dim", "unique_consecutive", "equal",
                            "is_nonzero", "repeat_interleave", "masked_scatter", "histc"})
#: Functions whose host reads are not of device data: draws from CPU generators.
_HOST_SIDE = ("draw_seed", "epoch_layer")


def _bool_index(args: Tuple[Any, ...]) -> bool:
    """``x[mask]``: an index list holding a bool tensor (its size is the mask's count)."""
    return any(isinstance(a, (list, tuple)) and any(
        isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in a)
        for a in args)


class HostReads(TorchDispatchMode):
    """Records every operator that would read device data on the host on a GPU.

    The CPU stand-in for ``torch.cuda.set_sync_debug_mode("error")``: on a CPU nothing
    synchronises, but the same operators run, so a step that records nothing here has no host
    read of device data on a GPU either (except inside compiled kernels: the fused ops' CUDA label
    checks are covered by :func:`~cda2_ext.ops._checks.labels_checked`). Host reads of CPU generators
    (``draw_seed``) are not device reads and are left out. ``reads``: ``(op, where)`` pairs,
    ``where`` the innermost ``cda2_ext`` frames.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads: List[Tuple[str, str]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Tuple[Any, ...] = (),
                           kwargs: Optional[dict] = None) -> Any:
        name = func._schema.name.split("::")[-1]
        if name in _HOST_READ_OPS or (name.startswith("index") and _bool_index(args)):
            frames = [f for f in traceback.extract_stack()[:-1] if "cda2_ext" in f.filename]
            if not any(f.name in _HOST_SIDE for f in frames):
                where = " <- ".join(f"{f.filename.rsplit('cda2_ext/', 1)[-1]}:{f.lineno} {f.name}"
                                    for f in reversed(frames[-3:]))
                self.reads.append((name, where))
        return func(*args, **(kwargs or {}))
