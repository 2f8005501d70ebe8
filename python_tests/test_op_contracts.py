"""The raw operators' contracts that the CPU and CUDA kernels must share (csrc/checks.h).

Each test runs on every device (the ``device`` fixture; the CUDA case skips without a GPU) and
checks the exact exception type and message, so a backend that drifts (writes zeros where the
other raises, checks a gradient the other does not) fails here:

* a selection index outside ``[0, M)`` raises ``ValueError`` naming ``index`` before any output,
  with the message the labels of ``collab_loss`` get (one range check, ``check_range_result``);
* ``ppd_bce_backward``'s ``grad`` is checked alike on both devices (None, shape, dtype);
* None where an operator takes a tensor raises ``TypeError`` naming the argument, also for the
  operators whose autograd kernel (csrc/autograd.cpp) runs before the backend's checks;
* the parallel CPU argmax of ``collab_select`` equals ``torch.argmax`` over many chunks.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Tuple

import pytest
import torch

from cda2_ext.ops import reference

pytestmark = pytest.mark.requires_extension

M, B, K = 3, 6, 5


def raw():
    return torch.ops.cda2_ext


# ---- one range check for labels and selection indices ------------------------------------------

@pytest.mark.parametrize("bad, at", [(M, 2), (-1, 4), (2 ** 40, 0)])
def test_select_backward_rejects_index_out_of_range(device, bad, at):
    """CPU and CUDA both raise, naming ``index``, the bad entry and where it is (CUDA used to
    write zeros for that row instead)."""
    idx = torch.tensor([0, 1, 2, 0, 1, 2], device=device)
    idx[at] = bad
    g = torch.ones(B, K, device=device)
    with pytest.raises(ValueError, match=re.escape(f"index: entries must lie in [0, {M}), found {bad} at index {at}")):
        raw().collab_select_backward(g, idx, M)


def test_select_backward_valid_index_is_scatter(device, gen):
    """The check does not reject what collab_select produces: the gradient is the scatter."""
    g = torch.randn(B, K, generator=gen).to(device)
    idx = torch.randint(0, M, (B,), generator=gen).to(device)
    out = raw().collab_select_backward(g, idx, M)
    want = torch.zeros(M, B, K, device=device)
    want[idx, torch.arange(B, device=device)] = g
    assert torch.equal(out, want)


@pytest.mark.parametrize("op", ["collab_loss", "collab_loss_backward"])
def test_labels_out_of_range_same_message(device, op):
    """Labels go through the same range check as indices, with the same message on every device."""
    z = torch.zeros(M, B, K, device=device)
    y = torch.tensor([0, 1, 2, 3, 4, K], device=device)
    want = re.escape(f"target: labels must lie in [0, {K}), found {K} at index {B - 1}")
    if op == "collab_loss":
        call = lambda: raw().collab_loss(z, y, 1.0, 1)  # noqa: E731
    else:
        # The CUDA backward does not re-read labels (the forward checked them, and its kernel never
        # indexes memory with one); the CPU backward writes dz[y], so it checks again.
        if device != "cpu":
            pytest.skip("the CUDA backward leaves the label check to the forward")
        stats = torch.zeros(M, B, device=device)
        lse = torch.zeros(M, B, dtype=torch.float64, device=device)
        call = lambda: raw().collab_loss_backward(  # noqa: E731
            torch.ones((), device=device), None, None, None, z, y, lse, stats.new_empty(0), stats, stats, 1.0, 1)
    with pytest.raises(ValueError, match=want):
        call()


# ---- ppd_bce_backward's gradient: one check for both backends ----------------------------------

def _ppd(device, dtype=torch.float32):
    s = torch.linspace(-3, 3, M * B, dtype=dtype).view(M, B).to(device)
    return s, torch.full((M, B), 0.25, dtype=dtype, device=device)


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_ppd_bce_backward_rejects_missing_grad(device, reduction):
    """An undefined grad is named as such (the CPU kernel used to report it as a shape [0])."""
    s, t = _ppd(device)
    with pytest.raises(TypeError, match=r"^grad: expected a tensor, got None"):
        raw().ppd_bce_backward(None, s, t, reduction)


BAD_GRADS: Dict[str, Tuple[int, Callable[[torch.Tensor], torch.Tensor], type, str]] = {
    # reduction code, grad maker (given ppd_logit), exception, message
    "shape_none": (0, lambda s: torch.ones(M, B + 1, device=s.device), ValueError,
                   rf"^grad: expected shape \[{M}, {B}\], got \[{M}, {B + 1}\]"),
    "vector_for_mean": (1, lambda s: torch.ones(M, B, device=s.device), ValueError,
                        rf"^grad: expected shape \[\], got \[{M}, {B}\]"),
    "scalar_for_none": (0, lambda s: torch.ones((), device=s.device), ValueError,
                        rf"^grad: expected shape \[{M}, {B}\], got \[\]"),
    "dtype": (2, lambda s: torch.ones((), dtype=torch.float64, device=s.device), TypeError,
              r"^grad: expected dtype Float, got Double"),
    "half_grad_for_half_input": (0, lambda s: torch.ones(M, B, dtype=torch.float16, device=s.device), TypeError,
                                 r"^grad: expected dtype Float, got Half"),
    "other_device": (0, lambda s: torch.ones(M, B, device="meta"), ValueError,
                     r"^grad: expected a tensor on .* like ppd_logit, got meta"),
}


@pytest.mark.parametrize("case", sorted(BAD_GRADS))
def test_ppd_bce_backward_rejects_bad_grad(device, case):
    reduction, make, exc, msg = BAD_GRADS[case]
    s, t = _ppd(device, torch.float16 if case.startswith("half") else torch.float32)
    with pytest.raises(exc, match=msg):
        raw().ppd_bce_backward(make(s), s, t, reduction)


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_ppd_bce_backward_valid_grad(device, reduction):
    """The accepted grads still give sigmoid(s) - t, scaled by the reduction."""
    s, t = _ppd(device)
    g = torch.full((M, B) if reduction == 0 else (), 2.0, device=device)
    ds = raw().ppd_bce_backward(g, s, t, reduction)
    want = 2.0 * (torch.sigmoid(s) - t) / (M * B if reduction == 1 else 1)
    torch.testing.assert_close(ds, want)


# ---- None for a tensor argument ----------------------------------------------------------------

def _none_cases(device) -> Dict[str, tuple]:
    """op -> (args with one None, the argument it replaces)."""
    z = torch.zeros(M, B, K, device=device)
    y = torch.zeros(B, dtype=torch.int64, device=device)
    s = torch.zeros(M, B, device=device)
    x = torch.zeros(M, B, 2, device=device)
    x0 = torch.zeros(B, 2, device=device)
    lse = torch.zeros(M, B, dtype=torch.float64, device=device)
    empty = s.new_empty(0)
    one = torch.ones((), device=device)
    return {
        "collab_loss.logits": (raw().collab_loss, (None, y, 1.0, 1), "logits"),
        "collab_loss.target": (raw().collab_loss, (z, None, 1.0, 1), "target"),
        "collab_loss_backward.lse": (raw().collab_loss_backward,
                                     (one, None, None, None, z, y, None, empty, s, s, 1.0, 1), "lse"),
        "collab_loss_backward.prob": (raw().collab_loss_backward,
                                      (one, None, None, None, z, y, lse, None, s, s, 1.0, 1), "prob"),
        "collab_loss_backward.weights": (raw().collab_loss_backward,
                                         (one, None, None, None, z, y, lse, empty, None, s, 1.0, 1), "weights"),
        "ppd_bce.ppd_logit": (raw().ppd_bce, (None, s, 1), "ppd_logit"),
        "ppd_bce.target_prob": (raw().ppd_bce, (s, None, 1), "target_prob"),
        "sign_step_.grad": (raw().sign_step_, (x, None, x0, 0.1, 0.1, 0.0, 1.0), "grad"),
        "random_start_.x_nat": (raw().random_start_, (x, None, 0.1, 0.0, 1.0, 1), "x_nat"),
        "collab_select.ppd_logit": (raw().collab_select, (None, z), "ppd_logit"),
        "collab_select.logits": (raw().collab_select, (s, None), "logits"),
        "collab_select_backward.index": (raw().collab_select_backward, (torch.ones(B, K, device=device), None, M),
                                         "index"),
    }


NONE_CASES = sorted(_none_cases("cpu"))


@pytest.mark.parametrize("case", NONE_CASES)
def test_none_tensor_is_named(device, case):
    """collab_loss, ppd_bce and collab_select used to fail inside autograd's Function::apply with
    "tensor does not have a device", before the backend could name the argument."""
    op, args, name = _none_cases(device)[case]
    with pytest.raises(TypeError, match=rf"^{re.escape(name)}: expected a tensor, got None"):
        op(*args)


# ---- the parallel CPU argmax ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_select_argmax_over_many_chunks(device, dtype, gen):
    """B large enough that the argmax is split across threads (grain ~32k scores): ties, NaNs
    and every chunk boundary still follow torch.argmax's rules."""
    Mb, Bb, Kb = 3, 50_000, 2
    s = torch.randint(0, 4, (Mb, Bb), generator=gen).to(dtype)  # few values: many ties
    s[:, ::7] = 1.0  # all tied: the first sub-model wins
    s[1, ::11] = float("nan")  # NaN beats every number
    s[2, ::13] = float("nan")
    z = torch.randn(Mb, Bb, Kb, generator=gen).to(dtype)
    idx, chosen = raw().collab_select(s.to(device), z.to(device))
    ridx, rchosen = reference.collaborative_select(s, z)
    assert torch.equal(idx.cpu(), ridx)
    assert torch.equal(chosen.cpu(), rchosen)
