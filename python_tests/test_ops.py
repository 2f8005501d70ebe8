"""The fused operators against their plain-PyTorch twins, finite differences and the paper, on
every device (the ``device`` fixture: ``cpu`` and ``cuda``; ``pytest -k cuda`` runs the CUDA cases).

Four kinds of tests live here:

* fused vs reference (``@requires_extension``): forward outputs and every gradient, on fresh random
  inputs over the shapes, layouts, sigmas, reductions and dtypes the kernels must handle, with both
  CUDA forward kernels (K <= 2048 and above), unaligned and non-contiguous inputs;
* properties that hold for any correct implementation, run against both ``cda2_ext.ops`` and
  ``cda2_ext.ops.reference`` (the ``impl`` fixture) and checked against independent oracles
  (``F.cross_entropy``, ``F.binary_cross_entropy_with_logits``, Eq. 8, finite differences, the
  hash written out in plain Python), so they can fail without the extension too;
* the operator registration: ``torch.library.opcheck`` on every raw op, ``torch.compile`` and meta
  tensors;
* what only exists on CUDA (names with ``cuda``): the CUDA kernels registered, CUDA against the CPU
  kernels on the same inputs (bit for bit where the math allows it), side streams, a second GPU.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import cda2_ext
from cda2_ext import ops
from cda2_ext.ops import reference
from helpers import (FLOATS, HALF, OUTPUTS, RAW_OPS, RED_CODE, REDUCTIONS, REQUIRE_CUDA, cuda_missing,
                     eps, make_logits, make_target, schema_args, stat_dtype)

requires_extension = pytest.mark.requires_extension

F32_64 = (torch.float32, torch.float64)
SIGMAS = (1e-4, 1e-2, 1.0, 1e3)
RAW = torch.ops.cda2_ext


@pytest.fixture(params=[pytest.param("ops", marks=requires_extension), "reference"])
def impl(request):
    """The implementation under test: the fused ops (needs the build) or the reference twins."""
    return ops if request.param == "ops" else reference


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def ulp(dtype: torch.dtype) -> float:
    """One unit in the last place at 1.0 (bounds the rounding of values in [0, 1])."""
    return torch.finfo(dtype).eps


# ------------------------------------------------------------------------------------------------
# collaboration loss: helpers

def _ce64(z: Tensor, y: Tensor) -> Tensor:
    M = z.shape[0]
    return -torch.log_softmax(z.double(), -1).gather(-1, y.expand(M, -1).unsqueeze(-1)).squeeze(-1)


def separate_ce(z: Tensor, y: Tensor, gap: float) -> Tensor:
    """Nudge true-label logits until, per sample, the two smallest ce differ by >= gap.

    With sigma tiny, the weights of a near-tie are ill-conditioned (an ulp of ce moves them by
    ulp/sigma); float32 comparisons at sigma=1e-4 run on separated inputs, float64 on raw ones.
    """
    z = z.detach().clone()
    if z.shape[0] < 2:
        return z
    for _ in range(50):
        s, idx = _ce64(z, y).sort(0)
        bad = ((s[1] - s[0]) < gap).nonzero().flatten()
        if bad.numel() == 0:
            return z
        z[idx[0, bad], bad, y[bad]] += 0.25
        z[idx[1, bad], bad, y[bad]] -= 0.25
    raise AssertionError("could not separate the cross-entropies")


def upstream_grads(M, B, reduction, dtype, gen, which=OUTPUTS, device="cpu") -> Dict[str, Tensor]:
    st = stat_dtype(dtype)
    shapes = {"loss": (B,) if reduction == "none" else (), "ce": (M, B), "weights": (M, B),
              "p_true": (M, B)}
    return {n: torch.randn(shapes[n], generator=gen, dtype=torch.float64).to(device, st) for n in which}


def run_collab(impl, base: Tensor, target: Tensor, sigma: float, reduction: str,
               upstream: Dict[str, Tensor], view: Callable[[Tensor], Tensor] = lambda t: t):
    """Forward through ``view(leaf)``; backward with ``upstream``; return (outputs, d leaf)."""
    leaf = base.detach().clone().requires_grad_(True)
    out = impl.collaboration_loss(view(leaf), target, sigma, reduction)
    outs = [getattr(out, n) for n in upstream]
    (grad,) = torch.autograd.grad(outs, [leaf], [upstream[n] for n in upstream])
    return out._replace(**{n: getattr(out, n).detach() for n in OUTPUTS}), grad


def assert_collab_close(fused, ref, dtype, sigma, B, reduction, grads=None, upstream=None,
                        zmax=1.0):
    e = eps(dtype)
    base = 32 * e
    ce_max = float(ref.ce.abs().max())
    # ce = lse - z_y cancels: its absolute error scales with the logits, not with ce
    ce_atol = base * max(1.0, ce_max, zmax)
    loss_atol = base * max(1.0, ce_max, sigma * 3) * (B if reduction == "sum" else 1)
    w = ref.weights
    w_atol = base + 4 * w * (1 - w) * ce_atol / sigma
    kw = dict(rtol=base)
    torch.testing.assert_close(fused.loss, ref.loss, atol=loss_atol, **kw, msg=lambda m: "loss: " + m)
    torch.testing.assert_close(fused.ce, ref.ce, atol=ce_atol, **kw, msg=lambda m: "ce: " + m)
    torch.testing.assert_close(fused.p_true, ref.p_true, atol=base, rtol=ce_atol,
                               msg=lambda m: "p_true: " + m)
    assert fused.weights.dtype == ref.weights.dtype
    err = (fused.weights - w).abs()
    assert bool((err <= w_atol + base * w).all()), f"weights: max error {float(err.max()):.3g}"
    if grads is not None:
        gf, gr = grads
        assert gf.dtype == gr.dtype == dtype and gf.shape == gr.shape
        geps = base if dtype not in HALF else {torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
        # exp(z - lse) with lse kept in float64: relative error ~ eps64 * |z| for huge logits
        atol = (geps + 8 * torch.finfo(torch.float64).eps * zmax) * float(gr.abs().max()) + base
        if upstream and "weights" in upstream:
            atol += 8 * e * float(upstream["weights"].abs().max()) / sigma
        torch.testing.assert_close(gf, gr, rtol=geps, atol=atol, msg=lambda m: "d logits: " + m)


def compare_collab(base, target, sigma, reduction, gen, view=lambda t: t, which=OUTPUTS):
    dtype = base.dtype
    M, B = view(base).shape[:2]
    up = upstream_grads(M, B, reduction, dtype, gen, which, base.device)
    f_out, f_grad = run_collab(ops, base, target, sigma, reduction, up, view)
    r_out, r_grad = run_collab(reference, base, target, sigma, reduction, up, view)
    for n in OUTPUTS:
        assert getattr(f_out, n).shape == getattr(r_out, n).shape, n
        assert getattr(f_out, n).device == base.device, n
    assert_collab_close(f_out, r_out, dtype, sigma, B, reduction, (f_grad, r_grad), up,
                        zmax=float(base.abs().max()))
    return f_out, f_grad


# ------------------------------------------------------------------------------------------------
# collaboration loss: fused vs reference

SHAPES = {
    "paper": (3, 128, 10),
    "M1": (1, 16, 10),
    "K2": (3, 32, 2),
    "B1": (3, 1, 10),
    "M1_B1_K2": (1, 1, 2),
    "M8": (8, 64, 100),
    # odd sizes: no 16-byte vector loads
    "odd": (2, 5, 3),
    "K33": (4, 7, 33),
    "B33": (3, 33, 100),
    "K1000": (2, 9, 1000),
    # either side of 2048, where the CUDA forward switches from lanes per sample to a block
    "K2047": (5, 3, 2047),
    "K2049": (2, 4, 2049),
    "K4099": (3, 3, 4099),
    "largeK": (3, 8, 5000),
    "K32768": (2, 6, 32768),
}


@requires_extension
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_collab_loss_matches_reference(shape, dtype, reduction, device, gen):
    """Forward outputs and the gradient through all four outputs at once."""
    M, B, K = shape
    z, y = make_logits(shape, dtype, gen, device=device), make_target(B, K, gen, device)
    out, grad = compare_collab(z, y, 1.0, reduction, gen)
    assert all(getattr(out, n).dtype == stat_dtype(dtype) for n in OUTPUTS)
    assert grad.dtype == dtype
    torch.testing.assert_close(out.weights.sum(0), torch.ones(B, dtype=stat_dtype(dtype), device=device),
                               rtol=0, atol=8 * M * eps(dtype))


@requires_extension
@pytest.mark.parametrize("dtype", F32_64, ids=str)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_collab_loss_sigma_sweep(sigma, dtype, device, gen):
    M, B, K = 3, 128, 10
    z, y = make_logits((M, B, K), dtype, gen, device=device), make_target(B, K, gen, device)
    if dtype == torch.float32 and sigma < 0.1:
        z = separate_ce(z, y, 20 * sigma)
    compare_collab(z, y, sigma, "mean", gen)


@requires_extension
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", F32_64, ids=str)
@pytest.mark.parametrize("sigma", [1e-2, 1.0, 1e3])
def test_collab_loss_huge_logits(sigma, dtype, reduction, device, gen):
    M, B, K = 3, 64, 10
    z, y = make_logits((M, B, K), dtype, gen, scale=1e4, device=device), make_target(B, K, gen, device)
    z[0, 0] = 1e4  # a whole row at the extreme
    z[1, 1, :] = -1e4
    out, grad = compare_collab(z, y, sigma, reduction, gen)
    for n in OUTPUTS:
        assert bool(torch.isfinite(getattr(out, n)).all()), n
    assert bool(torch.isfinite(grad).all())


@requires_extension
@pytest.mark.parametrize("sigma", [1e-4, 1.0, 1e4])
def test_collab_loss_offset_and_masked_logits(sigma, device, gen):
    """Logits around 1e4 with -inf (masked) classes: finite, close to float64, and Eq. 8 holds."""
    M, B, K = 3, 64, 50
    z = make_logits((M, B, K), torch.float32, gen, scale=5.0, device=device) + 1e4
    y = make_target(B, K, gen, device)
    mask = (torch.rand(M, B, K, generator=gen) < 0.3).to(device)
    mask.scatter_(-1, y.view(1, B, 1).expand(M, B, 1), False)  # never mask the true class
    z = z.masked_fill(mask, float("-inf"))
    got = ops.collaboration_loss(z, y, sigma, "none")
    want = reference.collaboration_loss(z.double(), y, sigma, "none")
    for n in OUTPUTS:
        g, w = getattr(got, n), getattr(want, n)
        assert bool(torch.isfinite(g).all()), n
        if n == "weights" and sigma < 1:
            continue  # near-one-hot: a 1e-6 change in ce moves them by exp(1e-6 / sigma)
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{n}: {m}")
    torch.testing.assert_close(got.weights.sum(0), torch.ones(B, device=device), rtol=1e-5, atol=1e-5)
    # Eq. 8: min_m ce - sigma ln M <= L <= min_m ce (up to float32 rounding of L)
    cmin = got.ce.min(0).values
    slack = 1e-4 + 1e-6 * sigma
    assert bool((got.loss <= cmin + slack).all())
    assert bool((got.loss >= cmin - sigma * math.log(M) - slack).all())


@requires_extension
def test_collab_loss_nan_stays_in_its_row(device, gen):
    z, y = make_logits((2, 4, 10), torch.float32, gen, device=device), make_target(4, 10, gen, device)
    z[0, 1, 3] = float("nan")
    out = ops.collaboration_loss(z, y, 1.0, "none")
    assert bool(torch.isnan(out.ce[0, 1]))
    assert bool(torch.isfinite(out.ce[1]).all() and torch.isfinite(out.ce[0, [0, 2, 3]]).all())


# the gradient through every subset of the outputs that matters
COMBOS = [("loss",), ("ce",), ("weights",), ("p_true",), ("loss", "p_true"), ("ce", "weights"),
          ("loss", "weights", "p_true"), OUTPUTS]


@requires_extension
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", F32_64, ids=str)
@pytest.mark.parametrize("which", COMBOS, ids=["+".join(c) for c in COMBOS])
def test_collab_loss_gradient_combinations(which, dtype, reduction, device, gen):
    """Outputs that reach no loss arrive in the backward as undefined (None) gradients."""
    M, B, K = 3, 128, 10
    z, y = make_logits((M, B, K), dtype, gen, device=device), make_target(B, K, gen, device)
    compare_collab(z, y, 0.7, reduction, gen, which=which)


NONCONTIG = {
    # logits made as [B, M, K] and transposed: row stride M*K, sub-model stride K
    "transposed": ((64, 3, 10), lambda t: t.transpose(0, 1)),
    # every other class: the K axis has stride 2
    "K_strided": ((3, 64, 20), lambda t: t[..., ::2]),
    # a window of a bigger tensor
    "sliced": ((5, 80, 12), lambda t: t[1:4, 8:72, 1:11]),
    # K-major storage
    "K_major": ((10, 3, 64), lambda t: t.permute(1, 2, 0)),
    # contiguous, but one element off the allocation's alignment: no vector loads
    "unaligned": ((3 * 20 * 64 + 1,), lambda t: t[1:].view(3, 20, 64)),
}


@requires_extension
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", [*F32_64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", NONCONTIG.keys())
def test_collab_loss_noncontiguous(layout, dtype, reduction, device, gen):
    base_shape, view = NONCONTIG[layout]
    z = make_logits(base_shape, dtype, gen, device=device)
    v = view(z)
    M, B, K = v.shape
    assert not v.is_contiguous() or v.data_ptr() % 16 != 0
    y_base = make_target(2 * B, K, gen, device)
    y = y_base[::2]  # non-contiguous target too
    compare_collab(z, y, 0.5, reduction, gen, view=view)


@requires_extension
@pytest.mark.parametrize("dtype", F32_64, ids=str)
def test_collab_loss_expanded_upstream_gradients(dtype, device, gen):
    """``loss.sum().backward()`` hands the op stride-0 (expanded) gradients."""
    M, B, K = 3, 32, 10
    z, y = make_logits((M, B, K), dtype, gen, device=device), make_target(B, K, gen, device)
    grads = []
    for impl in (ops, reference):
        leaf = z.clone().requires_grad_(True)
        out = impl.collaboration_loss(leaf, y, 0.5, "none")
        (out.loss.sum() + 0.5 * out.ce.sum() + (out.p_true * 2).sum()).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=64 * eps(dtype), atol=64 * eps(dtype))


@requires_extension
def test_collab_loss_inputs_not_modified(device, gen):
    z, y = make_logits((3, 16, 10), torch.float32, gen, device=device), make_target(16, 10, gen, device)
    z0, y0 = z.clone(), y.clone()
    leaf = z.requires_grad_(True)
    out = ops.collaboration_loss(leaf, y, 1.0, "mean")
    out.loss.backward()
    assert torch.equal(z.detach(), z0) and torch.equal(y, y0)


@requires_extension
def test_collab_loss_reduction_is_deterministic(device, gen):
    """A big reduced loss is bit-identical between runs (no atomics in the reduction)."""
    z = make_logits((8, 4096, 100), torch.float32, gen, device=device)
    y = make_target(4096, 100, gen, device)
    a = ops.collaboration_loss(z, y, 1.0, "mean").loss
    b = ops.collaboration_loss(z, y, 1.0, "mean").loss
    assert torch.equal(a, b)


@requires_extension
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", [(3, 128, 10), (2, 9, 1000), (3, 3, 4099), (2, 2, 32768)], ids=shape_id)
def test_raw_collab_loss_lse_and_saved_prob(shape, dtype, device, gen):
    """The raw op's fifth output is log-sum-exp in float64, accurate to the input's precision; the
    sixth (the softmax, saved for backward) is empty unless save_prob asks, and on CUDA always
    (recomputing it there moves fewer bytes than saving it)."""
    M, B, K = shape
    z, y = make_logits(shape, dtype, gen, device=device), make_target(B, K, gen, device)
    out = RAW.collab_loss(z, y, 1.0, 0)
    assert len(out) == 6 and out[5].numel() == 0
    lse = out[4]
    assert lse.dtype == torch.float64 and lse.shape == (M, B)
    want = torch.logsumexp(z.double(), dim=-1)
    if dtype == torch.float64:
        torch.testing.assert_close(lse, want, rtol=1e-12, atol=1e-12)
    else:  # float32 sum of exp: relative error ~1e-6 at K=32768, i.e. ~1e-6 absolute in lse
        torch.testing.assert_close(lse, want, rtol=2e-7, atol=1e-5)
    # ce = lse - z[y]
    zy = z.double().gather(-1, y.view(1, B, 1).expand(M, B, 1)).squeeze(-1)
    tol = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}
    torch.testing.assert_close(out[1].double(), lse - zy, **tol.get(dtype, dict(rtol=1e-4, atol=1e-5)))
    prob = RAW.collab_loss(z, y, 1.0, 0, True)[5]
    if device == "cuda":
        assert prob.numel() == 0
    elif prob.numel():
        assert prob.shape == (M, B, K) and prob.dtype == stat_dtype(dtype)
        # exp(z - lse): relative error ~ eps * |z - lse|
        torch.testing.assert_close(prob.double(), torch.softmax(z.double(), -1), rtol=32 * eps(dtype),
                                   atol=eps(dtype))


@requires_extension
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_raw_collab_loss_backward_without_upstream_is_zero(reduction, device, gen):
    """Every upstream gradient is optional; with none at all the gradient is zero."""
    z, y = make_logits((3, 9, 10), torch.float32, gen, device=device), make_target(9, 10, gen, device)
    code = RED_CODE[reduction]
    _, _, w, p, lse, prob = RAW.collab_loss(z, y, 1.0, code)
    got = RAW.collab_loss_backward(None, None, None, None, z, y, lse, prob, w, p, 1.0, code)
    assert got.shape == z.shape and int(torch.count_nonzero(got)) == 0


# ------------------------------------------------------------------------------------------------
# collaboration loss: properties (any implementation)

@pytest.mark.parametrize("dtype", F32_64, ids=str)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_eq8_bounds_and_weights_sum_to_one(impl, sigma, dtype, device, gen):
    M, B, K = 3, 128, 10
    z, y = make_logits((M, B, K), dtype, gen, device=device), make_target(B, K, gen, device)
    out = impl.collaboration_loss(z, y, sigma, "none")
    min_ce = out.ce.min(0).values
    tol = 8 * eps(dtype) * (1 + out.loss.abs() + sigma * math.log(M))
    assert bool((out.loss <= min_ce + tol).all()), "L > min_m ce"
    assert bool((out.loss >= min_ce - sigma * math.log(M) - tol).all()), "L < min_m ce - sigma ln M"
    torch.testing.assert_close(out.weights.sum(0), torch.ones(B, dtype=dtype, device=device),
                               rtol=0, atol=8 * M * eps(dtype))
    assert bool((out.weights >= 0).all())


@pytest.mark.parametrize("dtype", F32_64, ids=str)
@pytest.mark.parametrize("shape", [(3, 64, 10), (1, 8, 10), (4, 4, 1000), (2, 16, 2)], ids=shape_id)
def test_ce_and_p_true_match_cross_entropy(impl, shape, dtype, device, gen):
    M, B, K = shape
    z, y = make_logits(shape, dtype, gen, device=device), make_target(B, K, gen, device)
    out = impl.collaboration_loss(z, y, 1.0, "none")
    ce = F.cross_entropy(z.reshape(M * B, K), y.repeat(M), reduction="none").reshape(M, B)
    tol = dict(rtol=16 * eps(dtype), atol=16 * eps(dtype))
    torch.testing.assert_close(out.ce, ce, **tol)
    torch.testing.assert_close(out.p_true, torch.exp(-ce), **tol)
    # Eq. 7 written out, and the weights as its softmax
    a = -ce / 0.5
    out = impl.collaboration_loss(z, y, 0.5, "none")
    torch.testing.assert_close(out.loss, -0.5 * torch.logsumexp(a, 0), **tol)
    torch.testing.assert_close(out.weights, torch.softmax(a, 0), **tol)


@pytest.mark.parametrize("sigma", [1e-4, 1e-6, 1e-30])
def test_small_sigma_is_the_hard_min(impl, sigma, device, gen):
    M, B, K = 4, 128, 10
    z, y = make_logits((M, B, K), torch.float64, gen, device=device), make_target(B, K, gen, device)
    out = impl.collaboration_loss(z, y, sigma, "none")
    min_ce, arg = out.ce.min(0)
    assert bool(torch.isfinite(out.loss).all() and torch.isfinite(out.weights).all())
    assert float((out.loss - min_ce).abs().max()) <= sigma * math.log(M) + 1e-12
    s = out.ce.sort(0).values
    clear = (s[1] - s[0]) > 50 * sigma  # samples without a near-tie get a one-hot weight
    assert int(clear.sum()) > B // 2
    onehot = F.one_hot(arg, M).T.to(out.weights.dtype)
    torch.testing.assert_close(out.weights[:, clear], onehot[:, clear], rtol=0, atol=1e-12)
    # the gradient follows the best sub-model only
    leaf = z.clone().requires_grad_(True)
    impl.collaboration_loss(leaf, y, sigma, "sum").loss.backward()
    single = z.clone().requires_grad_(True)
    F.cross_entropy(single[arg, torch.arange(B, device=device)], y, reduction="sum").backward()
    torch.testing.assert_close(leaf.grad[:, clear], single.grad[:, clear], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sigma", [1e3, 1e6, 1e12])
def test_large_sigma_is_mean_minus_log_m(impl, sigma, device, gen):
    M, B, K = 3, 64, 10
    z, y = make_logits((M, B, K), torch.float64, gen, device=device), make_target(B, K, gen, device)
    out = impl.collaboration_loss(z, y, sigma, "none")
    approx = out.ce.mean(0) - sigma * math.log(M)
    torch.testing.assert_close(out.loss, approx, rtol=1e-12, atol=float(out.ce.var(0).max()) / sigma + 1e-9)
    torch.testing.assert_close(out.weights, torch.full_like(out.weights, 1 / M), rtol=0, atol=1e-2)
    for dt in (torch.float32, torch.bfloat16):  # no overflow in single/half precision either
        o = impl.collaboration_loss(z.to(dt), y, sigma, "mean")
        assert all(bool(torch.isfinite(t).all()) for t in o)


@pytest.mark.parametrize("dtype", F32_64, ids=str)
def test_reductions_agree(impl, dtype, device, gen):
    M, B, K = 3, 50, 10
    z, y = make_logits((M, B, K), dtype, gen, device=device), make_target(B, K, gen, device)
    outs = {r: impl.collaboration_loss(z, y, 0.3, r) for r in REDUCTIONS}
    assert outs["none"].loss.shape == (B,) and outs["mean"].loss.shape == () == outs["sum"].loss.shape
    tol = dict(rtol=16 * eps(dtype), atol=16 * eps(dtype))
    torch.testing.assert_close(outs["mean"].loss, outs["none"].loss.mean(), **tol)
    torch.testing.assert_close(outs["sum"].loss, outs["none"].loss.sum(), **tol)
    for r in ("mean", "sum"):
        for n in OUTPUTS[1:]:
            torch.testing.assert_close(getattr(outs[r], n), getattr(outs["none"], n), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", F32_64, ids=str)
def test_loss_gradient_formula(impl, dtype, device, gen):
    """dL[b]/dz[m,b,k] = w[m,b] * (softmax(z[m,b])_k - [k = y_b]) (docs/design.md)."""
    M, B, K = 3, 40, 7
    z, y = make_logits((M, B, K), dtype, gen, device=device), make_target(B, K, gen, device)
    leaf = z.clone().requires_grad_(True)
    out = impl.collaboration_loss(leaf, y, 0.8, "sum")
    out.loss.backward()
    expect = out.weights.detach().unsqueeze(-1) * (torch.softmax(z, -1) - F.one_hot(y, K).to(dtype))
    torch.testing.assert_close(leaf.grad, expect, rtol=32 * eps(dtype), atol=32 * eps(dtype))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("sigma", [0.05, 1.0, 20.0])
def test_gradcheck_collab_loss(impl, sigma, reduction, device, gen):
    """Finite differences through all four outputs at once, float64."""
    M, B, K = 3, 4, 5
    z = make_logits((M, B, K), torch.float64, gen, scale=1.0, device=device).requires_grad_(True)
    y = make_target(B, K, gen, device)
    assert torch.autograd.gradcheck(
        lambda t: tuple(impl.collaboration_loss(t, y, sigma, reduction)), (z,), eps=1e-6, atol=1e-7,
        rtol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_collab_loss_large_k(impl, reduction, device, gen):
    """K above 2048 (CUDA's one-block-per-sample kernels); fast mode (a random projection)."""
    M, B, K = 2, 3, 2100
    z = make_logits((M, B, K), torch.float64, gen, scale=1.0, device=device).requires_grad_(True)
    y = make_target(B, K, gen, device)
    assert torch.autograd.gradcheck(
        lambda t: tuple(impl.collaboration_loss(t, y, 0.7, reduction)), (z,), fast_mode=True)


@pytest.mark.parametrize("which", COMBOS[:4], ids=["+".join(c) for c in COMBOS[:4]])
def test_gradcheck_collab_loss_single_output(impl, which, device, gen):
    M, B, K = 2, 3, 4
    z = make_logits((M, B, K), torch.float64, gen, scale=1.0, device=device).requires_grad_(True)
    y = make_target(B, K, gen, device)
    assert torch.autograd.gradcheck(
        lambda t: getattr(impl.collaboration_loss(t, y, 0.3, "none"), which[0]), (z,), eps=1e-6,
        atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# PPD-head BCE

def _randn(shape, gen, device, dtype=torch.float32, scale=1.0) -> Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)


def _rand(shape, gen, device, dtype=torch.float32) -> Tensor:
    return torch.rand(shape, generator=gen, dtype=torch.float64).to(device, dtype)


PPD_SHAPES = [(3, 128), (1, 1), (5, 3), (5, 777), (8, 4096), (2, 70000)]


@requires_extension
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", PPD_SHAPES, ids=shape_id)
def test_ppd_bce_matches_reference(shape, dtype, reduction, device, gen):
    s = _randn(shape, gen, device, dtype, scale=4)
    t = _rand(shape, gen, device, dtype)
    g = _randn(shape if reduction == "none" else (), gen, device, stat_dtype(dtype))
    res = []
    for impl in (ops, reference):
        leaf = s.clone().requires_grad_(True)
        out = impl.ppd_bce(leaf, t, reduction)
        (grad,) = torch.autograd.grad(out, leaf, g)
        res.append((out.detach(), grad))
    (fo, fg), (ro, rg) = res
    assert fo.dtype == ro.dtype == stat_dtype(dtype) and fg.dtype == dtype
    assert fo.shape == ro.shape and fo.device.type == device
    n = 1 if reduction == "none" else s.numel()
    tol = 32 * eps(dtype)
    torch.testing.assert_close(fo, ro, rtol=tol, atol=tol * n)
    gtol = tol if dtype not in HALF else {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(fg, rg, rtol=gtol, atol=gtol * float(rg.abs().max()) + tol)


@requires_extension
@pytest.mark.parametrize("dtype", F32_64, ids=str)
def test_ppd_bce_huge_and_noncontiguous(dtype, device, gen):
    s = _randn((64, 3), gen, "cpu", dtype, scale=1e4)
    s[0, 0], s[1, 0] = 1e4, -1e4
    s = s.to(device)
    t = _rand((3, 64), gen, "cpu", dtype)
    t[0, 0], t[0, 1] = 0.0, 1.0
    t = t.to(device)
    res = []
    for impl in (ops, reference):
        leaf = s.clone().requires_grad_(True)
        out = impl.ppd_bce(leaf.T, t, "none")
        out.sum().backward()
        res.append((out.detach(), leaf.grad))
    assert bool(torch.isfinite(res[0][0]).all() and torch.isfinite(res[0][1]).all())
    # bce = s (1 - t) + log1p(e^-s) cancels: error ~ eps |s|. (The reference's F.softplus is also
    # up to 2e-9 off for s in (20, 37) in float64; test_ppd_bce_is_bce_with_logits pins that.)
    tol = 32 * eps(dtype) + (2e-9 if dtype == torch.float64 else 0.0)
    torch.testing.assert_close(res[0][0], res[1][0], rtol=tol, atol=tol * float(s.abs().max()))
    torch.testing.assert_close(res[0][1], res[1][1], rtol=tol, atol=tol)


@requires_extension
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_ppd_bce_half_logit_float_target(dtype, device, gen):
    """The usual pairing: half PPD logits, float32 p_true from the collaboration loss."""
    s = _randn((3, 32), gen, device, dtype)
    t = _rand((3, 32), gen, device)
    fo = ops.ppd_bce(s, t, "none")
    ro = reference.ppd_bce(s, t, "none")
    assert fo.dtype == torch.float32
    # ops casts the target to the logit's dtype first; allow that rounding
    torch.testing.assert_close(fo, ro, rtol=1e-2, atol=1e-2 * float(s.abs().max()))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", F32_64, ids=str)
def test_ppd_bce_is_bce_with_logits(impl, dtype, reduction, device, gen):
    s = _randn((4, 50), gen, "cpu", dtype, scale=5)
    # past F.softplus's default threshold (20) softplus(s) != s in float64: 20.5 is 1.25e-9 off
    s[0, :6] = torch.tensor([20.5, 25.0, 30.0, -20.5, -30.0, 45.0], dtype=dtype)
    s = s.to(device)
    t = _rand((4, 50), gen, device, dtype)
    leaf = s.clone().requires_grad_(True)
    out = impl.ppd_bce(leaf, t, reduction)
    expect = F.binary_cross_entropy_with_logits(s, t, reduction=reduction)
    torch.testing.assert_close(out, expect, rtol=16 * eps(dtype), atol=16 * eps(dtype) * s.numel())
    out.sum().backward()
    g = torch.sigmoid(s) - t
    g = g / s.numel() if reduction == "mean" else g
    torch.testing.assert_close(leaf.grad, g, rtol=16 * eps(dtype), atol=16 * eps(dtype))


def test_ppd_bce_target_is_detached(impl, device, gen):
    s = _randn((3, 8), gen, device).requires_grad_(True)
    t = _rand((3, 8), gen, device).requires_grad_(True)
    gs, gt = torch.autograd.grad(impl.ppd_bce(s, t, "sum"), [s, t], allow_unused=True)
    assert gs is not None and float(gs.abs().sum()) > 0
    assert gt is None or float(gt.abs().sum()) == 0


def test_ppd_bce_detached_through_collab_loss(impl, device, gen):
    """Alg. 1: the PPD loss trains only the PPD head; the label path learns only from L."""
    z = _randn((3, 16, 10), gen, device).requires_grad_(True)
    s = _randn((3, 16), gen, device).requires_grad_(True)
    y = make_target(16, 10, gen, device)
    out = impl.collaboration_loss(z, y, 1.0, "mean")
    gz, gs = torch.autograd.grad(impl.ppd_bce(s, out.p_true, "mean"), [z, s], allow_unused=True)
    assert gz is None or float(gz.abs().sum()) == 0
    assert float(gs.abs().sum()) > 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_ppd_bce(impl, reduction, device, gen):
    s = _randn((3, 5), gen, device, torch.float64).requires_grad_(True)
    t = _rand((3, 5), gen, device, torch.float64)
    assert torch.autograd.gradcheck(lambda a: impl.ppd_bce(a, t, reduction), (s,), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# projected sign step

EPS, ALPHA = 8 / 255, 2 / 255


def make_step_inputs(shape, dtype, gen, broadcast=True, lo=0.0, hi=1.0, device="cpu"):
    """x_nat in the box, x_adv scattered around it (some outside the ball and the box), a
    gradient with exact zeros and negative zeros among its entries."""
    nat_shape = shape[1:] if broadcast else shape
    x_nat = (torch.rand(nat_shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)
    x_adv = (x_nat + (torch.rand(shape, generator=gen, dtype=torch.float64) * 4 - 2).to(dtype) * EPS)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    grad[torch.rand(shape, generator=gen) < 0.1] = 0.0
    grad[torch.rand(shape, generator=gen) < 0.05] = -0.0
    return x_adv.to(device), grad.to(device), x_nat.to(device)


STEP_LAYOUTS = ["broadcast", "same_shape", "no_model_axis", "strided_x_adv", "strided_all",
                "channels_last", "x_nat_expanded", "model_axis_transposed"]


def _step_views(layout, shape, dtype, gen, device):
    """(x_adv base, index to view it, grad, x_nat) for one memory layout."""
    if layout == "broadcast":
        x, g, n = make_step_inputs(shape, dtype, gen, device=device)
        return x, (lambda t: t), g, n
    if layout == "no_model_axis":
        x, g, n = make_step_inputs(shape[1:], dtype, gen, broadcast=False, device=device)
        return x, (lambda t: t), g, n
    if layout == "same_shape":
        x, g, n = make_step_inputs(shape, dtype, gen, broadcast=False, device=device)
        return x, (lambda t: t), g, n
    if layout == "x_nat_expanded":
        x, g, n = make_step_inputs(shape, dtype, gen, device=device)
        return x, (lambda t: t), g, n.expand(shape)
    if layout == "channels_last":
        x, g, n = make_step_inputs(shape, dtype, gen, device=device)
        M = shape[0]
        x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (M, -1))
        return x, (lambda t: t), g, n.contiguous(memory_format=torch.channels_last)
    if layout == "model_axis_transposed":  # x_adv stored [B, M, ...]: the step writes through a view
        x, g, n = make_step_inputs(shape, dtype, gen, device=device)
        return x.transpose(0, 1).contiguous(), (lambda t: t.transpose(0, 1)), g, n
    wide = (*shape[:-1], 2 * shape[-1])
    x, g, n = make_step_inputs(wide, dtype, gen, device=device)
    view = lambda t: t[..., 1::2]  # noqa: E731
    if layout == "strided_x_adv":
        return x, view, g[..., 1::2].contiguous(), n[..., 1::2].contiguous()
    assert layout == "strided_all"
    return x, view, g.transpose(-1, -2).contiguous().transpose(-1, -2)[..., ::2], n[..., ::2]


@requires_extension
@pytest.mark.parametrize("box", [(0.0, 1.0), (0.2, 0.6)], ids=["box01", "box_cut"])
@pytest.mark.parametrize("dtype", F32_64, ids=str)
@pytest.mark.parametrize("layout", STEP_LAYOUTS)
def test_sign_step_equals_reference_exactly(layout, dtype, box, device, gen):
    x_base, view, g, n = _step_views(layout, (3, 4, 3, 8, 8), dtype, gen, device)
    xs = []
    for impl in (ops, reference):
        base = x_base.clone()
        out = impl.pgd_sign_step_(view(base), g, n, EPS, ALPHA, *box)
        assert out.data_ptr() == view(base).data_ptr()  # returns x_adv itself
        xs.append(base)
    assert torch.equal(xs[0], xs[1])  # including the untouched elements of a strided view
    assert not torch.equal(xs[0], x_base)


# (x_adv shape, x_nat shape): the paper's CIFAR batch broadcast over M and per sub-model, odd sizes
# (no 16-byte vectors), a single pixel, and no image axes at all.
IMAGE_SHAPES = [
    ((3, 128, 3, 32, 32), (128, 3, 32, 32)),
    ((3, 128, 3, 32, 32), (3, 128, 3, 32, 32)),
    ((8, 5, 3, 7, 7), (5, 3, 7, 7)),
    ((2, 1, 1, 1, 3), (1, 1, 1, 3)),
    ((4, 33), (33,)),
    ((17,), (17,)),
]
IMAGE_IDS = [shape_id(x) + ("-broadcast" if len(x) != len(n) else "-same") for x, n in IMAGE_SHAPES]


def over_image_shapes(test):
    """The fused attack ops (``requires_extension``) for every dtype and every ``IMAGE_SHAPES``
    case: ``test(shapes, dtype, ...)``."""
    test = pytest.mark.parametrize("shapes", IMAGE_SHAPES, ids=IMAGE_IDS)(test)
    test = pytest.mark.parametrize("dtype", FLOATS, ids=str)(test)
    return requires_extension(test)


@over_image_shapes
def test_sign_step_shapes_match_reference(shapes, dtype, device, gen):
    xs, ns = shapes
    x, g, n = make_step_inputs(xs, dtype, gen, broadcast=len(xs) != len(ns), device=device)
    got = x.clone()
    assert ops.pgd_sign_step_(got, g, n, EPS, ALPHA, 0.0, 1.0) is got
    want = reference.pgd_sign_step_(x.clone(), g, n, EPS, ALPHA, 0.0, 1.0)
    if dtype in HALF:  # the reference rounds alpha, x0 -/+ eps to the half type first
        torch.testing.assert_close(got, want, rtol=0, atol=ulp(dtype))
    else:
        assert torch.equal(got, want)
    assert bool(((got >= 0) & (got <= 1)).all())


@requires_extension
@pytest.mark.parametrize("dtype", F32_64, ids=str)
@pytest.mark.parametrize("eps_alpha", [(0.0, ALPHA), (EPS, 0.0), (0.5, 0.3), (1e-7, 1e-9)], ids=str)
def test_sign_step_exact_edge_scalars(eps_alpha, dtype, device, gen):
    e, alpha = eps_alpha
    x, g, n = make_step_inputs((2, 3, 3, 5, 5), dtype, gen, device=device)
    g[0, 0] = float("nan")  # whatever torch.sign makes of NaN, the fused step must match it
    a, b = x.clone(), x.clone()
    ops.pgd_sign_step_(a, g, n, e, alpha, 0.0, 1.0)
    reference.pgd_sign_step_(b, g, n, e, alpha, 0.0, 1.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert not bool(torch.isnan(a[1]).any())


@requires_extension
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_sign_step_half_close_to_reference(dtype, device, gen):
    x, g, n = make_step_inputs((3, 4, 3, 8, 8), dtype, gen, device=device)
    a, b = x.clone(), x.clone()
    ops.pgd_sign_step_(a, g, n, EPS, ALPHA)
    reference.pgd_sign_step_(b, g, n, EPS, ALPHA)
    torch.testing.assert_close(a, b, rtol=0, atol=ulp(dtype))
    assert bool((a >= 0).all() and (a <= 1).all())


@pytest.mark.parametrize("box", [(0.0, 1.0), (-0.1, 0.3)], ids=["box01", "box_cut"])
@pytest.mark.parametrize("dtype", F32_64, ids=str)
@pytest.mark.parametrize("broadcast", [True, False], ids=["broadcast", "same_shape"])
def test_sign_step_ball_box_and_formula(impl, broadcast, dtype, box, device, gen):
    lo, hi = box
    x, g, n = make_step_inputs((3, 8, 3, 8, 8), dtype, gen, broadcast=broadcast, lo=lo, hi=hi,
                               device=device)
    out = impl.pgd_sign_step_(x.clone(), g, n, EPS, ALPHA, lo, hi)
    nb = n.expand_as(x)
    assert bool((out >= nb - EPS).all() and (out <= nb + EPS).all()), "left the eps-ball"
    assert bool((out >= lo).all() and (out <= hi).all()), "left the box"
    # the textbook formula, written independently: clip(clip(x + a*sign(g), ball), box)
    step = x + ALPHA * torch.sign(g)
    expect = torch.clamp(torch.clamp(step, nb - EPS, nb + EPS), lo, hi)
    assert torch.equal(out, expect)
    # and where nothing clips, the step is exactly alpha * sign(g)
    free = (step > nb - EPS) & (step < nb + EPS) & (step > lo) & (step < hi)
    assert int(free.sum()) > 0 and torch.equal(out[free], step[free])


def test_sign_step_in_place_and_shapes(impl, device, gen):
    x, g, n = make_step_inputs((2, 3, 3, 4, 4), torch.float32, gen, device=device)
    ptr = x.data_ptr()
    out = impl.pgd_sign_step_(x, g, n, EPS, ALPHA)
    assert out is x and x.data_ptr() == ptr
    # [B, C, H, W] without the sub-model axis works too
    x1, g1, n1 = make_step_inputs((3, 3, 4, 4), torch.float32, gen, broadcast=False, device=device)
    assert impl.pgd_sign_step_(x1, g1, n1, EPS, ALPHA).shape == (3, 3, 4, 4)


def test_sign_step_bumps_version_counter(impl, device, gen):
    """An in-place write must be visible to autograd: a tensor saved for backward and then stepped
    on has to make that backward fail instead of silently using the new values."""
    x, g, n = make_step_inputs((2, 3, 3, 4, 4), torch.float32, gen, device=device)
    v0 = x._version
    impl.pgd_sign_step_(x, g, n, EPS, ALPHA)
    assert x._version > v0


@requires_extension
def test_in_place_attack_ops_refuse_tensors_that_record_gradients(device, gen):
    """sign_step_ / random_start_ are not differentiable: writing into a tensor autograd tracks
    must raise (naming x_adv) rather than corrupt a graph; under no_grad the same call works, and
    random_start_ also bumps the version counter."""
    x, g, n = make_step_inputs((2, 3, 3, 4, 4), torch.float32, gen, device=device)
    with pytest.raises(ValueError, match="^x_adv"):
        RAW.sign_step_(x, g.requires_grad_(), n, EPS, ALPHA, 0.0, 1.0)
    with pytest.raises(ValueError, match="^x_adv"):
        RAW.random_start_(x, n.clone().requires_grad_(), EPS, 0.0, 1.0, 1)
    with torch.no_grad():
        RAW.sign_step_(x, g, n, EPS, ALPHA, 0.0, 1.0)
        v0 = x._version
        RAW.random_start_(x, n, EPS, 0.0, 1.0, 1)
    assert x._version > v0


# ------------------------------------------------------------------------------------------------
# random start

def _py_hash_uniform(seed: int, i: int) -> float:
    """The counter-based hash of csrc/kernels/common.h, in Python integers (the spec)."""
    M32 = 0xFFFFFFFF

    def mix(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & M32
        x ^= x >> 15
        x = (x * 0x045D9F3B) & M32
        return x ^ (x >> 16)

    s = seed & (2 ** 64 - 1)
    h = mix((i & M32) ^ (s & M32))
    h = mix(h ^ ((i >> 32) & M32) ^ (s >> 32))
    return (h >> 8) * 2.0 ** -24


SEEDS = [0, 1, 12345, 2 ** 32 + 7, 2 ** 62 - 1, 2 ** 63 - 1]  # seeds lie in [0, 2**63)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_start_noise_is_the_hash(impl, seed, device):
    """x_nat = 0, eps = 1, box [-1, 1]: the start is exactly 2u - 1 with u the spec's hash."""
    x_nat = torch.zeros(2, 3, 4, 5, device=device)
    out = impl.pgd_random_start(x_nat, 1.0, -1.0, 1.0, num_models=3, seed=seed)
    assert out.shape == (3, 2, 3, 4, 5) and out.dtype == torch.float32 and out.device.type == device
    u = torch.tensor([_py_hash_uniform(seed, i) for i in range(out.numel())], dtype=torch.float32)
    assert torch.equal(out.flatten().cpu(), u * 2 - 1)


@requires_extension
@pytest.mark.parametrize("num_models", [None, 1, 3])
@pytest.mark.parametrize("dtype", F32_64, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_start_bit_identical_to_reference(seed, dtype, num_models, device, gen):
    x_nat = _rand((4, 3, 8, 8), gen, device, dtype)
    a = ops.pgd_random_start(x_nat, EPS, 0.0, 1.0, num_models=num_models, seed=seed)
    b = reference.pgd_random_start(x_nat, EPS, 0.0, 1.0, num_models=num_models, seed=seed)
    assert a.shape == b.shape and a.dtype == b.dtype == dtype
    assert torch.equal(a, b)


@requires_extension
@pytest.mark.parametrize("dtype", F32_64, ids=str)
@pytest.mark.parametrize("case", ["strided_x_nat", "channels_last", "box_cut", "eps0", "big_eps"])
def test_random_start_bit_identical_edge_cases(case, dtype, device, gen):
    x_nat = _rand((4, 3, 8, 8), gen, device, dtype)
    e, lo, hi = EPS, 0.0, 1.0
    if case == "strided_x_nat":
        x_nat = _rand((4, 3, 8, 16), gen, device, dtype)[..., ::2]
    elif case == "channels_last":
        x_nat = x_nat.contiguous(memory_format=torch.channels_last)
    elif case == "box_cut":
        lo, hi = 0.3, 0.5
    elif case == "eps0":
        e = 0.0
    else:
        e = 3.0
    a = ops.pgd_random_start(x_nat, e, lo, hi, num_models=2, seed=77)
    b = reference.pgd_random_start(x_nat, e, lo, hi, num_models=2, seed=77)
    assert torch.equal(a, b)
    if case == "eps0":
        assert torch.equal(a, x_nat.expand_as(a))


@over_image_shapes
def test_random_start_shapes_match_reference(shapes, dtype, device, gen):
    xs, ns = shapes
    x_nat = _rand(ns, gen, device, dtype)
    num_models = xs[0] if len(xs) != len(ns) else None
    seed = 1234567890123
    got = ops.pgd_random_start(x_nat, EPS, 0.0, 1.0, num_models=num_models, seed=seed)
    want = reference.pgd_random_start(x_nat, EPS, 0.0, 1.0, num_models=num_models, seed=seed)
    assert got.shape == want.shape == xs and got.dtype == dtype
    if dtype in HALF:  # the reference's (2u - 1) * eps runs in the half type
        torch.testing.assert_close(got, want, rtol=0, atol=2 * ulp(dtype))
    else:
        assert torch.equal(got, want)
    assert bool(((got - x_nat).abs() <= EPS + ulp(dtype)).all())
    assert bool(((got >= 0) & (got <= 1)).all())


@requires_extension
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_random_start_half_close_to_reference(dtype, device, gen):
    x_nat = _rand((4, 3, 8, 8), gen, device, dtype)
    a = ops.pgd_random_start(x_nat, EPS, num_models=3, seed=5)
    b = reference.pgd_random_start(x_nat, EPS, num_models=3, seed=5)
    assert a.dtype == dtype
    torch.testing.assert_close(a, b, rtol=0, atol=ulp(dtype))
    assert bool((a >= 0).all() and (a <= 1).all())


@requires_extension
def test_raw_random_start_writes_views_and_uses_the_whole_seed(device, gen):
    x_nat = _rand((4, 3, 5, 5), gen, device)
    base = torch.empty(4, 2, 3, 5, 5, device=device)
    x_adv = base.transpose(0, 1)  # [M, B, ...] view, not contiguous
    RAW.random_start_(x_adv, x_nat, 0.1, 0.0, 1.0, 7)
    want = reference.random_start_from_seed(x_nat, 0.1, 0.0, 1.0, 7, num_models=2)
    assert torch.equal(x_adv, want) and torch.equal(base.transpose(0, 1), want)
    other = torch.empty(2, 4, 3, 5, 5, device=device)
    RAW.random_start_(other, x_nat, 0.1, 0.0, 1.0, 8)
    assert not torch.equal(other, want)
    # a seed above 2**32 uses its high word too
    hi = torch.empty_like(other)
    RAW.random_start_(hi, x_nat, 0.1, 0.0, 1.0, 7 + (1 << 40))
    assert not torch.equal(hi, want)


@pytest.mark.parametrize("box", [(0.0, 1.0), (0.25, 0.75)], ids=["box01", "box_cut"])
@pytest.mark.parametrize("dtype", F32_64, ids=str)
def test_random_start_in_ball_and_box(impl, dtype, box, device, gen):
    lo, hi = box
    x_nat = _rand((16, 3, 8, 8), gen, device, dtype)
    x_nat.clamp_(lo, hi)
    out = impl.pgd_random_start(x_nat, EPS, lo, hi, num_models=3, generator=gen)
    assert out.shape == (3, *x_nat.shape) and out.dtype == dtype
    assert bool((out >= x_nat - EPS).all() and (out <= x_nat + EPS).all())
    assert bool((out >= lo).all() and (out <= hi).all())
    assert float((out - x_nat).abs().max()) > 0.9 * EPS  # actually spreads over the ball


def test_random_start_seeds_and_models_differ(impl, device):
    x_nat = torch.full((8, 3, 8, 8), 0.5, device=device)
    a = impl.pgd_random_start(x_nat, EPS, seed=1)
    b = impl.pgd_random_start(x_nat, EPS, seed=2)
    assert not torch.equal(a, b)
    assert float((a != b).float().mean()) > 0.99
    assert torch.equal(a, impl.pgd_random_start(x_nat, EPS, seed=1))
    m = impl.pgd_random_start(x_nat, EPS, num_models=3, seed=1)
    assert float((m[0] != m[1]).float().mean()) > 0.99 and float((m[1] != m[2]).float().mean()) > 0.99


def test_random_start_is_uniform(impl, device):
    x_nat = torch.full((64, 3, 32, 32), 0.5, dtype=torch.float64, device=device)
    e = 0.25
    u = (impl.pgd_random_start(x_nat, e, seed=2024) - 0.5).flatten() / e  # ~ U(-1, 1)
    n = u.numel()
    assert abs(float(u.mean())) < 6 * math.sqrt(1 / 3 / n)
    assert abs(float(u.var()) - 1 / 3) < 6 * math.sqrt(4 / 45 / n)
    assert float(u.min()) < -0.999 and float(u.max()) > 0.999
    counts = torch.histc(u, bins=20, min=-1, max=1)
    assert float((counts / (n / 20) - 1).abs().max()) < 0.05
    # neighbours are uncorrelated (a counter hash must not leak the index)
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01


def test_random_start_follows_torch_manual_seed(impl, device, gen):
    """Without a seed or generator the seed comes from the global RNG: torch.manual_seed replays
    it. (The one test here that touches the global RNG, inside fork_rng, on purpose.)"""
    x_nat = _rand((4, 3, 8, 8), gen, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        a = impl.pgd_random_start(x_nat, EPS, num_models=2)
        a2 = impl.pgd_random_start(x_nat, EPS, num_models=2)
        torch.manual_seed(1234)
        b = impl.pgd_random_start(x_nat, EPS, num_models=2)
    assert torch.equal(a, b) and not torch.equal(a, a2)
    c = impl.pgd_random_start(x_nat, EPS, generator=torch.Generator().manual_seed(9))
    d = impl.pgd_random_start(x_nat, EPS, generator=torch.Generator().manual_seed(9))
    assert torch.equal(c, d)


# ------------------------------------------------------------------------------------------------
# collaborative selection (Algorithm 2)

def _select_oracle(ppd, logits):
    M, B = ppd.shape
    best = torch.empty(B, dtype=torch.int64)
    for b, col in enumerate(ppd.T.tolist()):  # first maximum; NaN counts as the maximum (argmax's rule)
        nan = [m for m, v in enumerate(col) if v != v]
        best[b] = nan[0] if nan else max(range(M), key=lambda m: (col[m], -m))
    best = best.to(logits.device)
    return best, logits[best, torch.arange(B, device=logits.device)]


SELECT_SHAPES = [(3, 128, 10), (1, 5, 10), (4, 1, 3), (5, 16, 1000), (1, 1, 2), (4, 33, 7),
                 (8, 512, 1000), (4, 16, 32768)]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", SELECT_SHAPES, ids=shape_id)
def test_select_is_argmax_gather(impl, shape, dtype, device, gen):
    M, B, K = shape
    ppd = torch.randint(-2, 3, (M, B), generator=gen).to(device, dtype)  # many ties
    logits = _randn(shape, gen, device, dtype)
    idx, chosen = impl.collaborative_select(ppd, logits)
    e_idx, e_chosen = _select_oracle(ppd, logits)
    assert idx.dtype == torch.int64 and chosen.dtype == dtype and chosen.device.type == device
    assert torch.equal(idx, e_idx) and torch.equal(chosen, e_chosen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("score_dtype", [torch.float64, torch.float16], ids=str)
def test_select_score_dtype_may_differ(impl, score_dtype, dtype, device, gen):
    """The PPD scores may come in another float dtype than the logits (e.g. a float32 PPD head
    beside bfloat16 logits); the chosen rows keep the logits' dtype."""
    M, B, K = 4, 33, 7
    ppd = _randn((M, B), gen, device, score_dtype)
    ppd[:, 0] = 0.5  # a tie: the first sub-model wins
    ppd[1, 1] = float("nan")  # NaN beats every number
    ppd[:, 2] = float("nan")  # the first NaN wins
    logits = _randn((M, B, K), gen, device, dtype)
    idx, chosen = impl.collaborative_select(ppd, logits)
    e_idx, e_chosen = _select_oracle(ppd, logits)
    assert idx[:3].tolist() == [0, 1, 0]
    assert chosen.dtype == dtype and torch.equal(idx, e_idx) and torch.equal(chosen, e_chosen)


def test_select_ties_and_nan(impl, device):
    ppd = torch.tensor([[0.0, 1.0, 2.0, 1.0, float("nan")],
                        [0.0, 3.0, 2.0, float("nan"), 5.0],
                        [0.0, 3.0, 1.0, float("nan"), float("nan")]], device=device)
    logits = torch.arange(3 * 5 * 2, dtype=torch.float32, device=device).reshape(3, 5, 2)
    idx, chosen = impl.collaborative_select(ppd, logits)
    assert idx.tolist() == [0, 1, 0, 1, 0]
    assert torch.equal(chosen, logits[idx, torch.arange(5, device=device)])


@pytest.mark.parametrize("dtype", F32_64, ids=str)
def test_select_gradient_only_to_chosen_rows(impl, dtype, device, gen):
    M, B, K = 4, 32, 6
    ppd = _randn((M, B), gen, device, dtype).requires_grad_(True)
    z = _randn((M, B, K), gen, device, dtype).requires_grad_(True)
    idx, chosen = impl.collaborative_select(ppd, z)
    g = _randn((B, K), gen, device, dtype)
    chosen.backward(g)
    expect = torch.zeros_like(z)
    expect[idx, torch.arange(B, device=device)] = g
    assert torch.equal(z.grad, expect)
    assert ppd.grad is None or float(ppd.grad.abs().sum()) == 0


def test_gradcheck_select(impl, device, gen):
    ppd = _randn((3, 6), gen, device, torch.float64)
    z = _randn((3, 6, 4), gen, device, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: impl.collaborative_select(ppd, t)[1], (z,), eps=1e-6)


SELECT_LAYOUTS = {
    "strided": ((3, 10, 32), lambda t: t.transpose(1, 2)[:, ::2]),  # [3, 16, 10], strides everywhere
    "unaligned": ((3 * 16 * 10 + 1,), lambda t: t[1:].view(3, 16, 10)),
}


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", SELECT_LAYOUTS.keys())
def test_select_noncontiguous_matches_reference(layout, dtype, device, gen):
    base_shape, view = SELECT_LAYOUTS[layout]
    ppd = torch.randint(-1, 2, (16, 3), generator=gen).to(device, dtype).T  # [3, 16], ties
    base = _randn(base_shape, gen, device, dtype)
    res = []
    for impl in (ops, reference):
        leaf = base.clone().requires_grad_(True)
        idx, chosen = impl.collaborative_select(ppd, view(leaf))
        chosen.backward(torch.ones_like(chosen))
        res.append((idx, chosen.detach(), leaf.grad))
    for a, b in zip(*res):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# the raw operators: opcheck (schema, autograd registration, fake kernels, AOT dispatch)

def raw_collab_loss(logits, target, sigma, reduction, **kw) -> Dict[str, Tensor]:
    """torch.ops.cda2_ext.collab_loss's outputs by their schema names (lse and prob are saved for
    backward)."""
    op = RAW.collab_loss
    outs = op(*schema_args(op, dict(logits=logits, target=target, sigma=sigma, reduction=reduction, **kw)))
    return dict(zip([r.name for r in op.default._schema.returns], outs))


def _collab_bwd_values(M, B, K, dtype, reduction, sigma, gen, present, device, save_prob):
    z = make_logits((M, B, K), dtype, gen, device=device)
    y = make_target(B, K, gen, device)
    vals = raw_collab_loss(z, y, sigma, reduction, save_prob=save_prob)
    r = lambda *s: _randn(s, gen, device, stat_dtype(dtype))  # noqa: E731
    vals.update({
        "grad_loss": (r(B) if reduction == 0 else r()) if "loss" in present else None,
        "grad_ce": r(M, B) if "ce" in present else None,
        "grad_weights": r(M, B) if "weights" in present else None,
        "grad_p_true": r(M, B) if "p_true" in present else None,
        "logits": z, "target": y, "sigma": sigma, "reduction": reduction,
    })
    return vals


OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic")


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)


@requires_extension
@pytest.mark.parametrize("save_prob", [False, True])
@pytest.mark.parametrize("dtype", [*F32_64, *HALF], ids=str)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no_grad"])
def test_opcheck_collab_loss(reduction, dtype, requires_grad, save_prob, device, gen):
    z = make_logits((3, 5, 7), dtype, gen, device=device).requires_grad_(requires_grad)
    _opcheck(RAW.collab_loss, (z, make_target(5, 7, gen, device), 0.5, reduction, save_prob))


@requires_extension
@pytest.mark.parametrize("save_prob", [False, True])
@pytest.mark.parametrize("present", [("loss",), ("ce",), ("weights", "p_true"), ("loss", "ce"), OUTPUTS],
                         ids=str)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_collab_loss_backward(reduction, present, save_prob, device, gen):
    op = RAW.collab_loss_backward
    vals = _collab_bwd_values(3, 5, 7, torch.float32, reduction, 0.5, gen, present, device, save_prob)
    _opcheck(op, schema_args(op, vals))
    # and the raw backward equals autograd through the reference
    z = vals["logits"].clone().requires_grad_(True)
    ref = reference.collaboration_loss(z, vals["target"], 0.5, REDUCTIONS[reduction])
    outs, grads = zip(*[(getattr(ref, n), vals["grad_" + n]) for n in OUTPUTS
                        if vals["grad_" + n] is not None])
    (expect,) = torch.autograd.grad(outs, z, grads)
    torch.testing.assert_close(op(*schema_args(op, vals)), expect, rtol=1e-5, atol=1e-5)


@requires_extension
@pytest.mark.parametrize("dtype", [*F32_64, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_ppd_bce(reduction, dtype, device, gen):
    s = _randn((3, 6), gen, device, dtype).requires_grad_(True)
    _opcheck(RAW.ppd_bce, (s, _rand((3, 6), gen, device, dtype), reduction))


@requires_extension
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_ppd_bce_backward(reduction, device, gen):
    s = _randn((3, 6), gen, device)
    g = _randn((3, 6) if reduction == 0 else (), gen, device)
    _opcheck(RAW.ppd_bce_backward, (g, s, _rand((3, 6), gen, device), reduction))


@requires_extension
@pytest.mark.parametrize("dtype", F32_64, ids=str)
@pytest.mark.parametrize("broadcast", [True, False], ids=["broadcast", "same_shape"])
def test_opcheck_sign_step_(broadcast, dtype, device, gen):
    x, g, n = make_step_inputs((2, 3, 3, 4, 4), dtype, gen, broadcast=broadcast, device=device)
    _opcheck(RAW.sign_step_, (x, g, n, EPS, ALPHA, 0.0, 1.0))


@requires_extension
@pytest.mark.parametrize("dtype", F32_64, ids=str)
@pytest.mark.parametrize("broadcast", [True, False], ids=["broadcast", "same_shape"])
def test_opcheck_random_start_(broadcast, dtype, device, gen):
    n = _rand((3, 3, 4, 4), gen, device, dtype)
    x = torch.zeros((2, *n.shape) if broadcast else n.shape, dtype=dtype, device=device)
    _opcheck(RAW.random_start_, (x, n, EPS, 0.0, 1.0, 42))


@requires_extension
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck_collab_select(dtype, requires_grad, device, gen):
    ppd = _randn((3, 5), gen, device, dtype)
    z = _randn((3, 5, 7), gen, device, dtype).requires_grad_(requires_grad)
    # opcheck's AOT helper sums all outputs into one scalar starting from the int64 index, which
    # fails for any op whose first output is an integer (a torch limitation); the compiled
    # backward of collab_select is covered by test_compile_select instead.
    tests = OPCHECK_TESTS if not requires_grad else OPCHECK_TESTS[:3]
    torch.library.opcheck(RAW.collab_select, (ppd, z), test_utils=tests)


@requires_extension
def test_opcheck_collab_select_backward(device, gen):
    idx = torch.tensor([0, 2, 1, 2, 0], device=device)
    _opcheck(RAW.collab_select_backward, (_randn((5, 7), gen, device), idx, 3))


@requires_extension
def test_raw_ops_match_functional(device, gen):
    """The raw ops give the functional API's numbers (what opcheck's comparisons rest on)."""
    z, y = make_logits((3, 8, 5), torch.float64, gen, device=device), make_target(8, 5, gen, device)
    raw = raw_collab_loss(z, y, 0.5, 0)
    ref = reference.collaboration_loss(z, y, 0.5, "none")
    for n in OUTPUTS:
        torch.testing.assert_close(raw[n], getattr(ref, n))
    x, g, n = make_step_inputs((2, 3, 3, 4, 4), torch.float32, gen, device=device)
    a = x.clone()
    assert RAW.sign_step_(a, g, n, EPS, ALPHA, 0.0, 1.0) is None
    assert torch.equal(a, reference.pgd_sign_step_(x.clone(), g, n, EPS, ALPHA))


@requires_extension
def test_package_exports_run_on_the_inputs_device(device, gen):
    """The top-level helpers route tensors to the kernels of their device."""
    z, y = make_logits((3, 4, 10), torch.float32, gen, device=device), make_target(4, 10, gen, device)
    out = cda2_ext.collaboration_loss(z, y)
    assert out.loss.device.type == device
    torch.testing.assert_close(out.loss, reference.collaboration_loss(z, y).loss)


# ------------------------------------------------------------------------------------------------
# torch.compile and meta tensors

def _compile(fn, backend="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True)


@requires_extension
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_loss_step(reduction, device, gen):
    def step(z, s, y):
        out = ops.collaboration_loss(z, y, 0.5, reduction)
        bce = ops.ppd_bce(s, out.p_true, reduction)
        return out.loss.sum() + bce.sum() + (out.ce * out.weights).sum(), out.weights

    z0 = make_logits((3, 16, 10), torch.float32, gen, device=device)
    s0 = _randn((3, 16), gen, device)
    y = make_target(16, 10, gen, device)
    res = []
    for fn in (step, _compile(step)):
        z, s = z0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
        total, w = fn(z, s, y)
        total.backward()
        res.append((total.detach(), w.detach(), z.grad, s.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@requires_extension
def test_compile_attack_step(device, gen):
    def attack(x_nat, g):
        x = ops.pgd_random_start(x_nat, EPS, 0.0, 1.0, num_models=3, seed=11)
        ops.pgd_sign_step_(x, g, x_nat, EPS, ALPHA, 0.0, 1.0)
        return x

    x_nat = _rand((4, 3, 8, 8), gen, device)
    g = _randn((3, 4, 3, 8, 8), gen, device)
    assert torch.equal(attack(x_nat, g), _compile(attack)(x_nat, g))


@requires_extension
def test_compile_sign_step_mutates_input(device, gen):
    def step(x, g, n):
        ops.pgd_sign_step_(x, g, n, EPS, ALPHA, 0.0, 1.0)
        return x.sum()

    x, g, n = make_step_inputs((2, 3, 3, 4, 4), torch.float32, gen, device=device)
    a, b = x.clone(), x.clone()
    step(a, g, n)
    _compile(step)(b, g, n)
    assert torch.equal(a, b) and not torch.equal(a, x)


@requires_extension
def test_compile_select(device, gen):
    def infer(ppd, z):
        idx, chosen = ops.collaborative_select(ppd, z)
        return idx, chosen.softmax(-1)

    ppd = _randn((3, 16), gen, device)
    z0 = _randn((3, 16, 10), gen, device)
    g = _randn((16, 10), gen, device)
    res = []
    for fn in (infer, _compile(infer)):
        z = z0.clone().requires_grad_(True)
        idx, prob = fn(ppd, z)
        prob.backward(g)
        res.append((idx, prob.detach(), z.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@requires_extension
def test_compile_dynamic_batch(device, gen):
    fn = torch.compile(lambda z, y: ops.collaboration_loss(z, y, 1.0, "none").loss,
                       backend="aot_eager", fullgraph=True, dynamic=True)
    torch._dynamo.reset()
    for B in (5, 9):
        z, y = make_logits((3, B, 10), torch.float32, gen, device=device), make_target(B, 10, gen, device)
        torch.testing.assert_close(fn(z, y), ops.collaboration_loss(z, y, 1.0, "none").loss)


class _TinyCollab(torch.nn.Module):
    """M linear 'sub-models' with a label head and a PPD head, batched over M."""

    def __init__(self, M: int, D: int, K: int, gen: torch.Generator):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(M, D, K, generator=gen) * 0.1)
        self.v = torch.nn.Parameter(torch.randn(M, D, generator=gen) * 0.1)

    def forward(self, x):  # x [B, D] -> logits [M, B, K], ppd [M, B]
        logits = torch.einsum("bd,mdk->mbk", x, self.w)
        ppd = torch.einsum("bd,md->mb", x.detach(), self.v)
        return logits, ppd


def _train_step(model, opt, x, y):
    logits, ppd = model(x)
    out = ops.collaboration_loss(logits, y, 1.0, "mean")
    bce = ops.ppd_bce(ppd, out.p_true.detach(), "mean")
    idx, chosen = ops.collaborative_select(ppd, logits)
    acc = (chosen.argmax(-1) == y).float().mean()
    loss = out.loss + bce
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), acc


# Inductor (torch.compile's default) on CUDA, at both forward kernels' K. On a CPU inductor compiles
# C++ for ~20 s a case, so the CPU case uses aot_eager (the same graph capture, fake kernels and
# autograd; the other compile tests above run aot_eager on both devices).
@requires_extension
@pytest.mark.parametrize("device, backend, K", [("cpu", "aot_eager", 10), ("cuda", "inductor", 10),
                                                ("cuda", "inductor", 32768)], indirect=["device"])
def test_compile_training_step(device, backend, K, gen):
    M, B, D = 3, 64, 16
    x = _randn((B, D), gen, device)
    y = make_target(B, K, gen, device)
    eager = _TinyCollab(M, D, K, gen).to(device)
    comp = _TinyCollab(M, D, K, gen).to(device)
    comp.load_state_dict(eager.state_dict())
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(comp.parameters(), lr=0.1)
    torch._dynamo.reset()
    step = torch.compile(_train_step, backend=backend)
    for _ in range(3):
        le, ae = _train_step(eager, opt_e, x, y)
        lc, ac = step(comp, opt_c, x, y)
        torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ac, ae, rtol=0, atol=2.0 / B)
    for pe, pc in zip(eager.parameters(), comp.parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-4, atol=1e-5)

    # the PGD pieces compile too (in-place custom ops under torch.compile)
    def attack_step(x_adv, g, x_nat):
        ops.pgd_sign_step_(x_adv, g, x_nat, EPS, ALPHA)
        return x_adv

    x_nat = _rand((8, 3, 4, 4), gen, device)
    x_adv = ops.pgd_random_start(x_nat, EPS, num_models=M, seed=3)
    g = _randn(x_adv.shape, gen, device)
    want = reference.pgd_sign_step_(x_adv.clone(), g, x_nat, EPS, ALPHA)
    assert torch.equal(_compile(attack_step, backend)(x_adv, g, x_nat), want)


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_meta_collab_loss_and_bce(reduction, dtype):
    z = torch.empty(3, 7, 10, device="meta", dtype=dtype, requires_grad=True)
    y = torch.empty(7, device="meta", dtype=torch.int64)
    out = ops.collaboration_loss(z, y, 1.0, reduction)
    assert out.loss.shape == ((7,) if reduction == "none" else ())
    for n in OUTPUTS:
        t = getattr(out, n)
        assert t.device.type == "meta" and t.dtype == stat_dtype(dtype), n
    for n in OUTPUTS[1:]:
        assert getattr(out, n).shape == (3, 7)
    s = torch.empty(3, 7, device="meta", dtype=dtype, requires_grad=True)
    bce = ops.ppd_bce(s, out.p_true, reduction)
    assert bce.shape == ((3, 7) if reduction == "none" else ()) and bce.device.type == "meta"
    gz, gs = torch.autograd.grad(out.loss.sum() + bce.sum(), [z, s])
    assert gz.shape == z.shape and gz.dtype == dtype and gz.device.type == "meta"
    assert gs.shape == s.shape and gs.dtype == dtype


@requires_extension
def test_meta_attack_and_select():
    n = torch.empty(4, 3, 8, 8, device="meta")
    x = ops.pgd_random_start(n, EPS, num_models=3, seed=1)
    assert x.shape == (3, 4, 3, 8, 8) and x.device.type == "meta"
    assert ops.pgd_sign_step_(x, torch.empty_like(x), n, EPS, ALPHA) is x
    z = torch.empty(3, 4, 10, device="meta", requires_grad=True)
    idx, chosen = ops.collaborative_select(torch.empty(3, 4, device="meta"), z)
    assert idx.shape == (4,) and idx.dtype == torch.int64 and chosen.shape == (4, 10)
    (g,) = torch.autograd.grad(chosen.sum(), z)
    assert g.shape == z.shape and g.device.type == "meta"


def test_build_info_reported():
    assert isinstance(cda2_ext.BUILD_INFO, str) and cda2_ext.BUILD_INFO
    assert cda2_ext.HAS_EXTENSION == ops.HAS_EXTENSION


# ------------------------------------------------------------------------------------------------
# only on CUDA: the CUDA kernels against the CPU kernels, streams, devices

def test_cuda_kernels_registered():
    """Every raw op has a CUDA kernel. Skipped where CUDA cannot run (see helpers.cuda_missing),
    unless CDA2_REQUIRE_CUDA=1 (the GPU job): then a CPU-only torch, a missing GPU or an extension
    built without its CUDA kernels fails here instead of passing as a run of skips."""
    if not REQUIRE_CUDA and cuda_missing():
        pytest.skip(cuda_missing() + " (CDA2_REQUIRE_CUDA=1 makes that a failure)")
    assert torch.cuda.is_available(), f"CDA2_REQUIRE_CUDA=1 but torch {torch.__version__} sees no GPU"
    assert ops.HAS_EXTENSION, f"CDA2_REQUIRE_CUDA=1 but the extension is not built ({ops.BUILD_INFO})"
    assert ops.cuda_available() and "CUDA" in ops.BUILD_INFO, ops.BUILD_INFO
    missing = [n for n in RAW_OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"cda2_ext::{n}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing} ({ops.BUILD_INFO})"


@requires_extension  # conftest: skipped without the build, FAILED when CDA2_REQUIRE_EXTENSION=1
def test_raw_op_list_is_complete():
    """RAW_OPS (what the tests check per op) is every operator the extension registers."""
    registered = {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas()
                  if s.name.startswith("cda2_ext::")}
    assert registered == set(RAW_OPS)


def _cpu(args) -> list:
    return [a.cpu() if isinstance(a, Tensor) else a for a in args]


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
@pytest.mark.parametrize("K", [10, 1000, 32768])
def test_collab_loss_cuda_matches_cpu(K, dtype, cuda, gen):
    M, B = 3, 17
    z, y = make_logits((M, B, K), dtype, gen, device=cuda), make_target(B, K, gen, cuda)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-4, atol=1e-5)
    for code in RED_CODE.values():
        got = RAW.collab_loss(z, y, 0.7, code)
        cpu = RAW.collab_loss(z.cpu(), y.cpu(), 0.7, code)
        for g, c in zip(got[:4], cpu[:4]):  # loss, ce, weights, p_true
            assert g.dtype == c.dtype and g.shape == c.shape
            torch.testing.assert_close(g.cpu(), c, **tol)
        torch.testing.assert_close(got[4].cpu(), cpu[4], rtol=1e-6, atol=1e-5)  # lse: float64 out, float sums over K in another order


@requires_extension
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("K", [10, 1000, 32768])
def test_collab_loss_backward_cuda_matches_cpu(K, dtype, cuda, gen):
    M, B = 3, 9
    z, y = make_logits((M, B, K), dtype, gen, device=cuda), make_target(B, K, gen, cuda)
    _, _, w, p, lse, prob = RAW.collab_loss(z, y, 1.0, 0)
    r = lambda *s: _randn(s, gen, cuda, stat_dtype(dtype))  # noqa: E731
    args = (r(B), r(M, B), r(M, B), r(M, B), z, y, lse, prob, w, p, 1.0, 0)
    got = RAW.collab_loss_backward(*args)
    cpu = RAW.collab_loss_backward(*_cpu(args))
    tol = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
           torch.float16: dict(rtol=2e-3, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}[dtype]
    torch.testing.assert_close(got.cpu(), cpu, **tol)
    # a softmax saved by the CPU forward is accepted on CUDA (and gives the same gradient)
    cpu_prob = RAW.collab_loss(z.cpu(), y.cpu(), 1.0, 0, True)[5]
    if cpu_prob.numel():
        with_prob = RAW.collab_loss_backward(*args[:7], cpu_prob.to(cuda), *args[8:])
        torch.testing.assert_close(with_prob, got, **tol)


@requires_extension
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(3, 128), (1, 1), (8, 4096), (5, 777), (2, 70000)], ids=shape_id)
def test_ppd_bce_cuda_matches_cpu(shape, reduction, dtype, cuda, gen):
    s = _randn(shape, gen, cuda, dtype, scale=4)
    t = _rand(shape, gen, cuda, dtype)
    code = RED_CODE[reduction]
    out = RAW.ppd_bce(s, t, code)
    fwd = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.cpu(), RAW.ppd_bce(s.cpu(), t.cpu(), code), **fwd)
    g = _randn(out.shape, gen, cuda, out.dtype)
    bwd = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
           torch.float16: dict(rtol=2e-3, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}[dtype]
    torch.testing.assert_close(RAW.ppd_bce_backward(g, s, t, code).cpu(),
                               RAW.ppd_bce_backward(g.cpu(), s.cpu(), t.cpu(), code), **bwd)


@over_image_shapes
def test_pgd_ops_cuda_match_cpu_bit_for_bit(shapes, dtype, cuda, gen):
    xs, ns = shapes
    x, g, n = make_step_inputs(xs, dtype, gen, broadcast=len(xs) != len(ns), device=cuda)
    got, cpu = x.clone(), x.cpu()
    RAW.sign_step_(got, g, n, EPS, ALPHA, 0.0, 1.0)
    RAW.sign_step_(cpu, g.cpu(), n.cpu(), EPS, ALPHA, 0.0, 1.0)
    assert torch.equal(got.cpu(), cpu)
    num_models = xs[0] if len(xs) != len(ns) else None
    seed = 1234567890123
    start = ops.pgd_random_start(n, EPS, 0.0, 1.0, num_models=num_models, seed=seed)
    assert torch.equal(start.cpu(), ops.pgd_random_start(n.cpu(), EPS, 0.0, 1.0, num_models=num_models,
                                                         seed=seed))


@requires_extension
@pytest.mark.parametrize("score_dtype", [None, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", [(3, 128, 10), (1, 1, 2), (4, 33, 7), (8, 512, 1000), (4, 16, 32768)],
                         ids=shape_id)
def test_select_cuda_matches_cpu(shape, dtype, score_dtype, cuda, gen):
    M, B, K = shape
    z = make_logits(shape, dtype, gen, device=cuda)
    s = _randn((M, B), gen, "cpu", score_dtype or dtype)
    if B > 3 and M > 1:
        s[:, 0] = 0.5  # tie: the first sub-model wins
        s[1, 1] = float("nan")  # NaN beats every number
        s[:, 2] = float("nan")  # first NaN wins
    s = s.to(cuda)
    idx, chosen = RAW.collab_select(s, z)
    cidx, cchosen = RAW.collab_select(s.cpu(), z.cpu())
    assert torch.equal(idx.cpu(), cidx) and torch.equal(chosen.cpu(), cchosen)
    g = _randn(chosen.shape, gen, cuda, dtype)
    assert torch.equal(RAW.collab_select_backward(g, idx, M).cpu(),
                       RAW.collab_select_backward(g.cpu(), cidx, M))


@requires_extension
def test_collab_loss_on_a_cuda_side_stream(cuda, gen):
    z, y = make_logits((3, 128, 10), torch.float32, gen, device=cuda), make_target(128, 10, gen, cuda)
    want = reference.collaboration_loss(z, y, 1.0, "mean").loss
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = ops.collaboration_loss(z, y, 1.0, "mean").loss
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@requires_extension
def test_collab_loss_on_a_second_cuda_device(cuda, gen):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    z, y = make_logits((3, 16, 10), torch.float32, gen, device="cuda:1"), make_target(16, 10, gen, "cuda:1")
    got = ops.collaboration_loss(z, y, 1.0, "none")
    assert got.loss.device == z.device
    torch.testing.assert_close(got.loss, reference.collaboration_loss(z, y, 1.0, "none").loss,
                               rtol=1e-5, atol=1e-6)
