"""The ``cda2`` command.

Subcommands (``cda2 COMMAND --help`` for each):

* ``cda2 xor`` - the XOR experiment of Section 4.2 (Figure 4), seconds on a CPU.
* ``cda2 train`` - Algorithm 1 on CIFAR-10 (or a synthetic set), with checkpoints and ``--resume``.
* ``cda2 eval-clean`` (alias ``cda2 predict``) - clean accuracy of a checkpoint's collaboration,
  ensemble and sub-models, and how often each sub-model is chosen, as JSON.
* ``cda2 eval`` - robustness under white-box, adaptive, transfer and query attacks
  (:mod:`cda2_ext.evaluation`): the paper's tables, CSV/JSON and a plot.

Each subcommand is a ``register(subparsers)`` function that adds its parser and sets
``func``; a new subcommand (e.g. ``cda2 eval`` in its own module) only needs its own
``register`` appended to :data:`COMMANDS`. Expected failures (bad options, missing data or
checkpoints) exit with status 2 and one ``cda2: error: ...`` line, no traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = ["main", "build_parser", "COMMANDS", "CLIError"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _expected_errors() -> tuple:
    from .data import DataError
    from .training.checkpoint import CheckpointError
    from .training.config import ConfigError
    return (CLIError, ConfigError, DataError, CheckpointError)


def _write_json(obj: Any, path: Optional[str]) -> None:
    text = json.dumps(obj, indent=2)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(text)


# ----- cda2 xor ---------------------------------------------------------------------------------
def register_xor(sub: argparse._SubParsersAction) -> None:
    from .xor import XorConfig
    d = XorConfig()
    p = sub.add_parser("xor", help="XOR experiment (Sec. 4.2, Fig. 4): ensemble vs collaboration",
                       description="Train two linear sub-models on the 4-Gaussian XOR problem as an "
                       "ensemble (averaged predictions) and as a collaboration (soft-min surrogate + PPD "
                       "heads, Algorithm 2 at inference); print both test accuracies and draw Figure 4.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (data and initialisation)")
    p.add_argument("--n-train", type=int, default=d.n_train, help="training points")
    p.add_argument("--n-test", type=int, default=d.n_test, help="test points")
    p.add_argument("--steps", type=int, default=d.steps, help="full-batch Adam steps")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--sigma", type=float, default=d.sigma, help="soft-min temperature of Eq. 7")
    p.add_argument("--figure", default="xor.png", help="PNG to write ('' for none)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--unfused", action="store_true", help="use the plain-PyTorch reference ops")
    p.set_defaults(func=run_xor_cmd)


def run_xor_cmd(args: argparse.Namespace) -> int:
    from .xor import XorConfig, run_xor
    if not args.sigma > 0:
        raise CLIError(f"sigma: the soft-min temperature must be > 0, got {args.sigma}")
    if args.n_train < 4 or args.n_test < 4 or args.steps < 0:
        raise CLIError("n-train and n-test must be >= 4 and steps >= 0")
    cfg = XorConfig(n_train=args.n_train, n_test=args.n_test, steps=args.steps, lr=args.lr,
                    sigma=args.sigma, seed=args.seed, unfused=args.unfused)
    res = run_xor(cfg, figure=args.figure or None, json_path=args.json)
    print(f"XOR test accuracy: collaboration {100 * res.collaboration_acc:.1f}%  "
          f"ensemble {100 * res.ensemble_acc:.1f}%  "
          f"(sub-models {', '.join(f'{100 * a:.1f}%' for a in res.submodel_acc)}; "
          f"assigned {', '.join(f'{100 * a:.0f}%' for a in res.assignment)})  [{res.seconds:.1f}s]")
    if args.figure:
        print(f"figure: {args.figure}")
    return 0


# ----- cda2 train -------------------------------------------------------------------------------
_TRAIN_OPTIONS = [
    # (flag, field, type, help)
    ("--num-models", "num_models", int, "number of sub-models M"),
    ("--depth", "depth", int, "ResNet depth: 2 (Table 6) or 6n+2 (8, 14, 20, ...)"),
    ("--ppd-input", "ppd_input", str, "PPD head input (detached): features | logits"),
    ("--phases", "phases", str, "adversarial (paper's implementation) | natural | both | standard"),
    ("--sigma", "sigma", float, "soft-min temperature of the surrogate (Eq. 7), > 0"),
    ("--bce-weight", "bce_weight", float, "weight of the PPD-head BCE"),
    ("--select-score", "select_score", str, "sub-model selection in the adversarial phase: ppd | soe"),
    ("--eps", "eps", float, "L-inf radius of the training PGD (images in [0, 1])"),
    ("--alpha", "alpha", float, "PGD step size"),
    ("--steps", "steps", int, "PGD steps"),
    ("--epochs", "epochs", int, "training epochs"),
    ("--batch-size", "batch_size", int, "batch size"),
    ("--lr", "lr", float, "SGD learning rate"),
    ("--momentum", "momentum", float, "SGD momentum"),
    ("--weight-decay", "weight_decay", float, "SGD weight decay"),
    ("--schedule", "schedule", str, "multistep (x gamma at 50%%/75%% of epochs) | cosine | constant"),
    ("--gamma", "gamma", float, "multistep decay factor"),
    ("--dataset", "dataset", str, "cifar10 | synthetic"),
    ("--data", "data_dir", str, "CIFAR-10 folder (default: $CDA2_DATA, then ../shared/data)"),
    ("--train-limit", "train_limit", int, "use only the first N training images"),
    ("--test-limit", "test_limit", int, "evaluate on the first N test images"),
    ("--out-dir", "out_dir", str, "run folder: checkpoint.safetensors/.json, metrics.json"),
    ("--seed", "seed", int, "random seed"),
    ("--device", "device", str, "auto | cpu | cuda[:N]"),
    ("--eval-every", "eval_every", int, "clean test accuracy every N epochs (0: never)"),
]


def register_train(sub: argparse._SubParsersAction) -> None:
    from .training.config import TrainConfig
    d = TrainConfig()
    p = sub.add_parser("train", help="train a CDA² collaboration (Algorithm 1)",
                       description="Train M dual-head sub-models with Algorithm 1. Defaults follow the "
                       "paper (M=3, ResNet-20, eps=0.03, 100 epochs, adversarial phase only) and, where "
                       "it is silent, the authors' Synergy-of-Experts code (SGD 0.1/0.9/1e-4, batch 128, "
                       "x0.1 at 50%/75%, PGD step 0.01, sigma 1). Writes a checkpoint after every epoch.")
    for flag, name, typ, help_ in _TRAIN_OPTIONS:
        p.add_argument(flag, dest=name, type=typ, default=argparse.SUPPRESS,
                       help=f"{help_} (default: {getattr(d, name)})")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=argparse.SUPPRESS,
                   help="no random crop / flip")
    p.add_argument("--no-random-start", dest="random_start", action="store_false",
                   default=argparse.SUPPRESS, help="PGD starts at the clean image")
    p.add_argument("--unfused", dest="unfused", action="store_true", default=argparse.SUPPRESS,
                   help="use the plain-PyTorch reference ops instead of the fused ones")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="no progress bars")
    p.add_argument("--resume", action="store_true",
                   help="continue from --out-dir's checkpoint (its options, plus any given here "
                   "that do not change the trajectory, e.g. --epochs)")
    p.add_argument("--download", action="store_true",
                   help="download CIFAR-10 into --data (or ./data) first if missing (MD5-checked)")
    p.set_defaults(func=run_train_cmd)


def _train_config(args: argparse.Namespace):
    from .training.checkpoint import checkpoint_files, load_checkpoint
    from .training.config import TrainConfig
    from .training.trainer import RESUMABLE_CHANGES

    given = {name: getattr(args, name) for _, name, _, _ in _TRAIN_OPTIONS if hasattr(args, name)}
    given.update({k: getattr(args, k) for k in ("augment", "random_start", "unfused", "progress")
                  if hasattr(args, k)})
    out_dir = given.get("out_dir", TrainConfig.out_dir)
    has_ckpt = checkpoint_files(out_dir)[0].is_file()
    if args.resume and has_ckpt:
        stored = TrainConfig.from_dict(load_checkpoint(out_dir)[1]["config"])
        bad = sorted(k for k, v in given.items() if k not in RESUMABLE_CHANGES and getattr(stored, k) != v)
        if bad:
            raise CLIError(f"--resume: cannot change {', '.join(bad)} of the run in {out_dir}")
        return stored.replace(**given).validate()
    if has_ckpt and not args.resume:
        raise CLIError(f"{out_dir} already holds a checkpoint; pass --resume to continue it "
                       "or choose another --out-dir")
    return TrainConfig(**given).validate()


def run_train_cmd(args: argparse.Namespace) -> int:
    from .data import download_cifar10
    from .training.trainer import Trainer

    cfg = _train_config(args)
    if args.download and cfg.dataset == "cifar10":
        folder = download_cifar10(cfg.data_dir or "data")
        cfg = cfg.replace(data_dir=str(folder))
    t0 = time.perf_counter()
    trainer = Trainer.resume_or_start(cfg) if args.resume else Trainer(cfg)
    history = trainer.fit()
    final = history[-1] if history else {}
    print(json.dumps({"out_dir": cfg.out_dir, "epochs": trainer.epoch,
                      "seconds": round(time.perf_counter() - t0, 2),
                      "final": {k: final.get(k) for k in ("loss", "clean_acc", "adv_acc", "assign_hist",
                                                          "select_hist", "test")}}, indent=2))
    return 0


# ----- cda2 eval-clean / predict ----------------------------------------------------------------
def register_eval_clean(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-clean", aliases=["predict"],
                       help="clean accuracy of a trained collaboration, ensemble and sub-models",
                       description="Evaluate a checkpoint on clean test images: accuracy of the "
                       "collaboration (Algorithm 2), the ensemble (mean probability and majority vote) "
                       "and each sub-model, plus how often each sub-model is chosen. Prints JSON.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="run folder or checkpoint .safetensors/.json file")
    p.add_argument("--data", dest="data_dir", default=None,
                   help="CIFAR-10 folder (default: the one the run was trained on, then $CDA2_DATA)")
    p.add_argument("--split", default="test", choices=("test", "train"), help="which split")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--batch-size", type=int, default=500, help="evaluation batch size")
    p.add_argument("--score", default="ppd", choices=("ppd", "soe"),
                   help="Algorithm 2's selection score: PPD (paper) or max-prob x sigmoid(PPD) (SoE)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--unfused", action="store_true", help="use the plain-PyTorch reference ops")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.set_defaults(func=run_eval_clean_cmd)


def run_eval_clean_cmd(args: argparse.Namespace) -> int:
    from .data import load_images
    from .training.checkpoint import load_collaboration
    from .training.evaluate import evaluate_clean
    from .training.trainer import resolve_device

    if args.limit is not None and args.limit < 1:
        raise CLIError(f"limit: must be >= 1, got {args.limit}")
    device = resolve_device(args.device)
    model, meta = load_collaboration(args.checkpoint, device)
    model.unfused = args.unfused
    cfg = meta.get("config", {})
    dataset = cfg.get("dataset", "cifar10")
    data = load_images(dataset, args.split, args.data_dir or cfg.get("data_dir"), cfg.get("seed", 0))
    data = data.subset(args.limit)
    t0 = time.perf_counter()
    res = evaluate_clean(model, data.images, data.labels, args.batch_size, args.score, device)
    out: Dict[str, Any] = {"checkpoint": str(args.checkpoint), "epoch": meta.get("epoch"),
                           "dataset": dataset, "split": args.split, **res,
                           "seconds": round(time.perf_counter() - t0, 2)}
    _write_json(out, args.out)
    return 0


# ----- entry point ------------------------------------------------------------------------------
def register_eval(sub: argparse._SubParsersAction) -> None:
    """``cda2 eval``: robustness under attacks (lives in :mod:`cda2_ext.evaluation.cli_eval`)."""
    from .evaluation.cli_eval import register_eval as register
    register(sub)


COMMANDS: List[Callable[[argparse._SubParsersAction], None]] = [
    register_xor, register_train, register_eval_clean, register_eval,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``cda2`` parser with every registered subcommand."""
    from . import __version__
    p = argparse.ArgumentParser(prog="cda2", description="CDA²: Collaborate to Defend against "
                                "Adversarial Attacks - train and use collaborations of dual-head models.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``cda2`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _expected_errors() as err:
        print(f"cda2: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cda2: interrupted (the last completed epoch's checkpoint is kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
