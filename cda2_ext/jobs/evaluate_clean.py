"""``cda2 eval-clean`` as a job (the command: :mod:`cda2_ext.cli.eval_clean`)."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any, Dict

from .. import limits
from ..data import load_images
from ..errors import ConfigError
from ..evaluation.clean import evaluate_clean
from ..files.checkpoint import atomic_write
from ..files.run_folder import check_output, save_or_rescue
from ..models.collaboration import SCORES
from ..runtime import resolve_device
from ..training.restore import load_collaboration
from .base import Job

__all__ = ["CleanEvalJob"]


@dataclass(frozen=True)
class CleanEvalJob(Job):
    """``cda2 eval-clean`` as a typed request: its options by name (:meth:`Job.of`), run in this
    process by :meth:`run`."""

    command_name = "eval-clean"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        """The arguments of ``cda2 eval-clean``."""
        p.add_argument("checkpoint", help="run folder or checkpoint .safetensors/.json file")
        p.add_argument("--data", dest="data_dir", default=None,
                       help="CIFAR-10 folder, image folder or zip (default: the one the run was "
                       "trained on, else $CDA2_DATA, ./data, ~/.cache/cda2_ext/data)")
        p.add_argument("--split", default="test", choices=("test", "train"), help="which split")
        p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
        p.add_argument("--batch-size", type=int, default=500, help="evaluation batch size")
        p.add_argument("--score", default="ppd", choices=SCORES,
                       help="Algorithm 2's selection score: PPD (paper), soe: max-prob x sigmoid(PPD) (the "
                       "authors' code), or maxprob: the most confident sub-model (no PPD)")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
        p.add_argument("--unfused", action="store_true", help="use the plain-PyTorch reference ops")
        p.add_argument("--out", default=None, help="also write the JSON to this file (checked before "
                       "the evaluation starts; an existing file is kept unless --force)")
        p.add_argument("--force", action="store_true", help="overwrite an existing --out file")

    def run(self) -> int:
        """``cda2 eval-clean``: clean accuracies of a checkpoint, printed (and written) as JSON."""
        args = self.namespace()
        for flag, v in (("limit", args.limit), ("batch-size", args.batch_size)):
            if v is not None and v < 1:
                raise ConfigError(f"{flag}: must be >= 1, got {v}")
            limits.count(flag, v, 1, limits.ITEMS, optional=True)
        out_path = check_output(args.out, option="--out", force=args.force) if args.out else None
        device = resolve_device(args.device)
        model, meta = load_collaboration(args.checkpoint, device, fused=not args.unfused)
        cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
        dataset = cfg.get("dataset", "cifar10")
        data = load_images(dataset, args.split, args.data_dir or cfg.get("data_dir"), cfg.get("seed", 0))
        data = data.subset(args.limit)
        t0 = time.perf_counter()
        res = evaluate_clean(model, data.images, data.labels, args.batch_size, args.score, device)
        out: Dict[str, Any] = {"checkpoint": str(args.checkpoint), "epoch": meta.get("epoch"),
                               "dataset": dataset, "split": args.split, **res,
                               "seconds": round(time.perf_counter() - t0, 2)}
        text = json.dumps(out, indent=2)
        print(text, flush=True)  # first: the results are on stdout even if the file cannot be written
        if out_path is not None:
            save_or_rescue(lambda: atomic_write(out_path, (text + "\n").encode()), text, option="--out")
        return 0
