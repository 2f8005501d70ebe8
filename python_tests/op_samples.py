"""The sample inputs of the fused operators: one table per op, as pytorch/extension-cpp's tests
have one ``sample_inputs`` per op.

Each table (``COLLAB_LOSS``, ``PPD_BCE``, ``SIGN_STEP``, ``RANDOM_START``, ``SELECT``, at the
end of this module, each built by its ``*_samples()`` function) is a list of samples. A sample has

* ``id`` -- its pytest id, which says what is unusual about it (``K2049-bfloat16-sum``),
* ``dtype`` -- the dtype of its main input,
* ``tags`` -- which checks and regimes it belongs to (see below),
* ``args(gen, device, requires_grad=False)`` -- fresh arguments of the functional op
  (``cda2_ext.ops.<op>(*args)``), drawn from ``gen`` on the CPU in float64, then cast and moved
  (so a sample is the same numbers on every device); ``requires_grad`` makes the differentiable
  input require gradients (a non-contiguous one is then a view of a leaf that does).

``test_ops.py`` runs the checks over the tables:

* every sample: the fused op against its reference twin (forward and gradients), per device;
* ``GRADCHECK`` samples (float64, small): ``torch.autograd.gradcheck`` of both implementations;
* ``OPCHECK`` samples (small): ``torch.library.opcheck`` of the raw operator (and its backward);
* ``CUDA_VS_CPU`` samples: the CUDA kernels against the CPU kernels on the same inputs;
* the other tags name a regime (``"huge"`` logits, ``"masked"`` classes, ``"sigma"`` sweep, ...)
  that a property test picks.

A new case is one line in a table; a new op is a new table and the same four checks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch import Tensor

from helpers import FLOATS, HALF, OUTPUTS, REDUCTIONS, Device, make_logits, make_target

F32_64 = (torch.float32, torch.float64)
EPS, ALPHA = 8 / 255, 2 / 255  # the attack ops' default ball and step

GRADCHECK, OPCHECK, CUDA_VS_CPU = "gradcheck", "opcheck", "cuda_vs_cpu"

Args = Tuple[object, ...]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def shape_id(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def randn(shape: Sequence[int], gen: torch.Generator, device: Device = "cpu",
          dtype: torch.dtype = torch.float32, scale: float = 1.0) -> Tensor:
    """``scale * N(0, 1)`` drawn in float64 from ``gen``, then cast and moved (``make_logits``
    with the arguments in this module's order and a unit scale)."""
    return make_logits(shape, dtype, gen, scale=scale, device=device)


def rand(shape: Sequence[int], gen: torch.Generator, device: Device = "cpu",
         dtype: torch.dtype = torch.float32, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """``U(lo, hi)`` drawn in float64 from ``gen``, then cast and moved."""
    u = torch.rand(tuple(shape), generator=gen, dtype=torch.float64)
    return (u * (hi - lo) + lo).to(device, dtype)


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One row of an op's table (see the module docstring)."""

    id: str
    dtype: torch.dtype
    tags: FrozenSet[str] = frozenset()

    def args(self, gen: torch.Generator, device: Device = "cpu", requires_grad: bool = False) -> Args:
        raise NotImplementedError


S = TypeVar("S", bound=Sample)


def tagged(table: Sequence[S], *tags: str) -> List[S]:
    """The samples of ``table`` that carry every one of ``tags``."""
    return [s for s in table if set(tags) <= s.tags]


def sample_id(sample: Sample) -> str:
    """The pytest id of a sample (``parametrize(..., ids=sample_id)``)."""
    return sample.id


def _unique(table: List[S]) -> List[S]:
    ids = [s.id for s in table]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    assert not dup, f"sample ids given twice: {dup}"
    return table


def _tags(*names: str, when: bool = True) -> FrozenSet[str]:
    return frozenset(names) if when else frozenset()


# ------------------------------------------------------------------------------------------------
# collaboration_loss(logits [M, B, K], target [B], sigma, reduction)

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


#: Logit shapes (M, B, K) of the main grid: the paper's, the smallest counts, odd sizes (no
#: 16-byte vector loads), and K either side of 2048, where the CUDA forward switches from lanes
#: per sample to a block per sample.
COLLAB_SHAPES: Dict[str, Tuple[int, int, int]] = {
    "paper": (3, 128, 10),
    "M1": (1, 16, 10),
    "K2": (3, 32, 2),
    "B1": (3, 1, 10),
    "M1_B1_K2": (1, 1, 2),
    "M8": (8, 64, 100),
    "odd": (2, 5, 3),
    "K33": (4, 7, 33),
    "B33": (3, 33, 100),
    "K1000": (2, 9, 1000),
    "K2047": (5, 3, 2047),
    "K2049": (2, 4, 2049),
    "K4099": (3, 3, 4099),
    "largeK": (3, 8, 5000),
    "K32768": (2, 6, 32768),
}

#: Non-contiguous logits: (shape drawn, view the op sees); their targets are strided too.
COLLAB_LAYOUTS: Dict[str, Tuple[Tuple[int, ...], Callable[[Tensor], Tensor]]] = {
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

SIGMAS = (1e-4, 1e-2, 1.0, 1e3)
#: The outputs a backward receives gradients for: every subset that matters (the others arrive
#: as undefined gradients).
GRAD_OUTPUTS = [("loss",), ("ce",), ("weights",), ("p_true",), ("loss", "ce"), ("loss", "p_true"),
                ("ce", "weights"), ("weights", "p_true"), ("loss", "weights", "p_true"), OUTPUTS]


@dataclass(frozen=True, kw_only=True)
class CollabLossSample(Sample):
    """Arguments ``(logits, target, sigma, reduction)``.

    ``shape`` is the ``(M, B, K)`` the op sees; logits are ``scale * N(0, 1)`` laid out as
    ``layout`` (``"contiguous"`` or a key of ``COLLAB_LAYOUTS``). ``extreme``: ``"huge"`` (logits
    of scale 1e4, one whole row at +1e4 and one at -1e4) or ``"masked"`` (float32 logits around
    +1e4 with about 30 % of the classes at -inf, never the true one). ``separate``: the gap the
    two smallest cross-entropies of every sample are pushed apart to. ``outputs``: the outputs
    whose gradients the backward checks seed.
    """

    shape: Tuple[int, int, int]
    sigma: float = 1.0
    reduction: str = "mean"
    scale: float = 3.0
    layout: str = "contiguous"
    extreme: str = ""
    separate: float = 0.0
    outputs: Tuple[str, ...] = OUTPUTS

    def args(self, gen, device="cpu", requires_grad=False) -> Args:
        M, B, K = self.shape
        drawn, view = COLLAB_LAYOUTS.get(self.layout, (self.shape, lambda t: t))
        if self.extreme == "masked":
            z = make_logits(drawn, self.dtype, gen, scale=self.scale, device=device) + 1e4
            y = make_target(B, K, gen, device)
            mask = (torch.rand(M, B, K, generator=gen) < 0.3).to(device)
            mask.scatter_(-1, y.view(1, B, 1).expand(M, B, 1), False)  # never mask the true class
            z = z.masked_fill(mask, float("-inf"))
        else:
            z = make_logits(drawn, self.dtype, gen, scale=self.scale, device=device)
            # a strided target beside strided logits
            y = make_target(2 * B, K, gen, device)[::2] if self.layout in COLLAB_LAYOUTS \
                else make_target(B, K, gen, device)
        if self.extreme == "huge":  # whole rows at the extremes
            z[0, 0] = 1e4
            z[1, 1, :] = -1e4
        if self.separate:
            z = separate_ce(z, y, self.separate)
        return view(z.requires_grad_(requires_grad)), y, self.sigma, self.reduction


def collab_loss_samples() -> List[CollabLossSample]:
    """``collaboration_loss``'s table."""
    out: List[CollabLossSample] = []
    add = out.append
    for name, shape in COLLAB_SHAPES.items():
        for dt in FLOATS:
            for r in REDUCTIONS:
                # the CUDA-vs-CPU tests take one shape of each CUDA forward kernel (and the largest K)
                cuda = _tags(CUDA_VS_CPU, when=name in ("paper", "K1000", "K32768"))
                add(CollabLossSample(id=f"{name}-{dtype_name(dt)}-{r}", dtype=dt, shape=shape, reduction=r,
                                     tags=frozenset({"grid"}) | cuda))
    for sigma in SIGMAS:  # float32 near-ties at tiny sigma are separated (see separate_ce)
        for dt in F32_64:
            gap = 20 * sigma if dt == torch.float32 and sigma < 0.1 else 0.0
            add(CollabLossSample(id=f"sigma={sigma:g}-{dtype_name(dt)}", dtype=dt, shape=(3, 128, 10),
                                 sigma=sigma, separate=gap, tags=frozenset({"sigma"})))
    for sigma in (1e-2, 1.0, 1e3):
        for dt in F32_64:
            for r in REDUCTIONS:
                add(CollabLossSample(id=f"huge-sigma={sigma:g}-{dtype_name(dt)}-{r}", dtype=dt,
                                     shape=(3, 64, 10), sigma=sigma, reduction=r, scale=1e4, extreme="huge",
                                     tags=frozenset({"huge"})))
    for sigma in (1e-4, 1.0, 1e4):
        add(CollabLossSample(id=f"masked-offset-sigma={sigma:g}", dtype=torch.float32, shape=(3, 64, 50),
                             sigma=sigma, reduction="none", scale=5.0, extreme="masked",
                             tags=frozenset({"masked"})))
    for outs in GRAD_OUTPUTS:
        for dt in F32_64:
            for r in REDUCTIONS:
                add(CollabLossSample(id=f"grads={'+'.join(outs)}-{dtype_name(dt)}-{r}", dtype=dt,
                                     shape=(3, 128, 10), sigma=0.7, reduction=r, outputs=outs,
                                     tags=frozenset({"grad_outputs"})))
    for layout, (drawn, view) in COLLAB_LAYOUTS.items():
        shape = tuple(view(torch.empty(drawn, device="meta")).shape)
        for dt in (*F32_64, torch.bfloat16):
            for r in ("none", "mean"):
                add(CollabLossSample(id=f"{layout}-{dtype_name(dt)}-{r}", dtype=dt, shape=shape, sigma=0.5,
                                     reduction=r, layout=layout, tags=frozenset({"layout"})))
    # finite differences: float64, small; through all four outputs, and through each alone
    for sigma in (0.05, 1.0, 20.0):
        for r in REDUCTIONS:
            add(CollabLossSample(id=f"gradcheck-sigma={sigma:g}-{r}", dtype=torch.float64, shape=(3, 4, 5),
                                 sigma=sigma, reduction=r, scale=1.0, tags=frozenset({GRADCHECK})))
    for r in REDUCTIONS:  # K above 2048 (CUDA's block-per-sample kernels): gradcheck's fast mode
        add(CollabLossSample(id=f"gradcheck-K2100-{r}", dtype=torch.float64, shape=(2, 3, 2100), sigma=0.7,
                             reduction=r, scale=1.0, tags=frozenset({GRADCHECK})))
    for o in OUTPUTS:
        add(CollabLossSample(id=f"gradcheck-{o}-only", dtype=torch.float64, shape=(2, 3, 4), sigma=0.3,
                             reduction="none", scale=1.0, outputs=(o,), tags=frozenset({GRADCHECK})))
    for dt in FLOATS:
        for r in REDUCTIONS:
            add(CollabLossSample(id=f"opcheck-{dtype_name(dt)}-{r}", dtype=dt, shape=(3, 5, 7), sigma=0.5,
                                 reduction=r, tags=frozenset({OPCHECK})))
    return _unique(out)


# ------------------------------------------------------------------------------------------------
# ppd_bce(ppd_logit [M, B], target_prob [M, B], reduction)

PPD_SHAPES = [(3, 128), (1, 1), (5, 3), (5, 777), (8, 4096), (2, 70000)]
#: Values either side of F.softplus's default threshold (20), where softplus(s) != s in float64.
SOFTPLUS_EDGE = (20.5, 25.0, 30.0, -20.5, -30.0, 45.0)


@dataclass(frozen=True, kw_only=True)
class PpdBceSample(Sample):
    """Arguments ``(ppd_logit, target_prob, reduction)``: ``scale * N(0, 1)`` logits and
    ``U(0, 1)`` targets of ``shape``; ``target_dtype``: the target's dtype when it is not the
    logits' (the training pairing: half logits, a float32 ``p_true``). ``extreme``: ``"huge"``
    (logits of scale 1e4, two at exactly +-1e4, targets exactly 0 and 1, the logits a transposed
    view) or ``"softplus_edge"`` (a row of ``SOFTPLUS_EDGE``)."""

    shape: Tuple[int, int]
    reduction: str = "mean"
    scale: float = 4.0
    target_dtype: Optional[torch.dtype] = None
    extreme: str = ""

    def args(self, gen, device="cpu", requires_grad=False) -> Args:
        M, B = self.shape
        if self.extreme == "huge":
            s = randn((B, M), gen, "cpu", self.dtype, scale=self.scale)
            s[0, 0], s[1, 0] = 1e4, -1e4
            t = rand((M, B), gen, "cpu", self.dtype)
            t[0, 0], t[0, 1] = 0.0, 1.0
            s, t = s.to(device).requires_grad_(requires_grad).T, t.to(device)  # s: a transposed view
            return s, t, self.reduction
        s = randn(self.shape, gen, "cpu", self.dtype, scale=self.scale)
        if self.extreme == "softplus_edge":
            s[0, :len(SOFTPLUS_EDGE)] = torch.tensor(SOFTPLUS_EDGE, dtype=self.dtype)
        t = rand(self.shape, gen, device, self.target_dtype or self.dtype)
        return s.to(device).requires_grad_(requires_grad), t, self.reduction


def ppd_bce_samples() -> List[PpdBceSample]:
    """``ppd_bce``'s table."""
    out: List[PpdBceSample] = []
    add = out.append
    for shape in PPD_SHAPES:
        for dt in FLOATS:
            for r in REDUCTIONS:
                add(PpdBceSample(id=f"{shape_id(shape)}-{dtype_name(dt)}-{r}", dtype=dt, shape=shape,
                                 reduction=r, tags=frozenset({"grid", CUDA_VS_CPU})))
    for dt in F32_64:
        add(PpdBceSample(id=f"huge-transposed-{dtype_name(dt)}", dtype=dt, shape=(3, 64), reduction="none",
                         scale=1e4, extreme="huge", tags=frozenset({"huge"})))
        for r in REDUCTIONS:
            add(PpdBceSample(id=f"softplus-edge-{dtype_name(dt)}-{r}", dtype=dt, shape=(4, 50), reduction=r,
                             scale=5.0, extreme="softplus_edge", tags=frozenset({"softplus_edge"})))
    for dt in HALF:
        add(PpdBceSample(id=f"float32-target-{dtype_name(dt)}", dtype=dt, shape=(3, 32), reduction="none",
                         scale=1.0, target_dtype=torch.float32, tags=frozenset({"mixed_dtypes"})))
    for r in REDUCTIONS:
        add(PpdBceSample(id=f"gradcheck-{r}", dtype=torch.float64, shape=(3, 5), reduction=r, scale=1.0,
                         tags=frozenset({GRADCHECK})))
    for dt in (*F32_64, torch.float16):
        for r in REDUCTIONS:
            add(PpdBceSample(id=f"opcheck-{dtype_name(dt)}-{r}", dtype=dt, shape=(3, 6), reduction=r,
                             scale=1.0, tags=frozenset({OPCHECK})))
    return _unique(out)


# ------------------------------------------------------------------------------------------------
# pgd_sign_step_(x_adv, grad, x_nat, eps, alpha, lo, hi) and pgd_random_start(x_nat, eps, lo, hi,
# num_models, seed)

def make_step_inputs(shape, dtype, gen, broadcast=True, lo=0.0, hi=1.0, device="cpu"):
    """x_nat in [lo, hi], x_adv scattered around it (some outside the ball and the box), a
    gradient with exact zeros and negative zeros among its entries."""
    nat_shape = shape[1:] if broadcast else shape
    x_nat = (torch.rand(nat_shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)
    x_adv = (x_nat + (torch.rand(shape, generator=gen, dtype=torch.float64) * 4 - 2).to(dtype) * EPS)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    grad[torch.rand(shape, generator=gen) < 0.1] = 0.0
    grad[torch.rand(shape, generator=gen) < 0.05] = -0.0
    return x_adv.to(device), grad.to(device), x_nat.to(device)


#: Memory layouts of the sign step's tensors (see ``step_views``).
STEP_LAYOUTS = ["broadcast", "same_shape", "no_model_axis", "strided_x_adv", "strided_all",
                "channels_last", "x_nat_expanded", "model_axis_transposed"]


def step_views(layout, shape, dtype, gen, device, lo=0.0, hi=1.0):
    """(x_adv base, the view of it the op writes through, grad, x_nat) for one memory layout;
    ``x_nat`` is drawn in ``[lo, hi]``."""
    kw = dict(lo=lo, hi=hi, device=device)
    if layout in ("broadcast", "same_shape", "x_nat_expanded"):
        x, g, n = make_step_inputs(shape, dtype, gen, broadcast=layout != "same_shape", **kw)
        return x, (lambda t: t), g, n.expand(shape) if layout == "x_nat_expanded" else n
    if layout == "no_model_axis":
        x, g, n = make_step_inputs(shape[1:], dtype, gen, broadcast=False, **kw)
        return x, (lambda t: t), g, n
    if layout == "channels_last":
        x, g, n = make_step_inputs(shape, dtype, gen, **kw)
        M = shape[0]
        x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (M, -1))
        return x, (lambda t: t), g, n.contiguous(memory_format=torch.channels_last)
    if layout == "model_axis_transposed":  # x_adv stored [B, M, ...]: the step writes through a view
        x, g, n = make_step_inputs(shape, dtype, gen, **kw)
        return x.transpose(0, 1).contiguous(), (lambda t: t.transpose(0, 1)), g, n
    wide = (*shape[:-1], 2 * shape[-1])
    x, g, n = make_step_inputs(wide, dtype, gen, **kw)
    view = lambda t: t[..., 1::2]  # noqa: E731
    if layout == "strided_x_adv":
        return x, view, g[..., 1::2].contiguous(), n[..., 1::2].contiguous()
    assert layout == "strided_all", layout
    return x, view, g.transpose(-1, -2).contiguous().transpose(-1, -2)[..., ::2], n[..., ::2]


#: The box [lo, hi]: the image range, one inside it, one reaching below 0.
BOXES = {"box01": (0.0, 1.0), "box_cut": (0.2, 0.6), "box_neg": (-0.1, 0.3)}

#: (x_adv shape, x_nat shape): the paper's CIFAR batch broadcast over M and per sub-model, odd
#: sizes (no 16-byte vectors), a single pixel, and no image axes at all.
IMAGE_SHAPES = [
    ((3, 128, 3, 32, 32), (128, 3, 32, 32)),
    ((3, 128, 3, 32, 32), (3, 128, 3, 32, 32)),
    ((8, 5, 3, 7, 7), (5, 3, 7, 7)),
    ((2, 1, 1, 1, 3), (1, 1, 1, 3)),
    ((4, 33), (33,)),
    ((17,), (17,)),
]


def image_shape_id(x_shape, nat_shape) -> str:
    return shape_id(x_shape) + ("-broadcast" if len(x_shape) != len(nat_shape) else "-same")


@dataclass(frozen=True, kw_only=True)
class SignStepSample(Sample):
    """Arguments ``(x_adv, grad, x_nat, eps, alpha, lo, hi)`` from :func:`step_views`: ``shape``
    is ``x_adv``'s shape with its sub-model axis, ``layout`` one of ``STEP_LAYOUTS``; ``x_nat``
    spans the image range and the box (``U(min(lo, 0), max(hi, 1))``). ``nan_grad``: the
    gradient of sub-model 0's first image is NaN."""

    shape: Tuple[int, ...]
    layout: str = "broadcast"
    box: Tuple[float, float] = (0.0, 1.0)
    eps: float = EPS
    alpha: float = ALPHA
    nan_grad: bool = False

    def args(self, gen, device="cpu", requires_grad=False) -> Args:
        lo, hi = self.box
        x, view, g, n = step_views(self.layout, self.shape, self.dtype, gen, device, min(lo, 0.0), max(hi, 1.0))
        if self.nan_grad:
            g[0, 0] = float("nan")
        return view(x), g, n, self.eps, self.alpha, lo, hi


def sign_step_samples() -> List[SignStepSample]:
    """``pgd_sign_step_``'s table."""
    out: List[SignStepSample] = []
    add = out.append
    for layout in STEP_LAYOUTS:
        for dt in F32_64:
            for bname, box in BOXES.items():
                add(SignStepSample(id=f"{layout}-{dtype_name(dt)}-{bname}", dtype=dt, shape=(3, 4, 3, 8, 8),
                                   layout=layout, box=box,
                                   tags=_tags(OPCHECK, when=layout in ("broadcast", "same_shape")
                                              and bname == "box01") | {"layout"}))
    for dt in HALF:
        add(SignStepSample(id=f"broadcast-{dtype_name(dt)}-box01", dtype=dt, shape=(3, 4, 3, 8, 8),
                           tags=frozenset({"layout"})))
    for xs, ns in IMAGE_SHAPES:
        for dt in FLOATS:
            add(SignStepSample(id=f"{image_shape_id(xs, ns)}-{dtype_name(dt)}", dtype=dt, shape=xs,
                               layout="broadcast" if len(xs) != len(ns) else "same_shape",
                               tags=frozenset({"image_shape", CUDA_VS_CPU})))
    for e, a in [(0.0, ALPHA), (EPS, 0.0), (0.5, 0.3), (1e-7, 1e-9)]:
        for dt in F32_64:  # whatever torch.sign makes of NaN, the fused step must match it
            add(SignStepSample(id=f"eps={e:g}-alpha={a:g}-nan_grad-{dtype_name(dt)}", dtype=dt,
                               shape=(2, 3, 3, 5, 5), eps=e, alpha=a, nan_grad=True,
                               tags=frozenset({"edge_scalars"})))
    return _unique(out)


SEEDS = [0, 1, 12345, 2 ** 32 + 7, 2 ** 62 - 1, 2 ** 63 - 1]  # seeds lie in [0, 2**63)


@dataclass(frozen=True, kw_only=True)
class RandomStartSample(Sample):
    """Arguments ``(x_nat, eps, lo, hi, num_models, seed)``: ``x_nat`` of ``shape`` in ``[0, 1]``
    (which may reach outside the box), laid out as ``layout`` (``"contiguous"``, ``"strided"``:
    every other pixel of a wider image, or ``"channels_last"``)."""

    shape: Tuple[int, ...]
    num_models: Optional[int] = None
    seed: int = 1234567890123
    eps: float = EPS
    box: Tuple[float, float] = (0.0, 1.0)
    layout: str = "contiguous"

    def args(self, gen, device="cpu", requires_grad=False) -> Args:
        if self.layout == "strided":
            x = rand((*self.shape[:-1], 2 * self.shape[-1]), gen, device, self.dtype)[..., ::2]
        else:
            x = rand(self.shape, gen, device, self.dtype)
            if self.layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
        return (x, self.eps, *self.box, self.num_models, self.seed)


def random_start_samples() -> List[RandomStartSample]:
    """``pgd_random_start``'s table."""
    out: List[RandomStartSample] = []
    add = out.append
    for seed in SEEDS:
        for dt in F32_64:
            for m in (None, 1, 3):
                add(RandomStartSample(id=f"seed={seed}-M={m}-{dtype_name(dt)}", dtype=dt, shape=(4, 3, 8, 8),
                                      num_models=m, seed=seed,
                                      tags=_tags(OPCHECK, when=seed == 12345 and m != 1) | {"seeds"}))
    edge = {"strided_x_nat": dict(layout="strided"), "channels_last": dict(layout="channels_last"),
            "box_cut": dict(box=(0.3, 0.5)), "eps0": dict(eps=0.0), "big_eps": dict(eps=3.0)}
    for case, kw in edge.items():
        for dt in F32_64:
            add(RandomStartSample(id=f"{case}-{dtype_name(dt)}", dtype=dt, shape=(4, 3, 8, 8), num_models=2,
                                  seed=77, tags=frozenset({"edge"}), **kw))
    for xs, ns in IMAGE_SHAPES:
        for dt in FLOATS:
            add(RandomStartSample(id=f"{image_shape_id(xs, ns)}-{dtype_name(dt)}", dtype=dt, shape=ns,
                                  num_models=xs[0] if len(xs) != len(ns) else None,
                                  tags=frozenset({"image_shape", CUDA_VS_CPU})))
    for dt in HALF:
        add(RandomStartSample(id=f"M=3-{dtype_name(dt)}", dtype=dt, shape=(4, 3, 8, 8), num_models=3, seed=5,
                              tags=frozenset({"half"})))
    return _unique(out)


# ------------------------------------------------------------------------------------------------
# collaborative_select(ppd_logit [M, B], logits [M, B, K])

SELECT_SHAPES = [(3, 128, 10), (1, 5, 10), (4, 1, 3), (5, 16, 1000), (1, 1, 2), (4, 33, 7),
                 (8, 512, 1000), (4, 16, 32768)]

#: Non-contiguous logits: (shape drawn, view [3, 16, 10] the op sees).
SELECT_LAYOUTS: Dict[str, Tuple[Tuple[int, ...], Callable[[Tensor], Tensor]]] = {
    "strided": ((3, 10, 32), lambda t: t.transpose(1, 2)[:, ::2]),  # strides everywhere
    "unaligned": ((3 * 16 * 10 + 1,), lambda t: t[1:].view(3, 16, 10)),
}


@dataclass(frozen=True, kw_only=True)
class SelectSample(Sample):
    """Arguments ``(ppd_logit, logits)``. ``scores`` (in ``score_dtype``, the logits' dtype by
    default): ``"ties"`` (integers in [-2, 2]: many ties), ``"randn"`` (``N(0, 1)``: distinct
    scores, which a cast to the logits' dtype could tie) or ``"transposed_ties"`` (integers in
    [-1, 1], a transposed [B, M] tensor). ``tie_pattern``: the first three samples hold a full tie
    (the first sub-model wins), a NaN (it wins) and a column of NaNs (the first wins), so their
    answer is [0, 1, 0]. Logits ``N(0, 1)`` laid out as ``layout`` (``"contiguous"`` or a key of
    ``SELECT_LAYOUTS``)."""

    shape: Tuple[int, int, int]
    score_dtype: Optional[torch.dtype] = None
    scores: str = "ties"
    tie_pattern: bool = False
    layout: str = "contiguous"

    def args(self, gen, device="cpu", requires_grad=False) -> Args:
        M, B, K = self.shape
        sd = self.score_dtype or self.dtype
        if self.scores == "transposed_ties":
            ppd = torch.randint(-1, 2, (B, M), generator=gen).to(device, sd).T
        else:
            ppd = torch.randint(-2, 3, (M, B), generator=gen).to(sd) if self.scores == "ties" \
                else randn((M, B), gen, "cpu", sd)
            if self.tie_pattern:
                ppd[:, 0] = 0.5
                ppd[1, 1] = float("nan")
                ppd[:, 2] = float("nan")
            ppd = ppd.to(device)
        drawn, view = SELECT_LAYOUTS.get(self.layout, (self.shape, lambda t: t))
        z = randn(drawn, gen, device, self.dtype)
        return ppd, view(z.requires_grad_(requires_grad))


def select_samples() -> List[SelectSample]:
    """``collaborative_select``'s table."""
    out: List[SelectSample] = []
    add = out.append
    for shape in SELECT_SHAPES:
        for dt in FLOATS:
            # integer scores in the logits' dtype; N(0, 1) scores in it and in two others (a float32
            # PPD head beside bfloat16 logits, ...)
            for scores, sd in (("ties", None), ("randn", None), ("randn", torch.float64), ("randn", torch.float16)):
                sname = scores if sd is None else f"{scores}_{dtype_name(sd)}"
                add(SelectSample(id=f"{shape_id(shape)}-{dtype_name(dt)}-{sname}", dtype=dt, shape=shape,
                                 score_dtype=sd, scores=scores, tie_pattern=shape[0] > 1 and shape[1] > 3,
                                 tags=frozenset({"grid"}) | _tags(CUDA_VS_CPU, when=scores == "randn")))
    for layout in SELECT_LAYOUTS:
        for dt in (torch.float32, torch.bfloat16):
            add(SelectSample(id=f"{layout}-{dtype_name(dt)}", dtype=dt, shape=(3, 16, 10), layout=layout,
                             scores="transposed_ties", tags=frozenset({"layout"})))
    add(SelectSample(id="gradcheck", dtype=torch.float64, shape=(3, 6, 4), scores="randn",
                     tags=frozenset({GRADCHECK})))
    for dt in (torch.float32, torch.float16):
        add(SelectSample(id=f"opcheck-{dtype_name(dt)}", dtype=dt, shape=(3, 5, 7), scores="randn",
                         tags=frozenset({OPCHECK})))
    return _unique(out)


COLLAB_LOSS = collab_loss_samples()
PPD_BCE = ppd_bce_samples()
SIGN_STEP = sign_step_samples()
RANDOM_START = random_start_samples()
SELECT = select_samples()
