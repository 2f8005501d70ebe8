"""``cda2 train`` as a job: :class:`TrainJob`, a training run's options as
:class:`~cda2_ext.training.config.TrainConfig` fields, run by the trainer in this process."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..data import dataset_name, ensure_cifar10, infer_dataset
from ..errors import ConfigError, LostPeerError
from ..storage.checkpoint import checkpoint_files, load_checkpoint
from ..storage.run_folder import check_run_folder
from ..models.architectures import ARCHITECTURES, import_constructor, is_import_path
from ..models.selection import score_help
from ..runtime import resolve_device
from ..training.config import AMP, NONFINITE, OPTIMIZERS, TrainConfig
from ..training.distributed import DistContext, from_environment
from ..training.methods import METHODS
from ..training.trainer import Trainer
from ..training.weighting import param_help, weighting_params, weights_help
from .base import Job

__all__ = ["TrainJob", "TRAIN_OPTIONS", "train_options", "resolve_download"]

#: The options that are not :class:`TrainConfig` fields: what the command does with the folder
#: and the data, not what it trains.
_ACTIONS = ("resume", "force", "download")

# ----- options ----------------------------------------------------------------------------------
#: One option: (flag, TrainConfig field, type, help).
Option = Tuple[str, str, type, str]

TRAIN_OPTIONS: List[Option] = [
    ("--method", "method", str, f"what to train: {' | '.join(METHODS)}"),
    ("--num-models", "num_models", int, "number of sub-models M"),
    ("--depth", "depth", int, "ResNet depth: 2 (Table 6) or 6n+2 (8, 14, 20, ...)"),
    ("--arch", "arch", str, "sub-model architecture: " + " | ".join(
        f"{n} ({a.summary})" for n, a in ARCHITECTURES.items() if a.input_dims == 3) + " | "
     "package.module:function, your own constructor of one sub-model's trunk (an nn.Module "
     "mapping images to a feature vector; its folder on PYTHONPATH); a run records the path, and "
     "resuming or evaluating it needs the same --arch again"),
    ("--ppd-input", "ppd_input", str, "PPD head input (detached): features | logits"),
    ("--phases", "phases", str, "adversarial (paper's implementation) | natural | both | standard"),
    # (here train_options() puts --weights and the weightings' parameters: training/weighting.py)
    ("--temp-true", "temp_true", float, "temperature of p_y, the PPD BCE's target"),
    ("--bce-weight", "bce_weight", float, "weight of the PPD-head BCE"),
    ("--select-score", "select_score", str,
     score_help("the sub-model the adversarial phase attacks and trains as selected")),
    ("--eps", "eps", float, "L-inf radius of the training PGD (images in [0, 1])"),
    ("--alpha", "alpha", float, "PGD step size"),
    ("--steps", "steps", int, "PGD steps"),
    # ----- choices the paper leaves open (paper default | authors' code) -----
    ("--clean-weight", "clean_weight", float, "weight of soft-min + BCE on the clean batch added "
     "to every update (paper: 0; the authors' code: 1)"),
    ("--ppd-grad", "ppd_grad", str, "what the PPD BCE trains: head (paper, Alg. 1) | trunk (also "
     "the shared layers, as in the authors' code)"),
    ("--ppd-loss", "ppd_loss", str, "BCE of sigmoid(s) vs p_y (paper) | soe: of max-prob x "
     "sigmoid(s), the authors' code; pair with --select-score soe"),
    ("--pgd-bn", "pgd_bn", str, "BatchNorm during the training PGD: eval (here) | train (authors' "
     "code; the attack's batches then also move the running statistics)"),
    ("--epochs", "epochs", int, "training epochs"),
    ("--batch-size", "batch_size", int, "batch size"),
    ("--optimizer", "optimizer", str, f"{' | '.join(OPTIMIZERS)}"),
    ("--lr", "lr", float, "learning rate"),
    ("--momentum", "momentum", float, "SGD momentum"),
    ("--weight-decay", "weight_decay", float, "weight decay"),
    ("--schedule", "schedule", str, "multistep (x gamma at 50%%/75%% of epochs) | cosine | constant"),
    ("--gamma", "gamma", float, "multistep decay factor"),
    ("--dataset", "dataset", str, "cifar10 | imagefolder (an image folder or zip of any number of "
     "classes and any image size) | synthetic; unset: imagefolder when --data is an image folder "
     "or zip whose number of classes is not 10, else cifar10"),
    ("--data", "data_dir", str, "a cifar-10-batches-py folder (or the folder holding it), an "
     "image folder (train/<class>/, test/<class>/) or a zip of one, e.g. cifar-10-jpeg.zip "
     "(decoded once into ~/.cache/cda2_ext; unset: $CDA2_DATA, else ./data if it exists, then "
     "~/.cache/cda2_ext/data)"),
    ("--train-limit", "train_limit", int, "use only the first N training images"),
    ("--test-limit", "test_limit", int, "evaluate on the first N test images"),
    ("--out-dir", "out_dir", str, "run folder (new, empty, or an earlier run's): "
     "checkpoint.safetensors/.json, metrics.json"),
    ("--seed", "seed", int, "random seed"),
    ("--device", "device", str, "auto | cpu | cuda[:N]"),
    ("--eval-every", "eval_every", int, "clean test accuracy every N epochs (0: never)"),
    ("--on-nonfinite", "on_nonfinite", str, f"a non-finite loss: {' | '.join(NONFINITE)} (stop the "
     "run, keeping the last checkpoint, or skip that update and count it in the metrics)"),
    ("--amp", "amp", str, f"mixed precision of the forward passes: {' | '.join(AMP)} (losses and "
     "the fused ops stay in fp32)"),
    # ----- baseline methods: read only by the methods named; defaults per method -----
    ("--adp-alpha", "adp_alpha", float, "adp: weight of the ensemble entropy"),
    ("--adp-beta", "adp_beta", float, "adp: weight of the log-det of the non-true predictions"),
    ("--gal-coeff", "gal_coeff", float, "gal: weight of the input-gradient coherence term"),
    ("--gal-noise", "gal_noise", float, "gal: std of the Gaussian noise added to half the "
     "training images (0: none)"),
    ("--init-from", "init_from", str, "dverge: run folder of the trained `--method ensemble` run "
     "to start from (unset: from scratch)"),
    ("--distill-eps", "distill_eps", float, "dverge: L-inf radius of the feature distillation"),
    ("--distill-alpha", "distill_alpha", float, "dverge: step of the feature distillation"),
    ("--distill-steps", "distill_steps", int, "dverge: steps of the feature distillation"),
    ("--distill-layer", "distill_layer", int, "dverge: distil at this layer (1..depth) every "
     "epoch instead of a random one per epoch"),
    ("--dverge-coeff", "dverge_coeff", float, "dverge --plus-adv: weight of the distillation loss"),
]



def train_options() -> List[Option]:
    """Every option row of ``cda2 train``: :data:`TRAIN_OPTIONS` with ``--weights`` and each
    weighting parameter after ``--phases``, made from the weightings' records when a parser is
    built (so a weighting registered before then is in ``--help``)."""
    weighting: List[Option] = [("--weights", "weights", str, weights_help())]
    weighting += [(p.flag, p.name, float, param_help(p)) for p in weighting_params()]
    at = next(i for i, row in enumerate(TRAIN_OPTIONS) if row[1] == "phases") + 1
    return TRAIN_OPTIONS[:at] + weighting + TRAIN_OPTIONS[at:]


@dataclass(frozen=True)
class TrainJob(Job):
    """A ``cda2 train`` run: :class:`TrainConfig` fields given (the method's own defaults fill
    the rest, :meth:`TrainConfig.for_method`), plus ``resume``, ``force`` and ``download``.

    Example::

        TrainJob.of(method="cda2", depth=8, epochs=2, out_dir="runs/x").run()
    """

    command_name = "train"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        """The options of ``cda2 train``; none has a default of its own here (``SUPPRESS``), so
        that the method's defaults apply where an option is not given."""
        d = TrainConfig()
        for flag, name, typ, help_ in train_options():
            p.add_argument(flag, dest=name, type=typ, default=argparse.SUPPRESS,
                           help=f"{help_} (default: {getattr(d, name)})")
        for name, what in (("mean", "mean"), ("std", "standard deviation")):
            p.add_argument(f"--{name}", dest=name, type=float, nargs=3, metavar=("R", "G", "B"),
                           default=argparse.SUPPRESS, help=f"per-channel {what} of the images "
                           "in [0, 1], for the normalisation inside the model (default: CIFAR-10's "
                           "for cifar10; computed once from the training split for an image "
                           "folder, and stored with the run)")
        p.add_argument("--no-augment", dest="augment", action="store_false", default=argparse.SUPPRESS,
                       help="no random crop / flip")
        start = p.add_mutually_exclusive_group()  # both spellings, the default stated
        start.add_argument("--pgd-random-start", dest="random_start", action="store_true",
                           default=argparse.SUPPRESS, help="training PGD starts uniformly in the "
                           "eps-ball (default; Madry et al.)")
        start.add_argument("--no-random-start", dest="random_start", action="store_false",
                           default=argparse.SUPPRESS, help="training PGD starts at the clean image "
                           "(the authors' default run)")
        p.add_argument("--unfused", dest="unfused", action="store_true", default=argparse.SUPPRESS,
                       help="use the plain-PyTorch reference ops instead of the fused ones")
        p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                       help="no progress bars")
        # baseline methods: one flag, the DVERGE code's name as an alias
        p.add_argument("--adv", "--plus-adv", dest="adv", action="store_true", default=argparse.SUPPRESS,
                       help="ensemble/adp/gal: also train on PGD (--eps/--alpha/--steps) of the averaged "
                       "ensemble; dverge: DVERGE+AdvT (each sub-model also on PGD against itself)")
        p.add_argument("--sync-bn", dest="sync_bn", action="store_true", default=argparse.SUPPRESS,
                       help="under torchrun: BatchNorm statistics over the global batch, not each "
                       "process's shard (the run then matches a one-process run of the same batch)")
        again = p.add_mutually_exclusive_group()
        again.add_argument("--resume", action="store_true",
                           help="continue from --out-dir's checkpoint (its options, plus any given here "
                           "that do not change the trajectory, e.g. --epochs)")
        again.add_argument("--force", action="store_true",
                           help="start over in --out-dir even if it holds an earlier run (its checkpoint "
                           "and metrics are deleted) or other files (left alone)")
        p.add_argument("--download", action="store_true",
                       help="download CIFAR-10 into --data first if missing (MD5-checked; unset: "
                       "into $CDA2_DATA, else ./data if it exists, else ~/.cache/cda2_ext/data)")

    @classmethod
    def of(cls, **options: Any) -> "TrainJob":
        """A run of ``options``; unknown names and values no run can take are
        :class:`~cda2_ext.errors.ConfigError` at once (the config is built and validated)."""
        job = super().of(**options)
        if not job.values.get("resume"):
            job.config()
        return job

    @property
    def given(self) -> Dict[str, Any]:
        """The :class:`TrainConfig` fields given (lists, as a parser makes them, as tuples)."""
        return {k: tuple(v) if isinstance(v, list) else v for k, v in self.options
                if k not in _ACTIONS}

    @property
    def resume(self) -> bool:
        return bool(self.values.get("resume"))

    @property
    def force(self) -> bool:
        return bool(self.values.get("force"))

    @property
    def download(self) -> bool:
        return bool(self.values.get("download"))

    @property
    def out_dir(self) -> str:
        return self.given.get("out_dir", TrainConfig.out_dir)

    def config(self) -> TrainConfig:
        """The run's options: the given ones, or with ``resume`` the stored run's plus the given
        changes that do not change its trajectory."""
        given = self.given
        st_path = checkpoint_files(self.out_dir)[0]
        if self.resume and st_path.is_file():
            stored = TrainConfig.from_meta(load_checkpoint(st_path)[1], st_path)
            if is_import_path(stored.arch) and "arch" not in given:
                raise ConfigError(f"--resume: the run in {self.out_dir} has arch {stored.arch}, your "
                                  "own constructor, and a checkpoint never imports code by itself: "
                                  f"name it again with --arch {stored.arch}")
            bad = stored.resume_conflicts(given)
            if bad:
                raise ConfigError(f"--resume: cannot change {', '.join(bad)} of the run in {self.out_dir}")
            return stored.replace(**given).validate()
        if "dataset" not in given:  # what --data holds: an image folder of any K, or CIFAR-10
            given["dataset"] = infer_dataset(given.get("data_dir"))
        return TrainConfig.for_method(**given).validate()  # the method's own defaults where not given

    def run(self) -> int:
        """Train (or resume) the run and print its final metrics as JSON.

        Under ``torchrun`` every process runs this; rank 0 checks the folder, downloads, writes
        and prints."""
        cfg = self.config()
        # Both checked again by the trainer (the folder under the run's lock); here so that a
        # wrong --device or --out-dir fails before anything is created or loaded.
        resolve_device(cfg.device)
        # --arch package.module:function was given (for a new run, or again to resume): imported
        # now, so that a typo fails before the run folder is touched
        arch = import_constructor(cfg.arch) if is_import_path(cfg.arch) else None
        dist = from_environment()
        t0 = time.perf_counter()
        try:
            trainer, trained = self._train(cfg, dist, arch)
        except RuntimeError as err:  # a peer process ended: one line on every rank, not a traceback
            lost = dist.lost_peer(err)
            if lost is None:
                raise
            dist.abandon()
            raise LostPeerError(f"{lost}; the checkpoint of the last finished epoch in {cfg.out_dir} "
                                "is kept: run the same torchrun command with --resume to continue"
                                ) from None
        history = trainer.history
        final = history[-1] if history else {}
        if not dist.is_main:
            return 0
        if self.resume and not trained:
            print(f"cda2: nothing to train: the run in {cfg.out_dir} has finished {trainer.epoch} "
                  f"epoch(s), --epochs is {cfg.epochs}; pass a larger --epochs to continue it",
                  file=sys.stderr)
        tc = trainer.config  # with an image folder's K and normalisation
        print(json.dumps({"out_dir": cfg.out_dir, "epochs": trainer.epoch,
                          "data": {"dataset": tc.dataset, "name": dataset_name(tc.dataset, tc.data_dir),
                                   "num_classes": tc.num_classes,
                                   "image_size": list(trainer.image_size)},
                          "seconds": round(time.perf_counter() - t0, 2),
                          "final": {k: final.get(k) for k in ("loss", "clean_acc", "adv_acc",
                                                              "assign_hist", "select_hist", "test")}},
                         indent=2))
        return 0

    def _train(self, cfg: TrainConfig, dist: DistContext, arch: Optional[Callable[[], Any]]
               ) -> Tuple[Trainer, bool]:
        """Check the folder (rank 0), download if asked, train; returns the trainer and whether
        any epoch was trained in this call (a resumed run may already be past ``--epochs``)."""
        if dist.is_main:
            check_run_folder(cfg.out_dir, resume=self.resume, force=self.force)
        if self.download and cfg.dataset == "cifar10":
            folder = resolve_download(cfg.data_dir, dist)
            cfg = cfg.replace(data_dir=str(folder))
        trainer = Trainer(cfg, dist=dist, arch=arch)
        started: List[int] = []  # the first step of any epoch trained here
        trainer.fit(lambda step, losses: started.append(step) if step == 0 else None,
                    resume=self.resume, force=self.force)
        # Every rank leaves the job together and destroys the process group before Python shuts
        # down; a group left to the interpreter's exit can abort a finished run with SIGABRT (see
        # DistContext.close). Not on an error: a failed rank never reaches close()'s barrier, and
        # torchrun ends the others.
        trainer.close()
        return trainer, bool(started)


def resolve_download(folder: Optional[str], dist: DistContext) -> Path:
    """Rank 0 downloads (if missing) into ``folder`` (``None``: the default data folder); the
    others wait and then use the same data."""
    if dist.is_main:
        path = ensure_cifar10(folder)
    dist.barrier()
    return path if dist.is_main else ensure_cifar10(folder)
