"""The faster ways of running a collaboration (cda2_ext.models.layouts) compute what the packed
reference computes: outputs, gradients, BatchNorm buffers, and the adversarial examples of
training, in float64 on small shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn

from cda2_ext import ops
from cda2_ext.attacks.training_pgd import collaboration_pgd, per_model_pgd
from cda2_ext.models import Collaboration, CollaborationConfig, layouts
from cda2_ext.runtime import eval_mode
from helpers import pgd_oracle

IMG = 16
F64 = dict(rtol=1e-10, atol=1e-12)


def collaboration_loss_fn(model, y):
    """CE (summed) of Algorithm 2's answer: the loss of the adversarial-phase PGD."""
    def loss(x):
        logits, ppd = model(x)
        return Fn.cross_entropy(ops.collaborative_select(ppd, logits)[1], y, reduction="sum")
    return loss


def per_model_loss(model, y):
    """Sum over sub-models m of CE(f_m(x[m]), y): the loss of the natural-phase PGD."""
    def loss(x):
        logits = model(x)[0]
        return Fn.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(logits.shape[0]),
                                reduction="sum")
    return loss


def _pair(depth: int = 8, M: int = 3, **kw):
    """A packed-layout collaboration and a loop-layout copy with the same state, float64."""
    torch.manual_seed(0)
    packed = Collaboration(num_models=M, depth=depth, layout="packed", **kw).double()
    loop = Collaboration(num_models=M, depth=depth, layout="loop", **kw).double()
    loop.load_state_dict(packed.state_dict())
    # non-trivial running statistics and affine parameters, so BatchNorm folding is exercised
    with torch.no_grad():
        for a, b in zip(packed.modules(), loop.modules()):
            if isinstance(a, torch.nn.BatchNorm2d):
                for t in (a.running_mean, a.running_var, a.weight, a.bias):
                    t.copy_(torch.rand(t.shape, dtype=t.dtype) + 0.5)
                b.load_state_dict(a.state_dict())
    return packed, loop


def _inputs(gen, M: int, B: int = 5, per_model: bool = False) -> torch.Tensor:
    shape = (M, B, 3, IMG, IMG) if per_model else (B, 3, IMG, IMG)
    return torch.rand(shape, generator=gen, dtype=torch.float64)


def _close(a, b) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **F64)


@pytest.mark.parametrize("depth", [2, 8])
@pytest.mark.parametrize("per_model", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_loop_layout_matches_packed(gen, depth, per_model, train):
    packed, loop = _pair(depth)
    packed.train(train), loop.train(train)
    x = _inputs(gen, 3, per_model=per_model)
    xp, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    outs_p, outs_l = packed(xp), loop(xl)
    _close(outs_p, outs_l)
    w = torch.randn(outs_p[0].shape, generator=gen, dtype=torch.float64)
    for outs in (outs_p, outs_l):
        ((outs[0] * w).sum() + outs[1].square().sum()).backward()
    torch.testing.assert_close(xp.grad, xl.grad, **F64)
    for (name, p), q in zip(packed.named_parameters(), loop.parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, **F64, msg=name)
    for (name, a), b in zip(packed.state_dict().items(), loop.state_dict().values()):
        torch.testing.assert_close(a, b, **F64, msg=name)  # running stats and num_batches_tracked


def test_layouts_share_the_state_dict_and_switch_at_runtime(gen):
    packed, loop = _pair()
    assert list(packed.state_dict()) == list(loop.state_dict())
    assert all(a.shape == b.shape
               for a, b in zip(packed.state_dict().values(), loop.state_dict().values()))
    x = _inputs(gen, 3)
    packed.eval()
    ref = packed(x)
    packed.layout = "loop"
    assert packed.layout == "loop" and packed.config.layout == "loop"
    _close(ref, packed(x))
    # a checkpoint config written before the option existed still loads
    d = CollaborationConfig().to_dict()
    del d["layout"]
    assert CollaborationConfig.from_dict(d).layout == "auto"


def test_layout_is_validated():
    with pytest.raises(ValueError, match="layout"):
        Collaboration(num_models=2, depth=8, layout="grouped")
    m = Collaboration(num_models=2, depth=8)
    with pytest.raises(ValueError, match="layout"):
        m.layout = "vmap"
    assert layouts.resolve_layout("auto", torch.device("cpu")) == "loop"
    assert layouts.resolve_layout("auto", torch.device("cuda")) == "loop"
    assert layouts.resolve_layout("packed", torch.device("cuda")) == "packed"


@pytest.mark.parametrize("depth", [2, 8])
@pytest.mark.parametrize("per_model", [False, True])
@pytest.mark.parametrize("ppd_input,detach_ppd", [("features", True), ("logits", True),
                                                  ("features", False)])
def test_frozen_matches_packed_eval(gen, depth, per_model, ppd_input, detach_ppd):
    packed, loop = _pair(depth, ppd_input=ppd_input, detach_ppd=detach_ppd)
    loop.train()  # frozen() is eval-mode whatever the module's mode
    frozen = loop.frozen()
    assert isinstance(frozen.fn, layouts.FrozenNet)
    x = _inputs(gen, 3, per_model=per_model)
    xp, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    with eval_mode(packed):
        outs_p = packed(xp)
    outs_f = frozen(xf)
    _close(outs_p, outs_f)
    # output gradients with whole rows of zeros: the frozen backward skips them
    gl = torch.randn(outs_p[0].shape, generator=gen, dtype=torch.float64)
    gp = torch.randn(outs_p[1].shape, generator=gen, dtype=torch.float64)
    gl[0, :2] = 0
    gl[2] = 0
    gp[2] = 0
    assert outs_f[1].requires_grad == (not detach_ppd)  # input-only: no path to the weights
    n = 1 if detach_ppd else 2  # a detached PPD head has no gradient to the input
    (g_ref,) = torch.autograd.grad(outs_p[:n], xp, (gl, gp)[:n])
    (g_f,) = torch.autograd.grad(outs_f[:n], xf, (gl, gp)[:n])
    torch.testing.assert_close(g_ref, g_f, **F64)
    assert loop.training  # the snapshot left the module's mode alone


def test_frozen_is_input_only_and_a_snapshot(gen):
    _, loop = _pair()
    frozen = loop.frozen()
    x = _inputs(gen, 3).requires_grad_()
    logits, _ = frozen(x)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in loop.parameters())
    with torch.no_grad():  # a no-grad call saves nothing and gives the same numbers
        _close(frozen(x), (logits, frozen(x)[1]))
    with pytest.raises(ValueError, match="x: expected"):
        frozen(torch.rand(2, 5, 3, IMG, IMG, dtype=torch.float64))


def test_frozen_backward_visits_only_live_samples(gen, monkeypatch):
    """The collaboration loss back-propagates through one sub-model per sample, not M."""
    _, loop = _pair(M=3)
    frozen = loop.frozen()
    rows_seen = []
    inner = layouts.FrozenTrunk.backward_one

    def spy(self, net, grad, x, saved, rows):
        rows_seen.append(grad.shape[0])
        return inner(self, net, grad, x, saved, rows)

    monkeypatch.setattr(layouts.FrozenTrunk, "backward_one", spy)
    B = 12
    x = _inputs(gen, 3, B=B).requires_grad_()
    y = torch.randint(0, 10, (B,), generator=gen)
    loss = collaboration_loss_fn(frozen, y)(x)
    torch.autograd.grad(loss, x)
    assert sum(rows_seen) == B and len(rows_seen) <= 3


def test_linear_arch_frozen(gen):
    torch.manual_seed(0)
    m = Collaboration(num_models=2, arch="linear", in_channels=2, num_classes=2,
                      normalize=False).double()
    x = torch.rand(7, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    a = m(x)
    b = m.frozen()(x)
    _close(a, b)


@pytest.mark.parametrize("kind", ["collaboration", "per_model"])
@pytest.mark.parametrize("depth", [2, 8])
def test_adversarial_examples_unchanged(gen, kind, depth):
    """Training PGD through frozen() gives the adversarial examples of PGD through the module
    (the path before the speed work: packed layout, eval mode, autograd)."""
    packed, loop = _pair(depth)
    B = 6
    x = _inputs(gen, 3, B=B)
    y = torch.randint(0, 10, (B,), generator=gen)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    kw = dict(eps=8 / 255, alpha=2 / 255, steps=4)
    with eval_mode(packed):  # the old path, spelled out: the module itself under autograd
        if kind == "collaboration":
            before = pgd_oracle(collaboration_loss_fn(packed, y), x, **kw, backend=ops,
                         generator=torch.Generator().manual_seed(seed))
        else:
            before = pgd_oracle(per_model_loss(packed, y), x, **kw, num_models=3, backend=ops,
                         generator=torch.Generator().manual_seed(seed))
    attack = collaboration_pgd if kind == "collaboration" else per_model_pgd
    for model in (packed, loop):  # packed: EvalNet; loop: FrozenNet
        model.train()
        after = attack(model, x, y, **kw, generator=torch.Generator().manual_seed(seed), backend=ops)
        assert torch.equal(before, after), model.layout
        assert model.training
    assert (before - x).abs().amax() > 0  # the attack moved


def test_trainer_step_same_with_either_layout():
    from cda2_ext.data import ImageSet
    from cda2_ext.training import TrainConfig, Trainer
    g = torch.Generator().manual_seed(0)
    data = ImageSet((torch.rand(16, 3, IMG, IMG, generator=g) * 255).to(torch.uint8),
                    torch.randint(0, 10, (16,), generator=g), tuple("abcdefghij"))
    results = {}
    for layout in ("packed", "loop"):
        cfg = TrainConfig(num_models=2, depth=8, batch_size=8, steps=2, device="cpu", progress=False,
                          eval_every=0, out_dir="/nonexistent", phases="both")
        tr = Trainer(cfg, train_set=data, log=None)
        tr.model.layout = layout
        x, y = next(tr.batches())
        tallies = tr._new_tallies()
        losses = tr.train_step(x, y, tallies)
        results[layout] = (losses, tr.model.state_dict(), float(tallies["clean"].get("correct")))
    (lp, sp, cp), (ll, sl, cl) = results["packed"], results["loop"]
    assert cp == cl
    for k in lp:
        torch.testing.assert_close(lp[k], ll[k], rtol=1e-4, atol=1e-5)
    for k in sp:
        torch.testing.assert_close(sp[k], sl[k], rtol=1e-3, atol=1e-5, msg=k)


def test_hooks_make_the_fast_paths_step_aside(gen):
    """Hooks on the packed sub-modules (e.g. the skip-gradient attack's) must still run."""
    _, loop = _pair()
    loop.eval()
    calls = []
    handle = loop.net.trunk.blocks[0].bn2.register_forward_hook(lambda *a: calls.append(1))
    try:
        x = _inputs(gen, 3)
        loop(x)
        assert calls == [1]
        assert isinstance(loop.frozen().fn, layouts.EvalNet)
        loop.frozen()(x)
        assert calls == [1, 1]
    finally:
        handle.remove()
    assert isinstance(loop.frozen().fn, layouts.FrozenNet)
