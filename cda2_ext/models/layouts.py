"""Faster ways to run the packed sub-models: a per-model loop, and a frozen attack snapshot.

The parameters always stay **packed** (:mod:`cda2_ext.models.resnet`: one tensor per layer holding
all M sub-models), so the state dict, the checkpoints and the optimiser never see which of these
runs; only the order of the arithmetic changes.

Layouts (``CollaborationConfig.layout``; :data:`LAYOUTS`):

* ``"packed"``: one grouped convolution per layer over ``[B, M*C, H, W]`` (fewest kernel calls).
  On an H200 it lost to a loop over M nets wherever the step attacks (2.7x slower adversarial
  steps at B=512, ``benchmarks/results/gpu_check_nvidia-h200.md``) and tied without attacks.
* ``"loop"``: a Python loop over sub-models, each running ordinary ``groups=1`` convolutions with
  its slice of the packed weights (``weight.split`` gives views, so gradients land in the packed
  parameter and BatchNorm running statistics update in place), on ``channels_last`` activations.
  oneDNN's grouped convolutions with 16-64 channels per group are slower on CPU than M plain ones,
  and channels-last spares oneDNN a layout reorder on every call (measured in
  ``benchmarks/train_step.py``).
* ``"auto"`` (default): ``"loop"`` on every device (kept as a name so that a later measurement
  can pick per device without changing configs or checkpoints).

Module hooks: the loop layout and the snapshot do not call the packed sub-modules, so while any
hook is registered on the trunk (or globally) they step aside and the packed forward runs.

Attack snapshot (:class:`FrozenTrunk`, reached through ``Collaboration.frozen()``). PGD needs the
gradient w.r.t. the **input** of the model in **eval mode** while the weights stay fixed, so:

* BatchNorm is folded into the preceding convolution (eval-mode BN is an affine map per channel):
  no BN forward or backward on any of the PGD steps;
* the forward saves only the ReLU outputs (each is the next convolution's input and its own mask)
  and no graph, and runs its ReLUs and residual adds in place;
* the backward is written out (data gradients of the convolutions, ReLU masks, average pooling)
  and, on a CPU, skips, per sub-model, every sample whose incoming gradient is exactly zero. The
  collaboration loss of Algorithm 1's adversarial phase back-propagates only through the sub-model
  the PPD heads select for each sample (``collaborative_select`` gives the others an exact zero),
  so the backward costs one sub-model's worth of work instead of M; the other rows would
  contribute exact zeros. Which rows those are is known only from the data, so on a GPU (where
  :func:`~cda2_ext.runtime.sync_free` holds) every row is computed: the shapes stay static and the
  host never waits for the device (nor would a CUDA graph), for the same result.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..runtime import sync_free
from .packed import PackedConv2d

# resnet imports this module, so it does not import resnet back (not even for annotations): the
# ``trunk`` arguments below are :class:`~cda2_ext.models.resnet.PackedResNetTrunk` instances.

__all__ = ["LAYOUTS", "resolve_layout", "has_hooks", "loop_trunk_forward", "FrozenTrunk",
           "FrozenNet", "EvalNet"]

LAYOUTS = ("auto", "packed", "loop")


def resolve_layout(layout: str, device: torch.device) -> str:
    """The concrete layout (``"packed"`` or ``"loop"``) that ``layout`` means on ``device``."""
    if layout == "auto":  # measured: loop on CPU (oneDNN) and on an H200 (see the module docstring)
        return "loop"
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return layout


def has_hooks(module: nn.Module) -> bool:
    """True when a hook is registered on ``module``, one of its children, or globally.

    The loop layout and the frozen snapshot call functional ops on views of the packed weights,
    not the packed sub-modules, so hooks on those (e.g. the skip-gradient transfer attack's
    hooks on ``bn2``) would silently not run; the packed forward runs instead.
    """
    from torch.nn.modules import module as _m
    if (_m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks
            or _m._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               or m._backward_pre_hooks for m in module.modules())


def _channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last)


# ----- the loop layout (training and evaluation, ordinary autograd) -------------------------------
class _BNSplit(NamedTuple):
    """One packed BatchNorm cut into per-model views, plus the arguments of ``Fn.batch_norm``."""

    weight: Tuple[Tensor, ...]
    bias: Tuple[Tensor, ...]
    mean: Tuple[Optional[Tensor], ...]
    var: Tuple[Optional[Tensor], ...]
    training: bool
    momentum: float
    eps: float


def _split_bn(bn: nn.BatchNorm2d, M: int) -> _BNSplit:
    """Per-model views of ``bn``'s parameters and buffers, with ``nn.BatchNorm2d.forward``'s
    bookkeeping done once for the packed module (``num_batches_tracked`` counts forwards, not
    sub-models), so the loop updates the buffers exactly as one packed call would."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    C = bn.num_features // M

    def split(t: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
        return t.split(C) if t is not None else (None,) * M

    return _BNSplit(split(bn.weight), split(bn.bias), split(bn.running_mean if keep else None),
                    split(bn.running_var if keep else None), training, momentum, bn.eps)


def _conv_bn(x: Tensor, conv: nn.Module, w: Tensor, bn: _BNSplit, m: int) -> Tensor:
    y = Fn.conv2d(x, w, None, conv.stride, conv.padding)
    return Fn.batch_norm(y, bn.mean[m], bn.var[m], bn.weight[m], bn.bias[m], bn.training,
                         bn.momentum, bn.eps)


def loop_trunk_forward(trunk: nn.Module, x: Tensor) -> Tensor:
    """:class:`~cda2_ext.models.resnet.PackedResNetTrunk`'s forward as a loop over sub-models.

    Same inputs, outputs, gradients and BatchNorm buffer updates as the packed forward
    (``x [B, C, H, W]`` shared or ``[M, B, C, H, W]`` -> ``[M, B, F]``).
    """
    M = trunk.num_models
    convs = [c for c in trunk.modules() if isinstance(c, PackedConv2d)]
    w = {id(c): c.weight.split(c.out_ch) for c in convs}
    bns = {id(b): _split_bn(b, M) for b in trunk.modules() if isinstance(b, nn.BatchNorm2d)}
    conv0, bn0 = trunk.stem[0], trunk.stem[1]
    xs = [_channels_last(xm) for xm in x] if x.dim() == 5 else [_channels_last(x)] * M
    feats = []
    for m, xm in enumerate(xs):
        h = Fn.relu(_conv_bn(xm, conv0, w[id(conv0)][m], bns[id(bn0)], m))
        for blk in trunk.blocks:
            o = Fn.relu(_conv_bn(h, blk.conv1, w[id(blk.conv1)][m], bns[id(blk.bn1)], m))
            o = _conv_bn(o, blk.conv2, w[id(blk.conv2)][m], bns[id(blk.bn2)], m)
            if blk.shortcut is not None:
                sc, sbn = blk.shortcut[0], blk.shortcut[1]
                h = _conv_bn(h, sc, w[id(sc)][m], bns[id(sbn)], m)
            h = Fn.relu(o + h)
        feats.append(trunk.pool(h).flatten(1))  # not reshape(B, -1): B may be 0
    return torch.stack(feats)


# ----- the frozen attack snapshot -----------------------------------------------------------------
def _rows(t: Tensor, rows: Tensor) -> Tensor:
    """``t[rows]`` for a channels-last ``t``, staying channels-last (``index_select`` would return
    NCHW, and every elementwise op between the two layouts then runs ~40x slower)."""
    return t.permute(0, 2, 3, 1).index_select(0, rows).permute(0, 3, 1, 2)


def _relu_grad(grad: Tensor, out: Tensor) -> Tensor:
    """Gradient through a ReLU whose output was ``out`` (the kernel autograd's ReLU uses)."""
    return torch.ops.aten.threshold_backward(grad, out, 0)


class _Conv(NamedTuple):
    """A convolution with eval-mode BatchNorm folded in: ``conv(x, weight) + bias``."""

    weight: Tensor
    bias: Tensor
    stride: int
    padding: int

    def __call__(self, x: Tensor) -> Tensor:
        return Fn.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def input_grad(self, grad: Tensor, inp: Tensor) -> Tensor:
        """Gradient w.r.t. the input ``inp`` (only its shape and layout are read)."""
        return torch.ops.aten.convolution_backward(
            grad, inp, self.weight, None, [self.stride] * 2, [self.padding] * 2, [1, 1], False,
            [0, 0], 1, [True, False, False])[0]


def _fold(conv: nn.Module, bn: nn.BatchNorm2d) -> List[_Conv]:
    """Per-model folded copies of a packed conv + its BatchNorm in eval mode (detached)."""
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        weight = _channels_last(conv.weight * scale.view(-1, 1, 1, 1))
        bias = bn.bias - bn.running_mean * scale
    C = conv.out_ch
    return [_Conv(weight[m * C:(m + 1) * C], bias[m * C:(m + 1) * C], conv.stride, conv.padding)
            for m in range(conv.num_models)]


class _Block(NamedTuple):
    conv1: _Conv
    conv2: _Conv
    shortcut: Optional[_Conv]


class _SubNet(NamedTuple):
    """One sub-model's folded trunk."""

    stem: _Conv
    blocks: List[_Block]


class FrozenTrunk:
    """Eval-mode snapshot of a :class:`~cda2_ext.models.resnet.PackedResNetTrunk` for attacks.

    Computes the trunk's eval-mode function ``x -> features [M, B, F]`` with BatchNorm folded into
    the convolutions and weights detached; differentiable w.r.t. ``x`` only, by a hand-written
    backward that skips samples with a zero incoming gradient (see the module docstring). It copies
    the weights when built: build it again after the parameters or running statistics change.
    """

    def __init__(self, trunk: nn.Module) -> None:
        M = self.num_models = trunk.num_models
        stem = _fold(trunk.stem[0], trunk.stem[1])
        blocks = [(_fold(b.conv1, b.bn1), _fold(b.conv2, b.bn2),
                   _fold(b.shortcut[0], b.shortcut[1]) if b.shortcut is not None else [None] * M)
                  for b in trunk.blocks]
        self.nets = [_SubNet(stem[m], [_Block(c1[m], c2[m], sc[m]) for c1, c2, sc in blocks])
                     for m in range(M)]
        size = trunk.pool.output_size
        self.pool_hw = (size, size) if isinstance(size, int) else tuple(size)

    def _pool(self, h: Tensor) -> Tensor:
        return Fn.adaptive_avg_pool2d(h, self.pool_hw).flatten(1)  # B may be 0

    def forward_one(self, net: _SubNet, x: Tensor, saved: Optional[List[Tensor]]) -> Tensor:
        """``x [B, C, H, W]`` (normalised) -> features ``[B, F]`` of one sub-model. When ``saved``
        is a list, the ReLU outputs are appended to it in order (the backward's masks and
        convolution inputs)."""
        keep = saved.append if saved is not None else (lambda t: None)
        h = net.stem(x).relu_()
        keep(h)
        for blk in net.blocks:
            o = blk.conv1(h).relu_()
            keep(o)
            out = blk.conv2(o)
            out += h if blk.shortcut is None else blk.shortcut(h)
            h = out.relu_()
            keep(h)
        return self._pool(h)

    def backward_one(self, net: _SubNet, grad: Tensor, x: Tensor, saved: List[Tensor],
                     rows: Optional[Tensor]) -> Tensor:
        """Gradient w.r.t. ``x`` (the rows ``rows`` of it, all when ``None``) of the features'
        rows ``rows``, given their gradient ``grad [n, F]``."""
        take = (lambda t: t) if rows is None else (lambda t: _rows(t, rows))
        acts = iter(reversed(saved))
        h = take(next(acts))
        g = torch.ops.aten._adaptive_avg_pool2d_backward(
            _channels_last(grad.reshape(grad.shape[0], h.shape[1], *self.pool_hw)), h)
        for blk in reversed(net.blocks):
            g = _relu_grad(g, h)
            o = take(next(acts))
            h = take(next(acts))  # the block's input: a ReLU output (the stem's for the first block)
            g_short = g if blk.shortcut is None else blk.shortcut.input_grad(g, h)
            g = blk.conv1.input_grad(_relu_grad(blk.conv2.input_grad(g, o), o), h)
            g += g_short
        return net.stem.input_grad(_relu_grad(g, h), take(x))

    def inputs(self, x: Tensor) -> List[Tensor]:
        """Each sub-model's channels-last input (one shared tensor for a shared ``x``)."""
        if x.dim() == 5:
            return [_channels_last(xm) for xm in x]
        return [_channels_last(x)] * self.num_models

    def __call__(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W]`` (shared) or ``[M, B, C, H, W]``, normalised -> ``[M, B, F]``."""
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenTrunkFn.apply(x, self)
        with torch.no_grad():
            return torch.stack([self.forward_one(net, xm, None)
                                for net, xm in zip(self.nets, self.inputs(x))])


class _FrozenTrunkFn(torch.autograd.Function):
    """Autograd face of :class:`FrozenTrunk`: ``x -> features``, backward by hand, input only."""

    @staticmethod
    def forward(ctx, x: Tensor, frozen: FrozenTrunk) -> Tensor:  # type: ignore[override]
        ctx.frozen, ctx.shape = frozen, x.shape
        ctx.inputs, ctx.saved = frozen.inputs(x), [[] for _ in frozen.nets]
        return torch.stack([frozen.forward_one(net, xm, saved)
                            for net, xm, saved in zip(frozen.nets, ctx.inputs, ctx.saved)])

    @staticmethod
    @once_differentiable  # the hand-written backward records no graph of its own
    def backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], None]:  # type: ignore[override]
        frozen, shape = ctx.frozen, ctx.shape
        shared = len(shape) == 4
        gx = grad.new_zeros(shape)
        # [M, B]: samples whose features carry a gradient (None: all rows, static shapes)
        live = None if sync_free(grad.device) else grad.ne(0).any(-1)
        for m, net in enumerate(frozen.nets):
            n = grad.shape[1] if live is None else int(live[m].sum())
            if n == 0:
                continue
            rows = None if n == grad.shape[1] else live[m].nonzero().squeeze(1)
            g_m = grad[m] if rows is None else grad[m].index_select(0, rows)
            g_x = frozen.backward_one(net, g_m, ctx.inputs[m], ctx.saved[m], rows)
            target = gx if shared else gx[m]
            if rows is None:
                target += g_x
            else:
                target.index_add_(0, rows, g_x)
        ctx.inputs = ctx.saved = None
        return gx, None


class FrozenNet:
    """Eval-mode, input-differentiable snapshot of a :class:`~cda2_ext.models.resnet.DualHeadNet`.

    ``x -> (logits [M, B, K], ppd_logit [M, B])`` like the network in eval mode, with the trunk
    run by :class:`FrozenTrunk` (a ResNet trunk; other trunks run as they are) and the heads'
    weights detached. Valid while the network's parameters and buffers stay as they were.
    """

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.num_models = net.num_models
        self.trunk = FrozenTrunk(net.trunk) if hasattr(net.trunk, "stem") else net.trunk

    def __call__(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self.net.heads(self.trunk(self.net.normalise(x)), detach_weights=True)


class EvalNet:
    """The packed layout's stand-in for :class:`FrozenNet`: the network itself, run in eval mode
    (a grouped convolution cannot skip one sub-model's samples; whether a folded packed snapshot
    pays on a GPU is for the GPU benchmark to show)."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.num_models = net.num_models

    def __call__(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        was = self.net.training
        self.net.eval()
        try:
            return self.net(x)
        finally:
            self.net.train(was)
