"""``cda2 reproduce``: plans, reuse and resume of steps, and the written table / record / figure."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from cda2_ext.storage.checkpoint import checkpoint_files, load_checkpoint
from cda2_ext.cli import main as cda2_main
from cda2_ext.reproduce import (EXPERIMENTS, ReproduceError, StepRunner, plan_experiment,
                                run_experiment)
from cda2_ext.reproduce import paper
from cda2_ext.reproduce.experiments import BUDGETS, Budget
from cda2_ext.errors import ConfigError
from cda2_ext.jobs.train import TrainJob
from cda2_ext.jobs.xor import XorJob
from cda2_ext.reproduce.runner import output_step, train_step
from helpers import tiny_options

TINY = tiny_options(phases="standard", steps=None, test_limit=None, epochs=None)  # each step sets epochs


def _epoch(run: Path) -> int:
    return load_checkpoint(checkpoint_files(run)[0])[1]["epoch"]


def _with_budget(monkeypatch, name: str, **params) -> None:
    """Shrink experiment ``name``'s small budget for a test."""
    exp = EXPERIMENTS[name]
    small = exp.budgets["small"]
    budget = Budget(dataclasses.replace(small.params, **params), small.shows, small.cannot_show)
    monkeypatch.setitem(EXPERIMENTS, name, dataclasses.replace(
        exp, budgets={**exp.budgets, "small": budget}))


# ----- the registry ---------------------------------------------------------------------------------
def test_every_experiment_has_both_budgets_saying_what_they_show():
    assert {"xor", "depth"} <= set(EXPERIMENTS)
    for exp in EXPERIMENTS.values():
        assert {"small", "paper"} <= set(exp.budgets) <= set(BUDGETS)
        for b in exp.budgets.values():
            assert b.shows and b.cannot_show


def test_a_budget_the_experiment_lacks_is_refused_naming_its_budgets(tmp_path):
    assert "gpu" not in EXPERIMENTS["xor"].budgets
    with pytest.raises(ReproduceError, match="budget: expected one of .*'small'.*'paper'"):
        plan_experiment("xor", "gpu", tmp_path)


def test_table6_numbers_are_the_papers():
    assert [paper.TABLE6[d]["single"] for d in (2, 8, 14, 20)] == [65.0, 88.3, 90.5, 91.9]
    assert [paper.TABLE6[d]["collaboration"] for d in (2, 8, 14, 20)] == [67.0, 89.5, 91.6, 92.5]
    # the gain column is the difference, except at depth 14 where the paper prints 0.9 for 1.1
    for d, row in paper.TABLE6.items():
        diff = row["collaboration"] - row["single"]
        assert diff == pytest.approx(1.1 if d == 14 else row["gain"], abs=1e-9)
    assert paper.TABLE6[14]["gain"] == 0.9


def test_the_converged_budget_checks_two_arms_on_a_second_seed(tmp_path):
    steps = plan_experiment("depth", "converged", tmp_path, data="/d", device="cpu")
    trains = [s.out.name for s in steps if s.kind == "train"]
    assert trains == [f"resnet2_{a}_seed0" for a in
                      ("authors", "authors_lr0.3", "paper", "control", "single")] + [
        "resnet2_authors_lr0.3_seed1", "resnet2_single_seed1"]
    assert len(steps) == 2 * len(trains)


def test_depth_plan_trains_four_arms_per_depth_and_seed(tmp_path):
    steps = plan_experiment("depth", "paper", tmp_path, data="/d", device="cpu")
    trains = [s for s in steps if s.kind == "train"]
    assert len(trains) == 4 * 4 * 3 and len(steps) == 2 * len(trains)
    assert steps[:len(trains)] == trains  # every train step first: a runner may run them at once
    seen = set()
    for s in trains:
        a = s.argv
        assert a[a.index("--epochs") + 1] == "100" and "--adv" not in a
        assert a[a.index("--data") + 1] == "/d" and a[a.index("--device") + 1] == "cpu"
        assert s.out.parent == tmp_path / "depth-paper"
        arm = s.out.name.split("_")[1]
        m = a[a.index("--num-models") + 1]
        if arm == "control":  # independently trained: each sub-model on its own cross-entropy
            assert a[a.index("--method") + 1] == "ensemble" and m == "3"
        else:
            assert a[a.index("--phases") + 1] == "standard" and m == ("1" if arm == "single" else "3")
        assert ("--weights" in a) is (arm == "authors")
        if arm == "authors":
            assert " ".join(a).count("--weights detector --ppd-grad trunk --ppd-loss soe "
                                     "--select-score soe") == 1
        seen.add((a[a.index("--depth") + 1], arm, a[a.index("--seed") + 1]))
    assert seen == {(d, arm, seed) for d in ("2", "8", "14", "20")
                    for arm in ("single", "paper", "authors", "control") for seed in "012"}
    scores = {s.out.name.split("_")[1]: s.argv[s.argv.index("--score") + 1]
              for s in steps if s.kind == "output"}
    assert scores == {"single": "ppd", "paper": "ppd", "authors": "soe", "control": "maxprob"}
    assert all(s.argv[0] == "eval-clean" and s.reads for s in steps if s.kind == "output")


def test_time_plan_trains_each_method_as_table_4_does(tmp_path):
    steps = plan_experiment("time", "small", tmp_path)
    by_method = {s.argv[s.argv.index("--method") + 1]: s.argv for s in steps}
    assert set(by_method) == set(paper.TABLE4)
    for method, argv in by_method.items():  # PGD training for all but DVERGE (App. C)
        assert ("--adv" in argv) is (method in ("gal", "adp"))
        assert argv[argv.index("--depth") + 1] == "8"


def test_dry_run_prints_the_commands(tmp_path, capsys):
    assert cda2_main(["reproduce", "depth", "--budget", "small", "--out", str(tmp_path),
                      "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [s.command for s in plan_experiment("depth", "small", tmp_path)]
    assert all(ln.startswith("cda2 ") for ln in lines)


def test_missing_methods_and_bad_budget_fail_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(EXPERIMENTS, "xor", dataclasses.replace(EXPERIMENTS["xor"],
                                                                methods=("no-such-method",)))
    with pytest.raises(ReproduceError, match="no-such-method"):
        run_experiment("xor", "small", tmp_path)
    with pytest.raises(ReproduceError, match="budget"):
        plan_experiment("depth", "huge", tmp_path)
    with pytest.raises(ReproduceError, match="experiment"):
        plan_experiment("table99", "small", tmp_path)
    assert not any(tmp_path.iterdir())


# ----- reuse, resume, refuse ------------------------------------------------------------------------
def test_train_steps_run_then_reuse_then_resume_and_refuse_other_options(tmp_path):
    run = tmp_path / "run"
    runner = StepRunner(log=lambda s: None)
    one = train_step(TrainJob.of(**TINY, epochs=1, out_dir=str(run)))
    assert runner.run(one) == "ran" and _epoch(run) == 1
    assert runner.run(one) == "reused"
    # the same run asked for longer: the finished 1-epoch checkpoint is an interrupted 2-epoch run
    two = train_step(TrainJob.of(**TINY, epochs=2, out_dir=str(run)))
    assert StepRunner.train_state(two) == "interrupted"
    assert runner.run(two) == "resumed" and _epoch(run) == 2
    assert [r["status"] for r in runner.records] == ["ran", "reused", "resumed"]
    other = train_step(TrainJob.of(**TINY, epochs=2, lr=0.2, out_dir=str(run)))
    with pytest.raises(ReproduceError, match="lr"):
        runner.run(other)
    assert StepRunner(force=True, log=lambda s: None).run(other) == "ran"


def test_output_steps_rerun_when_their_command_or_their_run_changes(tmp_path):
    out = tmp_path / "x.json"

    def xor(steps):
        return output_step(XorJob.of(steps=steps, n_train=8, n_test=8, figure="", json=str(out)),
                           out, reads=[tmp_path / "r"])

    runner = StepRunner(log=lambda s: None)
    assert runner.run(xor(2)) == "ran" and out.is_file()
    assert runner.run(xor(2)) == "reused"
    assert runner.run(xor(3)) == "ran"  # another command
    runner.changed.add(tmp_path / "r")  # the run it reads was trained again
    assert runner.run(xor(3)) == "ran"


def test_a_failing_step_names_its_command(tmp_path):
    runner = StepRunner(log=lambda s: None, execute=lambda job: 2)
    out = tmp_path / "x.json"
    with pytest.raises(ReproduceError, match="exit status 2: cda2 xor"):
        runner.run(output_step(XorJob.of(json=str(out)), out))
    # a job's own error (what `cda2 xor` would print as its one line) names the step too
    runner = StepRunner(log=lambda s: None)
    with pytest.raises(ReproduceError, match=r"step failed \(sigma: .*\): cda2 xor --sigma -1"):
        runner.run(output_step(XorJob.of(sigma=-1.0, json=str(out)), out))
    assert not out.exists()


# ----- whole experiments ----------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """XOR's 600 tiny steps only wait on a second thread (most of all on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_reproduce_xor_writes_table_record_and_figure_and_reuses_on_rerun(tmp_path, monkeypatch,
                                                                          capsys, one_thread):
    _with_budget(monkeypatch, "xor", seeds=(0, 1))
    out, results = tmp_path / "runs", tmp_path / "results"
    assert cda2_main(["reproduce", "xor", "--out", str(out), "--results", str(results)]) == 0
    printed = capsys.readouterr().out
    assert "| ensemble |" in printed and "| collaboration |" in printed
    rec = json.loads((results / "reproduce_xor_small.json").read_text())
    # the record names no local folder: --out is written as $OUT
    assert rec["commands"] == [s.command.replace(str(out), "$OUT")
                               for s in plan_experiment("xor", "small", out)]
    assert str(tmp_path) not in json.dumps(rec["commands"]) + json.dumps(rec["steps"])
    assert [s["status"] for s in rec["steps"]] == ["ran", "ran"]
    assert rec["params"] == {"seeds": [0, 1]} and rec["budget"] == "small"
    ens, col = rec["rows"]
    assert ens[1] == paper.FIG4["ensemble"] and col[1] == paper.FIG4["collaboration"]
    assert col[2] > 90 and ens[2] < 80  # collaboration solves XOR, the averaged ensemble cannot
    md = (results / "reproduce_xor_small.md").read_text()
    assert "cda2 xor --seed 0" in md and "reproduce_xor_small.png" in md
    assert (results / "reproduce_xor_small.png").stat().st_size > 0
    assert rec["figure"] == "reproduce_xor_small.png"  # beside the record: no machine path
    run_experiment("xor", "small", out, results, log=lambda s: None)
    rec2 = json.loads((results / "reproduce_xor_small.json").read_text())
    assert [s["status"] for s in rec2["steps"]] == ["reused", "reused"]
    assert rec2["rows"] == rec["rows"]


@pytest.mark.slow
def test_reproduce_depth_tabulates_every_arm_with_errors_and_verdicts(tmp_path, monkeypatch,
                                                                      cifar_dir):
    _with_budget(monkeypatch, "depth", depths=(2,), epochs=1, train_limit=64, test_limit=50,
                 seeds=(0, 1), arms=("single", "paper", "authors", "authors_lr0.3", "control"),
                 extra_seeds=(("single", 2), ("paper", 2)))  # a seed check of two arms
    rec = run_experiment("depth", "small", tmp_path, data=str(cifar_dir), device="cpu",
                         log=lambda s: None, jobs=2)
    assert rec["columns"][:8] == ["depth", "seed", "arm", "rule", "answer %", "± images",
                                  "vs one model", "± paired"]
    rows = {(r[1], r[2]): r for r in rec["rows"]}
    assert len(rows) == 12 and all(r[0] == 2 for r in rows.values())
    assert {a for s, a in rows if s == 2} == {"one model", "CDA², paper (Eq. 7, sigma 1)"}
    for seed in (0, 1, 2):
        single = rows[seed, "one model"]
        paper_arm = rows[seed, "CDA², paper (Eq. 7, sigma 1)"]
        for r in rows.values():
            p = r[4] / 100
            assert r[5] == pytest.approx(100 * (p * (1 - p) / 25) ** 0.5)  # the 25 reported images
        assert single[6:12] == [None] * 6  # one model: no difference to itself, no sub-models
        assert paper_arm[6] == pytest.approx(paper_arm[4] - single[4])   # same images: exact
        assert paper_arm[7] >= 0 and paper_arm[12] == 2.0
        assert paper_arm[13] in ("confirms", "contradicts", "inconclusive")
    assert rec["notes"][0].startswith("Verdicts, fixed before the runs")
    assert len(rec["findings"]) == 4  # three CDA² arms, then the split-gradient finding
    assert rec["findings"][-1].startswith("Depth 2, split gradient")
    assert rec["findings"][0].count(" ± ") == 3 and "on seeds 0 and 1 and 2" in rec["findings"][0]
    # the rule-by-rule table: every rule, sub-model, best, oracle and the fitted selector
    table = rec["tables"][0]
    assert table["columns"] == ["rule", "CDA², paper (Eq. 7, sigma 1)", "CDA², authors' weighting",
                                "CDA², authors' weighting, lr 0.3", "3 independent, most confident"]
    labels = [r[0] for r in table["rows"]]
    assert {"PPD (Algorithm 2)", "the authors' detector", "max-probability", "margin",
            "minimum entropy", "mean-probability ensemble", "vote", "oracle (some sub-model is right)",
            "fitted selector (logistic, fit half)"} <= set(labels)
    assert {s["status"] for s in rec["steps"]} == {"ran"} and len(rec["steps"]) == 24
    assert [t["title"].split(":")[0] for t in rec["tables"]] == [
        "Depth 2, seed 0", "Depth 2, seed 1", "Depth 2, seed 2"]
    assert rec["tables"][2]["columns"] == ["rule", "CDA², paper (Eq. 7, sigma 1)"]
    assert rec["measured"]["2"]["arms"]["control_seed0"]["score"] == "maxprob"
    assert "per_image" not in rec["measured"]["2"]["arms"]["control_seed0"]["rules"]
    md = (tmp_path / "reproduce_depth_small.md").read_text()
    assert md.index("**Findings:**") < md.index("| depth | seed |")
    # a second invocation reuses every run and evaluation
    rec2 = run_experiment("depth", "small", tmp_path, data=str(cifar_dir), device="cpu",
                          log=lambda s: None, jobs=2)
    assert {s["status"] for s in rec2["steps"]} == {"reused"} and rec2["rows"] == rec["rows"]


# ----- the compared defenses: whitebox (Table 1), transfer (Tables 2, 5), square (Table 3) -------------
DEFENSE_EXPERIMENTS = ("whitebox", "transfer", "square")


def _trains(steps):
    return {s.out.name: s.argv for s in steps if s.kind == "train"}


def test_defense_experiments_share_their_training_runs(tmp_path):
    plans = {e: plan_experiment(e, "small", tmp_path) for e in DEFENSE_EXPERIMENTS}
    runs = {e: _trains(p) for e, p in plans.items()}
    # the same commands for the same folders: whichever runs first trains, the others reuse
    for method in ("ensemble", "gal", "dverge", "adp", "cda2"):
        assert runs["whitebox"][method] == runs["square"][method] == runs["transfer"][method]
    dverge = runs["whitebox"]["dverge"]
    assert dverge[dverge.index("--init-from") + 1] == str(tmp_path / "defenses-small" / "ensemble")
    # the training PGD's steps go to the adversarially trained methods only
    assert all(("--steps" in runs["whitebox"][m]) == (m in ("gal", "adp", "cda2"))
               for m in ("ensemble", "gal", "dverge", "adp", "cda2"))
    assert all("--adv" in runs["whitebox"][m] for m in ("gal", "adp"))
    assert set(runs["transfer"]) - set(runs["whitebox"]) == {"surrogate_m3_seed1"}
    surrogate = runs["transfer"]["surrogate_m3_seed1"]
    assert surrogate[surrogate.index("--seed") + 1] == "1"  # a hold-out model, not a defense's twin


def test_defense_experiments_at_the_paper_budget_use_the_published_protocol(tmp_path):
    # one evaluation per selection rule: the paper's four by PPD, the authors' CDA² by its detector
    ev, ev_soe, every, every_soe = [s for s in plan_experiment("whitebox", "paper", tmp_path)
                                    if s.kind == "output"]
    for cmd in (" ".join(ev.argv), " ".join(ev_soe.argv)):
        assert "--attack pgd --eps" in cmd
    # then every white-box attack, with the evaluation's own adaptive budget at this budget
    for cmd in (" ".join(every.argv), " ".join(every_soe.argv)):
        assert "--attack pgd adaptive --eps" in cmd and "--apgd-steps" not in cmd
    assert every.argv[:every.argv.index("--attack")] == ev.argv[:ev.argv.index("--attack")]
    for cmd in (" ".join(a.argv) for a in (ev, ev_soe, every, every_soe)):
        assert "--steps 50 --restarts 5" in cmd and "--last-iterate" in cmd
        assert "--subset dverge" in cmd and "--n-samples 1000" in cmd and "--seed 0" in cmd
        assert "--eps " + " ".join(f"{e:g}" for e in paper.EPS) in cmd
    assert "--score" not in ev.argv and ev.argv.count("--checkpoint") == 1
    assert " ".join(ev_soe.argv).startswith(f"eval --checkpoint {tmp_path}/defenses-paper/cda2-authors "
                                             "--attack")
    assert ev_soe.argv[ev_soe.argv.index("--score") + 1] == "soe"
    trains = _trains(plan_experiment("whitebox", "paper", tmp_path))
    assert all("--epochs" not in a and "--train-limit" not in a for a in trains.values())
    assert all(a[a.index("--depth") + 1] == "20" for a in trains.values())
    evals = [s for s in plan_experiment("transfer", "paper", tmp_path) if s.kind == "output"]
    t2, _, t5, _ = (e.argv for e in evals)
    n_surrogates = lambda a: a.index("--transfer-preset") - a.index("--surrogate") - 1  # noqa: E731
    assert "table2" in t2 and n_surrogates(t2) == 1 and "table5" in t5 and n_surrogates(t5) == 3
    sq, _ = [s for s in plan_experiment("square", "paper", tmp_path) if s.kind == "output"]
    assert "--queries 5000" in " ".join(sq.argv) and "--square-eps 0.03" in " ".join(sq.argv)


@pytest.mark.slow
def test_whitebox_then_square_reuse_the_runs_and_tabulate_paper_beside_measured(
        tmp_path, monkeypatch, cifar_dir):
    tiny = dict(depth=2, epochs=1, train_limit=32, train_steps=1, n_samples=8)
    _with_budget(monkeypatch, "whitebox", eps=(0.03,), steps=1, restarts=1, **tiny)
    _with_budget(monkeypatch, "square", queries=5, **tiny)
    kw = dict(data=str(cifar_dir), device="cpu", log=lambda s: None)
    wb = run_experiment("whitebox", "small", tmp_path, **kw)
    assert wb["columns"] == ["method", "paper clean %", "clean %", "paper 0.03 %", "0.03 %"]
    assert [r[0] for r in wb["rows"]] == ["gal", "dverge", "adp", "cda2", "cda2-authors"]
    for method, p_clean, clean, p_03, got in wb["rows"]:
        want = paper.TABLE1.get(method, {})  # the paper has no row for the authors' CDA²
        assert p_clean == want.get("clean") and p_03 == want.get("0.03")
        assert 0 <= got <= clean <= 100  # PGD never raises accuracy above clean
    # every white-box attack: never above its own PGD row (one of the attacks it takes the worst of)
    (every,) = wb["tables"]
    assert every["columns"] == ["method", "clean %", "every attack 0.03 %"]
    clean_of = {r[0]: r[2] for r in wb["rows"]}
    for method, clean, worst in every["rows"]:
        rows = wb["measured"]["every_attack"][method]
        pgd = next(v for label, v in rows.items() if label.startswith("PGD-"))["0.03"]
        assert 0 <= worst <= 100 * pgd + 1e-9 and clean == clean_of[method]
    assert wb["findings"][0].startswith("Against every white-box attack (worst case) at 0.03: here")
    sq = run_experiment("square", "small", tmp_path, **kw)
    statuses = [s["status"] for s in sq["steps"]]
    assert statuses[:6] == ["reused"] * 6 and statuses[6:] == ["ran", "ran"]
    assert [r[1] for r in sq["rows"]] == [paper.TABLE3.get(m) for m in ("gal", "dverge", "adp",
                                                                         "cda2", "cda2-authors")]
    assert all(0 <= r[3] <= r[2] for r in sq["rows"])


# ----- plans are jobs: checked when planned, printed as the commands that run them by hand -----------
def test_a_misspelled_or_impossible_option_fails_when_planned_not_when_run(tmp_path):
    with pytest.raises(ConfigError, match="no option 'epoch'.*epochs"):
        TrainJob.of(epoch=2, out_dir=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="depth"):
        TrainJob.of(depth=7, out_dir=str(tmp_path / "r"))
    assert not any(tmp_path.iterdir())


def test_every_planned_step_is_the_command_it_prints(tmp_path):
    """Parsing a step's printed command gives back the same job (so a user can rerun any step by
    hand), for every experiment and budget."""
    from cda2_ext.cli import build_parser
    for name, exp in EXPERIMENTS.items():
        for budget in exp.budgets:
            for step in plan_experiment(name, budget, tmp_path, data=str(tmp_path / "d")):
                args = build_parser().parse_args(step.argv)
                again = type(step.job).from_args(args)
                assert again.namespace() == step.job.namespace(), step.command
                if isinstance(step.job, TrainJob):
                    assert again.config() == step.job.config()


def test_ranking_notes_place_the_authors_row_among_the_measured_ones():
    from cda2_ext.reproduce import experiments
    measured = {"gal": {"0.03": 12.0}, "dverge": {"0.03": 6.5}, "adp": {"0.03": 17.0},
                "cda2": {"0.03": 11.0}, "cda2-authors": {"0.03": 17.0}}
    (note,) = experiments._ranking_notes("PGD", ["0.03"], experiments.paper.TABLE1, measured)
    assert note.startswith("PGD at 0.03: here adp 17.0%, gal 12.0%, cda2 11.0%, dverge 6.5%; the "
                           "paper's best is cda2 (47.8%), so this disagrees with it (CDA² ranks 3 "
                           "of 4).")
    # a tie shares the higher place
    assert note.endswith("(cda2-authors) has 17.0%: place 1 of 5.")
    del measured["cda2-authors"]
    (note,) = experiments._ranking_notes("PGD", ["0.03"], experiments.paper.TABLE1, measured)
    assert "cda2-authors" not in note
