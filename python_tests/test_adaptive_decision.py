"""The attacks on Algorithm 2's decision margin, and temperatures that follow the selection scale.

* the decision margin is positive exactly when the hard answer is wrong (and its targeted form
  over all pairs too), and neither changes when the PPD logits are rescaled;
* a hand-built collaboration whose selection can be flipped toward a wrong sub-model although no
  sub-model's own loss points there: the decision attacks break it, plain PGD on the hard
  collaboration and the soft-selection attack at T = 1 do not;
* a collaboration whose PPD logits are scaled by 0.01 gets temperatures 0.01 times as large and
  exactly the same attack results;
* ``cda2 eval``'s adaptive group uses those scale-relative temperatures, reports them, and has
  the decision-margin rows.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cda2_ext.attacks.adaptive import (ADAPTIVE_ATTACKS, DECISION_ATTACKS, AdaptiveConfig,
                                       adaptive_attacks)
from cda2_ext.attacks.apgd import apgd
from cda2_ext.attacks.decision import (choose_temperatures, decision_margin, selection_gap,
                                       selection_lead, targeted_decision_margin,
                                       wrong_class_targets)
from cda2_ext.attacks.engine import model_objective
from cda2_ext.attacks.whitebox import CollaborationLogits, PGDConfig, pgd_attack, predict_correct
from cda2_ext.evaluation import EvalConfig, evaluate_robustness
from cda2_ext.evaluation.rows import BUDGET_CHECK
from cda2_ext.models import Collaboration


def hard_wrong(logits: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Algorithm 2's answer is wrong: the logits of the highest-score sub-model miss the label."""
    chosen = s.argmax(0)
    z = logits.gather(0, chosen.view(1, -1, 1).expand(1, *logits.shape[1:])).squeeze(0)
    return z.argmax(-1) != y


# ----- the margin itself --------------------------------------------------------------------------
@pytest.mark.parametrize("M", [1, 2, 3, 5])
def test_decision_margin_is_positive_exactly_when_the_hard_answer_is_wrong(gen, M):
    B, K = 400, 6
    logits = torch.randn(M, B, K, generator=gen, dtype=torch.float64)
    s = torch.randn(M, B, generator=gen, dtype=torch.float64) * 0.1
    y = torch.randint(0, K, (B,), generator=gen)
    wrong = hard_wrong(logits, s, y)
    assert 0 < int(wrong.sum()) < B  # both cases occur
    d = decision_margin(logits, s, y, gap=0.07)
    assert torch.equal(d > 0, wrong)
    # the multi-targeted form over every (sub-model, wrong class) pair: some pair is positive iff wrong
    models, classes = wrong_class_targets(logits, y)
    G = M * (K - 1)
    assert models.shape == (G,) and classes.shape == (G, B)
    z = logits.unsqueeze(1).expand(M, G, B, K)
    dt = targeted_decision_margin(z, s.unsqueeze(1).expand(M, G, B), y, models, classes, gap=0.07)
    assert torch.equal(dt.amax(0) > 0, wrong)
    # rescaling the selection scores together with the scale changes nothing
    assert torch.allclose(decision_margin(logits, s * 0.01, y, gap=0.0007), d, rtol=1e-5, atol=1e-6)


def test_selection_lead_is_positive_only_for_the_winner(gen):
    s = torch.randn(4, 50, generator=gen)
    lead = selection_lead(s)
    winner = s.argmax(0)
    assert torch.equal(lead.argmax(0), winner) and (lead.gather(0, winner[None]) > 0).all()
    assert (lead.sum(0) - lead.gather(0, winner[None]).squeeze(0) <= 0).all()
    assert torch.isinf(selection_lead(s[:1])).all()


def test_wrong_class_targets_are_the_top_wrong_classes_per_sub_model(gen):
    logits = torch.randn(3, 20, 10, generator=gen)
    y = torch.randint(0, 10, (20,), generator=gen)
    models, classes = wrong_class_targets(logits, y, top=2)
    assert models.tolist() == [0, 0, 1, 1, 2, 2]
    assert (classes != y).all()
    for g in range(6):
        m, r = int(models[g]), g % 2
        wrong = logits[m].scatter(-1, y[:, None], -math.inf)
        assert torch.equal(classes[g], wrong.topk(2, -1).indices[:, r])
    with pytest.raises(ValueError, match="top"):
        wrong_class_targets(logits, y, top=10)


def test_temperatures_follow_the_gap_and_reject_nonsense():
    t = choose_temperatures(0.2, fractions=(1.0, 0.25), fixed=(1.0,))
    assert t.soft == (("soft(T=gap)", 0.2), ("soft(T=0.25*gap)", 0.05), ("soft(T=1)", 1.0))
    assert t.bpda == 0.2 and t.to_dict()["selection_gap"] == 0.2
    for bad in (dict(gap=0.0), dict(gap=float("nan")), dict(gap=1.0, fractions=(-1.0,)),
                dict(gap=1.0, fixed=(0.0,)), dict(gap=1.0, fractions=(1.0,), fixed=(1.0,), bpda=-2.0)):
        with pytest.raises(ValueError, match="gap|temperature"):
            choose_temperatures(**bad)
    with pytest.raises(ValueError, match="temperature"):
        AdaptiveConfig(attacks=("soft",), temperature_fractions=(), temperatures=()).validate()
    with pytest.raises(ValueError, match="decision_targets"):
        AdaptiveConfig(decision_targets=0).validate()
    assert set(DECISION_ATTACKS) <= set(ADAPTIVE_ATTACKS) == set(AdaptiveConfig().attacks)


# ----- a selection no sub-model's loss reveals -----------------------------------------------------
EPS = 0.1


class HiddenSwitch(nn.Module):
    """Three sub-models on ``x [B, 2, 4, 4]`` around 0.5; ``u1``/``u2`` the mean offsets of
    channel 0/1 (``|u| <= EPS`` in the ball).

    A is right everywhere in the ball (its logits follow ``u1``) and selected at the clean point;
    B is always wrong, C always right, and neither depends on ``x``. Only the PPD heads see
    ``u2``: pushing it above ``0.6 EPS`` makes B win the selection (``s_B = 2.5 (u2 - 0.6 EPS)``
    against ``s_A = 0``, ``s_C = 10 u2 - 0.95``). No sub-model's loss asks for that, so plain
    PGD (through A) never goes there. The scores are close (the clean gap is 0.15), and C - right,
    and rising faster with ``u2`` than B - keeps a weight comparable to A's in ``softmax(s / 1)``:
    the T = 1 relaxation's gradient points *down* in ``u2`` (towards ``u2 ~ -0.015``, where the
    two pulls balance) on the whole ball. At ``T`` of the order of the gap C's weight vanishes
    and the relaxation, like the decision margin, points up.
    """

    num_models = 3

    def __init__(self, ppd_scale: float = 1.0) -> None:
        super().__init__()
        self.detach_ppd = True  # like the real model: attacks must switch it off to see the PPD
        self.ppd_scale = ppd_scale

    def forward(self, x: torch.Tensor):
        u1 = x[:, 0].flatten(1).mean(1) - 0.5
        u2 = x[:, 1].flatten(1).mean(1) - 0.5
        z = torch.zeros_like(u1)
        A = torch.stack([5 - 20 * u1, z, z], -1)
        B = torch.stack([z, z + 5, z], -1)
        C = torch.stack([z + 5, z, z], -1)
        ppd = torch.stack([z, 2.5 * (u2 - 0.6 * EPS), 10 * u2 - 0.95]) * self.ppd_scale
        if self.detach_ppd:
            ppd = ppd.detach()
        return torch.stack([A, B, C]), ppd


def hidden_switch_batch():
    return torch.full((4, 2, 4, 4), 0.5), torch.zeros(4, dtype=torch.long)


def test_decision_attacks_break_a_selection_that_pgd_and_soft_t1_miss():
    net = HiddenSwitch()
    x, y = hidden_switch_batch()
    hard = CollaborationLogits(net)
    assert predict_correct(hard, x, y).all()
    assert selection_gap(net, x) == pytest.approx(0.15)
    pgd = pgd_attack(hard, x, y, EPS, PGDConfig(steps=20, restarts=5),
                     generator=torch.Generator().manual_seed(0))
    assert pgd.correct.all(), "plain PGD follows A's loss and never flips the selection"
    cfg = AdaptiveConfig(steps=10, apgd_steps=10, restarts=2, temperatures=(1.0,),
                         temperature_fractions=(1.0,), attacks=("soft", "submodels", *DECISION_ATTACKS))
    res = adaptive_attacks(net, x, y, EPS, cfg, seed=0)
    assert res["soft(T=1)"].correct.all(), "softmax(s / 1) is nearly an ensemble here and steers away"
    assert res["submodels"].correct.all(), "no sub-model's own loss reveals the switch"
    for name in DECISION_ATTACKS:
        assert (~res[name].correct).all(), name
        assert not predict_correct(hard, res[name].x_adv, y).any(), name  # real adversarial examples
        assert (res[name].x_adv - x).abs().max() <= EPS + 1e-6
    assert (~res["soft(T=gap)"].correct).all(), "the relaxation at the model's own scale finds it too"
    assert net.detach_ppd  # restored


# ----- temperatures follow the PPD scale ----------------------------------------------------------
class ScaledPPD(nn.Module):
    """A collaboration whose PPD logits are multiplied by ``scale`` (Algorithm 2's answer is the same)."""

    def __init__(self, net: nn.Module, scale: float) -> None:
        super().__init__()
        self.net, self.scale = net, scale
        self.num_models = net.num_models

    def forward(self, x: torch.Tensor):
        logits, ppd = self.net(x)
        return logits, ppd * self.scale


def test_scaled_ppd_logits_scale_the_temperatures_and_change_no_result():
    torch.manual_seed(0)
    base = Collaboration(num_models=3, depth=2).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(8, 3, 32, 32, generator=g)
    with torch.no_grad():  # labels the model gets right, at a radius where only some attacks succeed
        y = CollaborationLogits(base)(x).argmax(-1)
    # ppd-push adds a capped lead in raw PPD units (no temperature), so it is not scale-free
    attacks = tuple(a for a in ADAPTIVE_ATTACKS if a != "ppd-push")
    cfg = AdaptiveConfig(attacks=attacks, steps=4, apgd_steps=6, decision_targets=2)
    results, temps = [], []
    for scale in (1.0, 0.01):
        net = ScaledPPD(base, scale)
        t = cfg.choose_temperatures(selection_gap(net, x))
        temps.append(t)
        results.append(adaptive_attacks(net, x, y, 5e-4, cfg, seed=1, only_correct=False, temperatures=t))
    (t1, t2), (r1, r2) = temps, results
    assert t2.gap == pytest.approx(0.01 * t1.gap, rel=1e-5)
    assert t2.bpda == pytest.approx(0.01 * t1.bpda, rel=1e-5)
    assert [label for label, _ in t1.soft] == [label for label, _ in t2.soft]
    for (_, a), (_, b) in zip(t1.soft, t2.soft):
        assert b == pytest.approx(0.01 * a, rel=1e-5)
    assert set(r1) == set(r2)
    broken = 0
    for name in r1:
        assert torch.equal(r1[name].correct, r2[name].correct), name
        assert torch.allclose(r1[name].x_adv, r2[name].x_adv, atol=1e-5), name
        broken += int((~r1[name].correct).sum())
    assert 0 < broken < sum(r.correct.numel() for r in r1.values())  # a test with something to compare


# ----- in the evaluation: the temperatures used and reported, the decision rows ------------------
def test_evaluation_uses_and_reports_scale_relative_temperatures_and_the_decision_rows():
    torch.manual_seed(0)
    net = Collaboration(num_models=2, depth=2).eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = CollaborationLogits(net)(x).argmax(-1)
    cfg = EvalConfig(attacks=("adaptive",), eps=(0.002,), n_samples=4, sanity_eps=None, progress=False,
                     adaptive=AdaptiveConfig(steps=2, apgd_steps=2, temperatures=(1.0,), decision_targets=1))
    rep = evaluate_robustness({"c": net}, x, y, cfg, log=lambda s: None)
    t = rep.details["temperatures"]["c"]
    gap = selection_gap(net, x)
    assert t == {"selection_gap": gap, "soft": {"soft(T=gap)": gap, "soft(T=0.25*gap)": 0.25 * gap,
                                                "soft(T=1)": 1.0}, "bpda": gap}
    rows = rep.acc["c"]
    for attack in ("soft(T=gap)", "soft(T=0.25*gap)", "soft(T=1)", *DECISION_ATTACKS):
        assert f"adaptive: {attack}" in rows
    assert BUDGET_CHECK.label in rows
    (note,) = [c for c in rep.checks if "selection scale" in c]
    assert note.startswith(f"NOTE [c]: selection scale g = {gap:.3g} (median gap between the two highest "
                           "selection scores over the 4 samples); temperatures used: soft selection "
                           f"{gap:.3g} (gap), {0.25 * gap:.3g} (0.25*gap), 1 (fixed); BPDA {gap:.3g}.")


# ----- APGD over copies ---------------------------------------------------------------------------
def test_apgd_copies_are_independent_runs(gen):
    lin = nn.Linear(12, 5).double()
    x = torch.rand(6, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=gen)
    starts = (x + (torch.rand(3, 6, 12, generator=gen, dtype=torch.float64) - 0.5) * 0.1).clamp(0, 1)
    obj = model_objective(lin, y, "dlr")
    together = apgd(obj, x, y, 0.05, 12, x_init=starts)
    for g in range(3):
        alone = apgd(obj, x, y, 0.05, 12, x_init=starts[g:g + 1])
        assert torch.equal(together.x_adv[g], alone.x_adv[0])
        assert torch.equal(together.margin[g], alone.margin[0])
