"""The ``cda2`` command: help, xor, a tiny train + eval-clean, resume, and clear failures: a bad
option or data set is one line with exit status 2, found before anything is created."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from cda2_ext.cli import main
from helpers import TINY_TRAIN, no_training, only_error_line


@pytest.mark.parametrize("argv", [["--help"], ["xor", "--help"], ["train", "--help"],
                                  ["eval-clean", "--help"], ["predict", "--help"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage: cda2" in capsys.readouterr().out


@pytest.mark.slow
def test_module_entry_point(tmp_path):
    # Not from the repository root: `python -m` would import the source tree there, not the install.
    r = subprocess.run([sys.executable, "-m", "cda2_ext.cli", "--help"], cwd=tmp_path,
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "eval-clean" in r.stdout


@pytest.mark.slow
def test_xor(tmp_path, capsys):
    fig, js = tmp_path / "xor.png", tmp_path / "xor.json"
    assert main(["xor", "--figure", str(fig), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "collaboration" in out and "ensemble" in out
    res = json.loads(js.read_text())
    assert res["collaboration_acc"] >= 0.95 and res["ensemble_acc"] <= 0.75
    assert fig.stat().st_size > 10_000


def test_xor_keeps_existing_files_unless_forced(tmp_path, capsys):
    fig, js = tmp_path / "mine.png", tmp_path / "mine.json"
    fig.write_bytes(b"a user's figure")
    js.write_text("a user's notes")
    tiny = ["xor", "--steps", "2", "--n-train", "8", "--n-test", "8"]
    assert main([*tiny, "--figure", str(fig)]) == 2
    assert "--figure" in capsys.readouterr().err and fig.read_bytes() == b"a user's figure"
    assert main([*tiny, "--figure", "", "--json", str(js)]) == 2
    assert "--json" in capsys.readouterr().err and js.read_text() == "a user's notes"
    assert main([*tiny, "--figure", str(fig), "--json", str(js), "--force"]) == 0
    assert fig.read_bytes()[:4] == b"\x89PNG" and json.loads(js.read_text())["config"]["steps"] == 2
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary left behind
    pdf = tmp_path / "fig.pdf"  # the format the name asks for
    assert main([*tiny, "--figure", str(pdf)]) == 0 and pdf.read_bytes()[:5] == b"%PDF-"


@pytest.mark.slow
def test_tiny_train_eval_clean_and_resume(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", *TINY_TRAIN, "--epochs", "1", "--out-dir", run]) == 0
    capsys.readouterr()
    assert main(["eval-clean", run, "--out", str(tmp_path / "eval.json")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["epoch"] == 1 and res["n"] == 256  # synthetic test split
    for key in ("collaboration", "ensemble", "vote", "oracle"):
        assert 0.0 <= res[key] <= 1.0
    assert len(res["submodels"]) == 2 and abs(sum(res["selected"]) - 1) < 1e-9
    assert json.loads((tmp_path / "eval.json").read_text())["collaboration"] == res["collaboration"]
    # a second `train` into the same folder must not silently overwrite it ...
    assert main(["train", *TINY_TRAIN, "--epochs", "2", "--out-dir", run]) == 2
    assert "--resume" in capsys.readouterr().err
    # ... but --resume continues it, with a longer schedule
    assert main(["train", *TINY_TRAIN, "--epochs", "2", "--out-dir", run, "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 2
    assert main(["train", *TINY_TRAIN, "--sigma", "2", "--out-dir", run, "--resume"]) == 2
    assert "cannot change sigma" in capsys.readouterr().err


@pytest.mark.parametrize("extra, needle", [
    (["--sigma", "0"], "sigma"),
    (["--sigma", "-1"], "sigma"),
    (["--num-models", "0"], "num_models"),
    (["--depth", "7"], "depth"),
    (["--dataset", "cifar10", "--data", "/nonexistent/cifar"], "CIFAR-10 not found"),
])
def test_bad_configs_exit_nonzero_with_one_line(tmp_path, capsys, extra, needle):
    argv = ["train", *TINY_TRAIN, "--out-dir", str(tmp_path / "r"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cda2: error:") and needle in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_eval_and_xor_args(tmp_path, capsys):
    assert main(["eval-clean", str(tmp_path / "missing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["xor", "--sigma", "0", "--figure", ""]) == 2
    assert "sigma" in capsys.readouterr().err


def test_the_command_line_resumes_a_run_of_the_library_twin(run_copy, capsys):
    """helpers.tiny_config is TINY_TRAIN: a run it trained continues under the command line."""
    assert main(["train", *TINY_TRAIN, "--out-dir", str(run_copy), "--resume", "--epochs", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 2


@pytest.mark.parametrize("extra, needle", [
    (["--batch-size", "1"], "batch_size"),
    (["--train-limit", "1"], "train_limit"),
    (["--eps", "inf"], "eps"),
    (["--alpha", "inf"], "alpha"),
    (["--eps", "2"], "eps: the L-inf radius must lie in [0, 1]"),
    (["--steps", "0"], "steps"),
    (["--lr", "inf"], "lr"),
    (["--momentum", "-0.5"], "momentum"),
    (["--weight-decay", "-1"], "weight_decay"),
    (["--seed", str(2 ** 64)], "seed: must be an integer in [0, 2**63)"),
    (["--device", "cuda:x"], "device"),
    (["--device", "mps"], "device"),
    (["--on-nonfinite", "ignore"], "on_nonfinite"),
])
def test_bad_train_options_are_one_line(tmp_path, capsys, monkeypatch, extra, needle):
    no_training(monkeypatch)
    assert main(["train", *TINY_TRAIN, "--out-dir", str(tmp_path / "r"), *extra]) == 2
    only_error_line(capsys, needle)
    assert not (tmp_path / "r").exists()  # refused before anything was created


def test_a_data_set_without_images_is_one_line(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    empty = pickle.dumps({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, protocol=2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(empty)
    argv = ["train", *TINY_TRAIN, "--dataset", "cifar10", "--data", str(folder),
            "--out-dir", str(tmp_path / "r")]
    assert main(argv) == 2
    only_error_line(capsys, "training set", "got 0")


@pytest.mark.parametrize("extra, needle", [
    (["--batch-size", "0"], "batch-size"),
    (["--device", "cuda:x"], "device"),
    (["--device", "mps"], "device"),
])
def test_bad_eval_clean_options_are_one_line(trained, capsys, extra, needle):
    assert main(["eval-clean", str(trained), *extra]) == 2
    only_error_line(capsys, needle)
