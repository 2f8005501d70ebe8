"""``cda2 eval``: a full (tiny) run with every attack group, shared transfer sets, reproducibility,
``--subset dverge`` and ``--last-iterate``, and one-line failures; the outputs of ``cda2 eval`` and
``cda2 eval-clean``: checked before any work, never overwritten unasked, rescued when writing
fails. Runs through :func:`cda2_ext.cli.main`, the real entry point."""
from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from cda2_ext.jobs import evaluate_clean as cli_eval_clean
from cda2_ext.jobs import evaluate as cli_eval
from cda2_ext.cli import main as cda2_main
from cda2_ext.data import load_images
from helpers import only_error_line, tiny_train
#: The runs to attack: depth 8, as the transfer attacks' SGM needs residual blocks in the surrogate.
RUN = tiny_train(depth=8, eval_every=None)
SMALL = ["--n-samples", "12", "--batch-size", "12", "--steps", "2", "--restarts", "1",
         "--apgd-steps", "3", "--transfer-steps", "2", "--queries", "8", "--no-progress"]


def run_eval(argv):
    """``cda2 ...`` (argv starts with the subcommand) with the entry point's one-line errors."""
    return cda2_main(list(argv))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    target, surrogate = str(root / "cda2"), str(root / "base")
    assert cda2_main(["train", *RUN, "--seed", "0", "--out-dir", target]) == 0
    assert cda2_main(["train", *RUN, "--seed", "1", "--out-dir", surrogate]) == 0
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


# ----- options recorded and obeyed ----------------------------------------------------------------
def test_eval_records_the_subset(trained, tmp_path):
    out = tmp_path / "eval"
    assert cda2_main(["eval", "--checkpoint", str(trained), "--attack", "pgd", "--eps", "0.03",
                      "--n-samples", "8", "--steps", "1", "--restarts", "1", "--sanity-eps", "0",
                      "--no-progress", "--subset", "dverge", "--out", str(out)]) == 0
    res = json.loads((out / "robustness.json").read_text())
    assert res["config"]["subset"] == "dverge"
    n_test = len(load_images("synthetic", "test", None, 0))
    assert res["indices"] == random.Random(0).sample(range(n_test), 8)  # DVERGE's draw, its order


def test_eval_last_iterate_flag(trained, tmp_path):
    common = ["eval", "--checkpoint", str(trained), "--attack", "pgd", "--eps", "0.03",
              "--n-samples", "8", "--steps", "2", "--restarts", "1", "--sanity-eps", "0", "--no-progress"]
    for flag, name in (([], "worst"), (["--last-iterate"], "last")):
        assert cda2_main([*common, *flag, "--out", str(tmp_path / name)]) == 0
    worst, last = (json.loads((tmp_path / n / "robustness.json").read_text()) for n in ("worst", "last"))
    assert worst["config"]["pgd"]["last_iterate"] is False and last["config"]["pgd"]["last_iterate"]
    assert list(last["robust_accuracy"]["run"])[0] == "PGD-2x1 (ce, last iterate)"
    assert list(worst["robust_accuracy"]["run"])[0] == "PGD-2x1 (ce)"


# ----- outputs: checked before work, never overwritten unasked, rescued ---------------------------
def _refuse_clean_eval(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the evaluation ran although its output was refused")
    monkeypatch.setattr(cli_eval_clean, "collect_outputs", refuse)
    monkeypatch.setattr(cli_eval, "evaluate_robustness", refuse)


def test_outputs_are_checked_before_any_work(trained, tmp_path, capsys, monkeypatch):
    _refuse_clean_eval(monkeypatch)
    earlier = tmp_path / "clean.json"
    earlier.write_text("earlier")
    assert cda2_main(["eval-clean", str(trained), "--out", str(earlier)]) == 2
    only_error_line(capsys, "--out", "already exists", "--force")
    assert cda2_main(["eval-clean", str(trained), "--out", str(tmp_path)]) == 2
    only_error_line(capsys, "--out", "is a folder")
    assert cda2_main(["eval", "--checkpoint", str(trained), "--out", str(earlier)]) == 2
    only_error_line(capsys, "--out", "is a file")
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "robustness.json").write_text("earlier")
    assert cda2_main(["eval", "--checkpoint", str(trained), "--out", str(folder)]) == 2
    only_error_line(capsys, "--out", "robustness.json", "--force")
    assert cda2_main(["eval-clean", str(trained), "--out", "/proc/cda2-no/clean.json"]) == 2
    only_error_line(capsys, "--out", "cannot write")
    assert earlier.read_text() == "earlier" and (folder / "robustness.json").read_text() == "earlier"


def test_force_overwrites_and_a_failed_write_keeps_the_results(trained, tmp_path, capsys, monkeypatch):
    earlier = tmp_path / "clean.json"
    earlier.write_text("earlier")
    argv = ["eval-clean", str(trained), "--limit", "16", "--device", "cpu", "--out", str(earlier)]
    assert cda2_main([*argv, "--force"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert json.loads(earlier.read_text()) == res

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device", str(earlier))
    monkeypatch.setattr(cli_eval_clean, "atomic_write", disk_full)
    assert cda2_main([*argv, "--force"]) == 2
    out, err = capsys.readouterr()
    printed = json.loads(out)  # printed before the write was tried
    assert printed["collaboration"] == res["collaboration"] and printed["n"] == 16
    assert err.startswith("cda2: error:") and "\n" not in err.strip() and "No space" in err
    rescued = Path(err.split("saved to ")[1].split(" instead")[0])
    try:
        assert json.loads(rescued.read_text()) == printed
    finally:
        rescued.unlink()


def test_eval_keeps_its_report_when_the_folder_cannot_be_written(trained, tmp_path, capsys,
                                                                 monkeypatch):
    def unwritable(path):
        raise PermissionError(13, "Permission denied", str(path))
    report = SimpleNamespace(config={}, checks=["OK"], indices=[0, 1], format_table=lambda: "table",
                             to_dict=lambda: {"robust_accuracy": {"run": {"PGD": {"0.03": 0.5}}}},
                             to_json=unwritable, to_csv=unwritable, plot=unwritable)
    monkeypatch.setattr(cli_eval, "evaluate_robustness", lambda *a, **k: report)
    assert cda2_main(["eval", "--checkpoint", str(trained), "--attack", "pgd", "--device", "cpu",
                      "--no-progress", "--out", str(tmp_path / "eval")]) == 2
    err = only_error_line(capsys, "--out", "Permission denied", "saved to")
    rescued = Path(err.split("saved to ")[1].split(" instead")[0])
    try:
        assert json.loads(rescued.read_text()) == report.to_dict()
    finally:
        rescued.unlink()
