"""CDA² against the ensemble defenses (issue 12) at a CPU budget: one command sequence.

Trains, on the shared CIFAR-10 subset, a standard ensemble (DVERGE's starting point), a hold-out
ensemble of another seed (the transfer surrogate), and the five compared methods - CDA², the
PGD-trained ensemble, ADP+adv, GAL+adv (the paper trains its baselines adversarially, Sec. 4.3/4.4)
and DVERGE (from the ensemble) - then evaluates them all in one ``cda2 eval`` (same test subset
and seeds) and tabulates them with ``cda2 compare``. Every step is a ``cda2`` command, run
in-process and timed; the commands, wall times and the table go to
``benchmarks/results/baselines_cpu.{json,md}`` (the md's commentary is written by hand).

Ensemble runs are evaluated as ensembles (mean probability): until ``cda2 eval`` does this by
itself (a change proposed to ``cli/eval_robustness.py``: wrap a non-CDA² checkpoint in
``EnsembleLogits``), this script applies exactly that change to the ``cda2 eval`` it runs.

    OMP_NUM_THREADS=1 python benchmarks/baselines_cpu.py --out /tmp/baselines_cpu
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from cda2_ext.cli import main as cda2

ROOT = Path(__file__).resolve().parents[1]


def _tee(argv: List[str]) -> str:
    """Run ``cda2 argv`` in this process; return (and echo) what it printed."""
    buf = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s: str) -> int:
            buf.write(s)
            return sys.__stdout__.write(s)

    with contextlib.redirect_stdout(Tee()):
        rc = cda2(argv)
    if rc != 0:
        raise SystemExit(f"cda2 {' '.join(argv)} failed with status {rc}")
    return buf.getvalue()


def _evaluate_ensembles_as_ensembles(methods: Dict[str, str]) -> None:
    """Make the ``cda2 eval`` run here attack a non-CDA² checkpoint's ensemble output (mean
    probability, :class:`EnsembleLogits`) instead of Algorithm 2's selection (its PPD heads were
    never trained), and record which in ``config.targets``."""
    import cda2_ext.jobs.evaluate as er
    from cda2_ext.attacks.whitebox import EnsembleLogits

    original = er.evaluate_robustness

    def evaluate(models, *args, **kwargs):
        ens = {n for n in models if methods.get(n, "cda2") != "cda2"}
        report = original({n: EnsembleLogits(m) if n in ens else m for n, m in models.items()},
                          *args, **kwargs)
        report.config["targets"] = {n: "ensemble" if n in ens else "collaboration" for n in models}
        return report

    er.evaluate_robustness = evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/baselines_cpu", help="folder for the runs")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar-10-batches-py"))
    p.add_argument("--train-limit", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="training PGD steps (adversarial methods)")
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--num-models", type=int, default=3)
    p.add_argument("--n-samples", type=int, default=100)
    p.add_argument("--results", default=str(ROOT / "benchmarks/results/baselines_cpu.json"))
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    R = Path(args.out)
    common = ["--dataset", "cifar10", "--data", args.data, "--depth", str(args.depth),
              "--num-models", str(args.num_models), "--train-limit", str(args.train_limit),
              "--test-limit", "1000", "--epochs", str(args.epochs), "--no-progress",
              "--device", "cpu"]
    adv = ["--steps", str(args.steps)]
    train = {   # run folder -> the method's options (everything else: the method's defaults)
        "ensemble": ["--method", "ensemble"],
        "surrogate": ["--method", "ensemble", "--seed", "1"],
        "ensemble-adv": ["--method", "ensemble", "--adv", *adv],
        "adp-adv": ["--method", "adp", "--adv", *adv],
        "gal-adv": ["--method", "gal", "--adv", *adv],
        "dverge": ["--method", "dverge", "--init-from", str(R / "ensemble")],
        "cda2": ["--method", "cda2", *adv],
    }
    compared = ["cda2", "ensemble-adv", "adp-adv", "gal-adv", "dverge", "ensemble"]
    steps: List[Dict[str, object]] = []

    def timed(name: str, argv: List[str]) -> str:
        t0 = time.perf_counter()
        out = _tee(argv)
        steps.append({"step": name, "command": "cda2 " + " ".join(argv),
                      "wall_s": round(time.perf_counter() - t0, 1)})
        return out

    for run, opts in train.items():
        timed(f"train {run}", ["train", *opts, *common, "--out-dir", str(R / run), "--force"])
    methods = {run: train[run][1] for run in train}
    _evaluate_ensembles_as_ensembles(methods)
    timed("eval", ["eval", "--checkpoint", *[str(R / r) for r in compared],
                   "--surrogate", str(R / "surrogate"), "--n-samples", str(args.n_samples),
                   "--eps", "0.01", "0.03", "--steps", "5", "--restarts", "1",
                   "--apgd-steps", "5", "--transfer-steps", "5", "--queries", "200",
                   "--no-progress", "--out", str(R / "eval"), "--force"])
    table = timed("compare", ["compare", *[str(R / r) for r in compared], "--eval", str(R / "eval"),
                              "--out", str(R / "compare"), "--force"])
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "budget": {k: getattr(args, k) for k in ("train_limit", "epochs", "steps", "depth",
                                                 "num_models", "n_samples")},
        "steps": steps,
        "table": table.split("\nwrote ")[0].rstrip(),
        "compare": json.loads((R / "compare" / "compare.json").read_text()),
        "eval_checks": json.loads((R / "eval" / "robustness.json").read_text())["checks"],
        "eval_seconds": json.loads((R / "eval" / "robustness.json").read_text())["details"]["seconds"],
    }
    Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
