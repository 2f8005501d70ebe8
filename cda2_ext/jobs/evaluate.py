"""``cda2 eval`` as a job (the command: :mod:`cda2_ext.cli.eval_robustness`)."""
from __future__ import annotations

import argparse
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

from .. import limits
from ..attacks.adaptive import ADAPTIVE_ATTACKS, AdaptiveConfig
from ..attacks.transfer import TRANSFER_METHODS, TransferConfig, TransferSet
from ..attacks.whitebox import EnsembleLogits, PGDConfig
from ..data import dataset_name, load_images
from ..errors import ConfigError
from ..evaluation import EvalConfig, evaluate_robustness
from ..evaluation.family import (FAMILIES, FamilyParam, attack_groups, attack_help,
                                 default_attacks)
from ..storage.run_folder import ROBUSTNESS_NAME, check_output, save_or_rescue
from ..models.architectures import named_architectures
from ..models.selection import SCORES, score_help
from ..runtime import resolve_device
from ..training.restore import load_collaboration
from .base import Job, add_model_arguments, check_seed

__all__ = ["EvalJob"]

#: What ``cda2 eval`` writes into ``--out`` (the transfer sets only with ``--save-transfer``).
REPORT_FILES = (ROBUSTNESS_NAME, "robustness.csv", "robustness.png")
TRANSFER_FILES = "transfer_eps*.safetensors"


def _names(paths: List[str]) -> List[str]:
    """Short unique labels for checkpoint paths (their run folder names)."""
    out: List[str] = []
    for p in paths:
        q = Path(p)
        base = (q.parent.name if q.suffix in (".safetensors", ".json") else q.name) or str(q)
        name, k = base, 2
        while name in out:
            name, k = f"{base}#{k}", k + 1
        out.append(name)
    return out


def _dest(family: str, param: FamilyParam) -> str:
    """The job option (argparse attribute) of a family parameter: its flag as a name
    (``--square-eps``: ``square_eps``), as reproduce's plans spell it."""
    return param.cli_flag(family).lstrip("-").replace("-", "_")


def _add_family_arguments(p: argparse.ArgumentParser) -> None:
    """One option per parameter of every registered attack family (its flag, default and help
    from the record; its bounds are checked by ``EvalConfig``)."""
    for fam in FAMILIES.values():
        for param in fam.params:
            kind = float if param.radii or isinstance(param.default, float) else int
            extra: Dict[str, Any] = {"nargs": "+", "default": list(param.default)} if param.radii \
                else {"default": param.default}
            dest = _dest(fam.name, param)
            p.add_argument(param.cli_flag(fam.name), dest=dest, type=kind, metavar=dest.upper(),
                           help=f"{fam.name}: {param.help}", **extra)


def _family_options(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """``EvalConfig.options`` from the family options parsed by :func:`_add_family_arguments`."""
    return {fam.name: {param.name: getattr(args, _dest(fam.name, param)) for param in fam.params}
            for fam in FAMILIES.values() if fam.params}


def check_fit(nets: Dict[str, Any], size: Any, classes: int, source: Any) -> None:
    """Every model must answer the data's K classes, on images of the data's size: a
    :class:`~cda2_ext.errors.ConfigError` naming the option otherwise (a surrogate of another K
    would attack labels it does not have)."""
    h, w = size
    for option, net in nets.items():
        cfg = net.config
        if cfg.num_classes != classes:
            raise ConfigError(f"{option}: a model of {cfg.num_classes} classes, but the test data "
                              f"({source}) have {classes}")
        if cfg.image_size is not None and tuple(cfg.image_size) != (h, w):
            raise ConfigError(f"{option}: a model of {cfg.image_size[0]}x{cfg.image_size[1]} "
                              f"images, but the test data ({source}) are {h}x{w} (--data)")


@dataclass(frozen=True)
class EvalJob(Job):
    """``cda2 eval`` as a typed request: its options by name (:meth:`Job.of`), run in this
    process by :meth:`run`."""

    command_name = "eval"

    @classmethod
    def of(cls, **options: Any) -> "EvalJob":
        """An evaluation of ``options``; unknown names and settings no evaluation can run fail
        at once (the :class:`~cda2_ext.evaluation.EvalConfig` is built and validated)."""
        job = super().of(**options)
        job.config()
        return job

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        """The arguments of ``cda2 eval``; their defaults are the configs' own (one place each)."""
        d, pgd, ad, tr = EvalConfig(), PGDConfig(), AdaptiveConfig(), TransferConfig()
        p.add_argument("--checkpoint", nargs="+", required=True, metavar="RUN",
                       help="run folder(s) or checkpoint file(s) to evaluate (one table row group each)")
        p.add_argument("--attack", nargs="+", default=["all"], choices=(*attack_groups(), "all"),
                       help=attack_help())
        p.add_argument("--surrogate", nargs="+", default=[], metavar="CKPT",
                       help="hold-out checkpoints whose ensembles generate the transfer attacks")
        p.add_argument("--transfer-set", nargs="+", default=[], metavar="FILE",
                       help="evaluate saved transfer sets (.safetensors from --save-transfer) instead of "
                       "generating them")
        p.add_argument("--save-transfer", action="store_true",
                       help="save the generated transfer sets to --out (one file per eps)")
        p.add_argument("--transfer-preset", default="table2", choices=("table2", "table5"),
                       help="table2: MI-PGD, M-DI2-FGSM, SGM with CE (3 variants per surrogate); "
                       "table5: CE and CW, MI-PGD with 3 starts (10 per surrogate, 30 with 3 surrogates)")
        p.add_argument("--transfer-methods", nargs="+", default=None, choices=TRANSFER_METHODS,
                       help="the transfer methods to run (default: all of the preset's); leave sgm "
                       "out for surrogates without residual blocks (a depth-2 ResNet, a plain CNN)")
        p.add_argument("--eps", nargs="+", type=float, default=list(d.eps), help="L-inf radii")
        p.add_argument("--n-samples", type=int, default=d.n_samples, help="size of the random test subset")
        p.add_argument("--seed", type=int, default=d.seed, help="picks the subset and seeds every attack")
        p.add_argument("--subset", default=d.subset, choices=("seeded", "dverge"),
                       help="which test images: 'seeded' (a permutation drawn with --seed) or 'dverge' "
                       "(Python's random.seed(0); random.sample(range(10000), 1000), the images of "
                       "DVERGE's scripts and the paper's tables, with --seed 0 --n-samples 1000)")
        p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per attack batch")
        p.add_argument("--steps", type=int, default=pgd.steps,
                       help="PGD steps (also the adaptive sign-gradient attacks' steps)")
        p.add_argument("--restarts", type=int, default=pgd.restarts, help="PGD random starts (worst case kept)")
        p.add_argument("--last-iterate", action="store_true",
                       help="judge each PGD restart by its final iterate only, as the published "
                       "protocol does (DVERGE's scripts); the default also counts a sample as broken "
                       "when an earlier iterate broke it, which can only be stronger")
        p.add_argument("--adaptive-attacks", nargs="+", default=list(ad.attacks),
                       choices=ADAPTIVE_ATTACKS, help="which adaptive attacks to run")
        p.add_argument("--adaptive-restarts", type=int, default=ad.restarts,
                       help="random starts of each adaptive sign-gradient attack")
        p.add_argument("--temperature-fractions", nargs="*", type=float,
                       default=list(ad.temperature_fractions),
                       help="soft-selection temperatures as multiples of the model's selection scale g "
                       "(the median gap between its two highest selection scores on the evaluated "
                       "samples; one run each)")
        p.add_argument("--temperatures", nargs="*", type=float, default=list(ad.temperatures),
                       help="fixed soft-selection temperatures, run besides the scale-relative ones")
        p.add_argument("--bpda-temperature", type=float, default=ad.bpda_temperature,
                       help="temperature of BPDA's (and PPD push's) backward soft selection; "
                       "None: the selection scale g")
        p.add_argument("--decision-targets", default=str(ad.decision_targets), metavar="T|all",
                       help="wrong classes per sub-model of the multi-targeted decision-margin attacks "
                       "(the highest-scoring ones at the clean point; all: every class)")
        p.add_argument("--apgd-steps", type=int, default=ad.apgd_steps, help="APGD iterations")
        p.add_argument("--transfer-steps", type=int, default=tr.steps, help="iterations of each transfer attack")
        _add_family_arguments(p)
        p.add_argument("--sanity-eps", type=float, default=d.sanity_eps,
                       help="large radius where PGD must reach ~0%% accuracy (0: skip the check)")
        p.add_argument("--score", default=d.score, choices=SCORES,
                       help=score_help())
        p.add_argument("--data", dest="data_dir", default=None,
                       help="CIFAR-10 folder, image folder or zip (default: the one the run was "
                       "trained on, else $CDA2_DATA, ./data, ~/.cache/cda2_ext/data)")
        add_model_arguments(p, "the constructors of runs (and surrogates) of your own architecture")
        # SUPPRESS: the help formatter would print "(default: True)" beside a switch that turns off
        p.add_argument("--no-progress", dest="progress", action="store_false",
                       default=argparse.SUPPRESS, help="no progress bars")
        p.add_argument("--out", default="eval", help="folder for robustness.json/.csv/.png (checked "
                       "before the evaluation starts; earlier results there are kept unless --force)")
        p.add_argument("--force", action="store_true", help="overwrite earlier results in --out")

    @functools.cached_property
    def _config(self) -> EvalConfig:
        return self._build_config()

    def config(self) -> EvalConfig:
        """The evaluation's :class:`~cda2_ext.evaluation.EvalConfig` from the options (the
        checkpoints, surrogates and output folder are the job's own: :meth:`run`), built - and so
        checked - once per job (a job is frozen: its options never change)."""
        return self._config

    def _build_config(self) -> EvalConfig:
        args = self.namespace()
        named = (*default_attacks(), *args.attack) if "all" in args.attack else args.attack
        attacks = tuple(a for a in dict.fromkeys(named) if a != "all")
        try:
            decision_targets = None if args.decision_targets == "all" else int(args.decision_targets)
        except ValueError:
            decision_targets = 0
        if decision_targets is not None and not 1 <= decision_targets <= limits.CLASSES:
            raise ConfigError(f"decision-targets: expected a number in [1, {limits.CLASSES}] or all, got "
                           f"{args.decision_targets!r}")
        bpda = [] if args.bpda_temperature is None else [args.bpda_temperature]
        for flag, values in (("temperature-fractions", args.temperature_fractions),
                             ("temperatures", args.temperatures), ("bpda-temperature", bpda)):
            if any(not (math.isfinite(v) and v > 0) for v in values):
                raise ConfigError(f"{flag}: every value must be a finite number > 0, got {values}")
        for flag, v, lo, hi in (("n-samples", args.n_samples, 1, limits.ITEMS),
                                ("batch-size", args.batch_size, 1, limits.ITEMS),
                                ("steps", args.steps, 0, limits.ITERATIONS),
                                ("restarts", args.restarts, 1, limits.ITERATIONS),
                                ("adaptive-restarts", args.adaptive_restarts, 1, limits.ITERATIONS),
                                ("apgd-steps", args.apgd_steps, 0, limits.ITERATIONS),
                                ("transfer-steps", args.transfer_steps, 0, limits.ITERATIONS)):
            if v < lo:
                raise ConfigError(f"{flag}: must be >= {lo}, got {v}")
            limits.count(flag, v, lo, hi)
        check_seed(args.seed)
        if "transfer" in attacks and "all" not in args.attack and not (args.surrogate or args.transfer_set):
            raise ConfigError("--attack transfer needs at least one --surrogate checkpoint or --transfer-set file")
        # the configs check themselves when built (EvalConfig: its radii by limits.radius) and
        # raise a ConfigError naming the field: no wrapping, and no second check here
        return EvalConfig(
            attacks=attacks, eps=tuple(args.eps), n_samples=args.n_samples, seed=args.seed,
            batch_size=args.batch_size,
            pgd=PGDConfig(steps=args.steps, restarts=args.restarts, last_iterate=args.last_iterate),
            adaptive=AdaptiveConfig(attacks=tuple(args.adaptive_attacks), steps=args.steps,
                                    restarts=args.adaptive_restarts,
                                    temperature_fractions=tuple(args.temperature_fractions),
                                    temperatures=tuple(args.temperatures),
                                    bpda_temperature=args.bpda_temperature,
                                    decision_targets=decision_targets, apgd_steps=args.apgd_steps,
                                    score=args.score),
            transfer=TransferConfig.preset(args.transfer_preset, steps=args.transfer_steps,
                                           **({"methods": tuple(args.transfer_methods)}
                                              if args.transfer_methods else {})),
            options=_family_options(args),
            sanity_eps=args.sanity_eps or None, score=args.score, unfused=args.unfused,
            subset=args.subset,
            progress=getattr(args, "progress", True))

    def run(self) -> int:
        """``cda2 eval``: evaluate, print the table and checks, write JSON/CSV/PNG."""
        cfg = self.config()
        args = self.namespace()
        results = REPORT_FILES + ((TRANSFER_FILES,) if args.save_transfer else ())
        out = check_output(args.out, option="--out", folder=True, force=args.force, results=results)
        device = resolve_device(args.device)
        models: Dict[str, Any] = {}
        targets: Dict[str, str] = {}
        metas = []
        nets: Dict[str, Any] = {}  # every model loaded, by its --checkpoint/--surrogate path
        with named_architectures(*args.arch):  # the user's constructors: only those named here
            for name, path in zip(_names(args.checkpoint), args.checkpoint):
                model, meta = load_collaboration(path, device, fused=not args.unfused)
                config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
                # Only CDA² trains the PPD heads Algorithm 2 selects with: any other method's run
                # is evaluated as the ensemble it is (mean probability), with APGD as its
                # adaptive attack.
                ensemble = config.get("method", "cda2") != "cda2"
                models[name] = EnsembleLogits(model) if ensemble else model
                targets[name] = "ensemble" if ensemble else "collaboration"
                metas.append(config)
                nets[f"--checkpoint {path}"] = model
            surrogates: Dict[str, Any] = {}
            surrogate_paths: Dict[str, str] = {}
            for name, path in zip(_names(args.surrogate), args.surrogate):
                net, _ = load_collaboration(path, device, fused=not args.unfused)
                surrogates[f"S:{name}"] = EnsembleLogits(net)
                surrogate_paths[f"S:{name}"] = str(path)
                nets[f"--surrogate {path}"] = net
        tsets = {}
        for f in args.transfer_set:
            try:
                ts = TransferSet.load(f)
            except (ValueError, OSError) as err:  # not a transfer set, or unreadable: the user's file
                raise ConfigError(str(err)) from None
            tsets[ts.eps] = ts

        datasets = {m.get("dataset", "cifar10") for m in metas}
        if len(datasets) > 1:
            raise ConfigError(f"checkpoints were trained on different datasets: {sorted(datasets)}")
        first = metas[0]
        dataset = datasets.pop()
        data = load_images(dataset, "test", args.data_dir or first.get("data_dir"), first.get("seed", 0))
        check_fit(nets, data.images.shape[-2:], len(data.classes), data.source)

        t0 = time.perf_counter()
        try:
            report = evaluate_robustness(models, data.images, data.labels, cfg, surrogates=surrogates,
                                         transfer_sets=tsets, device=device,
                                         save_transfer_dir=out if args.save_transfer else None)
        except ValueError as err:  # an attack this model cannot take (e.g. SGM without residual blocks)
            raise ConfigError(str(err)) from None
        report.config.update({"checkpoints": dict(zip(models, args.checkpoint)), "targets": targets,
                              "surrogates": surrogate_paths, "transfer_sets": list(args.transfer_set),
                              "device": str(device),
                              "data": {"dataset": dataset, "name": dataset_name(dataset, data.source),
                                       "num_classes": len(data.classes), "source": data.source}})
        print(report.format_table())
        print()
        for line in report.checks:
            print(line)
        json_file, csv_file, png_file = (out / name for name in REPORT_FILES)
        paths = save_or_rescue(
            lambda: [report.to_json(json_file), report.to_csv(csv_file), report.plot(png_file)],
            json.dumps(report.to_dict(), indent=2), option="--out")
        print(f"\n{len(report.indices)} test images of {dataset_name(dataset, data.source)} "
              f"({len(data.classes)} classes), seed {cfg.seed}, {time.perf_counter() - t0:.1f}s; "
              f"wrote {', '.join(str(p) for p in paths)}")
        return 0
