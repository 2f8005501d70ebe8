"""Evaluation attacks: ball and box, worst case over restarts, the last iterate instead of the worst
one, Square's budget, the transfer rule, gradient masking caught by the adaptive attacks, and real
attacks on a small CIFAR model.

Everything is tiny (a few images, a few steps, depth-2/8 models) so the file runs in well under a
minute on two CPU cores; the CIFAR tests skip themselves without the shared subset.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

from cda2_ext import ops
from cda2_ext.attacks.adaptive import ADAPTIVE_ATTACKS, AdaptiveConfig, adaptive_attacks
from cda2_ext.attacks.apgd import apgd_attack
from cda2_ext.attacks.engine import (AttackResult, dlr_loss, margin, merge_worst,
                                     model_objective, run_restarts, sign_attack)
from cda2_ext.attacks.square import square_attack, square_p_schedule
from cda2_ext.attacks.transfer import (TransferConfig, TransferSet, all_variants_correct,
                                       generate_transfer_set, input_diversity, residual_blocks,
                                       skip_gradient, transfer_attack, transfer_correct)
from cda2_ext.attacks.whitebox import (CollaborationLogits, EnsembleLogits, PGDConfig,
                                       SubModelLogits, pgd_attack, ppd_gradients, predict_correct)
from cda2_ext.evaluation.rows import pgd_row
from cda2_ext.models import Collaboration
from cda2_ext.runtime import REFERENCE

TOL = 1e-6  # x_nat + eps is rounded in float32: the ball holds up to one ulp


def assert_in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    assert x_adv.shape[-x.dim():] == x.shape
    assert (x_adv - x).abs().max().item() <= eps + TOL
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


@pytest.fixture(scope="module")
def tiny():
    """An untrained 2-sub-model depth-2 collaboration and images that touch 0 and 1."""
    torch.manual_seed(0)
    net = Collaboration(num_models=2, depth=2).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 32, 32, generator=g)
    x[0], x[1, :, :8] = 0.0, 1.0  # the box must clip
    y = torch.randint(0, 10, (6,), generator=g)
    return net, x, y


# ----- ball and box -------------------------------------------------------------------------------
def test_pgd_and_adaptive_stay_in_ball_and_box(tiny):
    net, x, y = tiny
    eps = 0.05
    r = pgd_attack(CollaborationLogits(net), x, y, eps, PGDConfig(steps=3, restarts=2), only_correct=False)
    assert_in_ball(r.x_adv, x, eps)
    res = adaptive_attacks(net, x, y, eps, AdaptiveConfig(steps=2, apgd_steps=4, temperatures=(1.0, 0.1)),
                           only_correct=False)
    assert set(res) == {"soft(T=gap)", "soft(T=0.25*gap)", "soft(T=1)", "soft(T=0.1)", "submodels",
                        "ppd-push", "bpda", "apgd-ce", "apgd-dlr", "decision", "decision-targeted",
                        "apgd-decision", "apgd-decision-targeted", "worst"}
    for name, r in res.items():
        assert_in_ball(r.x_adv, x, eps)
        assert r.correct.shape == (6,), name
    # the worst case is at least as strong as each attack, sample by sample
    for name, r in res.items():
        assert bool((res["worst"].correct <= r.correct).all()), name


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mi-pgd", "m-di2-fgsm", "sgm"])
def test_transfer_methods_stay_in_ball_and_box(tiny, method):
    _, x, y = tiny
    surrogate = EnsembleLogits(Collaboration(num_models=2, depth=8).eval())
    r = transfer_attack(surrogate, x, y, 0.04, method, "cw", TransferConfig(steps=3, mi_restarts=2),
                        generator=torch.Generator().manual_seed(0))
    assert r.margin is None and r.correct is None  # nothing of the target was used
    v = r.x_adv
    assert v.shape == ((2 if method == "mi-pgd" else 1), *x.shape)
    assert_in_ball(v, x, 0.04)


def test_square_stays_in_ball_and_box(tiny):
    net, x, y = tiny
    r = square_attack(CollaborationLogits(net), x, y, 0.05, 40, generator=torch.Generator().manual_seed(0))
    assert_in_ball(r.x_adv, x, 0.05)


def test_eps_zero_changes_nothing(tiny):
    net, x, y = tiny
    r = pgd_attack(CollaborationLogits(net), x, y, 0.0, PGDConfig(steps=2, restarts=2), only_correct=False)
    assert torch.equal(r.x_adv, x)


# ----- bookkeeping ---------------------------------------------------------------------------------
def test_run_restarts_keeps_the_per_sample_worst_case():
    """Sample 0 breaks in restart 2 only; sample 1 never breaks (best margin kept); sample 2 breaks
    at once and is not attacked again."""
    x = torch.zeros(3, 1, 2, 2)
    y = torch.zeros(3, dtype=torch.long)
    script = [  # per restart: (margins, broken) for samples 0, 1, 2
        ([-2.0, -3.0, 1.0], [False, False, True]),
        ([0.5, -1.0, 9.0], [True, False, True]),
        ([-5.0, -2.0, 9.0], [False, False, True]),
    ]
    calls = []

    def once(idx, x0):
        r = len(calls)
        calls.append(idx.tolist())
        m = torch.tensor(script[r][0])[idx]
        broken = torch.tensor(script[r][1])[idx]
        xa = torch.full_like(x0, float(r + 1))
        return AttackResult(xa, m.unsqueeze(0), (~broken).unsqueeze(0))

    out = run_restarts(once, x, y, 0.1, 3, random_start=False)
    assert calls == [[0, 1, 2], [0, 1], [1]]
    assert out.correct.tolist() == [False, True, False]
    assert out.margin.tolist() == [0.5, -1.0, 1.0]
    assert out.x_adv[:, 0, 0, 0].tolist() == [2.0, 2.0, 1.0]  # the point each worst case was found at


@pytest.mark.slow
def test_pgd_restarts_equal_the_worst_of_single_runs():
    """Multi-restart PGD == per-sample worst over the same starts run one by one (float64, a
    linear model, so every sample's trajectory is independent of the batch)."""
    torch.manual_seed(3)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double().eval()
    x = torch.rand(16, 3, 4, 4, dtype=torch.float64)
    y = lin(x).argmax(-1)  # all clean-correct
    eps, cfg = 0.08, PGDConfig(steps=2, restarts=4, alpha_factor=0.25)
    multi = pgd_attack(lin, x, y, eps, cfg, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    seeds = [int(torch.randint(0, 2 ** 62, (), generator=g, dtype=torch.int64)) for _ in range(4)]
    singles = []
    for s in seeds:
        x0 = ops.pgd_random_start(x, eps, num_models=1, seed=s)
        singles.append(sign_attack(model_objective(lin, y), x, y, eps, 0.25 * eps, 2, x_init=x0).worst())
    worst = merge_worst(singles)
    assert torch.equal(multi.correct, worst.correct)
    assert 0 < int(multi.correct.sum()) < 16  # the check means something: some break, some don't
    keep = multi.correct
    assert torch.allclose(multi.margin[keep], worst.margin[keep])
    assert torch.equal(multi.correct, torch.stack([s.correct for s in singles]).all(0))


def test_attack_result_worst_prefers_broken_then_margin():
    r = AttackResult(torch.arange(6.).view(3, 2, 1), torch.tensor([[-1.0, 2.0], [0.5, 3.0], [-0.2, 1.0]]),
                     torch.tensor([[True, False], [False, False], [True, False]]))
    w = r.worst()
    assert w.correct.tolist() == [False, False]
    assert w.margin.tolist() == [0.5, 3.0]


def test_losses():
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    y = torch.tensor([0])
    assert margin(z, y).item() == -2.0
    assert math.isclose(dlr_loss(z, y).item(), -2.0 / 3.0, rel_tol=1e-6)
    assert math.isclose(dlr_loss(10 * z + 5, y).item(), dlr_loss(z, y).item(), rel_tol=1e-5)


# ----- the last iterate instead of the worst one --------------------------------------------------
def test_last_iterate_judges_the_final_point_and_worst_iterate_any_point():
    """A loss that always pushes x up, and a model that is wrong only near x = 0.6: PGD passes
    through the wrong region (0.5 -> 0.6 -> 0.7 -> 0.8) and ends outside it."""
    x_nat = torch.full((1, 1), 0.5)
    y = torch.zeros(1, dtype=torch.long)

    def objective(x):  # x [G, B, 1]
        wrong = ((x[..., 0] - 0.6).abs() < 0.03).float()
        logits = torch.stack([1 - 2 * wrong, torch.zeros_like(wrong)], -1)  # class 1 wins iff wrong
        return x[..., 0] * 1.0, logits.detach()

    kw = dict(x_init=x_nat.unsqueeze(0), lo=0.0, hi=1.0, backend=REFERENCE)
    worst = sign_attack(objective, x_nat, y, 0.3, 0.1, 3, **kw)
    last = sign_attack(objective, x_nat, y, 0.3, 0.1, 3, last_iterate=True, **kw)
    assert not bool(worst.correct.all()) and worst.x_adv.flatten().item() == pytest.approx(0.6)
    assert bool(last.correct.all()) and last.x_adv.flatten().item() == pytest.approx(0.8)


class _PassesThroughAWrongBand(torch.nn.Module):
    """Two classes; the logit gap d(x) = wrong - right is a bump peaking at x = 0.72: negative at
    0.5 and 0.8 (right), positive at 0.7 (wrong), rising at 0.5 and 0.7, so PGD with step 0.2 and
    eps 0.3 goes 0.5 -> 0.7 -> 0.8 through the wrong band and out of it."""

    def forward(self, x):
        d = -1 + 2 * torch.exp(-((x.flatten(1).mean(1) - 0.72) / 0.03) ** 2)
        return torch.stack([torch.zeros_like(d), d], -1)


def test_pgd_config_last_iterate_reaches_the_attack_and_its_row():
    x, y = torch.full((1, 1, 1, 1), 0.5), torch.zeros(1, dtype=torch.long)
    base = dict(steps=2, restarts=1, alpha_factor=2 / 3, random_start=False)
    worst = pgd_attack(_PassesThroughAWrongBand(), x, y, 0.3, PGDConfig(**base), backend=REFERENCE)
    last = pgd_attack(_PassesThroughAWrongBand(), x, y, 0.3, PGDConfig(**base, last_iterate=True),
                      backend=REFERENCE)
    assert worst.x_adv.item() == pytest.approx(0.7) and not bool(worst.correct.any())
    assert last.x_adv.item() == pytest.approx(0.8) and bool(last.correct.all())
    assert pgd_row(PGDConfig(last_iterate=True)).label == "PGD-50x5 (ce, last iterate)"
    assert pgd_row(PGDConfig()).label == "PGD-50x5 (ce)"


# ----- Square ---------------------------------------------------------------------------------------
class _QueryLog(nn.Module):
    """A model that records how often each sample is queried and that no gradient is involved.

    Samples are told apart by their (well separated) mean intensity."""

    def __init__(self, levels):
        super().__init__()
        self.levels = torch.tensor(levels)
        self.count = torch.zeros(len(levels), dtype=torch.long)
        self.grad_seen = False
        self.lin = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        self.grad_seen |= torch.is_grad_enabled() or x.requires_grad
        who = (x.flatten(1).mean(1, keepdim=True) - self.levels).abs().argmin(1)
        self.count += torch.bincount(who, minlength=len(self.levels))
        return self.lin(x.flatten(1)) + 4.0 * Fn.one_hot(who % 4, 4)  # confident, hard to flip


def test_square_never_exceeds_budget_and_only_queries_outputs():
    torch.manual_seed(0)
    levels = [0.1, 0.3, 0.5, 0.7, 0.9]
    model = _QueryLog(levels)
    x = torch.stack([torch.full((3, 8, 8), v) for v in levels])
    y = torch.arange(5) % 4
    y[4] = 1  # sample 4 is misclassified from the start: one query, then nothing
    budget = 25
    with torch.enable_grad():  # even with grad mode on, Square must not use gradients
        r = square_attack(model, x, y, 0.03, budget, generator=torch.Generator().manual_seed(0))
    assert not model.grad_seen
    assert torch.equal(model.count, r.queries)
    assert int(r.queries.max()) <= budget
    assert r.queries[4].item() == 1 and not r.correct[4]
    assert torch.equal(r.out_of_budget, r.correct & (r.queries == budget))
    assert r.out_of_budget[:4].all()  # the 4-logit bonus cannot be overcome at eps=0.03


def test_square_breaks_a_weak_model_and_schedule_shrinks():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    x = torch.rand(8, 3, 8, 8)
    y = lin(x).argmax(-1)
    r = square_attack(lin, x, y, 0.3, 200, generator=torch.Generator().manual_seed(0))
    assert (~r.correct).sum() >= 6
    assert square_p_schedule(0.8, 0, 5000) == 0.8
    assert square_p_schedule(0.8, 4999, 5000) == 0.8 / 512


# ----- transfer: the all-variants rule and shareable sets ----------------------------------------
def test_all_variants_rule():
    correct = torch.tensor([[True, True, False, True],
                            [True, False, False, True],
                            [True, True, True, True]])
    assert all_variants_correct(correct).tolist() == [True, False, False, True]
    assert all_variants_correct(correct, torch.tensor([True, True, True, False])).tolist() == [
        True, False, False, False]


@pytest.mark.slow
def test_transfer_set_grid_save_load_and_evaluate(tiny, tmp_path):
    net, x, y = tiny
    x = x[:, :, :16, :16].contiguous()  # the ResNets accept any size; 16x16 keeps this quick
    sur = {"a": EnsembleLogits(Collaboration(num_models=2, depth=8).eval()),
           "b": EnsembleLogits(Collaboration(num_models=3, depth=8).eval())}
    cfg = TransferConfig.preset("table5", steps=1)
    assert cfg.variants_per_surrogate() == 10  # x 3 surrogates = Table 5's 30
    ts = generate_transfer_set(sur, x, y, 0.03, cfg, seed=5, indices=torch.arange(6) * 10)
    assert len(ts.names) == 20 and ts.x_adv.shape == (20, *x.shape)
    assert ts.names[0] == "a/ce/mi-pgd#0" and ts.names[-1] == "b/cw/sgm"
    assert_in_ball(ts.x_adv, x, 0.03)
    again = generate_transfer_set(sur, x, y, 0.03, cfg, seed=5)
    assert torch.equal(ts.x_adv, again.x_adv)  # reproducible from the seed
    p = ts.save(tmp_path / "t.safetensors")
    back = TransferSet.load(p)
    assert torch.equal(back.x_adv, ts.x_adv) and back.names == ts.names and back.eps == 0.03
    assert back.indices.tolist() == list(range(0, 60, 10))
    assert back.config["transfer"]["losses"] == ["ce", "cw"] and back.config["seed"] == 5
    corr = transfer_correct(CollaborationLogits(net), back)
    assert corr.shape == (20, 6)
    manual = torch.stack([predict_correct(CollaborationLogits(net), v, y) for v in back.x_adv])
    assert torch.equal(corr, manual)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="unreadable transfer set"):
        TransferSet.load(tmp_path / "bad.safetensors")


def test_input_diversity_keeps_shape_and_gradient():
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    out = input_diversity(x, prob=1.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(input_diversity(x, prob=0.0), x)


def test_skip_gradient_scales_only_the_residual_branch():
    torch.manual_seed(0)
    # packed layout: with hooks registered the loop layout steps aside for the packed forward, and
    # the bit-for-bit comparison below must compare one implementation with itself
    net = Collaboration(num_models=1, depth=8, layout="packed").eval()
    model = SubModelLogits(net, 0)
    assert len(residual_blocks(model)) == 3
    x = torch.rand(2, 3, 32, 32, requires_grad=True)

    def fwd_grad(gamma=None):
        xx = x.detach().clone().requires_grad_(True)
        ctx = skip_gradient(model, gamma) if gamma is not None else torch.enable_grad()
        with ctx:
            out = model(xx)
            g, = torch.autograd.grad(out[:, 0].sum(), xx)
        return out.detach(), g

    out0, g0 = fwd_grad()
    out1, g1 = fwd_grad(1.0)
    out2, g2 = fwd_grad(0.2)
    assert torch.equal(out0, out1) and torch.equal(out0, out2)  # forward untouched
    assert torch.allclose(g0, g1)
    assert not torch.allclose(g0, g2, atol=1e-6)
    assert not any(b.bn2._forward_hooks for b, _ in residual_blocks(model))  # hooks removed
    with pytest.raises(ValueError, match="no residual blocks"):
        with skip_gradient(SubModelLogits(Collaboration(num_models=1, depth=2), 0), 0.2):
            pass


# ----- gradient masking: the adaptive attacks find what PGD misses ---------------------------------
TOY_EPS = 0.1


class MaskingToy(nn.Module):
    """Three sub-models whose PPD heads flip on PGD's path (inputs ``[B, 2, 4, 4]`` around 0.5).

    ``u1``/``u2`` are the mean offsets of channel 0/1. A is right unless ``u1 > eps/2``, B unless
    ``u1 < -eps/2``, C is always wrong. A is selected while ``u1 < eps/4``, B beyond - so following
    the selected sub-model's gradient just swaps A and B, both right where selected. C wins the
    selection only when ``u2`` is pushed up, which no sub-model's loss asks for: plain PGD (and
    APGD through the selected sub-model) never goes there, the attacks on the selection do.
    """

    num_models = 3

    def __init__(self):
        super().__init__()
        self.detach_ppd = True  # like the real model: attacks must switch it off to see the PPD

    def forward(self, x):
        u1 = x[:, 0].flatten(1).mean(1) - 0.5
        u2 = x[:, 1].flatten(1).mean(1) - 0.5
        s = 10.0 / TOY_EPS
        z = torch.zeros_like(u1)
        A = torch.stack([s * (0.5 * TOY_EPS - u1), z, z - 10], -1)
        B = torch.stack([s * (u1 + 0.5 * TOY_EPS), z, z - 10], -1)
        C = torch.stack([z - 1, z, z - 10], -1)
        ppd = torch.stack([s * (0.25 * TOY_EPS - u1), s * (u1 - 0.25 * TOY_EPS),
                           4 * s * (u2 - 0.5 * TOY_EPS)])
        if self.detach_ppd:
            ppd = ppd.detach()
        return torch.stack([A, B, C]), ppd


def test_adaptive_attacks_find_what_pgd_misses_on_a_masking_toy():
    net = MaskingToy()
    x = torch.full((4, 2, 4, 4), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    hard = CollaborationLogits(net)
    assert predict_correct(hard, x, y).all()
    pgd = pgd_attack(hard, x, y, TOY_EPS, PGDConfig(steps=20, restarts=3),
                     generator=torch.Generator().manual_seed(0))
    assert pgd.correct.all(), "plain PGD should be fooled by the flipping selection"
    res = adaptive_attacks(net, x, y, TOY_EPS, AdaptiveConfig(steps=10, apgd_steps=10), seed=0)
    assert (~res["worst"].correct).all()
    for name in ("soft(T=gap)", "soft(T=0.25*gap)", "ppd-push", "bpda", "decision-targeted"):
        assert (~res[name].correct).all(), name
    assert net.detach_ppd  # restored
    # an adversarial example the worst case returns really is one, judged by the hard collaboration
    assert not predict_correct(hard, res["worst"].x_adv, y).any()
    assert_in_ball(res["worst"].x_adv, x, TOY_EPS)


def test_ppd_gradients_context_restores_detach():
    net = Collaboration(num_models=2, depth=2)
    assert net.net.detach_ppd
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    with ppd_gradients(net):
        assert not net.net.detach_ppd
        _, ppd = net(x)
        g, = torch.autograd.grad(ppd.sum(), x)
        assert g.abs().sum() > 0
    assert net.net.detach_ppd


def test_bpda_forward_value_is_the_hard_answer(tiny):
    net, x, _ = tiny
    hard = CollaborationLogits(net)(x)
    bpda = CollaborationLogits(net, "bpda", temperature=0.5)(x)
    assert torch.equal(hard.float(), bpda)


def test_adaptive_config_rejects_unknown_attacks():
    with pytest.raises(ValueError, match="unknown"):
        AdaptiveConfig(attacks=("soft", "nope")).validate()
    assert set(ADAPTIVE_ATTACKS) == {"soft", "submodels", "ppd-push", "bpda", "apgd-ce", "apgd-dlr",
                                     "decision", "decision-targeted", "apgd-decision",
                                     "apgd-decision-targeted"}


# ----- a small undefended model on the CIFAR subset ------------------------------------------------
def _small_cnn() -> nn.Module:
    """Conv(3->16, stride 2) + ReLU + linear: trains to ~40% on the subset in seconds and, unlike
    an under-trained ResNet with heavy pooling, is as brittle as an undefended network should be."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 16 * 16, 10))


@pytest.fixture(scope="module")
def cifar_models(cifar_dir):
    """Two small undefended CNNs (target, surrogate: different seeds), 5 epochs of the subset each
    (~10 s apiece on one core), and 48 test images the target classifies correctly."""
    from cda2_ext.data import load_cifar10, to_float
    tr, te = load_cifar10(cifar_dir, "train"), load_cifar10(cifar_dir, "test")
    xs, ys = to_float(tr.images), tr.labels
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = _small_cnn()
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(seed)
        for _ in range(5):
            perm = torch.randperm(len(ys), generator=g)
            for i in range(0, len(ys), 64):
                b = perm[i:i + 64]
                loss = Fn.cross_entropy(net(xs[b]), ys[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        out.append(net.eval())
    x, y = to_float(te.images[:300]), te.labels[:300]
    keep = predict_correct(out[0], x, y)
    return out[0], out[1], x[keep][:48], y[keep][:48]


@pytest.mark.slow
def test_pgd_breaks_an_undefended_cifar_model(cifar_models):
    target, _, x, y = cifar_models
    assert len(y) >= 32  # the tiny model learned something (clean-correct subset)
    r = pgd_attack(target, x, y, 8 / 255, PGDConfig(steps=10, restarts=1),
                   generator=torch.Generator().manual_seed(0))
    assert r.correct.float().mean().item() <= 0.05
    assert_in_ball(r.x_adv, x, 8 / 255)
    a = apgd_attack(target, x, y, 8 / 255, steps=10, loss="dlr",
                    generator=torch.Generator().manual_seed(0))
    assert a.correct.float().mean().item() <= 0.1


@pytest.mark.slow
def test_transfer_attacks_lower_accuracy_of_an_undefended_cifar_model(cifar_models):
    target, surrogate, x, y = cifar_models
    cfg = TransferConfig(methods=("mi-pgd", "m-di2-fgsm"), steps=10)
    ts = generate_transfer_set({"s": surrogate}, x, y, 8 / 255, cfg, seed=0)
    corr = transfer_correct(target, ts)  # x was clean-correct: accuracy starts at 100%
    for name, c in zip(ts.names, corr):
        assert c.float().mean().item() <= 0.8, name
    assert all_variants_correct(corr).float().mean().item() <= 0.6


@pytest.mark.requires_extension
def test_fused_and_reference_ops_give_the_same_attacks(tiny):
    """The attacks only touch x through the fused random start / sign step, which are bit-identical
    to their reference twins - so whole attacks must agree exactly."""
    from cda2_ext.ops import reference
    net, x, y = tiny
    model = CollaborationLogits(net)
    runs = [pgd_attack(model, x, y, 0.03, PGDConfig(steps=2, restarts=2), only_correct=False,
                       generator=torch.Generator().manual_seed(0), backend=b) for b in (ops, reference)]
    assert torch.equal(runs[0].x_adv, runs[1].x_adv)
    sq = [square_attack(model, x, y, 0.03, 20, generator=torch.Generator().manual_seed(0), backend=b)
          for b in (ops, reference)]
    assert torch.equal(sq[0].x_adv, sq[1].x_adv) and torch.equal(sq[0].queries, sq[1].queries)
