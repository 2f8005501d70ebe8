"""The ``cda2`` command against a hostile user: no file of a user's touched, no
traceback, every error one line.

* run-folder files are opened without following links and must be regular files (a lock linked
  to a user's file must not be truncated to a PID), and results replace a planted link;
* an ``OSError`` on a user's path (a name too long, no permission, a loop of links) is one line
  naming the path and the reason;
* a peer process lost under ``torchrun`` is one line naming it, with how to resume;
* a resume past ``--epochs`` says so; every count option is bounded; an empty batch has empty
  outputs; a malformed command line is two lines.

(Damaged checkpoint metadata: ``test_checkpoint_integrity.py``.) Last, a seeded fuzz of every
subcommand's options (``slow``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cda2_ext.attacks.transfer import TransferSet
from cda2_ext.storage.checkpoint import atomic_write, checkpoint_files
from cda2_ext.cli import compare as cli_compare
from cda2_ext.cli import main
from cda2_ext.errors import ConfigError, LostPeerError
from cda2_ext.evaluation.report import EvalReport
from cda2_ext.models.collaboration import Collaboration, CollaborationConfig
from cda2_ext.storage.run_folder import LOCK_NAME, RunFolder
from cda2_ext.training.distributed import DistContext
from helpers import (TINY_TRAIN, free_port, no_training, one_line_error, run_cli, tiny_config,
                     tiny_trainer)

LONG = "x" * 300  # longer than any file name may be (NAME_MAX is 255): ENAMETOOLONG


# ----- run-folder files: never through a link, regular files only ---------------------------------
def test_a_lock_linked_to_a_users_file_is_refused_and_the_file_kept(tmp_path, capsys, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).symlink_to("../victim.txt")
    no_training(monkeypatch)
    for extra in ([], ["--force"]):
        rc, err = run_cli(["train", *TINY_TRAIN, "--out-dir", str(run), *extra], capsys)
        assert rc == 2
        one_line_error(err, f"{run / LOCK_NAME} is a symbolic link, not a regular file")
    with pytest.raises(ConfigError, match="symbolic link"):  # the library's RunFolder too
        RunFolder(run).__enter__()
    assert victim.read_text() == "precious\n" and (run / LOCK_NAME).is_symlink()


@pytest.mark.parametrize("kind", ["folder", "pipe"])
def test_a_lock_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, kind):
    run = tmp_path / "run"
    run.mkdir()
    lock = run / LOCK_NAME
    lock.mkdir() if kind == "folder" else os.mkfifo(lock)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=f"is a {kind}, not a regular file"):
        with RunFolder(run):
            pass
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("name, make, flags", [
    ("checkpoint.safetensors", "folder", ["--resume"]),
    ("checkpoint.safetensors", "folder", ["--force"]),
    ("metrics.json", "link", ["--resume"]),
    ("checkpoint.json", "link", ["--force"]),
])
def test_run_files_that_are_not_regular_files_are_refused_up_front(tmp_path, capsys, monkeypatch,
                                                                     name, make, flags):
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (run / name).mkdir() if make == "folder" else (run / name).symlink_to(victim)
    no_training(monkeypatch)  # refused before any epoch (it failed after one before)
    rc, err = run_cli(["train", *TINY_TRAIN, "--out-dir", str(run), *flags], capsys)
    assert rc == 2
    one_line_error(err, str(run / name), "not a regular file")
    assert victim.read_text() == "precious" and (run / name).exists()


def _writers(tmp_path):
    ts = TransferSet(torch.zeros(1, 2, 3, 4, 4), torch.zeros(2, dtype=torch.long), ["a"], 0.03)
    return {"atomic_write": lambda p: atomic_write(p, b"new"),
            "robustness.json": lambda p: EvalReport(config={}, indices=[]).to_json(p),
            "robustness.csv": lambda p: EvalReport(config={}, indices=[]).to_csv(p),
            "compare.csv": lambda p: cli_compare.to_csv([], p),
            "transfer set": ts.save}


@pytest.mark.parametrize("writer", ["atomic_write", "robustness.json", "robustness.csv",
                                    "compare.csv", "transfer set"])
def test_results_replace_a_planted_link_instead_of_writing_through_it(tmp_path, writer):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    link = out / "result"
    link.symlink_to(victim)
    _writers(tmp_path)[writer](link)
    assert victim.read_text() == "precious"
    assert link.is_file() and not link.is_symlink()


# ----- paths the system refuses -------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["eval-clean", LONG],
    ["eval", "--checkpoint", LONG, "--attack", "pgd"],
    ["train", *TINY_TRAIN, "--dataset", "cifar10", "--data", LONG],
    ["train", *TINY_TRAIN, "--method", "dverge", "--init-from", LONG],
    ["compare", "{run}", "--eval", LONG],
    ["compare", LONG],
], ids=["eval-clean", "eval", "train-data", "train-init-from", "compare-eval", "compare-run"])
def test_a_name_too_long_is_one_line(trained, tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)  # the commands' default outputs land here
    argv = [a.format(run=trained) for a in argv]
    outputs = {"train": ["--out-dir", str(tmp_path / "r")], "eval": ["--out", str(tmp_path / "e")],
               "compare": ["--out", str(tmp_path / "c")]}.get(argv[0], [])
    rc, err = run_cli([*argv, *outputs], capsys)
    assert rc == 2
    one_line_error(err, LONG, "File name too long")


def test_permission_denied_is_one_line_naming_the_path(trained, capsys, monkeypatch):
    # Tests run as root here, where chmod cannot deny anything: the system's answer is simulated.
    from pathlib import Path as P
    real = P.is_file

    def denied(self):
        if self.name == "checkpoint.safetensors":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)
    monkeypatch.setattr(P, "is_file", denied)
    rc, err = run_cli(["eval-clean", str(trained), "--device", "cpu"], capsys)
    assert rc == 2
    one_line_error(err, str(checkpoint_files(trained)[0]), "Permission denied")


def test_any_os_error_reaching_the_command_is_one_line(trained, capsys, monkeypatch):
    from cda2_ext.jobs import evaluate_clean as eval_clean

    def unreadable(*a, **k):
        raise PermissionError(13, "Permission denied", "/data/cifar-10-batches-py/test_batch")
    monkeypatch.setattr(eval_clean, "load_images", unreadable)
    rc, err = run_cli(["eval-clean", str(trained), "--device", "cpu"], capsys)
    assert rc == 2
    assert one_line_error(err) == ("cda2: error: /data/cifar-10-batches-py/test_batch: "
                                   "Permission denied")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may read any folder")
def test_an_unreadable_folder_is_one_line(trained, tmp_path, capsys):
    locked = tmp_path / "locked"
    shutil.copytree(trained, locked / "run")
    locked.chmod(0)
    try:
        rc, err = run_cli(["eval-clean", str(locked / "run"), "--device", "cpu"], capsys)
    finally:
        locked.chmod(0o755)
    assert rc == 2
    one_line_error(err, "Permission denied")


def test_a_loop_of_links_is_one_line(tmp_path, capsys):
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    for argv in (["eval-clean", str(tmp_path / "a")],
                 ["train", *TINY_TRAIN, "--dataset", "cifar10", "--data", str(tmp_path / "a"),
                  "--out-dir", str(tmp_path / "r")],
                 ["compare", str(tmp_path / "a"), "--out", str(tmp_path / "c")]):
        rc, err = run_cli(argv, capsys)
        assert rc == 2
        one_line_error(err, str(tmp_path / "a"))


def test_a_line_break_in_a_path_stays_on_one_line(tmp_path, capsys):
    rc, err = run_cli(["eval-clean", str(tmp_path / "two\nlines")], capsys)
    assert rc == 2
    one_line_error(err, "no checkpoint at")


# ----- a lost peer under torchrun -----------------------------------------------------------------
def test_lost_peer_errors_are_told_from_others():
    reset = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                         "[127.0.0.1]:65260: Connection reset by peer. This is typically caused by "
                         "a remote worker hanging or bugs in the application. GLHF!")
    lost = DistContext(0, 2).lost_peer(reset)
    assert isinstance(lost, LostPeerError)
    assert str(lost) == "rank 0 of 2 lost rank 1: Read error [127.0.0.1]:65260: Connection reset by peer"
    assert "a peer process" in str(DistContext(3, 4).lost_peer(reset))
    assert DistContext(0, 1).lost_peer(reset) is None  # alone: nothing to lose
    assert DistContext(0, 2).lost_peer(RuntimeError("shape mismatch in conv2d")) is None
    DistContext(0, 2).abandon()  # no group here: a no-op, never an error


_WORKER = r"""
import os, signal, sys
from cda2_ext.cli import main
from cda2_ext.training.trainer import Trainer

real, calls = Trainer.train_step, []
def step(self, *args, **kwargs):  # rank 1 dies mid-epoch, as if killed by the OOM killer
    calls.append(1)
    if int(os.environ["RANK"]) == 1 and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args, **kwargs)
Trainer.train_step = step
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_killed_peer_is_one_line_naming_it_and_how_to_resume(tmp_path):
    port = free_port()
    argv = [sys.executable, "-c", _WORKER, "train", *TINY_TRAIN, "--batch-size", "8",
            "--epochs", "2", "--out-dir", str(tmp_path / "run")]
    procs = []
    for rank in (0, 1):  # what torchrun sets, without its agent (which would kill rank 0 too)
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        out = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == -9
    assert procs[0].returncode == 2, out[0][1][-3000:]
    one_line_error(out[0][1], "rank 0 of 2 lost rank 1", "Connection", "--resume")


# ----- resume past the end, bounded counts, empty batches, malformed command lines ----------------
def test_resume_past_epochs_says_that_nothing_is_trained(tmp_path, capsys):
    run = tmp_path / "run"
    tiny_trainer(tiny_config(run, epochs=2)).fit()
    before = checkpoint_files(run)[0].read_bytes()
    rc = main(["train", *TINY_TRAIN, "--out-dir", str(run), "--resume", "--epochs", "1"])
    out, err = capsys.readouterr()
    assert rc == 0 and json.loads(out)["epochs"] == 2
    said = [ln for ln in err.splitlines() if ln.startswith("cda2:")]
    assert said == [f"cda2: nothing to train: the run in {run} has finished 2 epoch(s), --epochs "
                    "is 1; pass a larger --epochs to continue it"]
    assert checkpoint_files(run)[0].read_bytes() == before


BIG = str(2 ** 70)


@pytest.mark.parametrize("argv, needle", [
    (["xor", "--steps", BIG], "steps"),
    (["xor", "--steps", str(10 ** 7)], "steps"),
    (["xor", "--n-train", BIG], "n-train"),
    (["xor", "--n-test", BIG], "n-test"),
    (["xor", "--seed", BIG], "seed"),
    (["eval-clean", "{run}", "--limit", BIG], "limit"),
    (["eval-clean", "{run}", "--batch-size", BIG], "batch-size"),
    *[(["eval", "--checkpoint", "{run}", flag, BIG], flag.lstrip("-"))
      for flag in ("--n-samples", "--batch-size", "--steps", "--restarts", "--adaptive-restarts",
                   "--apgd-steps", "--transfer-steps", "--queries", "--decision-targets", "--seed")],
    *[(["train", *TINY_TRAIN, flag, BIG], flag.lstrip("-").replace("-", "_"))
      for flag in ("--num-models", "--depth", "--steps", "--epochs", "--batch-size",
                   "--train-limit", "--test-limit", "--eval-every", "--seed")],
    (["train", *TINY_TRAIN, "--epochs", str(10 ** 7)], "epochs"),
    (["train", *TINY_TRAIN, "--method", "dverge", "--distill-steps", BIG], "distill_steps"),
    (["train", *TINY_TRAIN, "--method", "dverge", "--distill-layer", BIG], "distill_layer"),
    (["reproduce", "xor", "--jobs", BIG], "--jobs"),
])
def test_every_count_option_is_bounded(trained, tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    no_training(monkeypatch)
    t0 = time.perf_counter()
    rc, err = run_cli([a.format(run=trained) for a in argv], capsys)
    assert rc == 2 and time.perf_counter() - t0 < 30
    one_line_error(err, needle)


@pytest.mark.parametrize("layout", ["packed", "loop"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-model"])
def test_an_empty_batch_gives_empty_outputs(layout, shared):
    m = Collaboration(CollaborationConfig(num_models=2, depth=8, layout=layout))
    x = torch.zeros((0, 3, 32, 32) if shared else (2, 0, 3, 32, 32), requires_grad=True)
    for mode in (True, False):
        m.train(mode)
        logits, ppd = m(x)
        assert logits.shape == (2, 0, 10) and ppd.shape == (2, 0)
        (logits.sum() + ppd.sum()).backward()
        frozen_logits, frozen_ppd = m.frozen()(x)
        assert frozen_logits.shape == (2, 0, 10) and frozen_ppd.shape == (2, 0)
    assert all(torch.isfinite(b).all() for b in m.buffers())  # BatchNorm statistics untouched


@pytest.mark.parametrize("argv", [["train", "--epochs", "abc"], ["train", "--bogus"],
                                  ["eval"], ["xor", "--steps"], ["nonsense"], []])
def test_a_malformed_command_line_is_two_lines(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    prog = " ".join(["cda2", *argv[:1]]) if argv and argv[0] != "nonsense" else "cda2"
    assert len(lines) == 2 and lines[0].startswith(f"{prog}: error: "), lines
    assert lines[1] == f"see {prog} --help"


# ----- a seeded fuzz of every subcommand ----------------------------------------------------------
FUZZ_WORKER = Path(__file__).with_name("cli_fuzz_worker.py")
FUZZ_COUNT = 100


def _fuzz_problems(rec: dict) -> list:
    """What is wrong with one fuzzed combination's outcome (nothing: ``[]``)."""
    where = f"cda2 {' '.join(map(repr, rec['argv']))}"
    err = rec["stderr"]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    problems = []
    if rec["exception"] is not None or "Traceback" in err:
        problems.append(f"{where}: traceback: {(rec['exception'] or err)[-1500:]}")
    elif rec["rc"] not in (0, 2):
        problems.append(f"{where}: exit status {rec['rc']!r}: {err[-500:]}")
    elif rec["rc"] == 2:
        first = next((k for k, ln in enumerate(lines)
                      if ln.startswith("cda2") and "error:" in ln), None)
        if first is None or len(lines) - first > 2 or any(ln.startswith("usage:") for ln in lines):
            problems.append(f"{where}: the error is not one or two lines at the end: {err[-800:]}")
    if rec["changed_outside"]:
        problems.append(f"{where}: changed outside its outputs: {rec['changed_outside'][:5]}")
    if rec["seconds"] > 60:
        problems.append(f"{where}: took {rec['seconds']} s")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "eval-clean", "eval", "xor", "reproduce", "compare"])
def test_fuzz_every_subcommand_fails_in_one_line_and_touches_only_its_outputs(command, tmp_path):
    """100 seeded argument combinations per subcommand (``cli_fuzz_worker.py``), in a child
    process so that a signal would be seen: no traceback, no signal, exit status 0 or 2, an error
    in at most two lines, and no path changed but the command's outputs (run folder, --out, ...)."""
    sandbox, results = tmp_path / "sandbox", tmp_path / "results.json"
    (sandbox / "home").mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CDA2_DATA": str(sandbox / "no-data"),
           "CDA2_CACHE": str(sandbox / "home" / "cache")}
    env.pop("CDA2_ALLOW_UNDIGESTED", None)
    r = subprocess.run([sys.executable, str(FUZZ_WORKER), command, str(FUZZ_COUNT), "22",
                        str(sandbox), str(results)], cwd=sandbox, env=env, capture_output=True,
                       text=True, timeout=900)
    started = [ln for ln in r.stdout.splitlines() if ln.startswith("start ")]
    assert r.returncode == 0, (f"the fuzz process ended with {r.returncode} during "
                               f"{started[-1:]}: {r.stderr[-3000:]}")
    records = json.loads(results.read_text())
    assert len(records) == FUZZ_COUNT
    problems = [p for rec in records for p in _fuzz_problems(rec)]
    assert not problems, f"{len(problems)} problems, e.g.:\n" + "\n".join(problems[:10])
    # the fuzz reached both sides: some combinations ran, most were refused
    statuses = [rec["rc"] for rec in records]
    assert statuses.count(2) >= 20 and (command == "reproduce" or statuses.count(0) >= 5), statuses
