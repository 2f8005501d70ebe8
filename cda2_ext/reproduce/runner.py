"""How ``cda2 reproduce`` runs an experiment: each step is a ``cda2`` command, run in this process,
recorded verbatim, and skipped when its result is already in the output folder.

* A **train step** (``cda2 train ... --out-dir RUN``) is *reused* when ``RUN`` holds a finished
  checkpoint (its epoch equals its ``epochs``) of the same options, *resumed* (``--resume``) when it
  holds an interrupted one, and run when it holds none. A checkpoint of other options is an error
  naming them (``--force`` retrains). The trainer's own resume replays the exact batches and
  random starts, so a resumed run ends where an uninterrupted one would.
* An **output step** (an evaluation writing one file) is reused when its file exists, the command
  that wrote it (kept beside it as ``FILE.cmd.json``) is the same, and none of the runs it reads
  was trained or resumed in this invocation.

``force`` reruns every step from scratch.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import Cda2Error

__all__ = ["ReproduceError", "Step", "train_step", "output_step", "StepRunner", "command_line"]


class ReproduceError(Cda2Error, RuntimeError):
    """A step of ``cda2 reproduce`` failed or its output folder holds something else."""


def command_line(argv: Sequence[str]) -> str:
    """``argv`` as the shell command a user would type (``cda2 ...``, quoted where needed)."""
    return shlex.join(["cda2", *map(str, argv)])


@dataclass
class Step:
    """One ``cda2`` command of an experiment.

    Attributes:
        argv: the arguments after ``cda2`` (strings).
        kind: ``"train"`` (``out`` is the run folder) or ``"output"`` (``out`` is the file written).
        out: see ``kind``.
        reads: run folders an output step reads (a change to any of them reruns it).
    """

    argv: List[str]
    kind: str
    out: Path
    reads: List[Path] = field(default_factory=list)

    @property
    def command(self) -> str:
        return command_line(self.argv)


def train_step(argv: Sequence[str], out_dir: Path) -> Step:
    """A ``cda2 train`` step; ``argv`` must contain ``--out-dir out_dir``."""
    argv = [str(a) for a in argv]
    if argv[:1] != ["train"] or "--out-dir" not in argv or argv[argv.index("--out-dir") + 1] != str(out_dir):
        raise ValueError(f"train step: expected 'train ... --out-dir {out_dir}', got {argv}")
    return Step(argv, "train", Path(out_dir))


def output_step(argv: Sequence[str], out_file: Path, reads: Sequence[Path] = ()) -> Step:
    """A step whose result is the file ``out_file``, named in ``argv`` itself or through the
    output folder it is written into (``cda2 eval --out DIR`` writes ``DIR/robustness.json``)."""
    argv = [str(a) for a in argv]
    if str(out_file) not in argv and str(Path(out_file).parent) not in argv:
        raise ValueError(f"output step: {out_file} does not appear in {argv}")
    return Step(argv, "output", Path(out_file), [Path(r) for r in reads])


def _train_seconds(run: Path) -> Optional[float]:
    """The summed epoch times in ``run``'s metrics.json (``None`` when unreadable)."""
    try:
        history = json.loads((Path(run) / "metrics.json").read_text())
        return round(sum(float(m["seconds"]) for m in history), 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _default_cli(argv: List[str]) -> int:
    from ..cli import main  # the CLI imports this package: import it only when a step runs
    return main(argv)


class StepRunner:
    """Runs steps with reuse and resume (see the module docstring) and records what it did.

    Args:
        force: rerun every step from scratch.
        log: where one-line progress notes go (default: stderr).
        cli: ``argv -> exit status`` (default: the ``cda2`` command in this process); the
            commands' own stdout goes to stderr, so that stdout carries only the final table.
    """

    def __init__(self, force: bool = False, log: Optional[Callable[[str], None]] = None,
                 cli: Callable[[List[str]], int] = _default_cli) -> None:
        self.force = force
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.cli = cli
        self.changed: set = set()                   # run folders trained in this invocation
        self.records: List[Dict[str, Any]] = []     # {"command", "status", "seconds"} per step

    # ----- what is there ---------------------------------------------------------------------------
    @staticmethod
    def train_state(step: Step) -> str:
        """``"finished"``, ``"interrupted"`` or ``"new"``; :class:`ReproduceError` when the folder
        holds a checkpoint of other options than the step asks for."""
        from ..checkpoint import checkpoint_files, load_checkpoint
        from ..cli import build_parser
        from ..cli.train import _train_config
        from ..training.config import TrainConfig
        from ..training.trainer import RESUMABLE_CHANGES

        st = checkpoint_files(step.out)[0]
        if not st.is_file():
            return "new"
        _, meta = load_checkpoint(st)
        stored = TrainConfig.from_meta(meta, st)
        args = build_parser().parse_args(step.argv)
        wanted = _train_config(args)  # without --resume: exactly the step's options
        differ = sorted(k for k, v in wanted.to_dict().items()
                        if k not in RESUMABLE_CHANGES and stored.to_dict().get(k) != v)
        if differ:
            raise ReproduceError(f"{step.out} holds a run with other options ({', '.join(differ)}) "
                                 "than this experiment trains; pass --force to retrain it there, "
                                 "or choose another --out")
        epoch = meta.get("epoch")
        return "finished" if isinstance(epoch, int) and epoch >= wanted.epochs else "interrupted"

    def _sidecar(self, step: Step) -> Path:
        return step.out.with_name(step.out.name + ".cmd.json")

    def output_current(self, step: Step) -> bool:
        """The step's file exists, was written by the same command, from unchanged runs."""
        side = self._sidecar(step)
        if not (step.out.is_file() and side.is_file()):
            return False
        try:
            same = json.loads(side.read_text()).get("argv") == step.argv
        except (OSError, ValueError, AttributeError):
            return False
        return same and not any(Path(r) in self.changed for r in step.reads)

    # ----- running -----------------------------------------------------------------------------------
    def _call(self, argv: List[str]) -> None:
        self.log(f"$ {command_line(argv)}")
        with contextlib.redirect_stdout(sys.stderr):
            rc = self.cli(argv)
        if rc != 0:
            raise ReproduceError(f"step failed with exit status {rc}: {command_line(argv)}")

    def run_all(self, steps: Sequence[Step], jobs: int = 1) -> None:
        """Run ``steps`` in order; with ``jobs > 1`` the train steps first, up to ``jobs`` at a
        time as child processes (training runs never read each other, and one small model leaves
        a GPU or a multi-core CPU mostly idle), then the rest in this process."""
        done: set = set()
        if jobs > 1:
            done = self._train_concurrently([s for s in steps if s.kind == "train"], jobs)
        for step in steps:
            if step.out not in done:
                self.run(step)

    def _train_concurrently(self, steps: Sequence[Step], jobs: int) -> set:
        """Train ``steps`` (reusing, resuming or forcing each as :meth:`run` would), ``jobs`` child
        processes at a time, each with its share of the CPU threads and its output in
        ``RUN.log`` beside the run folder. Returns the run folders handled."""
        pending = []
        for step in steps:
            call = self._train_call(step)
            if call is None:
                self.run(step)  # records it as reused
            else:
                pending.append((step, *call))
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // jobs)))
        running: List[Tuple[Step, List[str], str, Any, float, Any]] = []
        failed: List[str] = []
        try:
            self._drain(pending, running, failed, jobs, env)
        finally:  # interrupted (Ctrl-C, an error here): no child left training on its own
            for _, _, _, proc, _, log_file in running:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait()
                log_file.close()
        if failed:
            raise ReproduceError(f"{len(failed)} of {len(steps)} training step(s) failed; the "
                                 f"first: {failed[0]}")
        return {s.out for s in steps}

    def _drain(self, pending: List[Tuple[Step, List[str], str]], running: List[Any],
               failed: List[str], jobs: int, env: Dict[str, str]) -> None:
        """Start pending runs while fewer than ``jobs`` run, until all have ended."""
        while pending or running:
            while pending and len(running) < jobs:
                step, argv, status = pending.pop(0)
                log_path = step.out.with_name(step.out.name + ".log")
                log_path.parent.mkdir(parents=True, exist_ok=True)
                self.log(f"$ {command_line(argv)}  # in the background, output in {log_path}")
                log_file = open(log_path, "w")
                proc = subprocess.Popen([sys.executable, "-m", "cda2_ext.cli", *argv], env=env,
                                        stdout=log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
                running.append((step, argv, status, proc, time.perf_counter(), log_file))
            time.sleep(0.2)
            for item in [r for r in running if r[3].poll() is not None]:
                running.remove(item)
                step, argv, status, proc, t0, log_file = item
                log_file.close()
                self.changed.add(step.out)
                if proc.returncode != 0:
                    failed.append(f"{command_line(argv)} (exit status {proc.returncode}; see "
                                  f"{log_file.name})")
                    continue
                self.records.append({"command": step.command, "status": status,
                                     "seconds": round(time.perf_counter() - t0, 1),
                                     "train_seconds": _train_seconds(step.out)})

    def _train_call(self, step: Step) -> Optional[Tuple[List[str], str]]:
        """The command that brings train ``step`` up to date and the status that gives it
        (``"ran"`` or ``"resumed"``), or ``None`` when its run is finished."""
        state = "new" if self.force else self.train_state(step)
        if state == "finished":
            return None
        extra = ["--resume"] if state == "interrupted" else (["--force"] if self.force else [])
        return step.argv + extra, "resumed" if state == "interrupted" else "ran"

    def run(self, step: Step) -> str:
        """Run (or reuse, or resume) ``step``; returns ``"reused"``, ``"resumed"`` or ``"ran"``."""
        t0 = time.perf_counter()
        if step.kind == "train":
            call = self._train_call(step)
            if call is None:
                status = "reused"
            else:
                argv, status = call
                self._call(argv)
                self.changed.add(step.out)
        elif step.kind == "output":
            if not self.force and self.output_current(step):
                status = "reused"
            else:
                for f in (step.out, self._sidecar(step)):  # this experiment's own earlier result
                    if f.is_file():
                        f.unlink()
                step.out.parent.mkdir(parents=True, exist_ok=True)
                self._call(step.argv)
                if not step.out.is_file():
                    raise ReproduceError(f"step wrote no {step.out}: {step.command}")
                self._sidecar(step).write_text(json.dumps({"argv": step.argv}, indent=1) + "\n")
                status = "ran"
        else:
            raise ValueError(f"step kind: expected 'train' or 'output', got {step.kind!r}")
        if status == "reused":
            self.log(f"reused {step.out} ({step.command})")
        record: Dict[str, Any] = {"command": step.command, "status": status,
                                  "seconds": round(time.perf_counter() - t0, 1)}
        if step.kind == "train":  # the epochs' own time, also for a run reused from earlier
            record["train_seconds"] = _train_seconds(step.out)
        self.records.append(record)
        return status
