"""The robustness evaluation's parts: the attack-family registry, rows as data, the worst case,
one function per gradient-masking check, the budget check (twice the steps and restarts), the
protocol end to end on tiny models, and the samples evaluated (``--subset dverge``).

Everything runs on CPU in a few seconds (untrained depth-2 collaboration, a linear model, 6 images).
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cda2_ext.attacks.whitebox import PGDConfig
from cda2_ext.attacks.adaptive import AdaptiveConfig
from cda2_ext.evaluation import EvalConfig, attack_groups, default_attacks, evaluate_robustness
from cda2_ext.evaluation import robustness
from cda2_ext.evaluation.config import select_subset
from cda2_ext.evaluation.context import EvalContext, Outcome
from cda2_ext.evaluation.family import AttackFamily
from cda2_ext.evaluation.families import FAMILIES, PROBES, prepare_transfer, run_pgd
from cda2_ext.evaluation.masking import (CHECKS, Evidence, check_adaptive_gain, check_black_box,
                                         check_budget, check_monotone, check_sanity,
                                         check_square_budget, masking_checks)
from cda2_ext.evaluation.rows import (ADAPTIVE_WORST, BUDGET_CHECK, WORST, Role, Row, adaptive_row,
                                      pgd_row, square_row, transfer_row, worst_case)
from cda2_ext.models import Collaboration


def ok(bits: str) -> torch.Tensor:
    """``"1010"`` -> per-sample robust flags."""
    return torch.tensor([c == "1" for c in bits])


def bits(t: torch.Tensor) -> str:
    return "".join("1" if b else "0" for b in t.tolist())


PGD2 = PGDConfig(steps=2, restarts=1)
CFG = EvalConfig(pgd=PGD2)


def evidence(rows, details=None, n=4) -> Evidence:
    return Evidence("m", {r: {e: ok(b) for e, b in d.items()} for r, d in rows.items()},
                    details or {}, CFG, n)


# ----- registry and rows ---------------------------------------------------------------------------
def test_the_registry_is_the_attack_groups():
    assert attack_groups() == ("pgd", "adaptive", "transfer", "square", "autoattack")  # --attack choices
    assert attack_groups() == tuple(f.name for f in FAMILIES.values())
    assert default_attacks() == ("pgd", "adaptive", "transfer", "square")  # --attack all
    assert EvalConfig().attacks == default_attacks()
    assert [p.name for p in PROBES] == ["sanity", "budget"]


def test_the_docs_table_of_attack_families_is_the_registry():
    from cda2_ext.evaluation.family import docs_rows
    docs = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    assert "\n".join(docs_rows()) in docs, "docs/evaluation.md: paste cda2_ext.evaluation.family.docs_rows()"


def test_row_labels_are_built_in_one_place():
    assert pgd_row(PGD2) == Row("pgd", Role.WHITE_BOX, "PGD-2x1 (ce)", "PGD")
    assert adaptive_row("soft(T=1)").label == "adaptive: soft(T=1)"
    assert adaptive_row("bpda").role is Role.PART and ADAPTIVE_WORST.role is Role.WHITE_BOX
    assert ADAPTIVE_WORST.label == "adaptive (worst)"
    assert (transfer_row(3).label, transfer_row(3).role) == ("transfer (all 3 variants)", Role.BLACK_BOX)
    assert (square_row(8).label, square_row(8).short) == ("Square-8", "Square")
    assert WORST.label == "worst case (all attacks)" and WORST.role is Role.WORST


def test_worst_case_ands_every_row_but_the_parts_of_a_group():
    rows = {pgd_row(PGD2): {0.1: ok("1110")}, adaptive_row("bpda"): {0.1: ok("0000")},
            ADAPTIVE_WORST: {0.1: ok("1101")}, square_row(8): {0.2: ok("0111")}}
    worst = worst_case(rows)
    assert {e: bits(t) for e, t in worst.items()} == {0.1: "1100", 0.2: "0111"}


def test_schedule_runs_the_sweep_then_extra_radii_in_registry_order():
    ctx = SimpleNamespace(cfg=EvalConfig(eps=(0.02, 0.01), options={"square": {"eps": (0.03, 0.01, 0.03)}}))
    fams = [f for f in FAMILIES.values() if f.name in ("pgd", "adaptive", "square")]
    plan = robustness._schedule(ctx, fams)
    assert list(plan) == [0.02, 0.01, 0.03]
    assert {e: [f.name for f in fs] for e, fs in plan.items()} == {
        0.02: ["pgd", "adaptive"], 0.01: ["pgd", "adaptive", "square"], 0.03: ["square"]}


# ----- the checks, one at a time -------------------------------------------------------------------
def test_sanity_check():
    assert check_sanity(evidence({})) == []  # the probe did not run
    good = check_sanity(evidence({}, {"sanity": {"accuracy": {"m": 0.0}}}))
    bad = check_sanity(evidence({}, {"sanity": {"accuracy": {"m": 0.5}}}))
    assert len(good) == 1 and good[0].startswith("OK [m]: PGD at eps=0.3 leaves 0.0%")
    assert len(bad) == 1 and bad[0].startswith("WARNING [m]: PGD at eps=0.3 still leaves 50.0%")


def test_monotone_check_allows_one_sample_of_noise():
    row = pgd_row(PGD2)
    assert check_monotone(evidence({row: {0.01: "1000", 0.02: "1100"}})) == []
    (msg,) = check_monotone(evidence({row: {0.01: "1000", 0.02: "1110"}}))
    assert msg.startswith("WARNING [m]: PGD-2x1 (ce) accuracy rises from 25.0% at eps=0.01 to 75.0%")


def test_black_box_check_compares_with_all_white_box_rows_together():
    rows = {square_row(8): {0.03: "1100"},  # first in row order, but checked after transfer
            pgd_row(PGD2): {0.03: "1110"}, ADAPTIVE_WORST: {0.03: "1101"},
            adaptive_row("bpda"): {0.03: "0000"},  # a part: not a white-box row of its own
            transfer_row(3): {0.03: "1000"}}
    warn, fine = check_black_box(evidence(rows))
    assert warn.startswith("WARNING [m]: at eps=0.03 the white-box attacks leave 50.0% but the "
                           "transfer attack only 25.0% (1 samples broken by transfer")
    assert fine.startswith("OK [m]: at eps=0.03 white-box (50.0%) is not weaker than Square (50.0%); "
                           "0 samples were broken only by Square.")


def test_adaptive_gain_check():
    assert check_adaptive_gain(evidence({pgd_row(PGD2): {0.03: "1110"}})) == []
    (msg,) = check_adaptive_gain(evidence({pgd_row(PGD2): {0.03: "1110"}, ADAPTIVE_WORST: {0.03: "1000"}}))
    assert msg.startswith("NOTE [m]: at eps=0.03 the adaptive attacks break 2 samples that plain PGD "
                          "does not (PGD 75.0% -> worst 25.0%)")


def test_square_budget_check():
    details = {"square": {"m": {"0.03": {"out_of_budget": 2, "budget": 8},
                                "0.05": {"out_of_budget": 0, "budget": 8}}}}
    assert check_square_budget(evidence({}, details)) == [
        "NOTE [m]: Square at eps=0.03: 2 of 4 samples survived only until the budget of 8 queries ran out."]


def test_masking_checks_go_model_by_model_in_check_order():
    calls = []
    checks = [lambda ev: calls.append(("a", ev.model)) or [f"a{ev.model}"],
              lambda ev: calls.append(("b", ev.model)) or [f"b{ev.model}"]]
    evs = [dataclasses.replace(evidence({}), model=m) for m in ("x", "y")]
    assert masking_checks(evs, checks) == ["ax", "bx", "ay", "by"]
    assert len(CHECKS) == 8


# ----- the budget check ----------------------------------------------------------------------------
def test_budget_check_says_not_converged_when_twice_the_budget_breaks_more():
    """PGD with one step (no random start) moves a linear model's class-0 logit by 48 * eps/5;
    sample 0 needs two such steps, sample 1 three. Doubling the budget breaks sample 0 only."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.ones(48), torch.zeros(48)]))
        model[1].bias.copy_(torch.tensor([0.0, 22.5]))  # clean margins 1.5 and 2.46; one step 0.96
    x = torch.stack([torch.full((3, 4, 4), 0.5), torch.full((3, 4, 4), 0.52)])
    y = torch.zeros(2, dtype=torch.long)
    cfg = EvalConfig(attacks=("pgd",), eps=(0.1,), n_samples=2, sanity_eps=None, progress=False,
                     pgd=PGDConfig(steps=1, restarts=1, random_start=False))
    rep = evaluate_robustness({"lin": model}, x, y, cfg, log=lambda s: None)
    rows = rep.per_sample["lin"]
    assert rows["PGD-1x1 (ce)"] == {0.1: "11"}
    assert rows[BUDGET_CHECK.label] == {0.1: "01"} == rows[WORST.label]  # it joins the worst case
    d = rep.details["budget"]["lin"]["0.1"]
    assert (d["attack"], d["steps"], d["restarts"], d["standing"], d["fell"]) == ("PGD-1x1 (ce)", 2, 2, 2, 1)
    (line,) = [c for c in rep.checks if "eps=0.1" in c and "PGD-1x1" in c]
    assert line.startswith("WARNING [lin]: not converged at eps=0.1: PGD-1x1 (ce) re-run with twice the "
                           "steps and restarts (2 steps x 2 restarts) on the 2 samples still standing "
                           "broke 1 more")


def test_budget_check_sentence_when_nothing_falls():
    details = {"budget": {"m": {"0.03": {"attack": "adaptive: decision", "steps": 100, "restarts": 2,
                                         "standing": 7, "fell": 0}}}}
    details["budget"]["m"]["0.05"] = {"attack": "PGD-50x5 (ce)", "steps": 100, "restarts": 10, "standing": 0,
                                      "fell": 0}
    ev = Evidence("m", {}, details, EvalConfig(), 10)
    assert check_budget(ev) == ["OK [m]: budget check at eps=0.03: adaptive: decision re-run with twice "
                                "the steps and restarts (100 steps x 2 restarts) on the 7 samples still "
                                "standing broke none of them.",
                                "OK [m]: budget check at eps=0.05: no sample left standing, nothing to re-run."]


# ----- the protocol end to end ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    """A linear model labelled by its own predictions (all clean-correct) and an untrained
    depth-2 collaboration, on 6 images."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    collab = Collaboration(num_models=2, depth=2).eval()
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = plain(x).argmax(1)
    return {"plain": plain, "collab": collab}, x, y


def small_config(**kw) -> EvalConfig:
    base = dict(attacks=("pgd", "adaptive", "square"), eps=(0.02, 0.05), n_samples=6, batch_size=4,
                pgd=PGD2, adaptive=AdaptiveConfig(steps=2, apgd_steps=2),
                options={"square": {"queries": 5, "eps": (0.05, 0.1)}}, progress=False, seed=3)
    return EvalConfig(**{**base, **kw})


def test_protocol_rows_worst_case_details_and_independence(tiny):
    models, x, y = tiny
    rep = evaluate_robustness(models, x, y, small_config(), log=lambda s: None)
    assert rep.clean["plain"] == 1.0
    assert list(rep.acc["plain"]) == ["PGD-2x1 (ce)", "adaptive: apgd-ce", "adaptive: apgd-dlr",
                                      "adaptive (worst)", "Square-5", BUDGET_CHECK.label,
                                      "worst case (all attacks)"]
    assert "adaptive: submodels" in rep.acc["collab"]  # collaborations get every adaptive attack
    for model, rows in rep.per_sample.items():
        assert set(rows["PGD-2x1 (ce)"]) == {0.02, 0.05} and set(rows["Square-5"]) == {0.05, 0.1}
        for e, worst in rows["worst case (all attacks)"].items():
            parts = [r[e] for name, r in rows.items()
                     if e in r and not name.startswith("adaptive: ") and name != WORST.label]
            expect = "".join("1" if all(p[i] == "1" for p in parts) else "0" for i in range(len(worst)))
            assert worst == expect, (model, e)
    d = rep.to_dict()["details"]
    assert list(d) == ["seconds", "transfer", "square", "autoattack", "temperatures", "sanity", "budget"]
    assert set(d["seconds"]) == {"pgd", "adaptive", "square", "sanity", "budget"} and d["transfer"] == {}
    assert set(d["temperatures"]) == {"collab"}  # chosen once per collaboration, reported
    assert set(d["square"]["plain"]) == {"0.05", "0.1"}
    assert rep.checks and not any(c.startswith("NOTE: transfer") for c in rep.checks)
    # a family's randomness does not depend on which other families ran
    alone = evaluate_robustness(models, x, y, small_config(attacks=("pgd",), sanity_eps=None))
    assert alone.per_sample["collab"]["PGD-2x1 (ce)"] == rep.per_sample["collab"]["PGD-2x1 (ce)"]
    assert list(alone.acc["collab"]) == ["PGD-2x1 (ce)", BUDGET_CHECK.label, "worst case (all attacks)"]


def test_transfer_without_inputs_is_a_note(tiny):
    models, x, y = tiny
    rep = evaluate_robustness({"plain": models["plain"]}, x, y,
                              small_config(attacks=("pgd", "transfer"), sanity_eps=None))
    assert rep.checks[0].startswith("NOTE: transfer attack not run: no surrogate and no transfer set")
    assert list(rep.acc["plain"]) == ["PGD-2x1 (ce)", BUDGET_CHECK.label, "worst case (all attacks)"]


def test_a_new_family_is_one_runner_in_the_registry(tiny, monkeypatch):
    """Swap the Square family for a fake black-box runner: its row joins the table, the worst
    case and the black-box check without any change to the protocol."""
    models, x, y = tiny
    fake = Row("square", Role.BLACK_BOX, "fake", "Fake")

    def run_fake(ctx: EvalContext, eps: float):
        return [Outcome(name, fake, torch.zeros(ctx.n, dtype=torch.bool)) for name in ctx.targets]

    fams = {f.name: AttackFamily("square", run_fake, "fake", radii=lambda ctx: (0.05, 0.1))
            if f.name == "square" else f for f in FAMILIES.values()}
    monkeypatch.setattr(robustness, "FAMILIES", fams)
    rep = evaluate_robustness({"plain": models["plain"]}, x, y,
                              small_config(attacks=("pgd", "square"), sanity_eps=None))
    rows = rep.acc["plain"]
    assert list(rows) == ["PGD-2x1 (ce)", "fake", BUDGET_CHECK.label, "worst case (all attacks)"]
    # the fake broke everything (and alone ran at 0.1); at 0.02 PGD and its budget check are the rows
    assert rows["worst case (all attacks)"] == {0.02: rows[BUDGET_CHECK.label][0.02], 0.05: 0.0, 0.1: 0.0}
    assert "square" not in rep.details  # a family without details leaves no key
    assert any("than Fake" in c or "the Fake attack" in c for c in rep.checks)


def test_a_runner_can_be_called_on_its_own(tiny):
    models, x, y = tiny
    cfg = small_config()
    ctx = EvalContext(cfg=cfg, models=models, targets={"plain": models["plain"]}, x=x, y=y,
                      indices=torch.arange(6), batches=[(0, slice(0, 4)), (1, slice(4, 6))])
    (out,) = run_pgd(ctx, 0.05)
    assert out.model == "plain" and out.row == pgd_row(PGD2) and out.correct.shape == (6,)


def test_transfer_sets_of_other_samples_are_refused_before_any_attack():
    ctx = SimpleNamespace(indices=torch.tensor([1, 2]), surrogates={},
                          transfer_sets={0.03: SimpleNamespace(indices=torch.tensor([1, 3]))})
    with pytest.raises(ValueError, match="transfer set for eps=0.03 was made on other test samples"):
        prepare_transfer(ctx)
    ctx.transfer_sets[0.03].indices = torch.tensor([1, 2])
    assert prepare_transfer(ctx) is None
    ctx.transfer_sets = {}
    assert prepare_transfer(ctx).startswith("transfer attack not run")


# ----- the samples evaluated -----------------------------------------------------------------------
def test_subset_dverge_is_exactly_pythons_random_sample_with_seed_0():
    state = random.getstate()
    try:
        random.seed(0)
        expected = random.sample(range(10000), 1000)  # DVERGE's evaluation scripts
        after = random.getstate()
        random.setstate(state)
        got = select_subset(10000, 1000, 0, "dverge").tolist()
        assert random.getstate() == state  # the global stream is left alone
    finally:
        random.setstate(state)
    assert got == expected
    assert after != state  # (the oracle did use the global stream)
    seeded = select_subset(10000, 1000, 0)
    assert seeded.tolist() != sorted(expected) and len(set(seeded.tolist())) == 1000
    with pytest.raises(ValueError, match="subset"):
        select_subset(100, 10, 0, "dvergee")
    with pytest.raises(ValueError, match="subset"):
        EvalConfig(subset="random").validate()
