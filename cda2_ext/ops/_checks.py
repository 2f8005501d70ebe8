"""Argument checks shared by the fused ops, their fake (meta) kernels and the reference twins.

Only metadata is inspected here (shapes, dtypes, devices, scalars), so the checks are cheap and
work on fake tensors under ``torch.compile``. The one data-dependent check, labels in range, is
:func:`labels_in_range`; the compiled kernels do it themselves before touching logits, so only
the reference path calls it. The C++ side repeats the metadata checks (``csrc/checks.h``)
because ``torch.ops.cda2_ext.*`` can be called directly; the two must agree, and
``python_tests/test_bad_inputs.py::test_python_and_cpp_checks_agree`` runs one table of bad inputs
through both (same exception type, the same argument named first).

Reading labels is a host read of device data (a device synchronisation on a GPU), so a caller
that checked its labels once may run its ops inside :func:`labels_checked`: the trainer does, for
its data set, so that a training step never waits for the device. Outside it every call checks.

Errors: wrong dtype -> ``TypeError``; wrong shape, value, device or reduction -> ``ValueError``.
Every message starts with the argument's name.
"""
from __future__ import annotations

import contextlib
import math
import operator
from typing import Iterator, Optional

import torch
from torch import Tensor

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("none", "mean", "sum")


def _tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _float_tensor(name: str, t: object) -> Tensor:
    t = _tensor(name, t)
    if t.dtype not in FLOATS:
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), "
                        f"got {t.dtype}")
    return t


def _same_device(*named: tuple) -> None:
    (n0, t0), *rest = named
    for n, t in rest:
        if t.device != t0.device:
            raise ValueError(f"{n}: expected a tensor on {t0.device} like {n0}, got {t.device}")


def same_device(**named: Optional[Tensor]) -> None:
    """All given tensors (None skipped) on the first one's device; keyword names go in the error."""
    present = [(n, t) for n, t in named.items() if t is not None]
    if present:
        _same_device(*present)


def _same_dtype(n0: str, t0: Tensor, n: str, t: Tensor) -> None:
    if t.dtype != t0.dtype:
        raise TypeError(f"{n}: expected dtype {t0.dtype} like {n0}, got {t.dtype}")


def _positive(name: str, v: float, strict: bool) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise TypeError(f"{name}: expected a number, got {type(v).__name__}")
    if not math.isfinite(v) or v < 0 or (strict and v == 0):
        bound = "> 0" if strict else ">= 0"
        raise ValueError(f"{name}: must be finite and {bound}, got {v}")


def reduction(r: str) -> None:
    if r not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {r!r}")


def collab_loss_args(logits: Tensor, target: Tensor, sigma: float, red: str = "mean") -> None:
    logits = _float_tensor("logits", logits)
    target = _tensor("target", target)
    if logits.dim() != 3:
        raise ValueError(f"logits: expected shape [M, B, K], got {list(logits.shape)}")
    M, B, K = logits.shape
    if M < 1 or B < 1:
        raise ValueError(f"logits: needs M >= 1 sub-models and B >= 1 samples, got {list(logits.shape)}")
    if K < 2:
        raise ValueError(f"logits: needs K >= 2 classes, got K={K}")
    if target.dtype != torch.int64:
        raise TypeError(f"target: expected int64 labels, got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != B:
        raise ValueError(f"target: expected shape [B]=[{B}] to match logits {list(logits.shape)}, "
                         f"got {list(target.shape)}")
    _same_device(("logits", logits), ("target", target))
    _positive("sigma", sigma, strict=True)
    reduction(red)


# A plain module global, not a ContextVar: torch.compile traces reads of globals (and guards on
# them) but not ContextVar.get. Training runs one step at a time per process.
_LABELS_CHECKED = False


@contextlib.contextmanager
def labels_checked() -> Iterator[None]:
    """Inside: every label passed to the ops was range-checked by the caller already (the trainer
    checks its data set once, :meth:`~cda2_ext.data.ImageSet`'s labels at start), so the per-call
    label checks - :func:`labels_in_range` and the fused loss's CUDA check, each a host read of
    device data - are skipped. Internal to the package; the public ops check by default."""
    global _LABELS_CHECKED
    outer, _LABELS_CHECKED = _LABELS_CHECKED, True
    try:
        yield
    finally:
        _LABELS_CHECKED = outer


def labels_trusted() -> bool:
    """True inside :func:`labels_checked`."""
    return _LABELS_CHECKED


def labels_in_range(target: Tensor, num_classes: int, name: str = "target") -> None:
    """Raise ``ValueError`` (naming ``name``) if any label is outside ``[0, num_classes)`` (reads
    the data; skipped inside :func:`labels_checked`)."""
    if _LABELS_CHECKED:
        return
    if target.numel() and bool(((target < 0) | (target >= num_classes)).any()):
        bad = target[(target < 0) | (target >= num_classes)][0].item()
        raise ValueError(f"{name}: labels must lie in [0, {num_classes}), found {bad}")


def ppd_bce_args(ppd_logit: Tensor, target_prob: Tensor, red: str = "mean") -> None:
    ppd_logit = _float_tensor("ppd_logit", ppd_logit)
    target_prob = _float_tensor("target_prob", target_prob)
    if ppd_logit.dim() != 2 or ppd_logit.numel() == 0:
        raise ValueError(f"ppd_logit: expected a non-empty [M, B] tensor, got {list(ppd_logit.shape)}")
    if target_prob.shape != ppd_logit.shape:
        raise ValueError(f"target_prob: expected shape {list(ppd_logit.shape)} like ppd_logit, "
                         f"got {list(target_prob.shape)}")
    _same_device(("ppd_logit", ppd_logit), ("target_prob", target_prob))
    reduction(red)


def _image_pair(x_adv: Tensor, x_nat: Tensor) -> None:
    if x_adv.numel() == 0:
        raise ValueError(f"x_adv: expected a non-empty tensor, got {list(x_adv.shape)}")
    if x_nat.shape != x_adv.shape and x_nat.shape != x_adv.shape[1:]:
        raise ValueError(f"x_nat: expected shape {list(x_adv.shape)} or {list(x_adv.shape[1:])} "
                         f"(broadcast over the sub-model axis of x_adv), got {list(x_nat.shape)}")


def _box(eps: float, lo: float, hi: float) -> None:
    _positive("eps", eps, strict=False)
    for n, v in (("lo", lo), ("hi", hi)):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ValueError(f"{n}: expected a number, got {v!r}")
    if math.isnan(lo) or math.isnan(hi):  # the message of check_box in csrc/checks.h
        raise ValueError(f"lo: expected numbers for lo and hi, got {lo}, {hi}")
    if lo > hi:
        raise ValueError(f"lo: must be <= hi, got lo={lo} > hi={hi}")


def sign_step_args(x_adv: Tensor, grad: Tensor, x_nat: Tensor, eps: float, alpha: float,
                   lo: float, hi: float) -> None:
    x_adv = _float_tensor("x_adv", x_adv)
    grad = _float_tensor("grad", grad)
    x_nat = _float_tensor("x_nat", x_nat)
    if grad.shape != x_adv.shape:
        raise ValueError(f"grad: expected shape {list(x_adv.shape)} like x_adv, got {list(grad.shape)}")
    _image_pair(x_adv, x_nat)
    _same_dtype("x_adv", x_adv, "grad", grad)
    _same_dtype("x_adv", x_adv, "x_nat", x_nat)
    _same_device(("x_adv", x_adv), ("grad", grad), ("x_nat", x_nat))
    _box(eps, lo, hi)
    _positive("alpha", alpha, strict=False)


def random_start_args(x_nat: Tensor, eps: float, lo: float, hi: float,
                      num_models: Optional[int]) -> None:
    x_nat = _float_tensor("x_nat", x_nat)
    if x_nat.numel() == 0:
        raise ValueError(f"x_nat: expected a non-empty tensor, got {list(x_nat.shape)}")
    if num_models is not None and (not isinstance(num_models, int) or num_models < 1):
        raise ValueError(f"num_models: expected an int >= 1 or None, got {num_models!r}")
    _box(eps, lo, hi)


#: Seeds lie in [0, SEED_LIMIT): what torch generators take and the kernels' int64 holds.
SEED_LIMIT = 2 ** 63


def exact_int(v: object) -> int:
    """``v`` as an ``int`` if it is one (numpy and torch integers too), else ``TypeError``:
    booleans and floats are not counts, even ``2.0``."""
    if isinstance(v, bool):
        raise TypeError(f"expected an integer, got {type(v).__name__}")
    return operator.index(v)


def seed(v: object, name: str = "seed") -> int:
    """An RNG seed as an ``int`` in ``[0, 2**63)``; ``TypeError``/``ValueError`` naming ``name``."""
    try:
        v = exact_int(v)
    except TypeError:
        raise TypeError(f"{name}: expected an integer in [0, 2**63), got {type(v).__name__}") from None
    if not 0 <= v < SEED_LIMIT:
        raise ValueError(f"{name}: must be an integer in [0, 2**63), got {v}")
    return v


def select_args(ppd_logit: Tensor, logits: Tensor) -> None:
    ppd_logit = _float_tensor("ppd_logit", ppd_logit)
    logits = _float_tensor("logits", logits)
    if logits.dim() != 3 or logits.numel() == 0:
        raise ValueError(f"logits: expected a non-empty [M, B, K] tensor, got {list(logits.shape)}")
    if ppd_logit.shape != logits.shape[:2]:
        raise ValueError(f"ppd_logit: expected shape {list(logits.shape[:2])} ([M, B] of logits), "
                         f"got {list(ppd_logit.shape)}")
    _same_device(("ppd_logit", ppd_logit), ("logits", logits))
