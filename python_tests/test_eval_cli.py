"""``cda2 eval``: a full (tiny) run with every attack group, shared transfer sets, reproducibility
and one-line failures. Runs through :func:`cda2_ext.cli.main`, the real entry point."""
from __future__ import annotations

import json

import pytest

from cda2_ext.cli import main as cda2_main

TINY_TRAIN = ["--dataset", "synthetic", "--depth", "8", "--num-models", "2", "--steps", "1",
              "--batch-size", "16", "--train-limit", "32", "--test-limit", "32", "--no-progress",
              "--device", "cpu", "--epochs", "1"]
SMALL = ["--n-samples", "12", "--batch-size", "12", "--steps", "2", "--restarts", "1",
         "--apgd-steps", "3", "--transfer-steps", "2", "--queries", "8", "--no-progress"]


def run_eval(argv):
    """``cda2 ...`` (argv starts with the subcommand) with the entry point's one-line errors."""
    return cda2_main(list(argv))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    target, surrogate = str(root / "cda2"), str(root / "base")
    assert cda2_main(["train", *TINY_TRAIN, "--seed", "0", "--out-dir", target]) == 0
    assert cda2_main(["train", *TINY_TRAIN, "--seed", "1", "--out-dir", surrogate]) == 0
    return target, surrogate


def test_eval_and_eval_clean_are_different_commands():
    from cda2_ext import cli
    p = cli.build_parser()
    assert p.parse_args(["eval", "--checkpoint", "r"]).func is cli.eval_robustness.run
    assert p.parse_args(["eval-clean", "r"]).func is cli.eval_clean.run


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        run_eval(["eval", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--checkpoint", "--attack", "--surrogate", "--eps", "--n-samples", "--steps",
                 "--restarts", "--queries", "--out", "--transfer-set"):
        assert flag in out


@pytest.mark.slow
def test_eval_all_writes_table_json_csv_png_and_shares_transfer_sets(runs, tmp_path, capsys):
    target, surrogate = runs
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", target, "--attack", "all", "--surrogate", surrogate,
            "--eps", "0.03", "0.06", *SMALL, "--save-transfer", "--out", str(out)]
    assert run_eval(argv) == 0
    text = capsys.readouterr().out
    assert "attack" in text and "clean" in text and "0.03" in text and "0.06" in text
    res = json.loads((out / "robustness.json").read_text())
    rows = res["robust_accuracy"]["cda2"]
    assert set(rows) >= {"PGD-2x1 (ce)", "adaptive: soft(T=gap)", "adaptive: soft(T=0.25*gap)",
                         "adaptive: submodels", "adaptive: ppd-push", "adaptive: bpda",
                         "adaptive: apgd-ce", "adaptive: apgd-dlr", "adaptive: decision",
                         "adaptive: decision-targeted", "adaptive: apgd-decision",
                         "adaptive: apgd-decision-targeted", "adaptive (worst)",
                         "transfer (all 3 variants)", "Square-8",
                         "budget check (strongest, 2x steps+restarts)", "worst case (all attacks)"}
    assert "AutoAttack (standard)" not in rows  # an optional extra: runs only when named
    assert set(rows["Square-8"]) == {"0.03"}  # Table 3's radius only
    assert set(rows["PGD-2x1 (ce)"]) == {"0.03", "0.06"}
    clean = res["clean"]["cda2"]
    for row, by_eps in rows.items():
        for e, a in by_eps.items():
            assert 0.0 <= a <= clean + 1e-9, (row, e)
            assert a >= rows["worst case (all attacks)"][e] - 1e-9, (row, e)
    assert res["n"] == 12 and len(res["indices"]) == 12
    assert res["details"]["square"]["cda2"]["0.03"]["max_queries"] <= 8
    assert any("eps=0.3" in c for c in res["checks"])  # the sanity check ran and said so
    assert sum("budget check at eps=" in c or "not converged at eps=" in c for c in res["checks"]) == 2
    assert set(res["details"]["temperatures"]["cda2"]["soft"]) == {"soft(T=gap)", "soft(T=0.25*gap)"}
    assert res["config"]["pgd"]["steps"] == 2 and res["config"]["checkpoints"]["cda2"] == target
    csv_text = (out / "robustness.csv").read_text().splitlines()
    assert csv_text[0].startswith("model,attack,clean,0.03,0.06")
    assert (out / "robustness.png").stat().st_size > 10_000
    tfile = out / "transfer_eps0.03.safetensors"
    assert tfile.is_file() and (out / "transfer_eps0.06.safetensors").is_file()

    # the saved set, evaluated later without the surrogate, gives the same transfer accuracy
    out2 = tmp_path / "eval2"
    assert run_eval(["eval", "--checkpoint", target, "--attack", "transfer", "--transfer-set", str(tfile),
                     "--eps", "0.03", "--sanity-eps", "0", *SMALL, "--out", str(out2)]) == 0
    res2 = json.loads((out2 / "robustness.json").read_text())
    assert (res2["robust_accuracy"]["cda2"]["transfer (all 3 variants)"]["0.03"]
            == rows["transfer (all 3 variants)"]["0.03"])


@pytest.mark.slow
def test_results_are_reproducible_from_the_seed(runs, tmp_path, capsys):
    target, _ = runs
    bits = []
    for k in range(2):
        out = tmp_path / f"r{k}"
        assert run_eval(["eval", "--checkpoint", target, "--attack", "pgd", "square", "--eps", "0.03",
                         "--sanity-eps", "0", "--seed", "3", *SMALL, "--out", str(out)]) == 0
        bits.append(json.loads((out / "robustness.json").read_text())["per_sample_robust"])
    assert bits[0] == bits[1]


@pytest.mark.slow
@pytest.mark.parametrize("extra, needle", [
    (["--attack", "transfer"], "--surrogate"),
    (["--eps", "2"], "eps"),
    (["--n-samples", "0"], "n-samples"),
    (["--transfer-set", "/nonexistent.safetensors", "--attack", "transfer"], "transfer set"),
])
def test_bad_options_fail_with_one_line(runs, tmp_path, capsys, extra, needle):
    target, _ = runs
    rc = run_eval(["eval", "--checkpoint", target, *SMALL, "--out", str(tmp_path / "x"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("cda2: error:") and needle in err and "\n" not in err


def test_missing_checkpoint_fails_with_one_line(tmp_path, capsys):
    rc = run_eval(["eval", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("cda2: error:") and "no checkpoint" in err
