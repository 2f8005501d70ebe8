"""Where and how the model runs: the operator backend, the device, and eval mode for attacks.

* :data:`FUSED` / :data:`REFERENCE` and :func:`ops_backend` - the one place where the fused
  kernels (:mod:`cda2_ext.ops`) or their plain-PyTorch twins (:mod:`cda2_ext.reference`) are
  chosen. Both modules expose the same functions with the same signatures, so code that runs the
  CDA² operators takes ``backend: OpsBackend`` (default :data:`FUSED`) and calls
  ``backend.collaboration_loss(...)``; a choice is made once (from a ``fused`` flag) and passed
  down, never re-derived or mutated later.
* :func:`resolve_device` - ``"auto"`` / ``"cpu"`` / ``"cuda[:N]"`` to a usable ``torch.device``.
* :func:`eval_mode` - BatchNorm on running statistics while an attack runs, restored afterwards.
"""
from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Iterator

import torch
from torch import nn

from . import ops, reference
from .errors import ConfigError

__all__ = ["OpsBackend", "FUSED", "REFERENCE", "ops_backend", "backend_of", "backend_name", "resolve_device",
           "eval_mode"]

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
