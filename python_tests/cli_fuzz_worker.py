"""Child process of ``test_hostile_inputs.py``'s CLI fuzz: ``python cli_fuzz_worker.py COMMAND N
SEED SANDBOX RESULTS``.

In ``SANDBOX`` (its working folder) it sets up what a hostile user has at hand - a finished tiny
run and its evaluation, a user's files, links to them planted where a run writes, a loop of
links, a folder of photos - then runs ``N`` seeded argument combinations of ``cda2 COMMAND``
through :func:`cda2_ext.cli.main` in this process, and writes one record per combination to
``RESULTS`` (JSON): the arguments, exit status, stderr, seconds, any exception, and every path of
the sandbox that changed although no output option named it. It prints ``start I`` before each
combination, so a parent that sees this process die of a signal knows which one did it.

Each combination is the command's small valid base (synthetic images, depth 2, one epoch, one
attack step: seconds at most) with one to three options replaced by values drawn from pools of
hostile ones: out of range, not numbers, huge, NaN, paths that are too long, loops, links, a
user's file, folders where files go. Pools of size options (epochs, steps, images) hold only
invalid or small values, so no combination can run long; ``--download`` is never drawn (no
network), and ``reproduce`` always has ``--dry-run``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from helpers import tiny_train  # this script's folder is on sys.path

BIG = str(2 ** 70)
LONG = "x" * 300
INTS = ["0", "-1", BIG, str(2 ** 63), "abc", "", "1e3", "3.5", "nan"]
FLOATS = ["0", "-1", "nan", "inf", "-inf", "1e308", "1e-300", "abc", "", "0.5", "1", "0.01"]
SEEDS = ["0", "7", "-1", str(2 ** 63 - 1), str(2 ** 63), BIG, "abc"]
DEVICES = ["cpu", "auto", "cuda", "cuda:7", "mps", "", "cpu:0", "x"]
#: Inputs: the finished run, its files, and what should not be one.
INPUTS = ["RUN", "RUN/checkpoint.safetensors", "RUN/checkpoint.json", LONG, "victim.txt", "loop",
          "nonexistent", "photos", "", "linked_run", "dir\nname", "/proc/cda2-none", "bad.json",
          "deep.json"]
#: Outputs: {i} is the combination's own fresh name; the rest exist already or cannot be made.
OUTPUTS = ["out{i}", "out{i}/deeper/more", LONG, "victim.txt", "linked_run", "lock_dir", "ckpt_dir",
           "/proc/cda2-none/x", "", "photos", "RUN/checkpoint.json", "loop", "two\nlines{i}"]

_TINY = tiny_train(test_limit=8, no_progress=None)  # --no-progress is one of train's base_flags
TINY_TRAIN = {**dict(zip(_TINY[::2], _TINY[1::2])), "--out-dir": "out{i}"}

# ----- per command: (base options, option pools, flags, output options and their defaults) -------
COMMANDS: Dict[str, dict] = {
    "train": dict(
        positional=[], base=TINY_TRAIN, base_flags=["--no-progress"],
        pools={
            "--method": ["cda2", "ensemble", "adp", "gal", "dverge", "bogus", ""],
            "--num-models": ["1", "2", "3", "0", "-1", BIG, "1025", "abc"],
            "--depth": ["2", "8", "3", "0", BIG, "2002", "abc"],
            "--ppd-input": ["features", "logits", "x"],
            "--phases": ["adversarial", "natural", "both", "standard", "x"],
            "--weights": ["softmin", "detector", "x"],
            **{f: FLOATS for f in ("--sigma", "--temp-c", "--temp-true", "--bce-weight", "--eps",
                                   "--alpha", "--clean-weight", "--lr", "--momentum",
                                   "--weight-decay", "--gamma", "--adp-alpha", "--adp-beta",
                                   "--gal-coeff", "--gal-noise", "--distill-eps", "--distill-alpha",
                                   "--dverge-coeff")},
            "--select-score": ["ppd", "soe", "maxprob", "x"],
            "--steps": ["0", "1", "2", "-1", BIG, "abc"],
            "--ppd-grad": ["head", "trunk", "x"], "--ppd-loss": ["paper", "soe", "x"],
            "--pgd-bn": ["eval", "train", "x"],
            "--epochs": ["0", "1", "2", "-1", BIG, "1000001", "abc"],
            "--batch-size": ["0", "1", "2", "16", BIG, "abc"],
            "--optimizer": ["sgd", "adam", "x"],
            "--schedule": ["multistep", "cosine", "constant", "x"],
            "--dataset": ["synthetic", "cifar10", "x"],
            "--data": INPUTS, "--init-from": INPUTS,
            "--train-limit": ["1", "2", "8", "0", "-5", BIG, "abc"],
            "--test-limit": ["1", "8", "0", BIG],
            "--out-dir": OUTPUTS + ["resume_run"] * 3,
            "--seed": SEEDS, "--device": DEVICES,
            "--eval-every": ["0", "1", "-1", BIG],
            "--on-nonfinite": ["stop", "skip", "x"], "--amp": ["none", "bf16", "fp16", "x"],
            "--distill-steps": ["1", "2", "0", BIG], "--distill-layer": ["1", "2", "0", "3", BIG],
        },
        flags=["--no-augment", "--pgd-random-start", "--no-random-start", "--unfused", "--adv",
               "--sync-bn", "--resume", "--force", "--no-progress"],
        outputs={"--out-dir": "runs/cda2"}),
    "eval-clean": dict(
        positional=[["RUN"], ["RUN"], INPUTS], base={"--device": "cpu", "--limit": "16"},
        base_flags=[],
        pools={"--data": INPUTS, "--split": ["test", "train", "x"],
               "--limit": ["1", "8", "0", "-1", BIG, "abc"], "--batch-size": ["1", "7", "0", BIG],
               "--score": ["ppd", "soe", "maxprob", "x"], "--device": DEVICES,
               "--out": [o + ".json" if "{i}" in o else o for o in OUTPUTS]},
        flags=["--unfused", "--force"], outputs={"--out": None}),
    "eval": dict(
        positional=[],
        base={"--checkpoint": "RUN", "--attack": "pgd", "--n-samples": "8", "--steps": "1",
              "--restarts": "1", "--eps": "0.03", "--sanity-eps": "0", "--device": "cpu",
              "--apgd-steps": "1", "--transfer-steps": "1", "--queries": "5", "--out": "out{i}"},
        base_flags=["--no-progress"],
        pools={"--checkpoint": INPUTS + ["RUN RUN"], "--attack": ["pgd", "square", "bogus", "pgd pgd"],
               "--surrogate": INPUTS, "--transfer-set": INPUTS,
               "--transfer-preset": ["table2", "table5", "x"],
               "--eps": ["0.03", "-1", "nan", "inf", "2", "abc", "0", "0.01 0.02"],
               "--n-samples": ["1", "8", "0", BIG, "abc"], "--seed": SEEDS,
               "--subset": ["seeded", "dverge", "x"], "--batch-size": ["1", "4", "0", BIG],
               "--steps": ["0", "1", "2", "-1", BIG], "--restarts": ["0", "1", "2", BIG],
               "--adaptive-attacks": ["x", "bpda"], "--adaptive-restarts": ["0", "1", BIG],
               "--temperature-fractions": ["1", "0", "-1", "nan", "inf"],
               "--temperatures": ["1", "0", "-1", "nan"], "--bpda-temperature": FLOATS,
               "--decision-targets": ["1", "3", "all", "0", "abc", BIG],
               "--apgd-steps": ["0", "1", BIG], "--transfer-steps": ["0", "1", BIG],
               "--queries": ["1", "5", "0", BIG], "--square-eps": ["0.03", "nan", "-1", "2"],
               "--sanity-eps": ["0", "0.3", "2", "-1", "nan"],
               "--score": ["ppd", "soe", "maxprob", "x"], "--data": INPUTS, "--device": DEVICES,
               "--out": OUTPUTS},
        flags=["--save-transfer", "--last-iterate", "--unfused", "--force", "--no-progress"],
        outputs={"--out": "eval"}),
    "xor": dict(
        positional=[], base={"--steps": "5", "--n-train": "16", "--n-test": "16", "--figure": ""},
        base_flags=[],
        pools={"--steps": ["0", "1", "5", "-1", BIG, "1000001", "abc"],
               "--n-train": ["4", "3", "16", BIG, "10000001", "abc"],
               "--n-test": ["4", "3", "16", BIG, "10000001"], "--lr": FLOATS, "--sigma": FLOATS,
               "--seed": SEEDS,
               "--figure": ["fig{i}.png", "fig{i}.pdf", "fig{i}.xyz", "fig{i}", LONG, "victim.txt",
                            "photos", "/proc/cda2-none/x.png", "", "linked_run"],
               "--json": ["res{i}.json", LONG, "victim.txt", "photos", "", "/proc/cda2-none/x"]},
        flags=["--unfused", "--force"], outputs={"--figure": "xor.png", "--json": None}),
    "reproduce": dict(
        positional=[["xor", "depth", "time", "whitebox", "transfer", "square", "bogus", ""]],
        base={}, base_flags=["--dry-run"],
        pools={"--budget": ["small", "cpu", "gpu", "paper", "x"], "--out": OUTPUTS,
               "--results": OUTPUTS, "--data": INPUTS, "--device": DEVICES,
               "--jobs": ["0", "1", "2", "64", "65", BIG, "abc"]},
        flags=["--force"], outputs={"--out": "runs/reproduce", "--results": None}),
    "compare": dict(
        positional=[["RUN"], ["RUN"], INPUTS, INPUTS + ["RUN RUN"]], base={"--out": "out{i}"},
        base_flags=[],
        pools={"--eval": ["RUN/eval", "RUN/eval/robustness.json", LONG, "victim.txt", "nonexistent",
                          "RUN/checkpoint.json", "bad.json", "deep.json", "loop", "photos", ""],
               "--out": OUTPUTS},
        flags=["--force"], outputs={"--out": "compare"}),
}
JUNK = ["--bogus", "-x", "--", "😀", "--epochs", "--out"]


def generate(command: str, rng: random.Random, i: int) -> List[str]:
    """One argument combination: the base, one to three options redrawn, sometimes junk."""
    spec = COMMANDS[command]
    options = dict(spec["base"])
    flags = list(spec["base_flags"])
    positional = [rng.choice(choices) for choices in spec["positional"][:1]]
    if len(spec["positional"]) > 1 and rng.random() < 0.3:  # a hostile positional
        positional = [rng.choice(spec["positional"][-1])]
    for _ in range(rng.randint(1, 3)):
        r = rng.random()
        if r < 0.75:
            flag = rng.choice(sorted(spec["pools"]))
            options[flag] = rng.choice(spec["pools"][flag])
        elif r < 0.95 and spec["flags"]:
            flags.append(rng.choice(spec["flags"]))
        else:
            flags.append(rng.choice(JUNK))
    argv = [command]
    for p in positional:
        argv += p.split(" ") if p == "RUN RUN" else [p]
    for flag, value in options.items():
        argv += [flag, *value.split(" ")]  # "RUN RUN", "0.01 0.02": several values
    argv += flags
    return [a.replace("{i}", str(i)) for a in argv]


def outputs_of(command: str, argv: Sequence[str]) -> List[str]:
    """The paths this combination may write: its output options' values (the last one given, as
    argparse takes it) or their defaults."""
    found = []
    for flag, default in COMMANDS[command]["outputs"].items():
        value = default
        for k, a in enumerate(argv[:-1]):
            if a == flag:
                value = argv[k + 1]
        if value is not None:
            found.append(value)
    return found


# ----- the sandbox ---------------------------------------------------------------------------------
def setup(sandbox: Path) -> None:
    """The finished run and what a user has around it (see the module docstring)."""
    from cda2_ext.cli import main

    os.chdir(sandbox)
    (sandbox / "home").mkdir(exist_ok=True)
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with quiet[0], quiet[1]:
        argv = ["train", "--no-progress"] + [x for kv in TINY_TRAIN.items() for x in kv]
        assert main([a.replace("out{i}", "RUN") for a in argv]) == 0
        assert main(["eval", "--checkpoint", "RUN", "--attack", "pgd", "--n-samples", "8", "--steps",
                     "1", "--restarts", "1", "--eps", "0.03", "--sanity-eps", "0", "--device",
                     "cpu", "--no-progress", "--out", "RUN/eval"]) == 0
    (sandbox / "victim.txt").write_text("precious\n")
    (sandbox / "victim2.txt").write_text("also precious\n")
    linked = sandbox / "linked_run"
    linked.mkdir()
    (linked / ".cda2.lock").symlink_to("../victim.txt")
    (linked / "metrics.json").symlink_to("../victim2.txt")
    (sandbox / "lock_dir" / ".cda2.lock").mkdir(parents=True)
    (sandbox / "ckpt_dir" / "checkpoint.safetensors").mkdir(parents=True)
    (sandbox / "photos").mkdir()
    (sandbox / "photos" / "cat.jpg").write_bytes(b"meow")
    (sandbox / "loop").symlink_to("loop2")
    (sandbox / "loop2").symlink_to("loop")
    (sandbox / "bad.json").write_text("[1, 2, 3]")
    (sandbox / "deep.json").write_text("[" * 100_000 + "]" * 100_000)


def snapshot(root: Path) -> Dict[str, tuple]:
    """Every path under ``root`` (but ``home``) -> what it is and, for files, size, mtime, inode."""
    seen: Dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        if Path(folder) == root and "home" in dirs:
            dirs.remove("home")
        for name in dirs + files:
            p = os.path.join(folder, name)
            st = os.lstat(p)
            if os.path.islink(p):
                seen[p] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                seen[p] = ("dir",)
            else:
                seen[p] = ("file", st.st_size, st.st_mtime_ns, st.st_ino)
    return seen


def _allowed(path: str, outputs: Sequence[str], kind: Optional[tuple]) -> bool:
    for out in outputs:
        if path == out or path.startswith(out.rstrip(os.sep) + os.sep):
            return True
        if kind is not None and kind[0] == "dir" and out.startswith(path + os.sep):
            return True  # a parent folder made for the output
    return False


def changed_outside(before: Dict[str, tuple], after: Dict[str, tuple], sandbox: Path,
                    outputs: Sequence[str]) -> List[str]:
    outs = [os.path.normpath(os.path.join(sandbox, o)) for o in outputs]
    bad = []
    for path in sorted(set(before) | set(after)):
        if before.get(path) != after.get(path) and not _allowed(path, outs, after.get(path)):
            bad.append(path)
    return bad


def run_one(argv: List[str]) -> Tuple[object, str, Optional[str]]:
    """``(exit status, stderr, traceback of an unexpected exception or None)``."""
    from cda2_ext.cli import main

    err = io.StringIO()
    exc = None
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc: object = main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException:  # noqa: BLE001 - exactly what the fuzz looks for
            rc, exc = None, traceback.format_exc()
    return rc, err.getvalue(), exc


def fuzz(command: str, n: int, seed: int, sandbox: Path) -> List[dict]:
    setup(sandbox)
    rng = random.Random(f"{command}:{seed}")
    records = []
    for i in range(n):
        argv = generate(command, rng, i)
        if "resume_run" in argv:  # a fresh copy of the finished run to resume or replace
            shutil.rmtree(sandbox / "resume_run", ignore_errors=True)
            shutil.copytree(sandbox / "RUN", sandbox / "resume_run")
        print(f"start {i} {json.dumps(argv)}", flush=True)
        outputs = outputs_of(command, argv)
        before = snapshot(sandbox)
        t0 = time.perf_counter()
        rc, err, exc = run_one(argv)
        seconds = time.perf_counter() - t0
        after = snapshot(sandbox)
        records.append({"i": i, "argv": argv, "rc": rc, "stderr": err[-4000:], "exception": exc,
                        "seconds": round(seconds, 2),
                        "changed_outside": changed_outside(before, after, sandbox, outputs)})
        for out in outputs:  # keep the sandbox small: this combination's fresh outputs go
            if f"{i}" in out and not out.startswith("/"):
                target = sandbox / out.split("/")[0]
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(
                    missing_ok=True)
    return records


if __name__ == "__main__":
    cmd, count, seed_, box, results = sys.argv[1:6]
    recs = fuzz(cmd, int(count), int(seed_), Path(box))
    Path(results).write_text(json.dumps(recs, indent=1))
