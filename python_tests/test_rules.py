"""The rule report of ``cda2 eval-clean --rules all``: each rule picks what it should on planted
cases, the half-chosen best sub-model, the oracle and the fitted selector, paired standard errors
against a plain reading of the formula, and the command's table and JSON."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cda2_ext.cli import main as cda2_main
from cda2_ext.errors import ConfigError
from cda2_ext.evaluation.rules import (answers, correct_from_bits, entry, paired_between,
                                       paired_difference, rule_names, rule_report, split_halves)
from cda2_ext.models.selection import SCORES, SelectionScore

K = 4


def _probs_logits(rows):
    """Logits whose softmax is (close to) the given probability rows."""
    return torch.tensor(rows, dtype=torch.float64).clamp_min(1e-9).log()


def _planted(B: int = 40):
    """Three sub-models on B images of label 0, each rule's pick known by hand:

    ==========  ==================  =====  =====================================
    sub-model   p                   PPD    answers
    ==========  ==================  =====  =====================================
    0           [.40, .35, .25, 0]  +4     0 (right, unsure)
    1           [0, .90, .05, .05]  -4     1 (wrong, the most confident)
    2           [.30, 0, .70, 0]    -4     2 (wrong)
    ==========  ==================  =====  =====================================

    PPD and the authors' detector (.40 x sigmoid(4) = .39 > .90 x sigmoid(-4) = .016) pick
    sub-model 0; max-prob, margin (.85) and entropy (.39 nats) pick sub-model 1; the mean
    probability [.23, .42, .33, .02] says 1; the vote is a three-way tie, broken by the mean
    probability: 1.
    """
    z = torch.stack([_probs_logits([[.40, .35, .25, 0]] * B), _probs_logits([[0, .90, .05, .05]] * B),
                     _probs_logits([[.30, 0, .70, 0]] * B)])
    ppd = torch.tensor([[4.0] * B, [-4.0] * B, [-4.0] * B], dtype=torch.float64)
    return z, ppd, torch.zeros(B, dtype=torch.int64)


def test_each_rule_picks_what_it_should_on_a_planted_case():
    z, ppd, y = _planted()
    right = {name: bool((answers(z, ppd, name) == y).all()) for name in rule_names()}
    assert right == {"ppd": True, "soe": True, "maxprob": False, "margin": False,
                     "entropy": False, "ensemble": False, "vote": False}


def test_the_combiners_where_two_modest_sub_models_outvote_a_confident_one():
    # 0: [.45, .30, .25, 0] and 1: [.45, .25, .30, 0] say 0 (right); 2: [.30, .50, .20, 0] says 1
    # and is the most confident. Mean probability [.40, .35, .25, 0]: 0; vote 2 to 1: 0.
    z = torch.stack([_probs_logits([[.45, .30, .25, 0]]), _probs_logits([[.45, .25, .30, 0]]),
                     _probs_logits([[.30, .50, .20, 0]])])
    ppd = torch.zeros(3, 1, dtype=torch.float64)
    got = {name: int(answers(z, ppd, name)) for name in ("ensemble", "vote", "maxprob")}
    assert got == {"ensemble": 0, "vote": 0, "maxprob": 1}


def test_max_prob_margin_and_entropy_each_pick_their_own_sub_model():
    # max-prob:  .58 (0) > .56 (2) > .50 (1)
    # margin:    .41 (2) > .18 (0) > 0   (1)
    # entropy:   .69 (1) < .78 (0) < 1.17 (2) nats
    z = torch.stack([_probs_logits([[.58, .40, .01, .01]]), _probs_logits([[.50, .50, 0, 0]]),
                     _probs_logits([[.56, .15, .15, .14]])])
    ppd = torch.zeros(3, 1, dtype=torch.float64)
    pick = {r: int(SCORES[r].fn(z, ppd)[:, 0].argmax()) for r in ("maxprob", "margin", "entropy")}
    assert pick == {"maxprob": 0, "margin": 2, "entropy": 1}


def test_best_sub_model_oracle_and_fitted_selector_on_a_planted_case():
    g = torch.Generator().manual_seed(0)
    M, N = 3, 400
    y = torch.randint(0, K, (N,), generator=g)
    # sub-model 0 is right on 90% of images, the others on 40%; confidence is uninformative
    # for sub-models 1-2 but the PPD of sub-model 0 is high exactly where it is right
    right = torch.stack([torch.rand(N, generator=g) < p for p in (0.9, 0.4, 0.4)])
    pred = torch.where(right, y, (y + 1) % K)
    z = torch.nn.functional.one_hot(pred, K).double() * 3.0
    ppd = torch.where(right, 2.0, -2.0).double()
    ppd[1:] = 5.0  # sub-models 1 and 2 claim to be sure: the PPD rule is misled by them
    r = rule_report(z, ppd, y, own="ppd")
    fit, rep = split_halves(N)
    assert r["n_fit"] + r["n_report"] == N and set(fit.tolist()).isdisjoint(rep.tolist())
    assert r["best_submodel"] == 0
    best = entry(r, "best sub-model")
    assert best["accuracy"] == pytest.approx(float(right[0, rep].double().mean()))
    assert entry(r, "oracle")["accuracy"] == pytest.approx(float(right[:, rep].any(0).double().mean()))
    # PPD picks sub-model 1 (ties go to the first of 1 and 2): about 40% right
    assert entry(r, "ppd")["accuracy"] == pytest.approx(float(right[1, rep].double().mean()))
    # the fitted selector learns that sub-model 0's PPD says when it is right: at least as good
    # as the best sub-model, up to the oracle
    fitted = entry(r, "fitted selector")["accuracy"]
    assert best["accuracy"] - 0.02 <= fitted <= entry(r, "oracle")["accuracy"]
    assert fitted > entry(r, "ppd")["accuracy"] + 0.3


def test_paired_standard_error_is_the_formula_and_tighter_than_unpaired():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1000, generator=g) < 0.6
    b = a.clone()
    b[:30] = ~b[:30]  # the two answers differ on 30 images only
    d, se = paired_difference(a, b)
    diff = a.double() - b.double()
    assert d == pytest.approx(float(diff.mean()))
    assert se == pytest.approx(float(diff.std()) / math.sqrt(1000))
    pa, pb = a.double().mean(), b.double().mean()
    unpaired = math.sqrt(pa * (1 - pa) / 1000 + pb * (1 - pb) / 1000)
    assert se < unpaired / 2
    assert paired_difference(a, a) == (0.0, 0.0)


def test_report_differences_are_paired_against_the_own_rule_and_between_runs():
    z, ppd, y = _planted(40)
    r = rule_report(z, ppd, y, own="maxprob")
    _, rep = split_halves(40)
    own = correct_from_bits(r["per_image"]["maxprob"])[rep]
    for e in r["entries"]:
        c = correct_from_bits(r["per_image"][e["name"]])[rep]
        assert (e["diff"], e["diff_se"]) == pytest.approx(paired_difference(c, own))
    assert entry(r, "ppd")["diff"] == pytest.approx(1.0)  # right everywhere vs wrong everywhere
    r2 = rule_report(z, ppd, y, own="ppd")
    assert paired_between(r2, "ppd", r, "maxprob") == pytest.approx((1.0, 0.0))


def test_a_new_selection_rule_is_one_record():
    SCORES.add(SelectionScore("second", "the second sub-model", "always sub-model 1 (a test rule)",
                              lambda z, s: torch.nn.functional.one_hot(
                                  torch.ones(z.shape[1], dtype=torch.int64), z.shape[0]).T.to(z)))
    try:
        z, ppd, y = _planted(8)
        assert "second" in rule_names()
        r = rule_report(z, ppd, y, own="second")
        assert entry(r, "second")["accuracy"] == 0.0 and entry(r, "ppd")["diff"] == 1.0
    finally:
        SCORES.remove("second")
    assert "second" not in rule_names()


def test_bad_inputs_are_one_clear_error():
    z, ppd, y = _planted(8)
    with pytest.raises(ConfigError, match="score"):
        rule_report(z, ppd, y, own="nope")
    with pytest.raises(ConfigError, match="at least 4"):
        rule_report(z[:, :3], ppd[:, :3], y[:3])
    with pytest.raises(ConfigError, match="logits"):
        rule_report(z, ppd[:, :5], y)


@pytest.mark.slow
def test_eval_clean_rules_prints_the_table_and_writes_the_json(trained, tmp_path, capsys):
    out = tmp_path / "clean.json"
    assert cda2_main(["eval-clean", str(trained), "--rules", "all", "--score", "soe",
                      "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for label in ("PPD (Algorithm 2)", "the authors' detector (own)", "max-probability", "margin",
                  "minimum entropy", "mean-probability ensemble", "vote", "best sub-model",
                  "oracle", "fitted selector"):
        assert label in printed
    rec = json.loads(out.read_text())
    r = rec["rules"]
    assert r["own"] == "soe" and r["n"] == rec["n"] and len(r["per_image"]["oracle"]) == rec["n"]
    # the full-set numbers agree with the plain evaluation's
    assert entry(r, "soe")["accuracy_all"] == pytest.approx(rec["collaboration"])
    assert entry(r, "ensemble")["accuracy_all"] == pytest.approx(rec["ensemble"])
    assert entry(r, "vote")["accuracy_all"] == pytest.approx(rec["vote"])
    assert entry(r, "oracle")["accuracy_all"] == pytest.approx(rec["oracle"])
    assert [entry(r, f"submodel {m}")["accuracy_all"] for m in range(len(rec["submodels"]))] \
        == pytest.approx(rec["submodels"])
