"""AutoAttack through the optional reference package: the attack itself (in the ball, judged by the
evaluated model, the global RNG kept) and its row in ``cda2 eval`` (the hard and the ensemble output
attacked, joined to the worst case).

The AutoAttack tests run where ``pyautoattack`` is installed (``pip install 'cda2_ext[autoattack]'``)
and are skipped elsewhere; the message for a missing package is tested everywhere.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from cda2_ext.attacks import autoattack as aa_module
from cda2_ext.attacks.autoattack import AUTOATTACK_PACKAGE, autoattack, autoattack_missing
from cda2_ext.attacks.whitebox import CollaborationLogits, PGDConfig
from cda2_ext.evaluation import EvalConfig, evaluate_robustness
from cda2_ext.evaluation.rows import WORST, autoattack_row

HAS_AUTOATTACK = importlib.util.find_spec(AUTOATTACK_PACKAGE) is not None
needs_autoattack = pytest.mark.skipif(not HAS_AUTOATTACK, reason=f"{AUTOATTACK_PACKAGE} is not installed")


def linear_model() -> nn.Module:
    """An undefended linear classifier on 3x4x4 images (10 classes: AutoAttack targets 9)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 10)).eval()


def own_labels(model: nn.Module, n: int = 12):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(n, 3, 4, 4, generator=g)
    with torch.no_grad():
        return x, model(x).argmax(-1)


def _hide_autoattack(monkeypatch) -> None:
    """Make the optional package look not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(aa_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == AUTOATTACK_PACKAGE else real(name, *a))


# ----- the attack ---------------------------------------------------------------------------------
def test_missing_autoattack_package_is_one_clear_line(monkeypatch):
    _hide_autoattack(monkeypatch)
    msg = autoattack_missing()
    assert AUTOATTACK_PACKAGE in msg and "pip install" in msg and "\n" not in msg
    model = linear_model()
    x, y = own_labels(model)
    with pytest.raises(ImportError, match=AUTOATTACK_PACKAGE):
        autoattack(model, x, y, 0.1)


def test_autoattack_rejects_bad_arguments_before_running():
    model = linear_model()
    x, y = own_labels(model)
    with pytest.raises(ValueError, match="version"):
        autoattack(model, x, y, 0.1, version="rand")
    with pytest.raises(ValueError, match="lo, hi"):
        autoattack(model, x, y, 0.1, lo=-1.0)
    with pytest.raises(ValueError, match="eps"):
        autoattack(model, x, y, -0.1)


@needs_autoattack
def test_autoattack_breaks_an_undefended_model_in_the_ball_and_keeps_the_rng():
    model = linear_model()
    x, y = own_labels(model)
    state = torch.random.get_rng_state()
    res = autoattack(model, x, y, 0.3, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # AutoAttack seeds the global RNG
    assert (res.x_adv - x).abs().max() <= 0.3 + 1e-6 and res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert not res.correct.any()  # at 0.3 every 48-pixel linear decision can be crossed
    with torch.no_grad():
        assert torch.equal(model(res.x_adv).argmax(-1) == y, res.correct)  # judged by the model
    # radius 0: nothing moves, nothing breaks
    zero = autoattack(model, x, y, 0.0)
    assert torch.equal(zero.x_adv, x) and zero.correct.all()


@needs_autoattack
def test_autoattack_points_are_judged_by_the_evaluated_model():
    attacked, judge = linear_model(), nn.Sequential(nn.Flatten(), nn.Linear(48, 10)).eval()
    x, y = own_labels(judge)
    res = autoattack(attacked, x, y, 0.3, judge=judge, seed=0)
    with torch.no_grad():
        assert torch.equal(judge(res.x_adv).argmax(-1) == y, res.correct)


# ----- its row in the evaluation ------------------------------------------------------------------
class TinyCollab(nn.Module):
    """Two linear sub-models with PPD heads on 3x4x4 images, 10 classes (AutoAttack targets 9)."""

    num_models = 2

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = nn.Linear(48, 2 * 11)

    def forward(self, x):
        out = self.heads(x.flatten(1)).view(-1, 2, 11).transpose(0, 1)  # [M, B, 11]
        return out[..., :10], out[..., 10]


def test_missing_autoattack_skips_its_row_with_one_line(monkeypatch):
    _hide_autoattack(monkeypatch)
    x = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    rep = evaluate_robustness({"c": TinyCollab().eval()}, x, torch.zeros(4, dtype=torch.long),
                              EvalConfig(attacks=("autoattack",), eps=(0.1,), n_samples=4, sanity_eps=None,
                                         progress=False), log=lambda s: None)
    assert rep.checks == [f"NOTE: {autoattack_missing()}"]
    assert rep.acc["c"] == {} and rep.details["autoattack"] == {}


@needs_autoattack
def test_autoattack_row_attacks_hard_and_ensemble_and_joins_the_worst_case():
    net = TinyCollab().eval()
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = CollaborationLogits(net)(x).argmax(-1)
    cfg = EvalConfig(attacks=("pgd", "autoattack"), eps=(0.3,), n_samples=6, sanity_eps=None, progress=False,
                     pgd=PGDConfig(steps=1, restarts=1))
    rep = evaluate_robustness({"c": net}, x, y, cfg, log=lambda s: None)
    rows = rep.per_sample["c"]
    aa = autoattack_row().label
    assert aa == "AutoAttack (standard)" and rows[aa] == {0.3: "000000"}  # an undefended model at 0.3
    assert rows[WORST.label] == {0.3: "000000"}
    d = rep.details["autoattack"]["c"]["0.3"]
    assert set(d) == {"hard", "ensemble"} and d["hard"]["accuracy"] == 0.0
    assert any(c.startswith("NOTE [c]: AutoAttack (standard) at eps=0.3 leaves 0.0% attacking the hard "
                            "output and") for c in rep.checks)
