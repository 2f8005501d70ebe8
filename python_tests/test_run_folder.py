"""A run folder (``--out-dir``) is a folder the run owns: a user's file or folder of other files is
never taken without ``--force`` and never deleted, an earlier run is continued with ``--resume``
or replaced with ``--force``, one run at a time holds it (the lock, against a real second
process), stale temporary files of a killed save are removed, and an unusable folder is found
before training starts. What the commands write there is read back through one typed reader each
(``training_time``, ``RobustnessRecord``), and damage is one error naming the file.

(Run-folder files that are links or not regular files: ``test_hostile_inputs.py``.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cda2_ext.cli import main
from cda2_ext.errors import CheckpointError, ConfigError
from cda2_ext.storage.run_folder import (LOCK_NAME, METRICS_NAME, ROBUSTNESS_NAME, RobustnessRecord,
                                      RunFolder, training_time)
from cda2_ext.training.config import RESUMABLE_CHANGES, TrainConfig
from helpers import TINY_TRAIN, no_training, only_error_line, tiny_config, tiny_trainer


def test_an_out_dir_that_is_a_users_file_is_refused_and_kept(tmp_path, capsys, monkeypatch):
    (tmp_path / "results.json").write_text('{"mine": 1}')
    (tmp_path / "metrics.json").write_text('{"mine": 2}')
    no_training(monkeypatch)
    assert main(["train", *TINY_TRAIN, "--out-dir", str(tmp_path / "results.json")]) == 2
    only_error_line(capsys, "out_dir", "is a file")
    assert main(["train", *TINY_TRAIN, "--force", "--out-dir", str(tmp_path / "results.json")]) == 2
    assert json.loads((tmp_path / "results.json").read_text()) == {"mine": 1}
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"mine": 2}


@pytest.mark.slow
def test_a_folder_of_other_files_needs_force_and_keeps_them(tmp_path, capsys, monkeypatch):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"meow")
    with monkeypatch.context() as m:
        no_training(m)
        assert main(["train", *TINY_TRAIN, "--out-dir", str(mine)]) == 2
        only_error_line(capsys, "holds no cda2 run", "--force")
        assert sorted(os.listdir(mine)) == ["cat.jpg"]
    assert main(["train", *TINY_TRAIN, "--force", "--out-dir", str(mine)]) == 0
    assert (mine / "cat.jpg").read_bytes() == b"meow" and (mine / "checkpoint.safetensors").is_file()


@pytest.mark.slow
def test_an_earlier_run_is_continued_with_resume_or_replaced_with_force(run_copy, capsys):
    assert main(["train", *TINY_TRAIN, "--out-dir", str(run_copy)]) == 2
    only_error_line(capsys, "--resume", "--force")
    (run_copy / "clean.json").write_text("{}")  # the user's file beside a run is fine
    assert main(["train", *TINY_TRAIN, "--out-dir", str(run_copy), "--force", "--sigma", "2"]) == 0
    meta = json.loads((run_copy / "checkpoint.json").read_text())
    assert meta["epoch"] == 1 and meta["config"]["sigma"] == 2 and len(meta["history"]) == 1
    assert (run_copy / "clean.json").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit):  # argparse: the two exclude each other
        main(["train", *TINY_TRAIN, "--out-dir", str(run_copy), "--force", "--resume"])


# ----- one run per folder -------------------------------------------------------------------------
_HOLDER = r"""
import sys
from cda2_ext.cli import main
from cda2_ext.training.trainer import Trainer

train_epoch = Trainer.train_epoch
def gated(self, *args, **kwargs):  # hold the run (and its folder) until the test says go
    print("training", flush=True)
    sys.stdin.readline()
    return train_epoch(self, *args, **kwargs)
Trainer.train_epoch = gated
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(tmp_path, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-c", _HOLDER, "train", *TINY_TRAIN, "--out-dir", str(out)]
    first = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=tmp_path, env=env)
    try:
        assert first.stdout.readline().strip() == "training", first.stderr.read()
        assert main(["train", *TINY_TRAIN, "--out-dir", str(out)]) == 2
        only_error_line(capsys, "in use by another cda2 run", f"PID {first.pid}")
        assert main(["train", *TINY_TRAIN, "--out-dir", str(out), "--resume"]) == 2
        only_error_line(capsys, f"PID {first.pid}")
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        first.kill()
        first.wait()
    # the lock died with the first process: the folder can be continued now
    assert main(["train", *TINY_TRAIN, "--out-dir", str(out), "--resume", "--epochs", "2"]) == 0


def test_the_lock_is_exclusive_within_a_process_too(tmp_path):
    with RunFolder(tmp_path / "run") as held:
        assert (held.path / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(ConfigError, match=f"PID {os.getpid()}"):
            RunFolder(tmp_path / "run").__enter__()
    with RunFolder(tmp_path / "run", resume=True):  # released on exit
        pass


# ----- taking the folder --------------------------------------------------------------------------
def test_stale_tmp_files_are_removed_when_a_run_takes_the_folder(run_copy):
    stale = [run_copy / ".checkpoint.safetensors.k3j2.tmp", run_copy / ".metrics.json.a1.tmp"]
    for f in stale:
        f.write_bytes(b"half a save")
    (run_copy / "notes.tmp").write_text("the user's")
    log = []
    tr = tiny_trainer(tiny_config(run_copy, epochs=2), log=log.append)
    tr.fit(resume=True)
    assert not any(f.exists() for f in stale) and (run_copy / "notes.tmp").exists()
    assert tr.epoch == 2 and any("removed" in line for line in log)


@pytest.mark.parametrize("where", ["/proc/cda2-no-such/run", "{tmp}/a-file/run"])
def test_an_unwritable_out_dir_fails_at_start(where, tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    out = where.format(tmp=tmp_path)
    no_training(monkeypatch)
    assert main(["train", *TINY_TRAIN, "--out-dir", out]) == 2
    only_error_line(capsys, "out_dir", "cannot write")
    with pytest.raises(ConfigError, match="out_dir"):  # the library path too
        tiny_trainer(tiny_config(out)).fit()


# ----- reading what the commands wrote: training_time, RobustnessRecord, resume_conflicts -----------
def test_training_time_reads_metrics_as_the_trainer_writes_them(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS_NAME).write_text(json.dumps([
        {"epoch": 1, "seconds": 4.0, "images_per_s": 250.0},
        {"epoch": 2, "seconds": 2.0, "images_per_s": 500.0},
        {"epoch": 3, "seconds": 3.0, "images_per_s": 1000 / 3}]))
    cost = training_time(run)
    assert cost.epoch_seconds == (4.0, 2.0, 3.0) and cost.seconds == 9.0
    assert cost.images_per_s == pytest.approx(3000 / 9)
    assert cost.warm_seconds_per_epoch == 2.5  # epochs 2 and 3: the first pays for warm-up
    assert cost.images_per_epoch == 1000
    assert training_time(run / "checkpoint.safetensors").seconds == 9.0  # the file names its run
    assert cost.cpu_share is None  # written before the trainer recorded its CPU time


def test_each_epoch_records_the_cpu_it_got(trained):
    """A slow epoch on a shared machine explains itself: CPU seconds, threads and load."""
    history = json.loads((trained / METRICS_NAME).read_text())
    for h in history:
        assert h["cpu_seconds"] > 0 and h["cpu_threads"] >= 1
        assert h["load_average"] is None or h["load_average"] >= 0
    cost = training_time(trained)
    expected = [h["cpu_seconds"] / (h["seconds"] * h["cpu_threads"]) for h in history]
    assert cost.epoch_cpu_share == pytest.approx(tuple(expected))
    assert 0 < cost.cpu_share < 1.5  # about 1 on a quiet machine; below on a shared one


@pytest.mark.parametrize("content, needle", [
    (None, "not found"), ("{not json", "unreadable"), ("[]", "no finished epoch"),
    ('{"seconds": 1}', "no finished epoch"), ('[{"epoch": 1}]', "is not a cda2 run's metrics"),
    ('[{"seconds": "fast"}]', "is not a cda2 run's metrics"), ("[1, 2]", "is not a cda2 run's"),
])
def test_damaged_metrics_are_one_checkpoint_error_naming_the_file(tmp_path, content, needle):
    if content is not None:
        (tmp_path / METRICS_NAME).write_text(content)
    with pytest.raises(CheckpointError, match=needle) as err:
        training_time(tmp_path)
    assert METRICS_NAME in str(err.value) and "\n" not in str(err.value)


def test_robustness_records_read_merge_and_find_rows(tmp_path):
    for name, model, acc in (("a", "cda2", 0.4), ("b", "cda2-authors", 0.5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / ROBUSTNESS_NAME).write_text(json.dumps({
            "n": 200, "clean": {model: 0.8},
            "robust_accuracy": {model: {"PGD-10x1": {"0.03": acc}, "worst case": {"0.03": acc / 2}}},
            "checks": [f"{model} ok"], "config": {"checkpoints": {model: f"runs/{model}"}}}))
    a = RobustnessRecord.read(tmp_path / "a")  # a folder: its robustness.json
    assert a.source == tmp_path / "a" / ROBUSTNESS_NAME and a.n == 200
    assert a.row("cda2", "PGD-") == {"0.03": 0.4} and a.row("cda2", "Square-") == {}
    assert a.checkpoints == {"cda2": "runs/cda2"} and a.targets == {}
    both = RobustnessRecord.merge([a, RobustnessRecord.read(tmp_path / "b" / ROBUSTNESS_NAME)])
    assert both.clean == {"cda2": 0.8, "cda2-authors": 0.8}
    assert both.row("cda2-authors", "worst") == {"0.03": 0.25}
    assert both.checks == ["cda2 ok", "cda2-authors ok"] and a.checks == ["cda2 ok"]
    (tmp_path / "c.json").write_text('{"n": 1, "clean": [1, 2]}')
    with pytest.raises(CheckpointError, match="is not a robustness.json of cda2 eval"):
        RobustnessRecord.read(tmp_path / "c.json")


def test_resume_conflicts_are_the_options_that_change_the_trajectory():
    base = TrainConfig(depth=8)
    assert base.resume_conflicts(base.replace(epochs=300, device="cpu", out_dir="x")) == []
    assert base.resume_conflicts(base.replace(lr=0.5, seed=3, epochs=2)) == ["lr", "seed"]
    assert base.resume_conflicts({"lr": 0.5, "epochs": 7}) == ["lr"]  # just the options given
    assert {"epochs", "device", "out_dir"} <= RESUMABLE_CHANGES and "lr" not in RESUMABLE_CHANGES
