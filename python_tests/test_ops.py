"""The fused operators against their plain-PyTorch twins, finite differences and the paper, on
every device (the ``device`` fixture: ``cpu`` and ``cuda``; ``pytest -k cuda`` runs the CUDA cases).

The inputs come from one table of samples per op (``op_samples.py``: ``COLLAB_LOSS``,
``PPD_BCE``, ``SIGN_STEP``, ``RANDOM_START``, ``SELECT``), and every table feeds the same checks:

* ``test_<op>_matches_reference`` (``@requires_extension``): every sample, the fused op against
  its reference twin, forward outputs and every gradient;
* ``test_gradcheck_<op>``: the table's ``GRADCHECK`` samples (float64, small), finite differences
  of both ``cda2_ext.ops`` and ``cda2_ext.ops.reference`` (the ``impl`` fixture);
* ``test_opcheck_<raw op>``: the table's ``OPCHECK`` samples, ``torch.library.opcheck`` of the raw
  operator (schema, autograd registration, fake kernels, AOT dispatch), and of its backward;
* ``test_<op>_cuda_matches_cpu`` (names with ``cuda``): the table's ``CUDA_VS_CPU`` samples, the
  CUDA kernels against the CPU kernels on the same inputs (bit for bit where the math allows it).

Beside them: properties that hold for any correct implementation, run against both
implementations (``impl``) and checked against independent oracles (``F.cross_entropy``,
``F.binary_cross_entropy_with_logits``, Eq. 8, the hash written out in plain Python), so they can
fail without the extension too; ``torch.compile`` and meta tensors; side streams and a second GPU.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import cda2_ext
from cda2_ext import ops
from cda2_ext.ops import reference
from helpers import (HALF, OUTPUTS, RAW_OPS, RED_CODE, REDUCTIONS, REQUIRE_CUDA, cuda_missing,
                     eps, make_logits, make_target, schema_args, stat_dtype)
from op_samples import (ALPHA, COLLAB_LOSS, CUDA_VS_CPU, EPS, F32_64, GRAD_OUTPUTS, GRADCHECK, OPCHECK,
                        PPD_BCE, RANDOM_START, SEEDS, SELECT, SIGN_STEP, Args, Sample, make_step_inputs, rand,
                        randn, sample_id, tagged)

requires_extension = pytest.mark.requires_extension
RAW = torch.ops.cda2_ext


@pytest.fixture(params=[pytest.param("ops", marks=requires_extension), "reference"])
def impl(request):
    """The implementation under test: the fused ops (needs the build) or the reference twins."""
    return ops if request.param == "ops" else reference


def over(table):
    """Parametrise a test over samples (``sample``), with the samples' ids."""
    return pytest.mark.parametrize("sample", table, ids=sample_id)


def ulp(dtype: torch.dtype) -> float:
    """One unit in the last place at 1.0 (bounds the rounding of values in [0, 1])."""
    return torch.finfo(dtype).eps


def gradcheck_options(t: Tensor) -> dict:
    """Tight finite differences for small inputs; above 1000 elements gradcheck's fast mode (a
    random projection of the Jacobian) with its default tolerances."""
    return dict(fast_mode=True) if t.numel() > 1000 else dict(eps=1e-6, atol=1e-7, rtol=1e-5)


OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic")


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)


def _cpu(args) -> list:
    return [a.cpu() if isinstance(a, Tensor) else a for a in args]


def _twice(sample: Sample, gen: torch.Generator, device: str) -> Tuple[Args, Args]:
    """Two identical, independent draws of a sample's arguments (one per implementation of an
    in-place op)."""
    state = gen.get_state()
    a = sample.args(gen, device)
    gen.set_state(state)
    return a, sample.args(gen, device)


def _storage(t: Tensor) -> Tensor:
    """The tensor a view writes into (the tensor itself when it is no view)."""
    return t if t._base is None else t._base


# ================================================================================================
# collaboration_loss

def upstream_grads(M, B, reduction, dtype, gen, which=OUTPUTS, device="cpu") -> Dict[str, Tensor]:
    st = stat_dtype(dtype)
    shapes = {"loss": (B,) if reduction == "none" else (), "ce": (M, B), "weights": (M, B),
              "p_true": (M, B)}
    return {n: randn(shapes[n], gen, device, st) for n in which}


def run_collab(impl, z: Tensor, target: Tensor, sigma: float, reduction: str, upstream: Dict[str, Tensor]):
    """Forward ``z`` (which requires grad); backward with ``upstream``; return (outputs, d z)."""
    out = impl.collaboration_loss(z, target, sigma, reduction)
    (grad,) = torch.autograd.grad([getattr(out, n) for n in upstream], [z], [upstream[n] for n in upstream])
    return out._replace(**{n: getattr(out, n).detach() for n in OUTPUTS}), grad


def assert_collab_close(fused, ref, dtype, sigma, B, reduction, grads=None, upstream=None, zmax=1.0):
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


@requires_extension
@over(COLLAB_LOSS)
def test_collab_loss_matches_reference(sample, device, gen):
    """Forward outputs, and the gradient through the sample's ``outputs`` at once (outputs that
    reach no loss arrive in the backward as undefined gradients): dtypes, shapes, devices,
    values within the rounding the inputs allow, weights that sum to one, nothing non-finite."""
    z, y, sigma, reduction = sample.args(gen, device, requires_grad=True)
    M, B, K = z.shape
    up = upstream_grads(M, B, reduction, sample.dtype, gen, sample.outputs, device)
    f_out, f_grad = run_collab(ops, z, y, sigma, reduction, up)
    r_out, r_grad = run_collab(reference, z, y, sigma, reduction, up)
    for n in OUTPUTS:
        f = getattr(f_out, n)
        assert f.shape == getattr(r_out, n).shape and f.device == z.device, n
        assert f.dtype == stat_dtype(sample.dtype) and bool(torch.isfinite(f).all()), n
    assert f_grad.dtype == sample.dtype and bool(torch.isfinite(f_grad).all())
    zd = z.detach()
    zmax = float(zd[torch.isfinite(zd)].abs().max())  # masked (-inf) classes carry no rounding
    assert_collab_close(f_out, r_out, sample.dtype, sigma, B, reduction, (f_grad, r_grad), up, zmax=zmax)
    torch.testing.assert_close(f_out.weights.sum(0), torch.ones_like(f_out.weights[0]), rtol=0,
                               atol=8 * M * eps(sample.dtype))


@requires_extension
@over(tagged(COLLAB_LOSS, "masked"))
def test_collab_loss_masked_logits_close_to_float64(sample, device, gen):
    """Logits around 1e4 with -inf (masked) classes: finite, close to float64, and Eq. 8 holds."""
    z, y, sigma, _ = sample.args(gen, device)
    M, B, _ = z.shape
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
@over([s for s in tagged(COLLAB_LOSS, "grid") if s.reduction == "none"])
def test_raw_collab_loss_lse_and_saved_prob(sample, device, gen):
    """The raw op's fifth output is log-sum-exp in float64, accurate to the input's precision; the
    sixth (the softmax, saved for backward) is empty unless save_prob asks, and on CUDA always
    (recomputing it there moves fewer bytes than saving it)."""
    z, y, sigma, _ = sample.args(gen, device)
    M, B, K = z.shape
    dtype = sample.dtype
    out = RAW.collab_loss(z, y, sigma, 0)
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
    prob = RAW.collab_loss(z, y, sigma, 0, True)[5]
    if device == "cuda":
        assert prob.numel() == 0
    elif prob.numel():
        assert prob.shape == (M, B, K) and prob.dtype == stat_dtype(dtype)
        # exp(z - lse): relative error ~ eps * |z - lse|, plus lse's own (a float32 sum over K)
        lse_err = float((lse - want).abs().max())
        torch.testing.assert_close(prob.double(), torch.softmax(z.double(), -1), rtol=32 * eps(dtype) + lse_err,
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


# ----- properties (any implementation) ----------------------------------------------------------

@over(tagged(COLLAB_LOSS, "sigma"))
def test_eq8_bounds_and_weights_sum_to_one(impl, sample, device, gen):
    z, y, sigma, _ = sample.args(gen, device)
    M, B, _ = z.shape
    dtype = sample.dtype
    out = impl.collaboration_loss(z, y, sigma, "none")
    min_ce = out.ce.min(0).values
    tol = 8 * eps(dtype) * (1 + out.loss.abs() + sigma * math.log(M))
    assert bool((out.loss <= min_ce + tol).all()), "L > min_m ce"
    assert bool((out.loss >= min_ce - sigma * math.log(M) - tol).all()), "L < min_m ce - sigma ln M"
    torch.testing.assert_close(out.weights.sum(0), torch.ones(B, dtype=dtype, device=device),
                               rtol=0, atol=8 * M * eps(dtype))
    assert bool((out.weights >= 0).all())


@over([s for s in tagged(COLLAB_LOSS, "grid") if s.dtype in F32_64 and s.reduction == "none"])
def test_ce_and_p_true_match_cross_entropy(impl, sample, device, gen):
    z, y, _, _ = sample.args(gen, device)
    M, B, K = z.shape
    dtype = sample.dtype
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


@over(tagged(COLLAB_LOSS, GRADCHECK))
def test_gradcheck_collab_loss(impl, sample, device, gen):
    """Finite differences, float64, through the sample's ``outputs`` at once."""
    z, y, sigma, reduction = sample.args(gen, device, requires_grad=True)

    def outputs(t):
        out = impl.collaboration_loss(t, y, sigma, reduction)
        return tuple(getattr(out, n) for n in sample.outputs)
    assert torch.autograd.gradcheck(outputs, (z,), **gradcheck_options(z))


# ================================================================================================
# ppd_bce

@requires_extension
@over(PPD_BCE)
def test_ppd_bce_matches_reference(sample, device, gen):
    s, t, reduction = sample.args(gen, device, requires_grad=True)
    dtype = sample.dtype
    g = randn(s.shape if reduction == "none" else (), gen, device, stat_dtype(dtype))
    res = []
    for impl in (ops, reference):
        out = impl.ppd_bce(s, t, reduction)
        (grad,) = torch.autograd.grad(out, s, g)
        res.append((out.detach(), grad))
    (fo, fg), (ro, rg) = res
    assert fo.dtype == ro.dtype == stat_dtype(dtype) and fg.dtype == dtype
    assert fo.shape == ro.shape and fo.device.type == device
    assert bool(torch.isfinite(fo).all() and torch.isfinite(fg).all())
    n = 1 if reduction == "none" else s.numel()
    smax = float(s.detach().abs().max())
    tol = 32 * eps(dtype)
    if t.dtype != dtype:  # ops casts the target to the logit's dtype first; allow that rounding
        torch.testing.assert_close(fo, ro, rtol=1e-2, atol=1e-2 * smax)
    else:
        # bce = s (1 - t) + log1p(e^-s) cancels: at huge logits the error is ~ eps |s|
        torch.testing.assert_close(fo, ro, rtol=tol, atol=tol * n * (smax if sample.extreme == "huge" else 1.0))
    gtol = tol if dtype not in HALF else {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(fg, rg, rtol=gtol, atol=gtol * float(rg.abs().max()) + tol)


@over(tagged(PPD_BCE, "softplus_edge"))
def test_ppd_bce_is_bce_with_logits(impl, sample, device, gen):
    """Against F.binary_cross_entropy_with_logits, beyond F.softplus's threshold (20) too."""
    s, t, reduction = sample.args(gen, device, requires_grad=True)
    dtype = sample.dtype
    out = impl.ppd_bce(s, t, reduction)
    expect = F.binary_cross_entropy_with_logits(s.detach(), t, reduction=reduction)
    torch.testing.assert_close(out, expect, rtol=16 * eps(dtype), atol=16 * eps(dtype) * s.numel())
    out.sum().backward()
    g = torch.sigmoid(s.detach()) - t
    g = g / s.numel() if reduction == "mean" else g
    torch.testing.assert_close(s.grad, g, rtol=16 * eps(dtype), atol=16 * eps(dtype))


def test_ppd_bce_target_is_detached(impl, device, gen):
    s = randn((3, 8), gen, device).requires_grad_(True)
    t = rand((3, 8), gen, device).requires_grad_(True)
    gs, gt = torch.autograd.grad(impl.ppd_bce(s, t, "sum"), [s, t], allow_unused=True)
    assert gs is not None and float(gs.abs().sum()) > 0
    assert gt is None or float(gt.abs().sum()) == 0


def test_ppd_bce_detached_through_collab_loss(impl, device, gen):
    """Alg. 1: the PPD loss trains only the PPD head; the label path learns only from L."""
    z = randn((3, 16, 10), gen, device).requires_grad_(True)
    s = randn((3, 16), gen, device).requires_grad_(True)
    y = make_target(16, 10, gen, device)
    out = impl.collaboration_loss(z, y, 1.0, "mean")
    gz, gs = torch.autograd.grad(impl.ppd_bce(s, out.p_true, "mean"), [z, s], allow_unused=True)
    assert gz is None or float(gz.abs().sum()) == 0
    assert float(gs.abs().sum()) > 0


@over(tagged(PPD_BCE, GRADCHECK))
def test_gradcheck_ppd_bce(impl, sample, device, gen):
    s, t, reduction = sample.args(gen, device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: impl.ppd_bce(a, t, reduction), (s,), **gradcheck_options(s))


# ================================================================================================
# pgd_sign_step_

@requires_extension
@over(SIGN_STEP)
def test_sign_step_matches_reference(sample, device, gen):
    """In place, through whatever view ``x_adv`` is, returning ``x_adv``: bit for bit in
    float32/float64 (NaN gradients included), within an ulp in half precision (the reference
    rounds alpha and x0 -/+ eps to the half type first). The whole storage is compared, so the
    elements a strided view leaves out must stay untouched; the result lies in the box, and is
    NaN only where the gradient is."""
    fused_args, ref_args = _twice(sample, gen, device)
    x, g, _, _, _, lo, hi = fused_args
    before = _storage(x).clone()
    assert ops.pgd_sign_step_(*fused_args) is x
    reference.pgd_sign_step_(*ref_args)
    got, want = _storage(x), _storage(ref_args[0])
    atol = ulp(sample.dtype) if sample.dtype in HALF else 0.0
    torch.testing.assert_close(got, want, rtol=0, atol=atol, equal_nan=True)
    assert not torch.equal(got, before)
    nan = torch.isnan(x)
    assert bool((nan | ((x >= lo) & (x <= hi))).all()), "left the box"
    assert bool((~nan | torch.isnan(g)).all()), "NaN where the gradient is a number"


@over([s for s in tagged(SIGN_STEP, "layout") if s.layout in ("broadcast", "same_shape") and s.dtype in F32_64])
def test_sign_step_ball_box_and_formula(impl, sample, device, gen):
    x, g, n, e, alpha, lo, hi = sample.args(gen, device)
    out = impl.pgd_sign_step_(x.clone(), g, n, e, alpha, lo, hi)
    nb = n.expand_as(x)
    inside = (nb >= lo) & (nb <= hi)  # where x_nat lies in the box, ball and box meet
    assert bool(((out >= nb - e) & (out <= nb + e))[inside].all()), "left the eps-ball"
    assert bool((out >= lo).all() and (out <= hi).all()), "left the box"
    # the textbook formula, written independently: clip(clip(x + a*sign(g), ball), box)
    step = x + alpha * torch.sign(g)
    expect = torch.clamp(torch.clamp(step, nb - e, nb + e), lo, hi)
    assert torch.equal(out, expect)
    # and where nothing clips, the step is exactly alpha * sign(g)
    free = (step > nb - e) & (step < nb + e) & (step > lo) & (step < hi)
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


# ================================================================================================
# pgd_random_start

def _py_hash_uniform(seed: int, i: int) -> float:
    """The counter-based hash of csrc/torch_free/common.h, in Python integers (the spec)."""
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


@pytest.mark.parametrize("seed", SEEDS)
def test_random_start_noise_is_the_hash(impl, seed, device):
    """x_nat = 0, eps = 1, box [-1, 1]: the start is exactly 2u - 1 with u the spec's hash."""
    x_nat = torch.zeros(2, 3, 4, 5, device=device)
    out = impl.pgd_random_start(x_nat, 1.0, -1.0, 1.0, num_models=3, seed=seed)
    assert out.shape == (3, 2, 3, 4, 5) and out.dtype == torch.float32 and out.device.type == device
    u = torch.tensor([_py_hash_uniform(seed, i) for i in range(out.numel())], dtype=torch.float32)
    assert torch.equal(out.flatten().cpu(), u * 2 - 1)


@requires_extension
@over(RANDOM_START)
def test_random_start_matches_reference(sample, device, gen):
    """Bit for bit in float32/float64, within two ulps in half precision (the reference's
    (2u - 1) * eps runs in the half type); in the box, and in the ball wherever x_nat lies in the
    box (eps = 0: x_nat itself)."""
    args = sample.args(gen, device)
    x_nat, e, lo, hi, num_models, _ = args
    got, want = ops.pgd_random_start(*args), reference.pgd_random_start(*args)
    shape = x_nat.shape if num_models is None else (num_models, *x_nat.shape)
    assert got.shape == want.shape == shape and got.dtype == sample.dtype and got.device == x_nat.device
    if sample.dtype in HALF:
        torch.testing.assert_close(got, want, rtol=0, atol=2 * ulp(sample.dtype))
    else:
        assert torch.equal(got, want)
    assert bool(((got >= lo) & (got <= hi)).all())
    dist = (got - x_nat).abs()
    inside = ((x_nat >= lo) & (x_nat <= hi)).expand_as(dist)
    assert bool((dist <= e + ulp(sample.dtype))[inside].all())
    if e == 0:
        assert torch.equal(got, x_nat.expand_as(got))


@requires_extension
def test_raw_random_start_writes_views_and_uses_the_whole_seed(device, gen):
    x_nat = rand((4, 3, 5, 5), gen, device)
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
    """With a ``generator`` (no seed): in the ball and the box, and spread over the ball."""
    lo, hi = box
    x_nat = rand((16, 3, 8, 8), gen, device, dtype, lo, hi)
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
    x_nat = rand((4, 3, 8, 8), gen, device)
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


# ================================================================================================
# collaborative_select (Algorithm 2)

def _select_oracle(ppd, logits):
    M, B = ppd.shape
    best = torch.empty(B, dtype=torch.int64)
    for b, col in enumerate(ppd.T.tolist()):  # first maximum; NaN counts as the maximum (argmax's rule)
        nan = [m for m, v in enumerate(col) if v != v]
        best[b] = nan[0] if nan else max(range(M), key=lambda m: (col[m], -m))
    best = best.to(logits.device)
    return best, logits[best, torch.arange(B, device=logits.device)]


@over(SELECT)
def test_select_is_argmax_gather(impl, sample, device, gen):
    """The first maximum (NaN the largest) and a gather, whatever the scores' dtype; the chosen
    rows keep the logits' dtype."""
    ppd, logits = sample.args(gen, device)
    idx, chosen = impl.collaborative_select(ppd, logits)
    e_idx, e_chosen = _select_oracle(ppd, logits)
    assert idx.dtype == torch.int64 and chosen.dtype == sample.dtype and chosen.device.type == device
    assert torch.equal(idx, e_idx) and torch.equal(chosen, e_chosen)
    if sample.tie_pattern:  # a tie (the first wins), a NaN (it wins), all NaN (the first wins)
        assert idx[:3].tolist() == [0, 1, 0]


@requires_extension
@over(SELECT)
def test_select_matches_reference(sample, device, gen):
    """Index, chosen rows and the gradient (into the chosen rows only), exactly."""
    ppd, logits = sample.args(gen, device, requires_grad=True)
    g = randn(logits.shape[1:], gen, device, sample.dtype)
    res = []
    for impl in (ops, reference):
        idx, chosen = impl.collaborative_select(ppd, logits)
        (grad,) = torch.autograd.grad(chosen, logits, g)
        res.append((idx, chosen.detach(), grad))
    for a, b in zip(*res):
        assert torch.equal(a, b)


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
    ppd = randn((M, B), gen, device, dtype).requires_grad_(True)
    z = randn((M, B, K), gen, device, dtype).requires_grad_(True)
    idx, chosen = impl.collaborative_select(ppd, z)
    g = randn((B, K), gen, device, dtype)
    chosen.backward(g)
    expect = torch.zeros_like(z)
    expect[idx, torch.arange(B, device=device)] = g
    assert torch.equal(z.grad, expect)
    assert ppd.grad is None or float(ppd.grad.abs().sum()) == 0


@over(tagged(SELECT, GRADCHECK))
def test_gradcheck_select(impl, sample, device, gen):
    ppd, z = sample.args(gen, device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: impl.collaborative_select(ppd, t)[1], (z,), **gradcheck_options(z))


# ================================================================================================
# the raw operators: opcheck (schema, autograd registration, fake kernels, AOT dispatch)

def raw_collab_loss(logits, target, sigma, reduction: int, **kw) -> Dict[str, Tensor]:
    """torch.ops.cda2_ext.collab_loss's outputs by their schema names (lse and prob are saved for
    backward)."""
    op = RAW.collab_loss
    outs = op(*schema_args(op, dict(logits=logits, target=target, sigma=sigma, reduction=reduction, **kw)))
    return dict(zip([r.name for r in op.default._schema.returns], outs))


@requires_extension
@pytest.mark.parametrize("save_prob", [False, True])
@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no_grad"])
@over(tagged(COLLAB_LOSS, OPCHECK))
def test_opcheck_collab_loss(sample, requires_grad, save_prob, device, gen):
    z, y, sigma, reduction = sample.args(gen, device, requires_grad)
    _opcheck(RAW.collab_loss, (z, y, sigma, RED_CODE[reduction], save_prob))


@requires_extension
@pytest.mark.parametrize("save_prob", [False, True])
@pytest.mark.parametrize("present", GRAD_OUTPUTS, ids="+".join)
@over([s for s in tagged(COLLAB_LOSS, OPCHECK) if s.dtype == torch.float32])
def test_opcheck_collab_loss_backward(sample, present, save_prob, device, gen):
    """The raw backward with gradients for the ``present`` outputs only (the others None); and it
    equals autograd through the reference."""
    op = RAW.collab_loss_backward
    z, y, sigma, reduction = sample.args(gen, device)
    M, B, _ = z.shape
    code = RED_CODE[reduction]
    vals = raw_collab_loss(z, y, sigma, code, save_prob=save_prob)
    up = upstream_grads(M, B, reduction, sample.dtype, gen, present, device)
    vals.update({f"grad_{n}": up.get(n) for n in OUTPUTS})
    vals.update(logits=z, target=y, sigma=sigma, reduction=code)
    _opcheck(op, schema_args(op, vals))
    leaf = z.clone().requires_grad_(True)
    ref = reference.collaboration_loss(leaf, y, sigma, reduction)
    (expect,) = torch.autograd.grad([getattr(ref, n) for n in up], leaf, list(up.values()))
    torch.testing.assert_close(op(*schema_args(op, vals)), expect, rtol=1e-5, atol=1e-5)


@requires_extension
@over(tagged(PPD_BCE, OPCHECK))
def test_opcheck_ppd_bce(sample, device, gen):
    s, t, reduction = sample.args(gen, device, requires_grad=True)
    _opcheck(RAW.ppd_bce, (s, t, RED_CODE[reduction]))


@requires_extension
@over([s for s in tagged(PPD_BCE, OPCHECK) if s.dtype == torch.float32])
def test_opcheck_ppd_bce_backward(sample, device, gen):
    s, t, reduction = sample.args(gen, device)
    g = randn(s.shape if reduction == "none" else (), gen, device)
    _opcheck(RAW.ppd_bce_backward, (g, s, t, RED_CODE[reduction]))


@requires_extension
@over(tagged(SIGN_STEP, OPCHECK))
def test_opcheck_sign_step_(sample, device, gen):
    _opcheck(RAW.sign_step_, sample.args(gen, device))


@requires_extension
@over(tagged(RANDOM_START, OPCHECK))
def test_opcheck_random_start_(sample, device, gen):
    x_nat, e, lo, hi, num_models, seed = sample.args(gen, device)
    x = torch.zeros(x_nat.shape if num_models is None else (num_models, *x_nat.shape), dtype=x_nat.dtype,
                    device=device)
    _opcheck(RAW.random_start_, (x, x_nat, e, lo, hi, seed))


@requires_extension
@pytest.mark.parametrize("requires_grad", [False, True])
@over(tagged(SELECT, OPCHECK))
def test_opcheck_collab_select(sample, requires_grad, device, gen):
    ppd, z = sample.args(gen, device, requires_grad)
    # opcheck's AOT helper sums all outputs into one scalar starting from the int64 index, which
    # fails for any op whose first output is an integer (a torch limitation); the compiled
    # backward of collab_select is covered by test_compile_select instead.
    tests = OPCHECK_TESTS if not requires_grad else OPCHECK_TESTS[:3]
    torch.library.opcheck(RAW.collab_select, (ppd, z), test_utils=tests)


@requires_extension
@over(tagged(SELECT, OPCHECK))
def test_opcheck_collab_select_backward(sample, device, gen):
    ppd, z = sample.args(gen, device)
    idx, chosen = RAW.collab_select(ppd, z)
    _opcheck(RAW.collab_select_backward, (randn(chosen.shape, gen, device, sample.dtype), idx, z.shape[0]))


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


# ================================================================================================
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
    s0 = randn((3, 16), gen, device)
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

    x_nat = rand((4, 3, 8, 8), gen, device)
    g = randn((3, 4, 3, 8, 8), gen, device)
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

    ppd = randn((3, 16), gen, device)
    z0 = randn((3, 16, 10), gen, device)
    g = randn((16, 10), gen, device)
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
    x = randn((B, D), gen, device)
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

    x_nat = rand((8, 3, 4, 4), gen, device)
    x_adv = ops.pgd_random_start(x_nat, EPS, num_models=M, seed=3)
    g = randn(x_adv.shape, gen, device)
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


# ================================================================================================
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


#: CUDA against CPU: float64 to its rounding, float32 and half to float32 sums in another order.
CUDA_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
            torch.float16: dict(rtol=2e-3, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}


@requires_extension
@over(tagged(COLLAB_LOSS, CUDA_VS_CPU))
def test_collab_loss_cuda_matches_cpu(sample, cuda, gen):
    z, y, sigma, reduction = sample.args(gen, cuda)
    code = RED_CODE[reduction]
    tol = dict(rtol=1e-4, atol=1e-5) if sample.dtype in HALF else CUDA_TOL[sample.dtype]
    got = RAW.collab_loss(z, y, sigma, code)
    cpu = RAW.collab_loss(z.cpu(), y.cpu(), sigma, code)
    for g, c in zip(got[:4], cpu[:4]):  # loss, ce, weights, p_true
        assert g.dtype == c.dtype and g.shape == c.shape
        torch.testing.assert_close(g.cpu(), c, **tol)
    torch.testing.assert_close(got[4].cpu(), cpu[4], rtol=1e-6, atol=1e-5)  # lse: float64 out, float sums over K in another order


@requires_extension
@over(tagged(COLLAB_LOSS, CUDA_VS_CPU))
def test_collab_loss_backward_cuda_matches_cpu(sample, cuda, gen):
    z, y, sigma, reduction = sample.args(gen, cuda)
    M, B, _ = z.shape
    code = RED_CODE[reduction]
    _, _, w, p, lse, prob = RAW.collab_loss(z, y, sigma, code)
    up = upstream_grads(M, B, reduction, sample.dtype, gen, OUTPUTS, cuda)
    args = (*up.values(), z, y, lse, prob, w, p, sigma, code)
    got = RAW.collab_loss_backward(*args)
    cpu = RAW.collab_loss_backward(*_cpu(args))
    tol = CUDA_TOL[sample.dtype]
    torch.testing.assert_close(got.cpu(), cpu, **tol)
    # a softmax saved by the CPU forward is accepted on CUDA (and gives the same gradient)
    cpu_prob = RAW.collab_loss(z.cpu(), y.cpu(), sigma, code, True)[5]
    if cpu_prob.numel():
        with_prob = RAW.collab_loss_backward(*args[:7], cpu_prob.to(cuda), *args[8:])
        torch.testing.assert_close(with_prob, got, **tol)


@requires_extension
@over(tagged(PPD_BCE, CUDA_VS_CPU))
def test_ppd_bce_cuda_matches_cpu(sample, cuda, gen):
    s, t, reduction = sample.args(gen, cuda)
    code = RED_CODE[reduction]
    out = RAW.ppd_bce(s, t, code)
    fwd = CUDA_TOL[torch.float64] if sample.dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.cpu(), RAW.ppd_bce(s.cpu(), t.cpu(), code), **fwd)
    g = randn(out.shape, gen, cuda, out.dtype)
    torch.testing.assert_close(RAW.ppd_bce_backward(g, s, t, code).cpu(),
                               RAW.ppd_bce_backward(g.cpu(), s.cpu(), t.cpu(), code), **CUDA_TOL[sample.dtype])


@requires_extension
@over(tagged(SIGN_STEP, CUDA_VS_CPU))
def test_sign_step_cuda_matches_cpu_bit_for_bit(sample, cuda, gen):
    args = sample.args(gen, cuda)
    cpu_args = _cpu(args)
    RAW.sign_step_(*args)
    RAW.sign_step_(*cpu_args)
    assert torch.equal(args[0].cpu(), cpu_args[0])


@requires_extension
@over(tagged(RANDOM_START, CUDA_VS_CPU))
def test_random_start_cuda_matches_cpu_bit_for_bit(sample, cuda, gen):
    args = sample.args(gen, cuda)
    assert torch.equal(ops.pgd_random_start(*args).cpu(), ops.pgd_random_start(*_cpu(args)))


@requires_extension
@over(tagged(SELECT, CUDA_VS_CPU))
def test_select_cuda_matches_cpu(sample, cuda, gen):
    s, z = sample.args(gen, cuda)
    idx, chosen = RAW.collab_select(s, z)
    cidx, cchosen = RAW.collab_select(s.cpu(), z.cpu())
    assert torch.equal(idx.cpu(), cidx) and torch.equal(chosen.cpu(), cchosen)
    g = randn(chosen.shape, gen, cuda, sample.dtype)
    M = z.shape[0]
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
