"""How ``cda2 reproduce`` runs an experiment: each step is a job (:mod:`cda2_ext.jobs`: what one
``cda2`` command does, typed), run in this process, recorded as the command that does the same by
hand, and skipped when its result is already in the output folder.

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
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import Cda2Error, CheckpointError, os_reason
from ..storage.checkpoint import checkpoint_files, load_checkpoint
from ..storage.run_folder import training_time
from ..jobs.base import Job, command_line
from ..jobs.train import TrainJob
from ..training.config import TrainConfig

__all__ = ["ReproduceError", "Step", "train_step", "output_step", "StepRunner", "command_line"]


class ReproduceError(Cda2Error, RuntimeError):
    """A step of ``cda2 reproduce`` failed or its output folder holds something else."""


@dataclass
class Step:
    """One job of an experiment.

    Attributes:
        job: what to run (a :class:`~cda2_ext.jobs.train.TrainJob` for a train step).
        kind: ``"train"`` (``out`` is the run folder) or ``"output"`` (``out`` is the file written).
        out: see ``kind``.
        reads: run folders an output step reads (a change to any of them reruns it).
    """

    job: Job
    kind: str
    out: Path
    reads: List[Path] = field(default_factory=list)

    @property
    def argv(self) -> List[str]:
        """The arguments after ``cda2`` that run this step by hand."""
        return self.job.argv()

    @property
    def command(self) -> str:
        return self.job.command


def train_step(job: TrainJob) -> Step:
    """A training step: ``job``'s run folder is the step's result."""
    if not isinstance(job, TrainJob) or "out_dir" not in job.given:
        raise ValueError(f"train step: expected a TrainJob with an out_dir, got {job!r}")
    return Step(job, "train", Path(job.out_dir))


def output_step(job: Job, out_file: Path, reads: Sequence[Path] = ()) -> Step:
    """A step whose result is the file ``out_file``, named in the job's options itself or through
    the output folder it is written into (``cda2 eval --out DIR`` writes ``DIR/robustness.json``)."""
    argv = job.argv()
    if str(out_file) not in argv and str(Path(out_file).parent) not in argv:
        raise ValueError(f"output step: {out_file} does not appear in {argv}")
    return Step(job, "output", Path(out_file), [Path(r) for r in reads])


def _train_cost(run: Path) -> Dict[str, Optional[float]]:
    """``{"train_seconds", "cpu_share"}`` of ``run``: its summed epoch times and the mean share
    of its cores it got (``None`` where unreadable or not recorded: a low share says the machine
    was shared, the usual cause of slow CPU epochs)."""
    try:
        cost = training_time(run)
    except CheckpointError:
        return {"train_seconds": None, "cpu_share": None}
    share = cost.cpu_share
    return {"train_seconds": round(cost.seconds, 1),
            "cpu_share": None if share is None else round(share, 2)}


def _run_job(job: Job) -> int:
    return job.run()


class StepRunner:
    """Runs steps with reuse and resume (see the module docstring) and records what it did.

    Args:
        force: rerun every step from scratch.
        log: where one-line progress notes go (default: stderr).
        execute: ``job -> exit status`` (default: :meth:`Job.run` in this process); the jobs'
            own stdout goes to stderr, so that stdout carries only the final table.
    """

    def __init__(self, force: bool = False, log: Optional[Callable[[str], None]] = None,
                 execute: Callable[[Job], int] = _run_job) -> None:
        self.force = force
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.execute = execute
        self.changed: set = set()                   # run folders trained in this invocation
        self.records: List[Dict[str, Any]] = []     # {"command", "status", "seconds"} per step

    # ----- what is there ---------------------------------------------------------------------------
    @staticmethod
    def train_state(step: Step) -> str:
        """``"finished"``, ``"interrupted"`` or ``"new"``; :class:`ReproduceError` when the folder
        holds a checkpoint of other options than the step asks for."""
        st = checkpoint_files(step.out)[0]
        if not st.is_file():
            return "new"
        _, meta = load_checkpoint(st)
        stored = TrainConfig.from_meta(meta, st)
        wanted = step.job.config()  # without --resume: exactly the step's options
        differ = stored.resume_conflicts(wanted)
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
    def _call(self, job: Job) -> None:
        self.log(f"$ {job.command}")
        try:
            with contextlib.redirect_stdout(sys.stderr):
                rc = self.execute(job)
        except (Cda2Error, OSError) as err:  # what the command would print as its one error line
            reason = os_reason(err) if isinstance(err, OSError) else str(err)
            raise ReproduceError(f"step failed ({reason}): {job.command}") from None
        if rc != 0:
            raise ReproduceError(f"step failed with exit status {rc}: {job.command}")

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

    def _drain(self, pending: List[Tuple[Step, TrainJob, str]], running: List[Any],
               failed: List[str], jobs: int, env: Dict[str, str]) -> None:
        """Start pending runs while fewer than ``jobs`` run, until all have ended."""
        while pending or running:
            while pending and len(running) < jobs:
                step, job, status = pending.pop(0)
                log_path = step.out.with_name(step.out.name + ".log")
                log_path.parent.mkdir(parents=True, exist_ok=True)
                self.log(f"$ {job.command}  # in the background, output in {log_path}")
                log_file = open(log_path, "w")
                # the printed command itself, in a child: what a user would run by hand
                proc = subprocess.Popen([sys.executable, "-m", "cda2_ext.cli", *job.argv()], env=env,
                                        stdout=log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
                running.append((step, job, status, proc, time.perf_counter(), log_file))
            time.sleep(0.2)
            for item in [r for r in running if r[3].poll() is not None]:
                running.remove(item)
                step, job, status, proc, t0, log_file = item
                log_file.close()
                self.changed.add(step.out)
                if proc.returncode != 0:
                    failed.append(f"{job.command} (exit status {proc.returncode}; see "
                                  f"{log_file.name})")
                    continue
                self.records.append({"command": step.command, "status": status,
                                     "seconds": round(time.perf_counter() - t0, 1),
                                     **_train_cost(step.out)})

    def _train_call(self, step: Step) -> Optional[Tuple[TrainJob, str]]:
        """The job that brings train ``step`` up to date and the status that gives it
        (``"ran"`` or ``"resumed"``), or ``None`` when its run is finished."""
        state = "new" if self.force else self.train_state(step)
        if state == "finished":
            return None
        job = step.job
        if state == "interrupted":
            return job.with_options(resume=True), "resumed"
        return (job.with_options(force=True) if self.force else job), "ran"

    def run(self, step: Step) -> str:
        """Run (or reuse, or resume) ``step``; returns ``"reused"``, ``"resumed"`` or ``"ran"``."""
        t0 = time.perf_counter()
        if step.kind == "train":
            call = self._train_call(step)
            if call is None:
                status = "reused"
            else:
                job, status = call
                self._call(job)
                self.changed.add(step.out)
        elif step.kind == "output":
            if not self.force and self.output_current(step):
                status = "reused"
            else:
                for f in (step.out, self._sidecar(step)):  # this experiment's own earlier result
                    if f.is_file():
                        f.unlink()
                step.out.parent.mkdir(parents=True, exist_ok=True)
                self._call(step.job)
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
            record.update(_train_cost(step.out))
        self.records.append(record)
        return status
