"""CUDA parametrisations of the fused operators.

Every test here needs a CUDA device and an extension built with the CUDA kernels; without them the
module skips itself. What is checked, on CUDA tensors:

* the CUDA op against :mod:`cda2_ext.reference` (run on the same device), float32 at rtol 1e-5,
  float64 tighter, float16/bfloat16 within their precision;
* the CUDA op against the CPU op on the same inputs (bit for bit where the math allows it:
  the sign step, the random start and the selection);
* ``torch.library.opcheck`` (schema, fake kernel, autograd registration, AOT dispatch);
* bad inputs raising the documented exception types on CUDA tensors;
* gradients through ``torch.autograd`` (against the reference's autograd, and ``gradcheck`` in
  float64);
* a ``torch.compile``d training step using the ops;
* shapes from the paper's (M=3, B=128, K=10) up to K=32768, unaligned and non-contiguous inputs,
  non-default streams.
"""
from __future__ import annotations

import os

import pytest
import torch

import cda2_ext
from cda2_ext import ops, reference

CUDA = torch.cuda.is_available()
HAS_CUDA_KERNELS = bool(getattr(ops, "HAS_EXTENSION", False)) and CUDA and ops.cuda_available()
REQUIRE_EXTENSION = os.environ.get("CDA2_REQUIRE_EXTENSION", "") not in ("", "0")

pytestmark = [
    pytest.mark.skipif(not CUDA, reason="needs a CUDA device"),
    pytest.mark.requires_extension,
]


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    """On a CUDA machine, an extension built without its CUDA kernels skips these tests, or fails
    them when CDA2_REQUIRE_EXTENSION=1 (as conftest.py does for a missing extension)."""
    if CUDA and not HAS_CUDA_KERNELS and getattr(ops, "HAS_EXTENSION", False):
        why = f"cda2_ext was built without its CUDA kernels ({ops.BUILD_INFO})"
        if REQUIRE_EXTENSION:
            pytest.fail(f"CDA2_REQUIRE_EXTENSION=1 but {why}", pytrace=False)
        pytest.skip(why)

DEV = "cuda"
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALVES = (torch.float16, torch.bfloat16)
REDUCTIONS = ["none", "mean", "sum"]
RED_CODE = {"none": 0, "mean": 1, "sum": 2}

# (M, B, K): the paper's shape, tiny and odd shapes, both forward kernels (group of lanes for
# K <= 2048, one block per sample above), unaligned K (no 16-byte vectors) and the huge-K case.
LOSS_SHAPES = [
    (3, 128, 10),
    (1, 1, 2),
    (2, 5, 3),
    (4, 7, 33),
    (3, 33, 100),
    (2, 9, 1000),
    (5, 3, 2047),
    (2, 4, 2049),
    (3, 3, 4099),
    (2, 6, 32768),
]


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALVES else dtype


def tol(dtype: torch.dtype) -> dict:
    """Tolerances for statistics (computed in float32 for half inputs) against the reference."""
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-12)
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-6)
    return dict(rtol=1e-4, atol=1e-5)  # half inputs, float32 statistics


def grad_tol(dtype: torch.dtype) -> dict:
    """Tolerances for gradients, which come back in the input's dtype."""
    if dtype == torch.float16:
        return dict(rtol=2e-3, atol=1e-5)
    if dtype == torch.bfloat16:
        return dict(rtol=1.6e-2, atol=1e-5)
    return tol(dtype)


def make_logits(M: int, B: int, K: int, dtype: torch.dtype, scale: float = 3.0,
                device: str = DEV) -> torch.Tensor:
    return (torch.randn(M, B, K, device=device, dtype=torch.float32) * scale).to(dtype)


def make_target(B: int, K: int, device: str = DEV) -> torch.Tensor:
    return torch.randint(0, K, (B,), device=device, dtype=torch.int64)


def loss_outputs(out) -> tuple:
    return out.loss, out.ce, out.weights, out.p_true


# ---------------------------------------------------------------------------------------------
# build sanity
# ---------------------------------------------------------------------------------------------
def test_build_reports_cuda():
    assert ops.cuda_available()
    assert "CUDA" in ops.BUILD_INFO


def test_cuda_kernels_registered():
    for name in ("collab_loss", "collab_loss_backward", "ppd_bce", "ppd_bce_backward", "sign_step_",
                 "random_start_", "collab_select", "collab_select_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cda2_ext::{name}", "CUDA"), name


# ---------------------------------------------------------------------------------------------
# collaboration loss: forward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_collab_loss_forward_vs_reference(shape, dtype, reduction):
    torch.manual_seed(0)
    M, B, K = shape
    z = make_logits(M, B, K, dtype)
    y = make_target(B, K)
    for sigma in (0.5, 1.0):
        got = ops.collaboration_loss(z, y, sigma, reduction)
        want = reference.collaboration_loss(z, y, sigma, reduction)
        for g, w, name in zip(loss_outputs(got), loss_outputs(want), ("loss", "ce", "weights", "p_true")):
            assert g.dtype == stat_dtype(dtype), name
            assert g.device.type == "cuda", name
            assert g.shape == w.shape, name
            torch.testing.assert_close(g, w, **tol(dtype), msg=lambda m: f"{name}: {m}")
        # weights sum to one over the sub-models
        torch.testing.assert_close(got.weights.sum(0), torch.ones(B, device=DEV, dtype=stat_dtype(dtype)),
                                   **tol(dtype))


@pytest.mark.parametrize("shape", [(3, 128, 10), (2, 9, 1000), (3, 3, 4099), (2, 2, 32768)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_collab_loss_lse_output(shape, dtype):
    """The raw op's fifth output is log-sum-exp in float64, accurate to the input's precision; the
    sixth (a saved softmax) stays empty on CUDA even when asked for: recomputing it is cheaper."""
    torch.manual_seed(1)
    M, B, K = shape
    z = make_logits(M, B, K, dtype)
    y = make_target(B, K)
    out = torch.ops.cda2_ext.collab_loss(z, y, 1.0, 0)
    assert len(out) == 6
    assert out[5].numel() == 0
    assert torch.ops.cda2_ext.collab_loss(z, y, 1.0, 0, True)[5].numel() == 0
    lse = out[4]
    assert lse.dtype == torch.float64 and lse.shape == (M, B)
    want = torch.logsumexp(z.double(), dim=-1)
    if dtype == torch.float64:
        torch.testing.assert_close(lse, want, rtol=1e-12, atol=1e-12)
    else:  # float32 sum of exp: relative error ~1e-6 at K=32768, i.e. ~1e-6 absolute in lse
        torch.testing.assert_close(lse, want, rtol=2e-7, atol=1e-5)
    # ce = lse - z[y]
    zy = z.double().gather(-1, y.view(1, B, 1).expand(M, B, 1)).squeeze(-1)
    torch.testing.assert_close(out[1].double(), lse - zy, **tol(dtype))


@pytest.mark.parametrize("K", [10, 1000, 32768])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_collab_loss_cuda_vs_cpu(K, dtype):
    torch.manual_seed(2)
    M, B = 3, 17
    z = make_logits(M, B, K, dtype)
    y = make_target(B, K)
    for reduction in REDUCTIONS:
        got = torch.ops.cda2_ext.collab_loss(z, y, 0.7, RED_CODE[reduction])
        cpu = torch.ops.cda2_ext.collab_loss(z.cpu(), y.cpu(), 0.7, RED_CODE[reduction])
        assert len(got) == len(cpu) == 6
        for g, c in zip(got[:4], cpu[:4]):  # loss, ce, weights, p_true
            assert g.dtype == c.dtype and g.shape == c.shape
            torch.testing.assert_close(g.cpu(), c, **tol(dtype))
        torch.testing.assert_close(got[4].cpu(), cpu[4], rtol=2e-7, atol=1e-5)  # lse, float64


def test_collab_loss_extreme_values():
    """Huge offsets, -inf (masked) classes, tiny and huge sigma: finite, close to float64."""
    torch.manual_seed(3)
    M, B, K = 3, 64, 50
    z = torch.randn(M, B, K, device=DEV) * 5 + 1e4
    y = make_target(B, K)
    mask = torch.rand(M, B, K, device=DEV) < 0.3
    mask.scatter_(-1, y.view(1, B, 1).expand(M, B, 1), False)  # never mask the true class
    z = z.masked_fill(mask, float("-inf"))
    for sigma in (1e-4, 1.0, 1e4):
        got = ops.collaboration_loss(z, y, sigma, "none")
        want = reference.collaboration_loss(z.double(), y, sigma, "none")
        for g, w, name in zip(loss_outputs(got), loss_outputs(want), ("loss", "ce", "weights", "p_true")):
            assert torch.isfinite(g).all(), name
            if name == "weights" and sigma < 1:
                continue  # near-one-hot: a 1e-6 change in ce moves them by exp(1e-6 / sigma)
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(got.weights.sum(0), torch.ones(B, device=DEV), rtol=1e-5, atol=1e-5)
        # Eq. 8: min_m ce - sigma ln M <= L <= min_m ce (up to float32 rounding of L)
        cmin = got.ce.min(0).values
        slack = 1e-4 + 1e-6 * sigma
        assert (got.loss <= cmin + slack).all()
        assert (got.loss >= cmin - sigma * torch.log(torch.tensor(float(M))) - slack).all()


def test_collab_loss_nan_propagates():
    z = make_logits(2, 4, 10, torch.float32)
    y = make_target(4, 10)
    z[0, 1, 3] = float("nan")
    out = ops.collaboration_loss(z, y, 1.0, "none")
    assert torch.isnan(out.ce[0, 1])
    assert torch.isfinite(out.ce[1]).all() and torch.isfinite(out.ce[0, [0, 2, 3]]).all()


def test_collab_loss_noncontiguous_and_unaligned():
    torch.manual_seed(4)
    M, B, K = 3, 20, 64
    base = torch.randn(B, M, K, device=DEV)
    z = base.transpose(0, 1)  # [M, B, K], not contiguous
    assert not z.is_contiguous()
    y = make_target(2 * B, K)[::2]  # strided labels
    got = ops.collaboration_loss(z, y, 1.0, "none")
    want = reference.collaboration_loss(z.contiguous(), y.contiguous(), 1.0, "none")
    for g, w in zip(loss_outputs(got), loss_outputs(want)):
        torch.testing.assert_close(g, w, **tol(torch.float32))
    # contiguous but 4 bytes off a 16-byte boundary: the kernels must fall back to scalar loads
    flat = torch.empty(M * B * K + 1, device=DEV)
    zu = flat[1:].view(M, B, K)
    zu.copy_(z)
    assert zu.is_contiguous() and zu.data_ptr() % 16 != 0
    got_u = ops.collaboration_loss(zu, y, 1.0, "none")
    for g, w in zip(loss_outputs(got_u), loss_outputs(want)):
        torch.testing.assert_close(g, w, **tol(torch.float32))
    # backward on the unaligned input too (detach keeps the storage, so the offset stays)
    zl = zu.detach().requires_grad_(True)
    assert zl.data_ptr() == zu.data_ptr()
    ops.collaboration_loss(zl, y, 1.0, "sum").loss.backward()
    zr = z.detach().clone().requires_grad_(True)
    reference.collaboration_loss(zr, y, 1.0, "sum").loss.backward()
    torch.testing.assert_close(zl.grad, zr.grad, **tol(torch.float32))


def test_collab_loss_reduced_is_deterministic():
    torch.manual_seed(5)
    z = make_logits(8, 4096, 100, torch.float32)
    y = make_target(4096, 100)
    a = ops.collaboration_loss(z, y, 1.0, "mean").loss
    b = ops.collaboration_loss(z, y, 1.0, "mean").loss
    assert torch.equal(a, b)


def test_collab_loss_on_side_stream():
    torch.manual_seed(6)
    z = make_logits(3, 128, 10, torch.float32)
    y = make_target(128, 10)
    want = reference.collaboration_loss(z, y, 1.0, "mean").loss
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = ops.collaboration_loss(z, y, 1.0, "mean").loss
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(got, want, **tol(torch.float32))


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_collab_loss_on_second_device():
    z = make_logits(3, 16, 10, torch.float32, device="cuda:1")
    y = make_target(16, 10, device="cuda:1")
    got = ops.collaboration_loss(z, y, 1.0, "none")
    assert got.loss.device == z.device
    want = reference.collaboration_loss(z, y, 1.0, "none")
    torch.testing.assert_close(got.loss, want.loss, **tol(torch.float32))


# ---------------------------------------------------------------------------------------------
# collaboration loss: backward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_collab_loss_backward_vs_reference(shape, dtype, reduction):
    """Upstream gradients on every output (loss, ce, weights, p_true) at once."""
    torch.manual_seed(7)
    M, B, K = shape
    z0 = make_logits(M, B, K, dtype)
    y = make_target(B, K)
    sd = stat_dtype(dtype)
    g_loss = torch.randn((B,) if reduction == "none" else (), device=DEV, dtype=sd)
    g_ce, g_w, g_p = (torch.randn(M, B, device=DEV, dtype=sd) for _ in range(3))
    grads = []
    for impl in (ops, reference):
        z = z0.clone().requires_grad_(True)
        out = impl.collaboration_loss(z, y, 0.8, reduction)
        (dz,) = torch.autograd.grad(loss_outputs(out), (z,), (g_loss, g_ce, g_w, g_p))
        assert dz.dtype == dtype and dz.shape == z.shape
        grads.append(dz)
    torch.testing.assert_close(grads[0], grads[1], **grad_tol(dtype))


@pytest.mark.parametrize("which", ["loss", "ce", "weights", "p_true"])
def test_collab_loss_backward_single_output(which):
    """Only one output reaches the loss: the others' gradients arrive undefined (None)."""
    torch.manual_seed(8)
    z0 = make_logits(3, 32, 10, torch.float32)
    y = make_target(32, 10)
    grads = []
    for impl in (ops, reference):
        z = z0.clone().requires_grad_(True)
        out = impl.collaboration_loss(z, y, 1.0, "mean")
        getattr(out, which).sum().backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1], **tol(torch.float32))


@pytest.mark.parametrize("K", [10, 1000, 32768])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_collab_loss_backward_cuda_vs_cpu(K, dtype):
    torch.manual_seed(9)
    M, B = 3, 9
    z = make_logits(M, B, K, dtype)
    y = make_target(B, K)
    sd = stat_dtype(dtype)
    loss, ce, w, p, lse, prob = torch.ops.cda2_ext.collab_loss(z, y, 1.0, 0)
    g_loss = torch.randn(B, device=DEV, dtype=sd)
    g_ce, g_w, g_p = (torch.randn(M, B, device=DEV, dtype=sd) for _ in range(3))
    args = (g_loss, g_ce, g_w, g_p, z, y, lse, prob, w, p, 1.0, 0)
    got = torch.ops.cda2_ext.collab_loss_backward(*args)
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    cpu = torch.ops.cda2_ext.collab_loss_backward(*cpu_args)
    torch.testing.assert_close(got.cpu(), cpu, **grad_tol(dtype))
    # a softmax saved by the CPU forward is accepted on CUDA (and gives the same gradient)
    cpu_prob = torch.ops.cda2_ext.collab_loss(z.cpu(), y.cpu(), 1.0, 0, True)[5]
    if cpu_prob.numel():
        with_prob = torch.ops.cda2_ext.collab_loss_backward(*args[:7], cpu_prob.to(DEV), *args[8:])
        torch.testing.assert_close(with_prob, got, **grad_tol(dtype))
    # every optional gradient may be None
    got0 = torch.ops.cda2_ext.collab_loss_backward(None, None, None, None, z, y, lse, prob, w, p, 1.0, 0)
    assert torch.count_nonzero(got0) == 0


def test_collab_loss_gradcheck():
    torch.manual_seed(10)
    for (M, B, K) in [(3, 4, 5), (2, 3, 2100)]:
        z = torch.randn(M, B, K, device=DEV, dtype=torch.float64, requires_grad=True)
        y = make_target(B, K)
        for reduction in REDUCTIONS:
            def f(z):
                return tuple(loss_outputs(ops.collaboration_loss(z, y, 0.7, reduction)))

            assert torch.autograd.gradcheck(f, (z,), fast_mode=K > 100)


# ---------------------------------------------------------------------------------------------
# PPD BCE
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 128), (1, 1), (8, 4096), (5, 777), (2, 70000)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ppd_bce_vs_reference_and_cpu(shape, dtype, reduction):
    torch.manual_seed(11)
    s0 = (torch.randn(shape, device=DEV) * 4).to(dtype)
    t = torch.rand(shape, device=DEV).to(dtype)
    s = s0.clone().requires_grad_(True)
    got = ops.ppd_bce(s, t, reduction)
    sr = s0.clone().requires_grad_(True)
    want = reference.ppd_bce(sr, t, reduction)
    assert got.dtype == stat_dtype(dtype) and got.shape == want.shape
    t_fwd = tol(dtype)
    if reduction != "none" and dtype != torch.float64:
        t_fwd = dict(rtol=1e-4, atol=1e-5)  # summation order over up to 140k terms
    torch.testing.assert_close(got, want, **t_fwd)
    g = torch.randn_like(got)
    (ds,) = torch.autograd.grad(got, s, g)
    (dr,) = torch.autograd.grad(want, sr, g)
    assert ds.dtype == dtype
    torch.testing.assert_close(ds, dr, **grad_tol(dtype))
    # CUDA vs CPU op
    code = RED_CODE[reduction]
    cpu = torch.ops.cda2_ext.ppd_bce(s0.cpu(), t.cpu(), code)
    torch.testing.assert_close(torch.ops.cda2_ext.ppd_bce(s0, t, code).cpu(), cpu, **t_fwd)
    cpu_b = torch.ops.cda2_ext.ppd_bce_backward(g.cpu(), s0.cpu(), t.cpu(), code)
    got_b = torch.ops.cda2_ext.ppd_bce_backward(g, s0, t, code)
    torch.testing.assert_close(got_b.cpu(), cpu_b, **grad_tol(dtype))


def test_ppd_bce_gradcheck():
    torch.manual_seed(12)
    s = torch.randn(3, 7, device=DEV, dtype=torch.float64, requires_grad=True)
    t = torch.rand(3, 7, device=DEV, dtype=torch.float64)
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(lambda s: ops.ppd_bce(s, t, reduction), (s,))


# ---------------------------------------------------------------------------------------------
# PGD: sign step and random start
# ---------------------------------------------------------------------------------------------
IMAGE_SHAPES = [
    ((3, 128, 3, 32, 32), (128, 3, 32, 32)),  # broadcast x_nat over M
    ((3, 128, 3, 32, 32), (3, 128, 3, 32, 32)),  # one x_nat per sub-model
    ((8, 5, 3, 7, 7), (5, 3, 7, 7)),  # odd sizes: no 16-byte vectors
    ((2, 1, 1, 1, 3), (1, 1, 1, 3)),
    ((4, 33), (33,)),
    ((17,), (17,)),
]


def ulp1(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


@pytest.mark.parametrize("shapes", IMAGE_SHAPES, ids=lambda s: "x".join(map(str, s[0])) + "-" + str(len(s[1])))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_sign_step_vs_reference_and_cpu(shapes, dtype):
    torch.manual_seed(13)
    xs, ns = shapes
    x_nat = torch.rand(ns, device=DEV).to(dtype)
    x_adv = (x_nat + 0.05 * torch.randn(xs, device=DEV)).clamp(0, 1).to(dtype)
    g = torch.randn(xs, device=DEV).to(dtype)
    g.view(-1)[::7] = 0  # sign(0) = 0
    eps, alpha = 8 / 255, 2 / 255
    got = x_adv.clone()
    ret = ops.pgd_sign_step_(got, g, x_nat, eps, alpha, 0.0, 1.0)
    assert ret is got
    want = reference.pgd_sign_step_(x_adv.clone(), g, x_nat, eps, alpha, 0.0, 1.0)
    if dtype in HALVES:  # the reference rounds alpha, x0 -/+ eps to the half type first
        torch.testing.assert_close(got, want, rtol=0, atol=2 * ulp1(dtype))
    else:
        assert torch.equal(got, want)
    cpu = x_adv.cpu()
    torch.ops.cda2_ext.sign_step_(cpu, g.cpu(), x_nat.cpu(), eps, alpha, 0.0, 1.0)
    assert torch.equal(got.cpu(), cpu)  # CPU and CUDA kernels agree bit for bit


def test_sign_step_noncontiguous_and_nan():
    torch.manual_seed(14)
    M, B = 3, 4
    x_nat = torch.rand(B, 3, 8, 8, device=DEV)
    base = torch.rand(B, M, 3, 8, 8, device=DEV)
    x_adv = base.transpose(0, 1)  # [M, B, ...] view, not contiguous
    assert not x_adv.is_contiguous()
    g = torch.randn(M, B, 3, 8, 8, device=DEV)
    g[0, 0, 0, 0, 0] = float("nan")
    want = reference.pgd_sign_step_(x_adv.clone(), g, x_nat, 0.1, 0.02, 0.0, 1.0)
    ops.pgd_sign_step_(x_adv, g, x_nat, 0.1, 0.02, 0.0, 1.0)
    assert torch.isnan(x_adv[0, 0, 0, 0, 0])
    torch.testing.assert_close(x_adv, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(base.transpose(0, 1), x_adv)  # written back through the view


@pytest.mark.parametrize("shapes", IMAGE_SHAPES, ids=lambda s: "x".join(map(str, s[0])) + "-" + str(len(s[1])))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_random_start_vs_reference_and_cpu(shapes, dtype):
    torch.manual_seed(15)
    xs, ns = shapes
    x_nat = torch.rand(ns, device=DEV).to(dtype)
    num_models = xs[0] if len(xs) != len(ns) else None
    seed = 1234567890123
    got = ops.pgd_random_start(x_nat, 8 / 255, 0.0, 1.0, num_models=num_models, seed=seed)
    want = reference.pgd_random_start(x_nat, 8 / 255, 0.0, 1.0, num_models=num_models, seed=seed)
    assert got.shape == want.shape and got.dtype == dtype
    if dtype in HALVES:  # the reference's (2u - 1) * eps runs in the half type
        torch.testing.assert_close(got, want, rtol=0, atol=2 * ulp1(dtype))
    else:
        assert torch.equal(got, want)
    cpu = ops.pgd_random_start(x_nat.cpu(), 8 / 255, 0.0, 1.0, num_models=num_models, seed=seed)
    assert torch.equal(got.cpu(), cpu)
    assert ((got - x_nat).abs() <= 8 / 255 + ulp1(dtype)).all()
    assert ((got >= 0) & (got <= 1)).all()


def test_random_start_raw_op_noncontiguous_and_seeds():
    x_nat = torch.rand(4, 3, 5, 5, device=DEV)
    base = torch.empty(4, 2, 3, 5, 5, device=DEV)
    x_adv = base.transpose(0, 1)
    torch.ops.cda2_ext.random_start_(x_adv, x_nat, 0.1, 0.0, 1.0, 7)
    want = reference.random_start_from_seed(x_nat, 0.1, 0.0, 1.0, 7, num_models=2)
    assert torch.equal(x_adv, want)
    other = torch.empty(2, 4, 3, 5, 5, device=DEV)
    torch.ops.cda2_ext.random_start_(other, x_nat, 0.1, 0.0, 1.0, 8)
    assert not torch.equal(other, want)
    # a seed above 2**32 uses its high word too
    hi = torch.empty_like(other)
    torch.ops.cda2_ext.random_start_(hi, x_nat, 0.1, 0.0, 1.0, 7 + (1 << 40))
    assert not torch.equal(hi, want)


# ---------------------------------------------------------------------------------------------
# collaborative selection
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 128, 10), (1, 1, 2), (4, 33, 7), (8, 512, 1000), (4, 16, 32768)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("score_dtype", [None, torch.float64, torch.float16], ids=str)
def test_collab_select_vs_reference_and_cpu(shape, dtype, score_dtype):
    torch.manual_seed(16)
    M, B, K = shape
    z0 = make_logits(M, B, K, dtype)
    s = torch.randn(M, B, device=DEV).to(score_dtype or dtype)
    if B > 3 and M > 1:
        s[:, 0] = 0.5  # tie: the first sub-model wins
        s[1, 1] = float("nan")  # NaN beats every number
        s[:, 2] = float("nan")  # first NaN wins
    z = z0.clone().requires_grad_(True)
    idx, chosen = ops.collaborative_select(s, z)
    ridx, rchosen = reference.collaborative_select(s, z0)
    assert idx.dtype == torch.int64 and chosen.dtype == dtype
    assert torch.equal(idx, ridx)
    assert torch.equal(chosen, rchosen)
    cidx, cchosen = torch.ops.cda2_ext.collab_select(s.cpu(), z0.cpu())
    assert torch.equal(idx.cpu(), cidx) and torch.equal(chosen.cpu(), cchosen)
    g = torch.randn_like(chosen)
    (dz,) = torch.autograd.grad(chosen, z, g)
    zr = z0.clone().requires_grad_(True)
    (dr,) = torch.autograd.grad(reference.collaborative_select(s, zr)[1], zr, g)
    assert torch.equal(dz, dr)
    cpu_b = torch.ops.cda2_ext.collab_select_backward(g.cpu(), idx.cpu(), M)
    assert torch.equal(torch.ops.cda2_ext.collab_select_backward(g, idx, M).cpu(), cpu_b)


def test_collab_select_unaligned_logits():
    M, B, K = 3, 10, 16
    flat = torch.randn(M * B * K + 1, device=DEV)
    z = flat[1:].view(M, B, K)
    s = torch.randn(M, B, device=DEV)
    idx, chosen = ops.collaborative_select(s, z)
    ridx, rchosen = reference.collaborative_select(s, z)
    assert torch.equal(idx, ridx) and torch.equal(chosen, rchosen)


# ---------------------------------------------------------------------------------------------
# opcheck on CUDA tensors
# ---------------------------------------------------------------------------------------------
def _opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_collab_loss(dtype, reduction):
    torch.manual_seed(17)
    M, B, K = 3, 8, 10
    z = make_logits(M, B, K, dtype).requires_grad_(True)
    y = make_target(B, K)
    _opcheck(torch.ops.cda2_ext.collab_loss.default, (z, y, 0.9, reduction))
    _opcheck(torch.ops.cda2_ext.collab_loss.default, (z.detach(), y, 0.9, reduction, True))
    loss, ce, w, p, lse, prob = torch.ops.cda2_ext.collab_loss(z.detach(), y, 0.9, reduction)
    sd = stat_dtype(dtype)
    g_loss = torch.randn(loss.shape, device=DEV, dtype=sd)
    g_ce = torch.randn(M, B, device=DEV, dtype=sd)
    _opcheck(torch.ops.cda2_ext.collab_loss_backward.default,
             (g_loss, g_ce, None, None, z.detach(), y, lse, prob, w, p, 0.9, reduction))


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_ppd_bce(reduction):
    s = torch.randn(3, 16, device=DEV, requires_grad=True)
    t = torch.rand(3, 16, device=DEV)
    _opcheck(torch.ops.cda2_ext.ppd_bce.default, (s, t, reduction))
    g = torch.randn((3, 16) if reduction == 0 else (), device=DEV)
    _opcheck(torch.ops.cda2_ext.ppd_bce_backward.default, (g, s.detach(), t, reduction))


def test_opcheck_pgd():
    x_nat = torch.rand(4, 3, 5, 5, device=DEV)
    x_adv = torch.rand(2, 4, 3, 5, 5, device=DEV)
    g = torch.randn_like(x_adv)
    _opcheck(torch.ops.cda2_ext.sign_step_.default, (x_adv, g, x_nat, 0.03, 0.01, 0.0, 1.0))
    _opcheck(torch.ops.cda2_ext.random_start_.default, (x_adv, x_nat, 0.03, 0.0, 1.0, 5))


def test_opcheck_collab_select():
    s = torch.randn(3, 8, device=DEV)
    z = torch.randn(3, 8, 10, device=DEV, requires_grad=True)
    _opcheck(torch.ops.cda2_ext.collab_select.default, (s, z))
    idx, chosen = torch.ops.cda2_ext.collab_select(s, z.detach())
    _opcheck(torch.ops.cda2_ext.collab_select_backward.default, (torch.randn_like(chosen), idx, 3))


# ---------------------------------------------------------------------------------------------
# bad inputs on CUDA tensors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-1, 10, 1 << 40])
def test_bad_labels_raise(bad):
    z = make_logits(3, 5, 10, torch.float32)
    y = make_target(5, 10)
    y[3] = bad
    with pytest.raises(ValueError, match="target"):
        ops.collaboration_loss(z, y, 1.0, "mean")
    with pytest.raises(ValueError, match="target"):
        torch.ops.cda2_ext.collab_loss(z, y, 1.0, 1)
    yk = make_target(5, 4099)
    yk[4] = bad if bad != 10 else 4099
    with pytest.raises(ValueError, match="target"):  # the one-block-per-sample path checks too
        torch.ops.cda2_ext.collab_loss(make_logits(2, 5, 4099, torch.float32), yk, 1.0, 0)
    # the stream is still usable afterwards
    y[3] = 0
    torch.ops.cda2_ext.collab_loss(z, y, 1.0, 1)
    torch.cuda.synchronize()


def test_bad_arguments_raise():
    z = make_logits(3, 5, 10, torch.float32)
    y = make_target(5, 10)
    op = torch.ops.cda2_ext
    with pytest.raises(TypeError, match="target"):
        op.collab_loss(z, y.int(), 1.0, 1)
    with pytest.raises(ValueError, match="target"):
        op.collab_loss(z, y[:4], 1.0, 1)
    with pytest.raises(ValueError, match="target"):
        op.collab_loss(z, y.cpu(), 1.0, 1)  # mixed devices
    with pytest.raises(ValueError, match="sigma"):
        op.collab_loss(z, y, 0.0, 1)
    with pytest.raises(ValueError, match="reduction"):
        op.collab_loss(z, y, 1.0, 3)
    with pytest.raises(ValueError, match="logits"):
        op.collab_loss(z[..., :1], y.clamp(max=0), 1.0, 1)  # K = 1
    with pytest.raises(TypeError, match="logits"):
        op.collab_loss(z.int(), y, 1.0, 1)
    _, _, w, p, lse, prob = op.collab_loss(z, y, 1.0, 0)
    with pytest.raises(TypeError, match="lse"):
        op.collab_loss_backward(None, None, None, None, z, y, lse.float(), prob, w, p, 1.0, 0)
    with pytest.raises(ValueError, match="grad_loss"):
        op.collab_loss_backward(torch.ones(4, device=DEV), None, None, None, z, y, lse, prob, w, p, 1.0, 0)
    with pytest.raises(ValueError, match="prob"):
        op.collab_loss_backward(None, None, None, None, z, y, lse, torch.rand(3, 5, 9, device=DEV), w, p, 1.0, 0)
    s = torch.randn(3, 5, device=DEV)
    with pytest.raises(ValueError, match="target_prob"):
        op.ppd_bce(s, torch.rand(3, 4, device=DEV), 1)
    with pytest.raises(TypeError, match="target_prob"):
        op.ppd_bce(s, torch.rand(3, 5, device=DEV, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="target_prob"):
        op.ppd_bce(s, torch.rand(3, 5), 1)
    x_nat = torch.rand(5, 3, 4, 4, device=DEV)
    x_adv = torch.rand(2, 5, 3, 4, 4, device=DEV)
    g = torch.randn_like(x_adv)
    with pytest.raises(ValueError, match="eps"):
        op.sign_step_(x_adv, g, x_nat, -0.1, 0.01, 0.0, 1.0)
    with pytest.raises(ValueError, match="x_nat"):
        op.sign_step_(x_adv, g, x_nat[:4], 0.1, 0.01, 0.0, 1.0)
    with pytest.raises(ValueError, match="grad"):
        op.sign_step_(x_adv, g[:1], x_nat, 0.1, 0.01, 0.0, 1.0)
    with pytest.raises(ValueError, match="lo"):
        op.random_start_(x_adv, x_nat, 0.1, 1.0, 0.0, 3)
    with pytest.raises(ValueError, match="ppd_logit"):
        op.collab_select(torch.randn(2, 5, device=DEV), z)
    with pytest.raises(ValueError, match="ppd_logit"):
        op.collab_select(torch.randn(3, 5), z)


# ---------------------------------------------------------------------------------------------
# a torch.compile'd training step
# ---------------------------------------------------------------------------------------------
class _TinyCollab(torch.nn.Module):
    """M linear 'sub-models' with a label head and a PPD head, batched over M."""

    def __init__(self, M: int, D: int, K: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(M, D, K) * 0.1)
        self.v = torch.nn.Parameter(torch.randn(M, D) * 0.1)

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


@pytest.mark.parametrize("K", [10, 32768])
def test_torch_compile_training_step(K):
    torch.manual_seed(18)
    M, B, D = 3, 64, 16
    x = torch.randn(B, D, device=DEV)
    y = make_target(B, K)
    eager = _TinyCollab(M, D, K).to(DEV)
    comp = _TinyCollab(M, D, K).to(DEV)
    comp.load_state_dict(eager.state_dict())
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(comp.parameters(), lr=0.1)
    step = torch.compile(_train_step)
    for _ in range(3):
        le, ae = _train_step(eager, opt_e, x, y)
        lc, ac = step(comp, opt_c, x, y)
        torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ac, ae, rtol=0, atol=2.0 / B)
    for pe, pc in zip(eager.parameters(), comp.parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-4, atol=1e-5)

    # the PGD pieces compile too (in-place custom ops under torch.compile)
    @torch.compile
    def attack_step(x_adv, g, x_nat):
        ops.pgd_sign_step_(x_adv, g, x_nat, 8 / 255, 2 / 255)
        return x_adv

    x_nat = torch.rand(8, 3, 4, 4, device=DEV)
    x_adv = ops.pgd_random_start(x_nat, 8 / 255, num_models=M, seed=3)
    g = torch.randn_like(x_adv)
    want = reference.pgd_sign_step_(x_adv.clone(), g, x_nat, 8 / 255, 2 / 255)
    assert torch.equal(attack_step(x_adv, g, x_nat), want)


def test_package_exports_still_work_on_cuda():
    """The top-level helpers route CUDA tensors to the CUDA kernels."""
    z = make_logits(3, 4, 10, torch.float32)
    y = make_target(4, 10)
    out = cda2_ext.collaboration_loss(z, y)
    assert out.loss.device.type == "cuda"
