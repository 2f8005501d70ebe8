"""``cda2 eval-clean`` as a job (the command: :mod:`cda2_ext.cli.eval_clean`)."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any, Dict

import torch

from .. import limits
from ..data import dataset_name, load_images
from ..errors import ConfigError
from ..evaluation.clean import clean_summary, collect_outputs
from ..evaluation.rules import rule_report, rule_table
from ..storage.checkpoint import atomic_write
from ..storage.run_folder import check_output, save_or_rescue
from ..models.architectures import named_architectures
from ..models.selection import SCORES, score_help
from ..runtime import eval_mode, resolve_device
from ..training.restore import load_collaboration
from .base import Job, add_model_arguments
from .evaluate import check_fit

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
                       help=score_help())
        p.add_argument("--rules", default=None, choices=("all",),
                       help="all: also score the run by every label-free rule (PPD, the authors' "
                       "detector, max-prob, margin, entropy, ensemble, vote), each sub-model, the "
                       "best sub-model, the oracle and a fitted selector, on half of the images "
                       "with paired standard errors; prints that table instead of the JSON, which "
                       "--out still receives (docs/evaluation.md)")
        add_model_arguments(p, "the constructor of a run of your own architecture")
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
        with named_architectures(*args.arch):  # the user's constructors: only those named here
            model, meta = load_collaboration(args.checkpoint, device, fused=not args.unfused)
        cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
        dataset = cfg.get("dataset", "cifar10")
        data = load_images(dataset, args.split, args.data_dir or cfg.get("data_dir"), cfg.get("seed", 0))
        check_fit({"checkpoint": model}, data.images.shape[-2:], len(data.classes), data.source)
        data = data.subset(args.limit)
        t0 = time.perf_counter()
        with torch.no_grad(), eval_mode(model):  # one pass: the plain numbers and the rules
            logits, ppd = collect_outputs(model, data.images, args.batch_size, device)
        res = clean_summary(logits, ppd, data.labels, args.score, model.backend)
        out: Dict[str, Any] = {"checkpoint": str(args.checkpoint), "epoch": meta.get("epoch"),
                               "dataset": dataset, "split": args.split,
                               "data": {"name": dataset_name(dataset, data.source),
                                        "num_classes": len(data.classes), "source": data.source},
                               **res}
        if args.rules:
            out["rules"] = rule_report(logits, ppd, data.labels, own=args.score)
        out["seconds"] = round(time.perf_counter() - t0, 2)
        text = json.dumps(out, indent=2)
        # first: the results are on stdout even if the file cannot be written
        print(rule_table(out["rules"], f"{args.checkpoint} (epoch {meta.get('epoch')}), "
                         f"{args.split} images of {out['data']['name']} "
                         f"({out['data']['num_classes']} classes)") if args.rules else text,
              flush=True)
        if out_path is not None:
            save_or_rescue(lambda: atomic_write(out_path, (text + "\n").encode()), text, option="--out")
        return 0
