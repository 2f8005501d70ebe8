"""Dual-head packed ResNets, the collaboration module and its prediction rules (Algorithm 2)."""
from __future__ import annotations

import pytest
import torch

from cda2_ext.ops import reference
from cda2_ext.models import (Collaboration, CollaborationConfig, collaborate,
                             ensemble_probs, majority_vote, selection_score)

IMG = 16  # small images keep the tests fast; the trunks pool adaptively


def _model(depth: int = 8, M: int = 3, **kw) -> Collaboration:
    torch.manual_seed(0)
    return Collaboration(num_models=M, depth=depth, **kw)


@pytest.mark.parametrize("depth", [2, 8])
def test_shapes_and_shared_equals_per_model(depth):
    m = _model(depth).eval()
    x = torch.rand(5, 3, IMG, IMG)
    logits, ppd = m(x)
    assert logits.shape == (3, 5, 10) and ppd.shape == (3, 5)
    logits2, ppd2 = m(x.expand(3, *x.shape))  # one (identical) variant per sub-model
    torch.testing.assert_close(logits, logits2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ppd, ppd2, rtol=1e-5, atol=1e-5)


def test_sub_models_are_independent():
    m = _model().eval()
    x = torch.rand(3, 4, 3, IMG, IMG, requires_grad=True)
    logits, _ = m(x)
    (g,) = torch.autograd.grad(logits[1].sum(), x)
    assert g[1].abs().sum() > 0 and g[0].abs().sum() == 0 and g[2].abs().sum() == 0


def test_packed_sub_model_matches_a_single_model():
    """Sub-model m of a packed M=3 collaboration computes what an M=1 model with its weights does."""
    m3 = _model(M=3).eval()
    m1 = Collaboration(num_models=1, depth=8).eval()
    sd1 = {}
    for k, v in m3.state_dict().items():
        if v.dim() == 0:
            sd1[k] = v
        elif k.startswith("net.label_head") or k.startswith("net.ppd_head"):
            sd1[k] = v[1:2]
        else:  # packed conv / BN tensors: rows m*C:(m+1)*C belong to sub-model m
            c = v.shape[0] // 3
            sd1[k] = v[c:2 * c]
    m1.load_state_dict(sd1)
    x = torch.rand(4, 3, IMG, IMG)
    l3, p3 = m3(x)
    l1, p1 = m1(x)
    torch.testing.assert_close(l3[1], l1[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p3[1], p1[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ppd_input", ["features", "logits"])
def test_ppd_head_trained_by_bce_only(ppd_input):
    m = _model(depth=2, ppd_input=ppd_input)
    x, y = torch.rand(6, 3, IMG, IMG), torch.randint(0, 10, (6,))
    logits, ppd = m(x)
    out = reference.collaboration_loss(logits, y)
    head = set(m.net.ppd_head.parameters())
    rest = [p for p in m.parameters() if p not in head]
    g_rest = torch.autograd.grad(reference.ppd_bce(ppd, out.p_true), rest, allow_unused=True, retain_graph=True)
    assert all(g is None or g.abs().sum() == 0 for g in g_rest)
    g_head = torch.autograd.grad(out.loss, list(head), allow_unused=True)
    assert all(g is None for g in g_head)


def test_algorithm2_picks_argmax_ppd():
    m = _model().eval()
    x = torch.rand(7, 3, IMG, IMG)
    logits, ppd = m(x)
    with torch.no_grad():
        # force a known winner per sample
        bias = torch.zeros(3, 7)
        want = torch.tensor([0, 1, 2, 2, 1, 0, 1])
        bias[want, torch.arange(7)] = 100.0
    index, chosen = collaborate(logits, ppd + bias)
    assert torch.equal(index, want)
    torch.testing.assert_close(chosen, logits[want, torch.arange(7)])
    # through the module, with its own PPD heads
    idx, ch = m.collaborate(x)
    assert torch.equal(idx, ppd.argmax(0))
    pred = m.predict(x)
    assert torch.equal(pred.selected, ppd.argmax(0))
    assert torch.equal(pred.collaboration, logits[idx, torch.arange(7)].argmax(-1))
    assert torch.equal(pred.per_model, logits.argmax(-1))


def test_fused_and_unfused_selection_agree():
    m = _model().eval()
    x = torch.rand(6, 3, IMG, IMG)
    a = m.predict(x)
    ref = Collaboration(m.config, fused=False).eval()
    ref.load_state_dict(m.state_dict())
    assert ref.backend is not m.backend
    b = ref.predict(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_soe_score():
    logits = torch.randn(3, 5, 4)
    ppd = torch.randn(3, 5)
    s = selection_score(logits, ppd, "soe")
    torch.testing.assert_close(s, torch.softmax(logits, -1).max(-1).values * torch.sigmoid(ppd))
    index, _ = collaborate(logits, ppd, "soe")
    assert torch.equal(index, s.argmax(0))
    with pytest.raises(ValueError):
        selection_score(logits, ppd, "nope")


def test_ensemble_rules():
    # 3 sub-models, 2 samples, 3 classes
    logits = torch.tensor([[[5., 0, 0], [0, 5, 0]],
                           [[5., 0, 0], [0, 0, 5]],
                           [[0., 0, 9], [4, 0, 0]]])
    assert majority_vote(logits).tolist() == [0, 1]  # sample 1: three-way tie -> highest mean prob
    probs = ensemble_probs(logits)
    torch.testing.assert_close(probs, torch.softmax(logits, -1).mean(0))
    assert probs.argmax(-1).tolist() == [0, 1]


def test_config_round_trip_and_validation():
    cfg = CollaborationConfig(num_models=2, depth=14, ppd_input="logits")
    m = Collaboration.from_config(cfg.to_dict())
    assert m.config == cfg and m.num_models == 2
    for bad in (dict(num_models=0), dict(depth=9), dict(ppd_input="x"), dict(arch="vit")):
        with pytest.raises(ValueError):
            Collaboration(**bad)
    with pytest.raises(ValueError):
        CollaborationConfig.from_dict({"num_modles": 3})
    with pytest.raises(ValueError):
        _model()(torch.rand(2, 4, 3, IMG, IMG))  # M axis of the wrong size


def test_linear_collaboration_for_vectors():
    m = Collaboration(num_models=2, arch="linear", in_channels=2, num_classes=2, normalize=False)
    logits, ppd = m(torch.randn(9, 2))
    assert logits.shape == (2, 9, 2) and ppd.shape == (2, 9)
