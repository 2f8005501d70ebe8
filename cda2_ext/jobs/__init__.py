"""Jobs: what each ``cda2`` command does, as a typed request the library runs directly.

The command line is one adapter to these (``cda2_ext/cli/``: parse, build the job, run it);
``cda2 reproduce`` is another (it plans jobs, runs them in this process, and prints each as the
command that does the same by hand). A job's options are defined once, in its
``add_arguments`` (the CLI adds the same ones to its parser). Option names are checked when a job
is built, and a training's or an evaluation's whole configuration too: a misspelled option or an
impossible value fails when an experiment is planned, not an hour into running it.

* :class:`~cda2_ext.jobs.train.TrainJob` - ``cda2 train`` (a :class:`~cda2_ext.training.TrainConfig`
  and what to do with the run folder);
* :class:`~cda2_ext.jobs.evaluate.EvalJob` - ``cda2 eval`` (an
  :class:`~cda2_ext.evaluation.EvalConfig`, the checkpoints and the output folder);
* :class:`~cda2_ext.jobs.evaluate_clean.CleanEvalJob` - ``cda2 eval-clean``;
* :class:`~cda2_ext.jobs.xor.XorJob` - ``cda2 xor``.
"""
from __future__ import annotations

from .base import Job, command_line
from .evaluate import EvalJob
from .evaluate_clean import CleanEvalJob
from .train import TrainJob
from .xor import XorJob

__all__ = ["Job", "TrainJob", "EvalJob", "CleanEvalJob", "XorJob", "command_line"]
