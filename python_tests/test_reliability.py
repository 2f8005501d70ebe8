"""Never lose a user's work: one test (or group) per defect, numbered as in the issue.

1 run-folder ownership, 2 the run lock (a real second process) and the checkpoint pair,
3 evaluation outputs checked first and rescued when writing fails, 4 stale temporary files and
folder fsync, 5 unwritable folders found at start, 6 the tensor digest, 7 non-finite losses,
8 one-line errors for bad options, 9 damaged checkpoint metadata, 10 damaged data batches (the
fuzz test is in test_data_fuzz.py), 11 the random-start seed's range.

Runs use tiny models on synthetic images; one trained run is shared and copied where needed.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cda2_ext import ops, reference
from cda2_ext.checkpoint import (ALLOW_UNDIGESTED_ENV, DIGEST_KEY, DOCUMENT_KEY, FORMAT,
                                 checkpoint_files, document_digest, load_checkpoint,
                                 load_collaboration, save_checkpoint, tensors_digest)
from cda2_ext.cli import main
from cda2_ext.cli import eval_clean as cli_eval_clean
from cda2_ext.cli import eval_robustness as cli_eval
from cda2_ext.data import DataError, load_cifar10, synthetic_images
from cda2_ext.errors import CheckpointError, ConfigError
from cda2_ext.run_dir import LOCK_NAME, RunFolder
from cda2_ext.training import TrainConfig, Trainer
from cda2_ext.errors import NonFiniteLossError

TINY = ["--dataset", "synthetic", "--depth", "8", "--num-models", "2", "--steps", "1",
        "--batch-size", "16", "--train-limit", "32", "--test-limit", "32", "--no-progress",
        "--device", "cpu", "--epochs", "1", "--eval-every", "0"]


def _cfg(out_dir, **kw) -> TrainConfig:
    """The library twin of TINY (so that the CLI can resume these runs)."""
    base = dict(dataset="synthetic", num_models=2, depth=8, epochs=1, batch_size=16, steps=1,
                train_limit=32, test_limit=32, progress=False, eval_every=0, out_dir=str(out_dir),
                device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _trainer(cfg: TrainConfig, n: int = 32) -> Trainer:
    return Trainer(cfg, train_set=synthetic_images(n, size=16), log=None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 1-epoch run folder (copy it before changing it)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    _trainer(_cfg(out)).fit()
    return out


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("cda2: error:") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _no_training(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("training started although the run should have been refused")
    monkeypatch.setattr(Trainer, "train_epoch", refuse)


# ----- 1. a run folder is a folder the run owns ---------------------------------------------------
def test_1_out_dir_that_is_a_users_file_is_refused_and_kept(tmp_path, capsys, monkeypatch):
    (tmp_path / "results.json").write_text('{"mine": 1}')
    (tmp_path / "metrics.json").write_text('{"mine": 2}')
    _no_training(monkeypatch)
    assert main(["train", *TINY, "--out-dir", str(tmp_path / "results.json")]) == 2
    _one_line_error(capsys, "out_dir", "is a file")
    assert main(["train", *TINY, "--force", "--out-dir", str(tmp_path / "results.json")]) == 2
    assert json.loads((tmp_path / "results.json").read_text()) == {"mine": 1}
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"mine": 2}


@pytest.mark.slow
def test_1_folder_of_other_files_needs_force_and_keeps_them(tmp_path, capsys, monkeypatch):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"meow")
    with monkeypatch.context() as m:
        _no_training(m)
        assert main(["train", *TINY, "--out-dir", str(mine)]) == 2
        _one_line_error(capsys, "holds no cda2 run", "--force")
        assert sorted(os.listdir(mine)) == ["cat.jpg"]
    assert main(["train", *TINY, "--force", "--out-dir", str(mine)]) == 0
    assert (mine / "cat.jpg").read_bytes() == b"meow" and (mine / "checkpoint.safetensors").is_file()


@pytest.mark.slow
def test_1_an_earlier_run_is_continued_with_resume_or_replaced_with_force(run_copy, capsys):
    assert main(["train", *TINY, "--out-dir", str(run_copy)]) == 2
    _one_line_error(capsys, "--resume", "--force")
    (run_copy / "clean.json").write_text("{}")  # the user's file beside a run is fine
    assert main(["train", *TINY, "--out-dir", str(run_copy), "--force", "--sigma", "2"]) == 0
    meta = json.loads((run_copy / "checkpoint.json").read_text())
    assert meta["epoch"] == 1 and meta["config"]["sigma"] == 2 and len(meta["history"]) == 1
    assert (run_copy / "clean.json").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit):  # argparse: the two exclude each other
        main(["train", *TINY, "--out-dir", str(run_copy), "--force", "--resume"])


# ----- 2. one run per folder; the checkpoint pair belongs together --------------------------------
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
def test_2_a_second_run_on_the_same_folder_is_refused_naming_the_first(tmp_path, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-c", _HOLDER, "train", *TINY, "--out-dir", str(out)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=tmp_path, env=env)
    try:
        assert first.stdout.readline().strip() == "training", first.stderr.read()
        assert main(["train", *TINY, "--out-dir", str(out)]) == 2
        _one_line_error(capsys, "in use by another cda2 run", f"PID {first.pid}")
        assert main(["train", *TINY, "--out-dir", str(out), "--resume"]) == 2
        _one_line_error(capsys, f"PID {first.pid}")
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        first.kill()
        first.wait()
    # the lock died with the first process: the folder can be continued now
    assert main(["train", *TINY, "--out-dir", str(out), "--resume", "--epochs", "2"]) == 0


def test_2_the_json_names_the_tensors_it_belongs_to(run_copy):
    st_path, json_path = checkpoint_files(run_copy)
    tensors, meta = load_checkpoint(run_copy)
    doc = json.loads(json_path.read_text())
    assert doc[DIGEST_KEY] == meta[DIGEST_KEY] == tensors_digest(tensors)


def test_2_run_folder_lock_is_exclusive_within_a_process_too(tmp_path):
    with RunFolder(tmp_path / "run") as held:
        assert (held.path / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(ConfigError, match=f"PID {os.getpid()}"):
            RunFolder(tmp_path / "run").__enter__()
    with RunFolder(tmp_path / "run", resume=True):  # released on exit
        pass


# ----- 3. evaluation outputs: checked before work, never overwritten unasked, rescued ------------
def _refuse_clean_eval(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the evaluation ran although its output was refused")
    monkeypatch.setattr(cli_eval_clean, "evaluate_clean", refuse)
    monkeypatch.setattr(cli_eval, "evaluate_robustness", refuse)


def test_3_outputs_are_checked_before_any_work(trained, tmp_path, capsys, monkeypatch):
    _refuse_clean_eval(monkeypatch)
    earlier = tmp_path / "clean.json"
    earlier.write_text("earlier")
    assert main(["eval-clean", str(trained), "--out", str(earlier)]) == 2
    _one_line_error(capsys, "--out", "already exists", "--force")
    assert main(["eval-clean", str(trained), "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "--out", "is a folder")
    assert main(["eval", "--checkpoint", str(trained), "--out", str(earlier)]) == 2
    _one_line_error(capsys, "--out", "is a file")
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "robustness.json").write_text("earlier")
    assert main(["eval", "--checkpoint", str(trained), "--out", str(folder)]) == 2
    _one_line_error(capsys, "--out", "robustness.json", "--force")
    assert main(["eval-clean", str(trained), "--out", "/proc/cda2-no/clean.json"]) == 2
    _one_line_error(capsys, "--out", "cannot write")
    assert earlier.read_text() == "earlier" and (folder / "robustness.json").read_text() == "earlier"


def test_3_force_overwrites_and_a_failed_write_keeps_the_results(trained, tmp_path, capsys, monkeypatch):
    earlier = tmp_path / "clean.json"
    earlier.write_text("earlier")
    argv = ["eval-clean", str(trained), "--limit", "16", "--device", "cpu", "--out", str(earlier)]
    assert main([*argv, "--force"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert json.loads(earlier.read_text()) == res

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device", str(earlier))
    monkeypatch.setattr(cli_eval_clean, "atomic_write", disk_full)
    assert main([*argv, "--force"]) == 2
    out, err = capsys.readouterr()
    printed = json.loads(out)  # printed before the write was tried
    assert printed["collaboration"] == res["collaboration"] and printed["n"] == 16
    assert err.startswith("cda2: error:") and "\n" not in err.strip() and "No space" in err
    rescued = Path(err.split("saved to ")[1].split(" instead")[0])
    try:
        assert json.loads(rescued.read_text()) == printed
    finally:
        rescued.unlink()


def test_3_eval_keeps_its_report_when_the_folder_cannot_be_written(trained, tmp_path, capsys,
                                                                   monkeypatch):
    def unwritable(path):
        raise PermissionError(13, "Permission denied", str(path))
    report = SimpleNamespace(config={}, checks=["OK"], indices=[0, 1], format_table=lambda: "table",
                             to_dict=lambda: {"robust_accuracy": {"run": {"PGD": {"0.03": 0.5}}}},
                             to_json=unwritable, to_csv=unwritable, plot=unwritable)
    monkeypatch.setattr(cli_eval, "evaluate_robustness", lambda *a, **k: report)
    assert main(["eval", "--checkpoint", str(trained), "--attack", "pgd", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "eval")]) == 2
    err = _one_line_error(capsys, "--out", "Permission denied", "saved to")
    rescued = Path(err.split("saved to ")[1].split(" instead")[0])
    try:
        assert json.loads(rescued.read_text()) == report.to_dict()
    finally:
        rescued.unlink()


# ----- 4. stale temporary files are cleaned; the folder is synced after renames -------------------
def test_4_stale_tmp_files_are_removed_when_a_run_takes_the_folder(run_copy):
    stale = [run_copy / ".checkpoint.safetensors.k3j2.tmp", run_copy / ".metrics.json.a1.tmp"]
    for f in stale:
        f.write_bytes(b"half a save")
    (run_copy / "notes.tmp").write_text("the user's")
    log = []
    tr = Trainer(_cfg(run_copy, epochs=2), train_set=synthetic_images(32, size=16), log=log.append)
    tr.fit(resume=True)
    assert not any(f.exists() for f in stale) and (run_copy / "notes.tmp").exists()
    assert tr.epoch == 2 and any("removed" in line for line in log)


def test_4_the_folder_is_fsynced_after_the_renames(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real(fd)
    monkeypatch.setattr(os, "fsync", spy)
    save_checkpoint(tmp_path, {"w": torch.ones(2)}, {"epoch": 1})
    assert synced[-1] is True and synced.count(True) >= 2  # after each of the two renames


# ----- 5. an unusable --out-dir is found before training ------------------------------------------
@pytest.mark.parametrize("where", ["/proc/cda2-no-such/run", "{tmp}/a-file/run"])
def test_5_unwritable_out_dir_fails_at_start(where, tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    out = where.format(tmp=tmp_path)
    _no_training(monkeypatch)
    assert main(["train", *TINY, "--out-dir", out]) == 2
    _one_line_error(capsys, "out_dir", "cannot write")
    with pytest.raises(ConfigError, match="out_dir"):  # the library path too
        _trainer(_cfg(out)).fit()


# ----- 6. the tensors' digest --------------------------------------------------------------------
def _flip_tensor_byte(st_path: Path, offset: int = 100) -> None:
    blob = bytearray(st_path.read_bytes())
    header_len = struct.unpack("<Q", blob[:8])[0]
    blob[8 + header_len + offset] ^= 0x01  # one bit of the tensor data, past the header
    st_path.write_bytes(bytes(blob))


def test_6_one_flipped_bit_in_the_tensors_is_reported(run_copy, capsys):
    st_path = checkpoint_files(run_copy)[0]
    _flip_tensor_byte(st_path)
    with pytest.raises(CheckpointError, match="damaged.*tensors_sha256") as e:
        load_checkpoint(run_copy)
    assert str(st_path) in str(e.value)
    assert main(["eval-clean", str(run_copy), "--device", "cpu"]) == 2
    _one_line_error(capsys, str(st_path), "damaged")
    assert main(["train", *TINY, "--out-dir", str(run_copy), "--resume"]) == 2
    _one_line_error(capsys, "damaged")


def test_6_a_checkpoint_without_digests_loads_only_when_allowed(run_copy, monkeypatch):
    # An undigested (old) checkpoint is refused unless the user opts in; then it loads
    # with a warning.
    from safetensors.torch import save_file
    tensors, meta = load_checkpoint(run_copy)
    del meta[DIGEST_KEY], meta[DOCUMENT_KEY]
    st_path = checkpoint_files(run_copy)[0]
    save_file(tensors, str(st_path), metadata={"format": FORMAT, "meta": json.dumps(meta)})
    monkeypatch.delenv(ALLOW_UNDIGESTED_ENV, raising=False)
    with pytest.raises(CheckpointError, match=f"no tensors_sha256.*{ALLOW_UNDIGESTED_ENV}=1"):
        load_collaboration(run_copy)
    monkeypatch.setenv(ALLOW_UNDIGESTED_ENV, "1")
    with pytest.warns(UserWarning, match=f"no {DOCUMENT_KEY}"):
        model, _ = load_collaboration(run_copy)
    assert model.num_models == 2


# ----- 7. non-finite losses ----------------------------------------------------------------------
def _poison_first_batch(monkeypatch):
    """NaN in one image of the first batch only (the data loader cannot make one: uint8)."""
    real, calls = Trainer.train_step, []

    def step(self, x, y, stats=None):
        calls.append(1)
        if len(calls) == 1:
            x = x.clone()
            x[0] = float("nan")
        return real(self, x, y, stats)
    monkeypatch.setattr(Trainer, "train_step", step)


def test_7_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    cfg = _cfg(tmp_path / "run", epochs=2)
    tr = _trainer(cfg)

    def poison(step, losses):  # after epoch 2's first step, the weights go bad
        if tr.epoch == 1 and step == 0:
            with torch.no_grad():
                next(tr.model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, step 2 of 2") as e:
        tr.fit(poison)
    assert "\n" not in str(e.value) and "checkpoint of epoch 1" in str(e.value)
    tensors, meta = load_checkpoint(cfg.out_dir)
    assert meta["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


@pytest.mark.slow
def test_7_cli_stops_with_one_line_and_writes_no_nan_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--lr", "1e30", "--out-dir", str(out)]) == 2
    _one_line_error(capsys, "loss is nan at epoch 1, step", "--on-nonfinite skip")
    assert not checkpoint_files(out)[0].exists()


def test_7_skip_mode_skips_and_counts_non_finite_batches(tmp_path, monkeypatch):
    _poison_first_batch(monkeypatch)
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 1 of 2"):
        _trainer(_cfg(tmp_path / "stop")).fit()
    _poison_first_batch(monkeypatch)
    tr = _trainer(_cfg(tmp_path / "skip", on_nonfinite="skip"))
    history = tr.fit()
    assert history[0]["skipped_steps"] == 1
    assert json.loads((tmp_path / "skip" / "metrics.json").read_text())[0]["skipped_steps"] == 1
    state = tr.model.state_dict().values()  # BatchNorm statistics untouched by the NaN batch
    assert all(torch.isfinite(t).all() for t in state if t.is_floating_point())


# ----- 8. bad options: one line, exit status 2 ---------------------------------------------------
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
def test_8_bad_train_options_are_one_line(tmp_path, capsys, monkeypatch, extra, needle):
    _no_training(monkeypatch)
    assert main(["train", *TINY, "--out-dir", str(tmp_path / "r"), *extra]) == 2
    _one_line_error(capsys, needle)
    assert not (tmp_path / "r").exists()  # refused before anything was created


def test_8_steps_zero_is_fine_without_an_attack(tmp_path):
    _cfg(tmp_path, phases="standard", steps=0).validate()


def test_8_a_data_set_without_images_is_one_line(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    empty = pickle.dumps({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, protocol=2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(empty)
    argv = ["train", *TINY, "--dataset", "cifar10", "--data", str(folder), "--out-dir", str(tmp_path / "r")]
    assert main(argv) == 2
    _one_line_error(capsys, "training set", "got 0")


@pytest.mark.parametrize("extra, needle", [
    (["--batch-size", "0"], "batch-size"),
    (["--device", "cuda:x"], "device"),
    (["--device", "mps"], "device"),
])
def test_8_bad_eval_clean_options_are_one_line(trained, capsys, extra, needle):
    assert main(["eval-clean", str(trained), *extra]) == 2
    _one_line_error(capsys, needle)


# ----- 9. damaged checkpoint metadata ------------------------------------------------------------
def _rewrite(run: Path, tensors=None, meta=None, header=None) -> Path:
    """Replace the run's checkpoint by one with the given tensors/meta (digest made to match, so
    only the metadata is damaged) or with a raw safetensors ``header``."""
    from safetensors.torch import save_file
    st_path = checkpoint_files(run)[0]
    if header is None:
        if isinstance(meta, dict):
            meta = {**meta, DIGEST_KEY: tensors_digest(tensors)}
            meta[DOCUMENT_KEY] = document_digest(meta)
        header = {"format": FORMAT, "meta": json.dumps(meta)}
    save_file(tensors, str(st_path), metadata=header)
    return st_path


def _damaged(kind: str, run: Path) -> Path:
    tensors, meta = load_checkpoint(run)
    if kind == "no config":
        del meta["config"]
    elif kind == "meta is a list":
        meta = [meta]
    elif kind == "rng missing":
        del tensors["rng.generator"]
    elif kind == "rng random bytes":
        tensors["rng.torch"] = torch.randint(0, 256, (77,), dtype=torch.uint8)
    elif kind == "depth 14 metadata, depth 8 tensors":
        meta["model"]["depth"] = meta["config"]["depth"] = 14
    elif kind == "foreign":
        return _rewrite(run, tensors, header={"name": "someone else's model"})
    return _rewrite(run, tensors, meta)


@pytest.mark.parametrize("kind, needle", [
    ("no config", "no training config"),
    ("meta is a list", "damaged metadata"),
    ("rng missing", "rng.generator: missing"),
    ("rng random bytes", "rng.torch"),
    ("depth 14 metadata, depth 8 tensors", "does not match its model config"),
    ("foreign", "is not a cda2-checkpoint/1 checkpoint"),
])
def test_9_damaged_checkpoints_are_one_line_naming_the_file(run_copy, capsys, kind, needle):
    st_path = _damaged(kind, run_copy)
    depth = 14 if "depth" in kind else 8  # as the damaged metadata says
    assert main(["train", *TINY, "--depth", str(depth), "--out-dir", str(run_copy), "--resume",
                 "--epochs", "2"]) == 2
    _one_line_error(capsys, str(st_path), needle)
    with pytest.raises(CheckpointError):  # and through the library, the same one line
        _trainer(_cfg(run_copy, depth=depth)).load()


@pytest.mark.parametrize("kind", ["meta is a list", "depth 14 metadata, depth 8 tensors", "foreign"])
def test_9_eval_clean_names_the_damaged_checkpoint(run_copy, capsys, kind):
    _damaged(kind, run_copy)
    assert main(["eval-clean", str(run_copy), "--device", "cpu"]) == 2
    _one_line_error(capsys, str(run_copy))


# ----- 10. damaged data batches (and test_data_fuzz.py) ------------------------------------------
def _batch_folder(tmp_path: Path, blob: bytes) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir(exist_ok=True)
    (folder / "test_batch").write_bytes(blob)
    return folder


def test_10_huge_label_is_one_line(tmp_path):
    blob = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2 ** 70]}, protocol=2)
    with pytest.raises(DataError, match="test_batch.*integer labels"):
        load_cifar10(_batch_folder(tmp_path, blob), "test")


@pytest.mark.parametrize("opcode", [pickle.BINBYTES, pickle.BINUNICODE])
def test_10_a_length_field_is_not_believed_before_allocating(tmp_path, opcode):
    # PROTO 4, then a 4 GiB string whose bytes are not in the file: the old reader allocated 4 GiB
    blob = b"\x80\x04" + opcode + struct.pack("<I", 0xFFFFFFFF) + b"abc" + pickle.STOP
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="test_batch.*only 4 remain"):
        load_cifar10(_batch_folder(tmp_path, blob), "test")
    assert time.perf_counter() - t0 < 1


def test_10_a_huge_memo_index_is_refused(tmp_path):
    blob = b"\x80\x02" + pickle.EMPTY_DICT + pickle.LONG_BINPUT + struct.pack("<I", 0xFFFFFFF0) + pickle.STOP
    with pytest.raises(DataError, match="memo index"):
        load_cifar10(_batch_folder(tmp_path, blob), "test")


def test_10_an_array_reconstructed_with_a_huge_shape_is_refused(tmp_path):
    blob = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
            b"J\xff\xff\xff\x7f\x85U\x01b\x87R.")  # _reconstruct(ndarray, (2**31 - 1,), b"b")
    with pytest.raises(DataError, match="unexpected numpy array reconstruction"):
        load_cifar10(_batch_folder(tmp_path, blob), "test")


# ----- 11. the random start's seed ---------------------------------------------------------------
@pytest.mark.parametrize("impl", [ops, reference], ids=["ops", "reference"])
@pytest.mark.parametrize("seed, exc", [(2 ** 70, ValueError), (2 ** 63, ValueError), (-1, ValueError),
                                       (1.5, TypeError), (True, TypeError)])
def test_11_seed_out_of_range_names_the_argument_and_range(impl, seed, exc):
    with pytest.raises(exc, match=r"^seed: .*\[0, 2\*\*63\)"):
        impl.pgd_random_start(torch.rand(2, 3, 4, 4), 0.1, seed=seed)


def test_11_the_largest_seed_gives_the_same_start_everywhere():
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(ops.pgd_random_start(x, 0.1, seed=2 ** 63 - 1),
                               reference.pgd_random_start(x, 0.1, seed=2 ** 63 - 1), rtol=0, atol=0)
