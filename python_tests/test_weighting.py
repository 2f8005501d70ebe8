"""How CDA² shares a sample among its sub-models (``--weights``), and the capacity experiment's
verdict: formulas against a plain reading of them in float64, options, and one training step."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from cda2_ext.errors import ConfigError
from cda2_ext.models.collaboration import SCORES, collaborate, selection_score
from cda2_ext.reproduce.capacity import Comparison, split_gradient, verdict, where_lost
from cda2_ext.runtime import FUSED, REFERENCE
from cda2_ext.training import TrainConfig, Trainer
from cda2_ext.training.weighting import (WEIGHTINGS, detector_weights, true_label_prob,
                                         weighted_loss)

from helpers import make_logits, make_target, tiny_config

BACKENDS = pytest.mark.parametrize("backend", [FUSED, REFERENCE], ids=["fused", "reference"])


def _plain_detector_loss(z, s, y, temp_c, temp_true):
    """The authors' "adaptative training" read literally, one sub-model and one sample at a time."""
    M, B, _ = z.shape
    loss, bce_target = 0.0, torch.empty(M, B, dtype=z.dtype)
    for b in range(B):
        d = [torch.softmax(z[j, b], 0).max() * torch.sigmoid(s[j, b]) for j in range(M)]
        w = torch.softmax(temp_c * torch.stack(d), 0)
        ce = [-torch.log_softmax(z[j, b], 0)[y[b]] for j in range(M)]
        loss = loss + sum(w[j].detach() * ce[j] for j in range(M))
        for j in range(M):
            bce_target[j, b] = torch.softmax(temp_true * z[j, b], 0)[y[b]]
    return loss / B, bce_target


@BACKENDS
@pytest.mark.parametrize("M,B,K", [(3, 5, 10), (1, 1, 2), (4, 7, 3)])
@pytest.mark.parametrize("temp_c,temp_true", [(1.0, 1.0), (0.0, 0.5), (7.0, 2.0)])
def test_detector_loss_is_the_authors_formula_in_float64(backend, M, B, K, temp_c, temp_true, gen):
    z = make_logits((M, B, K), torch.float64, gen).requires_grad_()
    s = (torch.randn(M, B, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    y = make_target(B, K, gen)
    got = weighted_loss(z, s, y, "detector", temp_c=temp_c, temp_true=temp_true, backend=backend)
    want, target = _plain_detector_loss(z, s, y, temp_c, temp_true)
    torch.testing.assert_close(got.loss, want)
    torch.testing.assert_close(got.p_true, target)
    torch.testing.assert_close(got.weights.sum(0), torch.ones(B, dtype=torch.float64))
    # the weights are constants (stop-gradient, so gradcheck's finite differences, which move
    # them, do not apply): the gradient is the weighted cross-entropy's, and none reaches the PPD
    gz, = torch.autograd.grad(got.loss, z, retain_graph=True)
    gz_want, = torch.autograd.grad(want, z)
    torch.testing.assert_close(gz, gz_want)
    assert torch.autograd.grad(got.loss, s, allow_unused=True)[0] is None
    assert not got.p_true.requires_grad and not got.weights.requires_grad


def test_detector_weights_stay_within_their_bounds_at_temp_1(gen):
    # detector in [0, 1]: at temp_c = 1 no sub-model gets less than 1 / (1 + (M-1)e)
    M = 3
    z = make_logits((M, 500, 10), torch.float64, gen, scale=30.0)
    s = torch.randn(M, 500, generator=gen, dtype=torch.float64) * 30
    w = detector_weights(z, s, 1.0)
    assert w.min() >= 1 / (1 + (M - 1) * math.e) - 1e-9
    assert w.max() <= math.e / (math.e + M - 1) + 1e-9


@BACKENDS
def test_softmin_weighting_is_eq7(backend, gen):
    z = make_logits((3, 6, 4), torch.float64, gen)
    s = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    y = make_target(6, 4, gen)
    got = weighted_loss(z, s, y, "softmin", sigma=0.5, backend=backend)
    ce = -torch.log_softmax(z, -1).gather(-1, y.expand(3, -1)[..., None])[..., 0]
    torch.testing.assert_close(got.loss, (-0.5 * torch.logsumexp(-ce / 0.5, 0)).mean())
    torch.testing.assert_close(got.weights, torch.softmax(-ce / 0.5, 0))
    torch.testing.assert_close(got.p_true, torch.exp(-ce))


def test_true_label_prob_at_huge_logits_stays_finite():
    z = torch.tensor([[[1e4, -1e4, 0.0]]], dtype=torch.float64)
    p = true_label_prob(z, torch.tensor([1]), 3.0)
    assert torch.isfinite(p).all() and p.item() == 0.0


def test_unknown_weighting_is_refused(gen):
    z = make_logits((2, 3, 4), torch.float64, gen)
    with pytest.raises(ValueError, match="weights: expected one of"):
        weighted_loss(z, z[..., 0], make_target(3, 4, gen), "average")


# ----- options -------------------------------------------------------------------------------------
def test_config_refuses_options_the_weighting_does_not_read():
    assert TrainConfig(weights="detector", temp_c=2.0).validate().weights == "detector"
    assert set(WEIGHTINGS) == {"softmin", "detector"}
    with pytest.raises(ConfigError, match=r"^sigma: is not read with weights 'detector'"):
        TrainConfig(weights="detector", sigma=4.0).validate()
    with pytest.raises(ConfigError, match=r"^temp_c: is not read with weights 'softmin'"):
        TrainConfig(temp_c=2.0).validate()
    with pytest.raises(ConfigError, match=r"^weights: must be one of"):
        TrainConfig(weights="mean").validate()
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ConfigError, match=r"^temp_true:"):
            TrainConfig(temp_true=bad).validate()
    with pytest.raises(ConfigError, match=r"^weights: only method\(s\) cda2 read it"):
        TrainConfig.for_method("ensemble", weights="detector").validate()


def test_maxprob_selects_the_most_confident_model_ignoring_the_ppd_head():
    assert "maxprob" in SCORES
    z = torch.tensor([[[0.0, 0.1]], [[5.0, 0.0]], [[1.0, 0.0]]])   # model 1 is the most confident
    ppd = torch.tensor([[9.0], [-9.0], [0.0]])                      # ... and has the lowest PPD
    index, chosen = collaborate(z, ppd, "maxprob")
    assert index.tolist() == [1] and torch.equal(chosen, z[1])
    torch.testing.assert_close(selection_score(z, ppd, "maxprob"), torch.softmax(z, -1).amax(-1))


@pytest.mark.parametrize("weights", WEIGHTINGS)
def test_one_training_epoch_with_each_weighting_is_finite(weights, tmp_path):
    extra = {"temp_c": 3.0} if weights == "detector" else {"sigma": 2.0}
    cfg = tiny_config(tmp_path / "run", num_models=3, phases="standard", steps=None, train_limit=64,
                      test_limit=None, weights=weights, ppd_grad="trunk", ppd_loss="soe",
                      select_score="soe", **extra)
    (m,) = Trainer(cfg, log=None).fit()
    assert math.isfinite(m["loss"]) and m["skipped_steps"] == 0
    assert sum(m["assign_hist"]) == pytest.approx(1.0)


# ----- the capacity experiment's verdict ---------------------------------------------------------------
def test_verdict_follows_the_written_criteria():
    se = 0.005  # the paired standard error of each difference
    def c(own, ctrl, best=0.0, fitted=0.0):
        return Comparison((own, se), (ctrl, se), (best, se), (fitted, se))
    assert verdict([c(0.02, 0.02)]) == "confirms"
    assert verdict([c(0.02, 0.02), c(0.005, 0.02)]) == "inconclusive"  # not on every seed
    assert verdict([c(0.02, 0.005)]) == "inconclusive"                # the control ties
    assert verdict([c(-0.05, 0.0)]) == "contradicts"
    assert verdict([c(0.0, 0.0)]) == "inconclusive"
    assert verdict([]) == "inconclusive"
    # a seed without the control (a seed check of some arms) cannot confirm, but can contradict
    no_control = Comparison((0.02, se), None, (0.0, se), (0.0, se))
    assert verdict([c(0.02, 0.02), no_control]) == "inconclusive"
    assert verdict([c(-0.05, 0.0), Comparison((-0.05, se), None, (0.0, se), (0.0, se))]) == \
        "contradicts"


def test_where_the_loss_is_follows_the_written_criteria():
    se = 0.005
    def c(own, best, fitted):
        return Comparison((own, se), (0.0, se), (best, se), (fitted, se))
    assert where_lost([c(-0.05, -0.04, -0.03)]) == ["experts"]
    assert where_lost([c(-0.05, -0.005, -0.03)]) == ["selector"]           # a good expert exists
    assert where_lost([c(-0.05, 0.0, 0.02)]) == ["selector", "ppd training"]
    assert where_lost([c(-0.008, 0.0, -0.01)]) == []  # within 1 point: not the selector
    assert where_lost([c(0.02, 0.01, 0.03)]) == []    # the rule beats the one model already
    assert split_gradient([c(0, -0.04, 0)], [c(0, -0.004, 0)]) is True
    assert split_gradient([c(0, -0.04, 0)], [c(0, -0.03, 0)]) is False
    assert split_gradient([c(0, 0.0, 0)], [c(0, 0.0, 0)]) is None         # no gap to close


# ----- the weightings as records ------------------------------------------------------------------
def test_every_weighting_parameter_is_a_train_config_field_with_its_records_default():
    from cda2_ext.training.weighting import weighting_params
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for p in weighting_params():
        assert fields.get(p.name) == p.default, p.name


def test_the_docs_table_of_defaults_has_the_weightings_rows():
    from cda2_ext.training.weighting import docs_rows
    docs = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    rows = docs_rows()
    assert "\n".join(rows) in docs, "docs/training.md: paste cda2_ext.training.weighting.docs_rows()"
