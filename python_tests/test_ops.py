"""The fused operators against their plain-PyTorch twins, finite differences and the paper.

Three kinds of tests live here:

* fused vs reference (``@requires_extension``): forward outputs and every gradient, on fresh random
  inputs over the shapes, layouts, sigmas, reductions and dtypes the kernels must handle;
* properties that hold for any correct implementation, run against both ``cda2_ext.ops`` and
  ``cda2_ext.reference`` (the ``impl`` fixture) and checked against independent oracles
  (``F.cross_entropy``, ``F.binary_cross_entropy_with_logits``, Eq. 8, finite differences, the
  hash written out in plain Python), so they can fail without the extension too;
* the operator registration: ``torch.library.opcheck`` on every raw op, ``torch.compile``
  (``aot_eager``, ``fullgraph=True``) and meta tensors.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import cda2_ext
from cda2_ext import ops, reference

requires_extension = pytest.mark.requires_extension

OUTPUTS = ("loss", "ce", "weights", "p_true")
REDUCTIONS = ("none", "mean", "sum")
RED_CODE = {"none": 0, "mean": 1, "sum": 2}
HALF = (torch.float16, torch.bfloat16)
SIGMAS = (1e-4, 1e-2, 1.0, 1e3)


@pytest.fixture(params=[pytest.param("ops", marks=requires_extension), "reference"])
def impl(request):
    """The implementation under test: the fused ops (needs the build) or the reference twins."""
    return ops if request.param == "ops" else reference


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF else dtype


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(_stat_dtype(dtype)).eps


# ------------------------------------------------------------------------------------------------
# input makers

def make_logits(shape, dtype, gen, scale=3.0) -> Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def make_target(B, K, gen) -> Tensor:
    return torch.randint(0, K, (B,), generator=gen)


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


def upstream_grads(M, B, reduction, dtype, gen, which=OUTPUTS) -> Dict[str, Tensor]:
    st = _stat_dtype(dtype)
    shapes = {"loss": (B,) if reduction == "none" else (), "ce": (M, B), "weights": (M, B),
              "p_true": (M, B)}
    return {n: torch.randn(shapes[n], generator=gen, dtype=torch.float64).to(st) for n in which}


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
    eps = _eps(dtype)
    base = 32 * eps
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
            atol += 8 * eps * float(upstream["weights"].abs().max()) / sigma
        torch.testing.assert_close(gf, gr, rtol=geps, atol=atol, msg=lambda m: "d logits: " + m)


def compare_collab(base, target, sigma, reduction, gen, view=lambda t: t, which=OUTPUTS):
    dtype = base.dtype
    M, B = view(base).shape[:2]
    up = upstream_grads(M, B, reduction, dtype, gen, which)
    f_out, f_grad = run_collab(ops, base, target, sigma, reduction, up, view)
    r_out, r_grad = run_collab(reference, base, target, sigma, reduction, up, view)
    for n in OUTPUTS:
        assert getattr(f_out, n).shape == getattr(r_out, n).shape, n
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
    "M8": (8, 64, 100),
    "largeK": (3, 8, 5000),
}


@requires_extension
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_collab_loss_matches_reference(shape, dtype, reduction, gen):
    M, B, K = shape
    z, y = make_logits(shape, dtype, gen), make_target(B, K, gen)
    compare_collab(z, y, 1.0, reduction, gen)


@requires_extension
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_collab_loss_half_matches_reference(shape, dtype, gen):
    M, B, K = shape
    z, y = make_logits(shape, dtype, gen), make_target(B, K, gen)
    out, grad = compare_collab(z, y, 1.0, "mean", gen)
    assert all(getattr(out, n).dtype == torch.float32 for n in OUTPUTS)
    assert grad.dtype == dtype


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_collab_loss_sigma_sweep(sigma, dtype, gen):
    M, B, K = 3, 128, 10
    z, y = make_logits((M, B, K), dtype, gen), make_target(B, K, gen)
    if dtype == torch.float32 and sigma < 0.1:
        z = separate_ce(z, y, 20 * sigma)
    compare_collab(z, y, sigma, "mean", gen)


@requires_extension
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sigma", [1e-2, 1.0, 1e3])
def test_collab_loss_huge_logits(sigma, dtype, reduction, gen):
    M, B, K = 3, 64, 10
    z, y = make_logits((M, B, K), dtype, gen, scale=1e4), make_target(B, K, gen)
    z[0, 0] = 1e4  # a whole row at the extreme
    z[1, 1, :] = -1e4
    out, grad = compare_collab(z, y, sigma, reduction, gen)
    for n in OUTPUTS:
        assert bool(torch.isfinite(getattr(out, n)).all()), n
    assert bool(torch.isfinite(grad).all())


# the gradient through every subset of the outputs that matters
COMBOS = [("loss",), ("ce",), ("weights",), ("p_true",), ("loss", "p_true"), ("ce", "weights"),
          ("loss", "weights", "p_true"), OUTPUTS]


@requires_extension
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("which", COMBOS, ids=["+".join(c) for c in COMBOS])
def test_collab_loss_gradient_combinations(which, dtype, reduction, gen):
    M, B, K = 3, 128, 10
    z, y = make_logits((M, B, K), dtype, gen), make_target(B, K, gen)
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
}


@requires_extension
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", NONCONTIG.keys())
def test_collab_loss_noncontiguous(layout, dtype, reduction, gen):
    base_shape, view = NONCONTIG[layout]
    z = make_logits(base_shape, dtype, gen)
    M, B, K = view(z).shape
    assert not view(z).is_contiguous()
    y_base = make_target(2 * B, K, gen)
    y = y_base[::2]  # non-contiguous target too
    compare_collab(z, y, 0.5, reduction, gen, view=view)


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_collab_loss_expanded_upstream_gradients(dtype, gen):
    """``loss.sum().backward()`` hands the op stride-0 (expanded) gradients."""
    M, B, K = 3, 32, 10
    z, y = make_logits((M, B, K), dtype, gen), make_target(B, K, gen)
    grads = []
    for impl in (ops, reference):
        leaf = z.clone().requires_grad_(True)
        out = impl.collaboration_loss(leaf, y, 0.5, "none")
        (out.loss.sum() + 0.5 * out.ce.sum() + (out.p_true * 2).sum()).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=64 * _eps(dtype), atol=64 * _eps(dtype))


@requires_extension
def test_collab_loss_inputs_not_modified(gen):
    z, y = make_logits((3, 16, 10), torch.float32, gen), make_target(16, 10, gen)
    z0, y0 = z.clone(), y.clone()
    leaf = z.requires_grad_(True)
    out = ops.collaboration_loss(leaf, y, 1.0, "mean")
    out.loss.backward()
    assert torch.equal(z.detach(), z0) and torch.equal(y, y0)


# ------------------------------------------------------------------------------------------------
# collaboration loss: properties (any implementation)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_eq8_bounds_and_weights_sum_to_one(impl, sigma, dtype, gen):
    M, B, K = 3, 128, 10
    z, y = make_logits((M, B, K), dtype, gen), make_target(B, K, gen)
    out = impl.collaboration_loss(z, y, sigma, "none")
    min_ce = out.ce.min(0).values
    tol = 8 * _eps(dtype) * (1 + out.loss.abs() + sigma * math.log(M))
    assert bool((out.loss <= min_ce + tol).all()), "L > min_m ce"
    assert bool((out.loss >= min_ce - sigma * math.log(M) - tol).all()), "L < min_m ce - sigma ln M"
    torch.testing.assert_close(out.weights.sum(0), torch.ones(B, dtype=dtype),
                               rtol=0, atol=8 * M * _eps(dtype))
    assert bool((out.weights >= 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(3, 64, 10), (1, 8, 10), (4, 4, 1000), (2, 16, 2)], ids=str)
def test_ce_and_p_true_match_cross_entropy(impl, shape, dtype, gen):
    M, B, K = shape
    z, y = make_logits(shape, dtype, gen), make_target(B, K, gen)
    out = impl.collaboration_loss(z, y, 1.0, "none")
    ce = F.cross_entropy(z.reshape(M * B, K), y.repeat(M), reduction="none").reshape(M, B)
    tol = dict(rtol=16 * _eps(dtype), atol=16 * _eps(dtype))
    torch.testing.assert_close(out.ce, ce, **tol)
    torch.testing.assert_close(out.p_true, torch.exp(-ce), **tol)
    # Eq. 7 written out, and the weights as its softmax
    a = -ce / 0.5
    out = impl.collaboration_loss(z, y, 0.5, "none")
    torch.testing.assert_close(out.loss, -0.5 * torch.logsumexp(a, 0), **tol)
    torch.testing.assert_close(out.weights, torch.softmax(a, 0), **tol)


@pytest.mark.parametrize("sigma", [1e-4, 1e-6, 1e-30])
def test_small_sigma_is_the_hard_min(impl, sigma, gen):
    M, B, K = 4, 128, 10
    z, y = make_logits((M, B, K), torch.float64, gen), make_target(B, K, gen)
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
    F.cross_entropy(single[arg, torch.arange(B)], y, reduction="sum").backward()
    torch.testing.assert_close(leaf.grad[:, clear], single.grad[:, clear], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sigma", [1e3, 1e6, 1e12])
def test_large_sigma_is_mean_minus_log_m(impl, sigma, gen):
    M, B, K = 3, 64, 10
    z, y = make_logits((M, B, K), torch.float64, gen), make_target(B, K, gen)
    out = impl.collaboration_loss(z, y, sigma, "none")
    approx = out.ce.mean(0) - sigma * math.log(M)
    torch.testing.assert_close(out.loss, approx, rtol=1e-12, atol=float(out.ce.var(0).max()) / sigma + 1e-9)
    torch.testing.assert_close(out.weights, torch.full_like(out.weights, 1 / M), rtol=0, atol=1e-2)
    for dt in (torch.float32, torch.bfloat16):  # no overflow in single/half precision either
        o = impl.collaboration_loss(z.to(dt), y, sigma, "mean")
        assert all(bool(torch.isfinite(t).all()) for t in o)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_reductions_agree(impl, dtype, gen):
    M, B, K = 3, 50, 10
    z, y = make_logits((M, B, K), dtype, gen), make_target(B, K, gen)
    outs = {r: impl.collaboration_loss(z, y, 0.3, r) for r in REDUCTIONS}
    assert outs["none"].loss.shape == (B,) and outs["mean"].loss.shape == () == outs["sum"].loss.shape
    tol = dict(rtol=16 * _eps(dtype), atol=16 * _eps(dtype))
    torch.testing.assert_close(outs["mean"].loss, outs["none"].loss.mean(), **tol)
    torch.testing.assert_close(outs["sum"].loss, outs["none"].loss.sum(), **tol)
    for r in ("mean", "sum"):
        for n in OUTPUTS[1:]:
            torch.testing.assert_close(getattr(outs[r], n), getattr(outs["none"], n), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_loss_gradient_formula(impl, dtype, gen):
    """dL[b]/dz[m,b,k] = w[m,b] * (softmax(z[m,b])_k - [k = y_b]) (DESIGN.md)."""
    M, B, K = 3, 40, 7
    z, y = make_logits((M, B, K), dtype, gen), make_target(B, K, gen)
    leaf = z.clone().requires_grad_(True)
    out = impl.collaboration_loss(leaf, y, 0.8, "sum")
    out.loss.backward()
    expect = out.weights.detach().unsqueeze(-1) * (torch.softmax(z, -1) - F.one_hot(y, K).to(dtype))
    torch.testing.assert_close(leaf.grad, expect, rtol=32 * _eps(dtype), atol=32 * _eps(dtype))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("sigma", [0.05, 1.0, 20.0])
def test_gradcheck_collab_loss(impl, sigma, reduction, gen):
    """Finite differences through all four outputs at once, float64."""
    M, B, K = 3, 4, 5
    z = make_logits((M, B, K), torch.float64, gen, scale=1.0).requires_grad_(True)
    y = make_target(B, K, gen)
    assert torch.autograd.gradcheck(
        lambda t: tuple(impl.collaboration_loss(t, y, sigma, reduction)), (z,), eps=1e-6, atol=1e-7,
        rtol=1e-5)


@pytest.mark.parametrize("which", COMBOS[:4], ids=["+".join(c) for c in COMBOS[:4]])
def test_gradcheck_collab_loss_single_output(impl, which, gen):
    M, B, K = 2, 3, 4
    z = make_logits((M, B, K), torch.float64, gen, scale=1.0).requires_grad_(True)
    y = make_target(B, K, gen)
    assert torch.autograd.gradcheck(
        lambda t: getattr(impl.collaboration_loss(t, y, 0.3, "none"), which[0]), (z,), eps=1e-6,
        atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# PPD-head BCE

@requires_extension
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF], ids=str)
@pytest.mark.parametrize("shape", [(3, 128), (1, 1), (8, 1024), (5, 3)], ids=str)
def test_ppd_bce_matches_reference(shape, dtype, reduction, gen):
    s = (torch.randn(shape, generator=gen, dtype=torch.float64) * 4).to(dtype)
    t = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(shape if reduction == "none" else (), generator=gen).to(_stat_dtype(dtype))
    res = []
    for impl in (ops, reference):
        leaf = s.clone().requires_grad_(True)
        out = impl.ppd_bce(leaf, t, reduction)
        (grad,) = torch.autograd.grad(out, leaf, g)
        res.append((out.detach(), grad))
    (fo, fg), (ro, rg) = res
    assert fo.dtype == ro.dtype == _stat_dtype(dtype) and fg.dtype == dtype
    n = 1 if reduction == "none" else s.numel()
    tol = 32 * _eps(dtype)
    torch.testing.assert_close(fo, ro, rtol=tol, atol=tol * n)
    gtol = tol if dtype not in HALF else {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(fg, rg, rtol=gtol, atol=gtol * float(rg.abs().max()) + tol)


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ppd_bce_huge_and_noncontiguous(dtype, gen):
    s = (torch.randn(64, 3, generator=gen, dtype=torch.float64) * 1e4).to(dtype)
    s[0, 0], s[1, 0] = 1e4, -1e4
    t = torch.rand(3, 64, generator=gen, dtype=torch.float64).to(dtype)
    t[0, 0], t[0, 1] = 0.0, 1.0
    res = []
    for impl in (ops, reference):
        leaf = s.clone().requires_grad_(True)
        out = impl.ppd_bce(leaf.T, t, "none")
        out.sum().backward()
        res.append((out.detach(), leaf.grad))
    assert bool(torch.isfinite(res[0][0]).all() and torch.isfinite(res[0][1]).all())
    # bce = s (1 - t) + log1p(e^-s) cancels: error ~ eps |s|. (The reference's F.softplus is also
    # up to 2e-9 off for s in (20, 37) in float64; test_ppd_bce_is_bce_with_logits pins that.)
    tol = 32 * _eps(dtype) + (2e-9 if dtype == torch.float64 else 0.0)
    torch.testing.assert_close(res[0][0], res[1][0], rtol=tol, atol=tol * float(s.abs().max()))
    torch.testing.assert_close(res[0][1], res[1][1], rtol=tol, atol=tol)


@requires_extension
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_ppd_bce_half_logit_float_target(dtype, gen):
    """The usual pairing: half PPD logits, float32 p_true from the collaboration loss."""
    s = torch.randn(3, 32, generator=gen).to(dtype)
    t = torch.rand(3, 32, generator=gen)
    fo = ops.ppd_bce(s, t, "none")
    ro = reference.ppd_bce(s, t, "none")
    assert fo.dtype == torch.float32
    # ops casts the target to the logit's dtype first; allow that rounding
    torch.testing.assert_close(fo, ro, rtol=1e-2, atol=1e-2 * float(s.abs().max()))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ppd_bce_is_bce_with_logits(impl, dtype, reduction, gen):
    s = (torch.randn(4, 50, generator=gen, dtype=torch.float64) * 5).to(dtype)
    # past F.softplus's default threshold (20) softplus(s) != s in float64: 20.5 is 1.25e-9 off
    s[0, :6] = torch.tensor([20.5, 25.0, 30.0, -20.5, -30.0, 45.0], dtype=dtype)
    t = torch.rand(4, 50, generator=gen, dtype=torch.float64).to(dtype)
    leaf = s.clone().requires_grad_(True)
    out = impl.ppd_bce(leaf, t, reduction)
    expect = F.binary_cross_entropy_with_logits(s, t, reduction=reduction)
    torch.testing.assert_close(out, expect, rtol=16 * _eps(dtype), atol=16 * _eps(dtype) * s.numel())
    out.sum().backward()
    g = torch.sigmoid(s) - t
    g = g / s.numel() if reduction == "mean" else g
    torch.testing.assert_close(leaf.grad, g, rtol=16 * _eps(dtype), atol=16 * _eps(dtype))


def test_ppd_bce_target_is_detached(impl, gen):
    s = torch.randn(3, 8, generator=gen, requires_grad=True)
    t = torch.rand(3, 8, generator=gen, requires_grad=True)
    gs, gt = torch.autograd.grad(impl.ppd_bce(s, t, "sum"), [s, t], allow_unused=True)
    assert gs is not None and float(gs.abs().sum()) > 0
    assert gt is None or float(gt.abs().sum()) == 0


def test_ppd_bce_detached_through_collab_loss(impl, gen):
    """Alg. 1: the PPD loss trains only the PPD head; the label path learns only from L."""
    z = torch.randn(3, 16, 10, generator=gen, requires_grad=True)
    s = torch.randn(3, 16, generator=gen, requires_grad=True)
    y = make_target(16, 10, gen)
    out = impl.collaboration_loss(z, y, 1.0, "mean")
    gz, gs = torch.autograd.grad(impl.ppd_bce(s, out.p_true, "mean"), [z, s], allow_unused=True)
    assert gz is None or float(gz.abs().sum()) == 0
    assert float(gs.abs().sum()) > 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_ppd_bce(impl, reduction, gen):
    s = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.rand(3, 5, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: impl.ppd_bce(a, t, reduction), (s,), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# projected sign step

EPS, ALPHA = 8 / 255, 2 / 255


def make_step_inputs(shape, dtype, gen, broadcast=True, lo=0.0, hi=1.0):
    """x_nat in the box, x_adv scattered around it (some outside the ball and the box), a
    gradient with exact zeros and negative zeros among its entries."""
    nat_shape = shape[1:] if broadcast else shape
    x_nat = (torch.rand(nat_shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)
    x_adv = (x_nat + (torch.rand(shape, generator=gen, dtype=torch.float64) * 4 - 2).to(dtype) * EPS)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    grad[torch.rand(shape, generator=gen) < 0.1] = 0.0
    grad[torch.rand(shape, generator=gen) < 0.05] = -0.0
    return x_adv, grad, x_nat


STEP_LAYOUTS = ["broadcast", "same_shape", "no_model_axis", "strided_x_adv", "strided_all",
                "channels_last", "x_nat_expanded"]


def _step_views(layout, shape, dtype, gen):
    """(x_adv base, index to view it, grad, x_nat) for one memory layout."""
    if layout == "broadcast":
        x, g, n = make_step_inputs(shape, dtype, gen)
        return x, (lambda t: t), g, n
    if layout == "no_model_axis":
        x, g, n = make_step_inputs(shape[1:], dtype, gen, broadcast=False)
        return x, (lambda t: t), g, n
    if layout == "same_shape":
        x, g, n = make_step_inputs(shape, dtype, gen, broadcast=False)
        return x, (lambda t: t), g, n
    if layout == "x_nat_expanded":
        x, g, n = make_step_inputs(shape, dtype, gen)
        return x, (lambda t: t), g, n.expand(shape)
    if layout == "channels_last":
        x, g, n = make_step_inputs(shape, dtype, gen)
        M = shape[0]
        x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (M, -1))
        return x, (lambda t: t), g, n.contiguous(memory_format=torch.channels_last)
    wide = (*shape[:-1], 2 * shape[-1])
    x, g, n = make_step_inputs(wide, dtype, gen)
    view = lambda t: t[..., 1::2]  # noqa: E731
    if layout == "strided_x_adv":
        return x, view, g[..., 1::2].contiguous(), n[..., 1::2].contiguous()
    assert layout == "strided_all"
    return x, view, g.transpose(-1, -2).contiguous().transpose(-1, -2)[..., ::2], n[..., ::2]


@requires_extension
@pytest.mark.parametrize("box", [(0.0, 1.0), (0.2, 0.6)], ids=["box01", "box_cut"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", STEP_LAYOUTS)
def test_sign_step_equals_reference_exactly(layout, dtype, box, gen):
    x_base, view, g, n = _step_views(layout, (3, 4, 3, 8, 8), dtype, gen)
    xs = []
    for impl in (ops, reference):
        base = x_base.clone()
        out = impl.pgd_sign_step_(view(base), g, n, EPS, ALPHA, *box)
        assert out.data_ptr() == view(base).data_ptr()  # returns x_adv itself
        xs.append(base)
    assert torch.equal(xs[0], xs[1])  # including the untouched elements of a strided view
    assert not torch.equal(xs[0], x_base)


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("eps,alpha", [(0.0, ALPHA), (EPS, 0.0), (0.5, 0.3), (1e-7, 1e-9)])
def test_sign_step_exact_edge_scalars(eps, alpha, dtype, gen):
    x, g, n = make_step_inputs((2, 3, 3, 5, 5), dtype, gen)
    g[0, 0] = float("nan")  # whatever torch.sign makes of NaN, the fused step must match it
    a, b = x.clone(), x.clone()
    ops.pgd_sign_step_(a, g, n, eps, alpha, 0.0, 1.0)
    reference.pgd_sign_step_(b, g, n, eps, alpha, 0.0, 1.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert not bool(torch.isnan(a[1]).any())


@requires_extension
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_sign_step_half_close_to_reference(dtype, gen):
    x, g, n = make_step_inputs((3, 4, 3, 8, 8), dtype, gen)
    a, b = x.clone(), x.clone()
    ops.pgd_sign_step_(a, g, n, EPS, ALPHA)
    reference.pgd_sign_step_(b, g, n, EPS, ALPHA)
    ulp = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    torch.testing.assert_close(a, b, rtol=0, atol=ulp)
    assert bool((a >= 0).all() and (a <= 1).all())


@pytest.mark.parametrize("box", [(0.0, 1.0), (-0.1, 0.3)], ids=["box01", "box_cut"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("broadcast", [True, False], ids=["broadcast", "same_shape"])
def test_sign_step_ball_box_and_formula(impl, broadcast, dtype, box, gen):
    lo, hi = box
    x, g, n = make_step_inputs((3, 8, 3, 8, 8), dtype, gen, broadcast=broadcast, lo=lo, hi=hi)
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


def test_sign_step_in_place_and_shapes(impl, gen):
    x, g, n = make_step_inputs((2, 3, 3, 4, 4), torch.float32, gen)
    ptr = x.data_ptr()
    out = impl.pgd_sign_step_(x, g, n, EPS, ALPHA)
    assert out is x and x.data_ptr() == ptr
    # [B, C, H, W] without the sub-model axis works too
    x1, g1, n1 = make_step_inputs((3, 3, 4, 4), torch.float32, gen, broadcast=False)
    assert impl.pgd_sign_step_(x1, g1, n1, EPS, ALPHA).shape == (3, 3, 4, 4)


def test_sign_step_bumps_version_counter(impl, gen):
    """An in-place write must be visible to autograd: a tensor saved for backward and then stepped
    on has to make that backward fail instead of silently using the new values."""
    x, g, n = make_step_inputs((2, 3, 3, 4, 4), torch.float32, gen)
    v0 = x._version
    impl.pgd_sign_step_(x, g, n, EPS, ALPHA)
    assert x._version > v0


@requires_extension
def test_in_place_attack_ops_refuse_tensors_that_record_gradients(gen):
    """sign_step_ / random_start_ are not differentiable: writing into a tensor autograd tracks
    must raise (naming x_adv) rather than corrupt a graph; under no_grad the same call works, and
    random_start_ also bumps the version counter."""
    x, g, n = make_step_inputs((2, 3, 3, 4, 4), torch.float32, gen)
    with pytest.raises(ValueError, match="^x_adv"):
        torch.ops.cda2_ext.sign_step_(x, g.requires_grad_(), n, EPS, ALPHA, 0.0, 1.0)
    with pytest.raises(ValueError, match="^x_adv"):
        torch.ops.cda2_ext.random_start_(x, n.clone().requires_grad_(), EPS, 0.0, 1.0, 1)
    with torch.no_grad():
        torch.ops.cda2_ext.sign_step_(x, g, n, EPS, ALPHA, 0.0, 1.0)
        v0 = x._version
        torch.ops.cda2_ext.random_start_(x, n, EPS, 0.0, 1.0, 1)
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


SEEDS = [0, 1, 12345, 2 ** 32 + 7, 2 ** 62 - 1, -3]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_start_noise_is_the_hash(impl, seed):
    """x_nat = 0, eps = 1, box [-1, 1]: the start is exactly 2u - 1 with u the spec's hash."""
    x_nat = torch.zeros(2, 3, 4, 5)
    out = impl.pgd_random_start(x_nat, 1.0, -1.0, 1.0, num_models=3, seed=seed)
    assert out.shape == (3, 2, 3, 4, 5) and out.dtype == torch.float32
    u = torch.tensor([_py_hash_uniform(seed, i) for i in range(out.numel())], dtype=torch.float32)
    assert torch.equal(out.flatten(), u * 2 - 1)


@requires_extension
@pytest.mark.parametrize("num_models", [None, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_start_bit_identical_to_reference(seed, dtype, num_models, gen):
    x_nat = torch.rand(4, 3, 8, 8, generator=gen, dtype=dtype)
    a = ops.pgd_random_start(x_nat, EPS, 0.0, 1.0, num_models=num_models, seed=seed)
    b = reference.pgd_random_start(x_nat, EPS, 0.0, 1.0, num_models=num_models, seed=seed)
    assert a.shape == b.shape and a.dtype == b.dtype == dtype
    assert torch.equal(a, b)


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", ["strided_x_nat", "channels_last", "box_cut", "eps0", "big_eps"])
def test_random_start_bit_identical_edge_cases(case, dtype, gen):
    x_nat = torch.rand(4, 3, 8, 8, generator=gen, dtype=dtype)
    eps, lo, hi = EPS, 0.0, 1.0
    if case == "strided_x_nat":
        x_nat = torch.rand(4, 3, 8, 16, generator=gen, dtype=dtype)[..., ::2]
    elif case == "channels_last":
        x_nat = x_nat.contiguous(memory_format=torch.channels_last)
    elif case == "box_cut":
        lo, hi = 0.3, 0.5
    elif case == "eps0":
        eps = 0.0
    else:
        eps = 3.0
    a = ops.pgd_random_start(x_nat, eps, lo, hi, num_models=2, seed=77)
    b = reference.pgd_random_start(x_nat, eps, lo, hi, num_models=2, seed=77)
    assert torch.equal(a, b)
    if case == "eps0":
        assert torch.equal(a, x_nat.expand_as(a))


@requires_extension
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_random_start_half_close_to_reference(dtype, gen):
    x_nat = torch.rand(4, 3, 8, 8, generator=gen).to(dtype)
    a = ops.pgd_random_start(x_nat, EPS, num_models=3, seed=5)
    b = reference.pgd_random_start(x_nat, EPS, num_models=3, seed=5)
    ulp = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    assert a.dtype == dtype
    torch.testing.assert_close(a, b, rtol=0, atol=ulp)
    assert bool((a >= 0).all() and (a <= 1).all())


@pytest.mark.parametrize("box", [(0.0, 1.0), (0.25, 0.75)], ids=["box01", "box_cut"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_random_start_in_ball_and_box(impl, dtype, box, gen):
    lo, hi = box
    x_nat = torch.rand(16, 3, 8, 8, generator=gen, dtype=dtype)
    x_nat.clamp_(lo, hi)
    out = impl.pgd_random_start(x_nat, EPS, lo, hi, num_models=3, generator=gen)
    assert out.shape == (3, *x_nat.shape) and out.dtype == dtype
    assert bool((out >= x_nat - EPS).all() and (out <= x_nat + EPS).all())
    assert bool((out >= lo).all() and (out <= hi).all())
    assert float((out - x_nat).abs().max()) > 0.9 * EPS  # actually spreads over the ball


def test_random_start_seeds_and_models_differ(impl):
    x_nat = torch.full((8, 3, 8, 8), 0.5)
    a = impl.pgd_random_start(x_nat, EPS, seed=1)
    b = impl.pgd_random_start(x_nat, EPS, seed=2)
    assert not torch.equal(a, b)
    assert float((a != b).float().mean()) > 0.99
    assert torch.equal(a, impl.pgd_random_start(x_nat, EPS, seed=1))
    m = impl.pgd_random_start(x_nat, EPS, num_models=3, seed=1)
    assert float((m[0] != m[1]).float().mean()) > 0.99 and float((m[1] != m[2]).float().mean()) > 0.99


def test_random_start_is_uniform(impl):
    x_nat = torch.full((64, 3, 32, 32), 0.5, dtype=torch.float64)
    eps = 0.25
    u = (impl.pgd_random_start(x_nat, eps, seed=2024) - 0.5).flatten() / eps  # ~ U(-1, 1)
    n = u.numel()
    assert abs(float(u.mean())) < 6 * math.sqrt(1 / 3 / n)
    assert abs(float(u.var()) - 1 / 3) < 6 * math.sqrt(4 / 45 / n)
    assert float(u.min()) < -0.999 and float(u.max()) > 0.999
    counts = torch.histc(u, bins=20, min=-1, max=1)
    assert float((counts / (n / 20) - 1).abs().max()) < 0.05
    # neighbours are uncorrelated (a counter hash must not leak the index)
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01


def test_random_start_follows_torch_manual_seed(impl):
    x_nat = torch.rand(4, 3, 8, 8)
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
    for b in range(B):  # first maximum; NaN counts as the maximum (torch.argmax's rule)
        col = ppd[:, b].tolist()
        nan = [m for m, v in enumerate(col) if v != v]
        best[b] = nan[0] if nan else max(range(M), key=lambda m: (col[m], -m))
    return best, logits[best, torch.arange(B)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF], ids=str)
@pytest.mark.parametrize("shape", [(3, 128, 10), (1, 5, 10), (4, 1, 3), (5, 16, 1000)], ids=str)
def test_select_is_argmax_gather(impl, shape, dtype, gen):
    M, B, K = shape
    ppd = torch.randint(-2, 3, (M, B), generator=gen).to(dtype)  # many ties
    logits = torch.randn(shape, generator=gen).to(dtype)
    idx, chosen = impl.collaborative_select(ppd, logits)
    e_idx, e_chosen = _select_oracle(ppd, logits)
    assert idx.dtype == torch.int64 and chosen.dtype == dtype
    assert torch.equal(idx, e_idx) and torch.equal(chosen, e_chosen)


def test_select_ties_and_nan(impl):
    ppd = torch.tensor([[0.0, 1.0, 2.0, 1.0, float("nan")],
                        [0.0, 3.0, 2.0, float("nan"), 5.0],
                        [0.0, 3.0, 1.0, float("nan"), float("nan")]])
    logits = torch.arange(3 * 5 * 2, dtype=torch.float32).reshape(3, 5, 2)
    idx, chosen = impl.collaborative_select(ppd, logits)
    assert idx.tolist() == [0, 1, 0, 1, 0]
    assert torch.equal(chosen, logits[idx, torch.arange(5)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_select_gradient_only_to_chosen_rows(impl, dtype, gen):
    M, B, K = 4, 32, 6
    ppd = torch.randn(M, B, generator=gen, dtype=dtype, requires_grad=True)
    z = torch.randn(M, B, K, generator=gen, dtype=dtype, requires_grad=True)
    idx, chosen = impl.collaborative_select(ppd, z)
    g = torch.randn(B, K, generator=gen, dtype=dtype)
    chosen.backward(g)
    expect = torch.zeros_like(z)
    expect[idx, torch.arange(B)] = g
    assert torch.equal(z.grad, expect)
    assert ppd.grad is None or float(ppd.grad.abs().sum()) == 0


def test_gradcheck_select(impl, gen):
    ppd = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    z = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: impl.collaborative_select(ppd, t)[1], (z,), eps=1e-6)


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_select_noncontiguous_matches_reference(dtype, gen):
    ppd = torch.randint(-1, 2, (16, 3), generator=gen).to(dtype).T  # [3, 16], ties
    base = torch.randn(3, 10, 32, generator=gen).to(dtype)
    res = []
    for impl in (ops, reference):
        leaf = base.clone().requires_grad_(True)
        idx, chosen = impl.collaborative_select(ppd, leaf.transpose(1, 2)[:, ::2])
        chosen.backward(torch.ones_like(chosen))
        res.append((idx, chosen.detach(), leaf.grad))
    for a, b in zip(*res):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# the raw operators: opcheck (schema, autograd registration, fake kernels, AOT dispatch)

def _raw():
    return torch.ops.cda2_ext


def _schema_args(op, values: Dict[str, object]) -> tuple:
    """Build an op's positional arguments by name from its schema (robust to argument order);
    arguments with a default that ``values`` does not name take the default."""
    args = []
    for a in op.default._schema.arguments:
        if a.name in values:
            args.append(values[a.name])
        else:
            assert a.has_default_value(), f"{op}: no test value for argument {a.name!r}"
            args.append(a.default_value)
    return tuple(args)


# names of collab_loss's outputs, in order, for schemas that leave its returns unnamed
COLLAB_RETURNS = ("loss", "ce", "weights", "p_true", "lse", "prob")


def raw_collab_loss(logits, target, sigma, reduction, **kw) -> Dict[str, Tensor]:
    """torch.ops.cda2_ext.collab_loss's outputs by name (the extra ones are saved for backward)."""
    op = torch.ops.cda2_ext.collab_loss
    outs = op(*_schema_args(op, dict(logits=logits, target=target, sigma=sigma, reduction=reduction, **kw)))
    names = [r.name or d for r, d in zip(op.default._schema.returns, COLLAB_RETURNS)]
    return dict(zip(names, outs))


def _collab_bwd_values(M, B, K, dtype, reduction, sigma, gen, present, **fwd_kw):
    z = make_logits((M, B, K), dtype, gen)
    y = make_target(B, K, gen)
    vals = raw_collab_loss(z, y, sigma, reduction, **fwd_kw)
    st = _stat_dtype(dtype)
    r = lambda *s: torch.randn(s, generator=gen).to(st)  # noqa: E731
    vals.update({
        "grad_loss": (r(B) if reduction == 0 else r()) if "loss" in present else None,
        "grad_ce": r(M, B) if "ce" in present else None,
        "grad_weights": r(M, B) if "weights" in present else None,
        "grad_p_true": r(M, B) if "p_true" in present else None,
        "logits": z, "target": y, "sigma": sigma, "reduction": reduction,
    })
    return vals


def _has_arg(op, name: str) -> bool:
    return any(a.name == name for a in op.default._schema.arguments)


OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic")


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no_grad"])
def test_opcheck_collab_loss(reduction, dtype, requires_grad, gen):
    z = make_logits((3, 5, 7), dtype, gen).requires_grad_(requires_grad)
    op = _raw().collab_loss
    _opcheck(op, _schema_args(op, dict(logits=z, target=make_target(5, 7, gen), sigma=0.5,
                                       reduction=reduction)))
    if _has_arg(op, "save_prob"):
        _opcheck(op, _schema_args(op, dict(logits=z, target=make_target(5, 7, gen), sigma=0.5,
                                           reduction=reduction, save_prob=True)))


@requires_extension
@pytest.mark.parametrize("save_prob", [False, True])
@pytest.mark.parametrize("present", [("loss",), ("ce",), ("weights", "p_true"), OUTPUTS], ids=str)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_collab_loss_backward(reduction, present, save_prob, gen):
    op = _raw().collab_loss_backward
    if save_prob and not _has_arg(_raw().collab_loss, "save_prob"):
        pytest.skip("collab_loss has no save_prob")
    kw = {"save_prob": True} if save_prob else {}
    vals = _collab_bwd_values(3, 5, 7, torch.float32, reduction, 0.5, gen, present, **kw)
    _opcheck(op, _schema_args(op, vals))
    # and the raw backward equals autograd through the reference
    z = vals["logits"].clone().requires_grad_(True)
    ref = reference.collaboration_loss(z, vals["target"], 0.5, ("none", "mean", "sum")[reduction])
    outs, grads = zip(*[(getattr(ref, n), vals["grad_" + n]) for n in OUTPUTS if vals["grad_" + n] is not None])
    (expect,) = torch.autograd.grad(outs, z, grads)
    torch.testing.assert_close(op(*_schema_args(op, vals)), expect, rtol=1e-5, atol=1e-5)


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_ppd_bce(reduction, dtype, gen):
    s = torch.randn(3, 6, generator=gen).to(dtype).requires_grad_(True)
    _opcheck(_raw().ppd_bce, (s, torch.rand(3, 6, generator=gen).to(dtype), reduction))


@requires_extension
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_ppd_bce_backward(reduction, gen):
    s = torch.randn(3, 6, generator=gen)
    g = torch.randn(3, 6, generator=gen) if reduction == 0 else torch.randn((), generator=gen)
    _opcheck(_raw().ppd_bce_backward, (g, s, torch.rand(3, 6, generator=gen), reduction))


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("broadcast", [True, False], ids=["broadcast", "same_shape"])
def test_opcheck_sign_step_(broadcast, dtype, gen):
    x, g, n = make_step_inputs((2, 3, 3, 4, 4), dtype, gen, broadcast=broadcast)
    _opcheck(_raw().sign_step_, (x, g, n, EPS, ALPHA, 0.0, 1.0))


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("broadcast", [True, False], ids=["broadcast", "same_shape"])
def test_opcheck_random_start_(broadcast, dtype, gen):
    n = torch.rand(3, 3, 4, 4, generator=gen, dtype=dtype)
    x = torch.zeros((2, *n.shape) if broadcast else n.shape, dtype=dtype)
    _opcheck(_raw().random_start_, (x, n, EPS, 0.0, 1.0, 42))


@requires_extension
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck_collab_select(dtype, requires_grad, gen):
    ppd = torch.randn(3, 5, generator=gen).to(dtype)
    z = torch.randn(3, 5, 7, generator=gen).to(dtype).requires_grad_(requires_grad)
    # opcheck's AOT helper sums all outputs into one scalar starting from the int64 index, which
    # fails for any op whose first output is an integer (a torch limitation); the compiled
    # backward of collab_select is covered by test_compile_select instead.
    tests = OPCHECK_TESTS if not requires_grad else OPCHECK_TESTS[:3]
    torch.library.opcheck(_raw().collab_select, (ppd, z), test_utils=tests)


@requires_extension
def test_opcheck_collab_select_backward(gen):
    idx = torch.tensor([0, 2, 1, 2, 0])
    _opcheck(_raw().collab_select_backward, (torch.randn(5, 7, generator=gen), idx, 3))


@requires_extension
def test_raw_ops_match_functional(gen):
    """The raw ops give the functional API's numbers (what opcheck's comparisons rest on)."""
    z, y = make_logits((3, 8, 5), torch.float64, gen), make_target(8, 5, gen)
    raw = raw_collab_loss(z, y, 0.5, 0)
    ref = reference.collaboration_loss(z, y, 0.5, "none")
    for n in OUTPUTS:
        torch.testing.assert_close(raw[n], getattr(ref, n))
    x, g, n = make_step_inputs((2, 3, 3, 4, 4), torch.float32, gen)
    a = x.clone()
    assert _raw().sign_step_(a, g, n, EPS, ALPHA, 0.0, 1.0) is None
    assert torch.equal(a, reference.pgd_sign_step_(x.clone(), g, n, EPS, ALPHA))


# ------------------------------------------------------------------------------------------------
# torch.compile and meta tensors

def _compile(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager", fullgraph=True)


@requires_extension
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_training_step(reduction, gen):
    def step(z, s, y):
        out = ops.collaboration_loss(z, y, 0.5, reduction)
        bce = ops.ppd_bce(s, out.p_true, reduction)
        return out.loss.sum() + bce.sum() + (out.ce * out.weights).sum(), out.weights

    z0 = make_logits((3, 16, 10), torch.float32, gen)
    s0 = torch.randn(3, 16, generator=gen)
    y = make_target(16, 10, gen)
    res = []
    for fn in (step, _compile(step)):
        z, s = z0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
        total, w = fn(z, s, y)
        total.backward()
        res.append((total.detach(), w.detach(), z.grad, s.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@requires_extension
def test_compile_attack_step(gen):
    def attack(x_nat, g):
        x = ops.pgd_random_start(x_nat, EPS, 0.0, 1.0, num_models=3, seed=11)
        ops.pgd_sign_step_(x, g, x_nat, EPS, ALPHA, 0.0, 1.0)
        return x

    x_nat = torch.rand(4, 3, 8, 8, generator=gen)
    g = torch.randn(3, 4, 3, 8, 8, generator=gen)
    assert torch.equal(attack(x_nat, g), _compile(attack)(x_nat, g))


@requires_extension
def test_compile_sign_step_mutates_input(gen):
    def step(x, g, n):
        ops.pgd_sign_step_(x, g, n, EPS, ALPHA, 0.0, 1.0)
        return x.sum()

    x, g, n = make_step_inputs((2, 3, 3, 4, 4), torch.float32, gen)
    a, b = x.clone(), x.clone()
    step(a, g, n)
    _compile(step)(b, g, n)
    assert torch.equal(a, b) and not torch.equal(a, x)


@requires_extension
def test_compile_select(gen):
    def infer(ppd, z):
        idx, chosen = ops.collaborative_select(ppd, z)
        return idx, chosen.softmax(-1)

    ppd = torch.randn(3, 16, generator=gen)
    z0 = torch.randn(3, 16, 10, generator=gen)
    g = torch.randn(16, 10, generator=gen)
    res = []
    for fn in (infer, _compile(infer)):
        z = z0.clone().requires_grad_(True)
        idx, prob = fn(ppd, z)
        prob.backward(g)
        res.append((idx, prob.detach(), z.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@requires_extension
def test_compile_dynamic_batch(gen):
    fn = torch.compile(lambda z, y: ops.collaboration_loss(z, y, 1.0, "none").loss,
                       backend="aot_eager", fullgraph=True, dynamic=True)
    torch._dynamo.reset()
    for B in (5, 9):
        z, y = make_logits((3, B, 10), torch.float32, gen), make_target(B, 10, gen)
        torch.testing.assert_close(fn(z, y), ops.collaboration_loss(z, y, 1.0, "none").loss)


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
        assert t.device.type == "meta" and t.dtype == _stat_dtype(dtype), n
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
