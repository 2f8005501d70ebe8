"""The fused operators: the Python face of ``torch.ops.cda2_ext.*``.

The schemas live in one place, ``csrc/ops.cpp``; the CPU (and, where built, CUDA) kernels and the
autograd formulas are C++ (``csrc/autograd.cpp``), so a forward+backward costs two dispatcher
calls and no Python. This module adds what Python is best at:

* fake (meta) kernels, so the ops trace under ``torch.compile`` and run on meta tensors,
* a friendly functional API whose argument checks (_checks.py, shared with the reference twins
  and the fake kernels) raise TypeError/ValueError naming the argument; the kernels repeat them
  (csrc/checks.h) for direct ``torch.ops.cda2_ext`` calls,
* a fallback to :mod:`cda2_ext.ops.reference` (with one warning) where the extension was not built.

Every function here has a plain-PyTorch twin of the same name in :mod:`cda2_ext.ops.reference`.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _checks, reference
from .reference import CollabLoss, _stat_dtype, draw_seed

try:  # importing _C registers the operators with the dispatcher; nothing is compiled here
    # (a name from it, not `from .. import _C`: where it is missing, that would be reported as a
    # circular import of the package, which is importing this module)
    from .._C import build_info as _build_info, has_cuda as _has_cuda  # type: ignore[import-not-found]

    HAS_EXTENSION = True
    BUILD_INFO: str = _build_info()
except ImportError as _err:  # pragma: no cover - exercised only where the build is missing
    HAS_EXTENSION = False
    BUILD_INFO = f"not built ({_err})"
    _hint = ""
    if (Path(__file__).resolve().parents[2] / "CMakeLists.txt").is_file():
        _hint = (f" This is the source tree ({Path(__file__).resolve().parents[1]}): run from another "
                 "directory to use an installed build, or install in place with "
                 "`pip install --no-build-isolation -e .`.")
    warnings.warn(f"cda2_ext: the compiled extension is unavailable ({_err}); falling back to the "
                  f"plain-PyTorch reference ops.{_hint}", RuntimeWarning, stacklevel=2)

__all__ = [
    "HAS_EXTENSION", "BUILD_INFO", "CollabLoss", "collaboration_loss", "ppd_bce",
    "pgd_sign_step_", "pgd_random_start", "collaborative_select", "cuda_available",
]

_REDUCTION = {"none": 0, "mean": 1, "sum": 2}  # same codes as at::Reduction
_REDUCTION_NAME = {v: k for k, v in _REDUCTION.items()}


def cuda_available() -> bool:
    """True when the extension was built with CUDA kernels."""
    return HAS_EXTENSION and bool(_has_cuda())


if HAS_EXTENSION:
    _ops = torch.ops.cda2_ext
    _collab_loss = _ops.collab_loss.default  # the overload itself: skips the packet's lookup

    # ----- fake kernels: shapes and dtypes only, mirroring csrc/cpu/*.cpp -----------------------
    # Each runs the same metadata checks as the C++ kernels, so bad input fails the same way under
    # torch.compile and on meta tensors.
    @torch.library.register_fake("cda2_ext::collab_loss")
    def _collab_loss_fake(logits, target, sigma, reduction, save_prob=False, check_target=True):
        _checks.collab_loss_args(logits, target, sigma, _REDUCTION_NAME.get(reduction, reduction))
        M, B, K = logits.shape
        dt = _stat_dtype(logits.dtype)
        loss = logits.new_empty((B,) if reduction == 0 else (), dtype=dt)
        stats = [logits.new_empty((M, B), dtype=dt) for _ in range(3)]
        lse = logits.new_empty((M, B), dtype=torch.float64)
        # Only the CPU kernel keeps the softmax (there the exps dominate; on a GPU the backward is
        # memory-bound and recomputing exp(z - lse) moves fewer bytes than saving prob).
        keep = save_prob and logits.device.type != "cuda"
        prob = logits.new_empty((M, B, K) if keep else (0,), dtype=dt)
        return (loss, *stats, lse, prob)

    @torch.library.register_fake("cda2_ext::collab_loss_backward")
    def _collab_loss_backward_fake(grad_loss, grad_ce, grad_weights, grad_p_true, logits, target,
                                   lse, prob, weights, p_true, sigma, reduction):
        _checks.same_device(logits=logits, target=target, grad_loss=grad_loss, grad_ce=grad_ce,
                            grad_weights=grad_weights, grad_p_true=grad_p_true, lse=lse, prob=prob,
                            weights=weights, p_true=p_true)
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake("cda2_ext::ppd_bce")
    def _ppd_bce_fake(ppd_logit, target_prob, reduction):
        _checks.ppd_bce_args(ppd_logit, target_prob, _REDUCTION_NAME.get(reduction, reduction))
        dt = _stat_dtype(ppd_logit.dtype)
        return ppd_logit.new_empty(ppd_logit.shape if reduction == 0 else (), dtype=dt)

    @torch.library.register_fake("cda2_ext::ppd_bce_backward")
    def _ppd_bce_backward_fake(grad, ppd_logit, target_prob, reduction):
        _checks.same_device(ppd_logit=ppd_logit, target_prob=target_prob, grad=grad)
        return torch.empty_like(ppd_logit, memory_format=torch.contiguous_format)

    @torch.library.register_fake("cda2_ext::sign_step_")
    def _sign_step_fake(x_adv, grad, x_nat, eps, alpha, lo, hi):
        _checks.sign_step_args(x_adv, grad, x_nat, eps, alpha, lo, hi)
        return None

    @torch.library.register_fake("cda2_ext::random_start_")
    def _random_start_fake(x_adv, x_nat, eps, lo, hi, seed):
        _checks.random_start_args(x_nat, eps, lo, hi, None)
        _checks.same_device(x_adv=x_adv, x_nat=x_nat)
        return None

    @torch.library.register_fake("cda2_ext::collab_select")
    def _collab_select_fake(ppd_logit, logits):
        _checks.select_args(ppd_logit, logits)
        M, B, K = logits.shape
        return (ppd_logit.new_empty((B,), dtype=torch.int64),
                logits.new_empty((B, K)))

    @torch.library.register_fake("cda2_ext::collab_select_backward")
    def _collab_select_backward_fake(grad_chosen, index, num_models, check_index=True):
        _checks.same_device(grad_chosen=grad_chosen, index=index)
        B, K = grad_chosen.shape
        return grad_chosen.new_empty((num_models, B, K))


def collaboration_loss(logits: Tensor, target: Tensor, sigma: float = 1.0,
                       reduction: str = "mean") -> CollabLoss:
    """Fused soft-min collaboration loss (Eq. 7) with per-sub-model CE, weights and p_y.

    One pass over ``logits [M, B, K]`` forward and one backward; see
    :func:`cda2_ext.ops.reference.collaboration_loss` for the math and the arguments.
    Labels outside ``[0, K)`` raise ``ValueError`` before the logits are read, except inside
    :func:`~cda2_ext.ops._checks.labels_checked` (the trainer, whose data set was checked once): there
    the CUDA kernel skips the check, which would synchronise the host on every call.
    """
    if not HAS_EXTENSION:
        return reference.collaboration_loss(logits, target, sigma, reduction)
    # Fast path for the training loop: with tensors and a numeric sigma, the kernel's own checks
    # (csrc/checks.h) raise the same TypeError/ValueError messages as _checks, so skip the
    # Python ones (a few microseconds per step); anything else gets the full Python checks.
    if not (type(logits) is Tensor and type(target) is Tensor and type(sigma) in (float, int)
            and reduction in _REDUCTION):
        _checks.collab_loss_args(logits, target, sigma, reduction)
    # lse and prob exist only to be saved for the backward pass (autograd asks for prob itself).
    loss, ce, weights, p_true, _, _ = _collab_loss(logits, target, float(sigma), _REDUCTION[reduction],
                                                   False, not _checks.labels_trusted())
    return CollabLoss(loss, ce, weights, p_true)


def ppd_bce(ppd_logit: Tensor, target_prob: Tensor, reduction: str = "mean") -> Tensor:
    """Fused PPD-head BCE ``softplus(s) - t*s``; ``target_prob`` is treated as detached.

    ``target_prob`` is cast to ``ppd_logit``'s dtype when they differ (it carries no gradient).
    See :func:`cda2_ext.ops.reference.ppd_bce`.
    """
    if not HAS_EXTENSION:
        return reference.ppd_bce(ppd_logit, target_prob, reduction)
    _checks.ppd_bce_args(ppd_logit, target_prob, reduction)
    t = target_prob.detach()
    if t.dtype != ppd_logit.dtype:
        t = t.to(ppd_logit.dtype)
    return _ops.ppd_bce(ppd_logit, t, _REDUCTION[reduction])


def pgd_sign_step_(x_adv: Tensor, grad: Tensor, x_nat: Tensor, eps: float, alpha: float,
                   lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """Fused projected sign step over all ``M*B`` images, in place; returns ``x_adv``.

    Reads ``x_adv``, ``grad`` and ``x_nat`` once and writes ``x_adv`` once; bit-identical to
    :func:`cda2_ext.ops.reference.pgd_sign_step_` in float32/float64 (a NaN gradient does not move
    ``x``, as ``torch.sign(nan) == 0``). Not differentiable: raises if a tensor requires grad.
    """
    if not HAS_EXTENSION:
        return reference.pgd_sign_step_(x_adv, grad, x_nat, eps, alpha, lo, hi)
    _checks.sign_step_args(x_adv, grad, x_nat, eps, alpha, lo, hi)
    _ops.sign_step_(x_adv, grad, x_nat, float(eps), float(alpha), float(lo), float(hi))
    return x_adv


def pgd_random_start(x_nat: Tensor, eps: float, lo: float = 0.0, hi: float = 1.0,
                     num_models: Optional[int] = None, seed: Optional[int] = None,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """Uniform random start in the eps-ball, clipped to ``[lo, hi]``.

    The noise is a counter-based hash of ``(seed, element index)``: the same seed gives the same
    start on CPU and CUDA and in :func:`cda2_ext.ops.reference.pgd_random_start`. With ``seed=None`` a
    seed is drawn from torch's RNG (``generator`` or the global one), so ``torch.manual_seed``
    makes runs repeatable; a given ``seed`` must be an integer in ``[0, 2**63)``. ``num_models=M``
    returns ``[M, *x_nat.shape]`` with independent noise.
    """
    if not HAS_EXTENSION:
        return reference.pgd_random_start(x_nat, eps, lo, hi, num_models, seed, generator)
    _checks.random_start_args(x_nat, eps, lo, hi, num_models)
    seed = draw_seed(generator) if seed is None else _checks.seed(seed)
    shape = x_nat.shape if num_models is None else (num_models, *x_nat.shape)
    out = torch.empty(shape, dtype=x_nat.dtype, device=x_nat.device)
    _ops.random_start_(out, x_nat, float(eps), float(lo), float(hi), int(seed))
    return out


def collaborative_select(ppd_logit: Tensor, logits: Tensor) -> Tuple[Tensor, Tensor]:
    """Algorithm 2 fused: argmax over the PPD scores and a gather of the chosen logits.

    Returns ``(index [B] int64, chosen [B, K])``; gradients flow to the chosen sub-model's logits
    only. See :func:`cda2_ext.ops.reference.collaborative_select`.
    """
    if not HAS_EXTENSION:
        return reference.collaborative_select(ppd_logit, logits)
    _checks.select_args(ppd_logit, logits)
    index, chosen = _ops.collab_select(ppd_logit, logits)
    return index, chosen
