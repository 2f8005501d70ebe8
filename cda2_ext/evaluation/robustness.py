"""The robustness evaluation protocol behind ``cda2 eval``: attacks x eps, tables, plots, checks.

Protocol (Section 4.3-4.4 of the paper, Yang et al. 2020):

* a seeded random subset of the test set (default 1000 images), the same for every model;
* an eps sweep (default 0.01 ... 0.07, images in [0, 1]) and clean accuracy;
* per eps: white-box PGD (50 steps x 5 restarts, step eps/5, CE), the adaptive attacks on the
  selection (each, and their worst case), transfer attacks from hold-out surrogates (robust only if
  every variant is classified correctly), Square (5000 queries, by default at eps = 0.03 only as
  in Table 3); and the per-sample worst case over everything that ran at that eps.

Every attack draws its randomness from ``derive_generator(seed, attack, eps, batch)``, so a run is
reproducible from the seed and does not depend on which other attacks were selected. Samples the
model gets wrong on clean inputs count as not robust and are not attacked.

Gradient-masking checks (printed in words, stored in the JSON), in the spirit of AutoAttack's
warnings: PGD at a large radius (eps = 0.3) must bring accuracy near 0; robust accuracy must not
grow with eps; white-box (PGD + adaptive) must not be weaker than transfer or Square on the same
samples; the adaptive attacks beating plain PGD is reported as evidence that PGD alone overstates
robustness; samples that survived Square only because its query budget ran out are counted.
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..attacks.adaptive import AdaptiveConfig, adaptive_attacks, apgd_attack
from ..attacks.engine import derive_generator, merge_worst
from ..attacks.square import square_attack
from ..attacks.transfer import (TransferConfig, TransferSet, all_variants_correct,
                                generate_transfer_set, transfer_correct)
from ..attacks.whitebox import PGDConfig, as_model_fn, pgd_attack, predict_correct
from ..data import to_float
from ..runtime import ops_backend

__all__ = ["ATTACK_GROUPS", "DEFAULT_EPS", "EvalConfig", "EvalReport", "select_subset",
           "evaluate_robustness"]

ATTACK_GROUPS = ("pgd", "adaptive", "transfer", "square")
DEFAULT_EPS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07)
WORST = "worst case (all attacks)"


@dataclass
class EvalConfig:
    """Everything that defines an evaluation run (stored in the JSON output).

    Attributes:
        attacks: attack groups to run, a subset of :data:`ATTACK_GROUPS`.
        eps: the L-inf radii of the sweep. n_samples: size of the random test subset.
        seed: picks the subset and seeds every attack. batch_size: images per attack batch.
        pgd, adaptive, transfer: the attacks' configurations (paper budgets by default).
        square_queries, square_eps, square_p_init: the Square attack (Table 3: 5000, 0.03).
        sanity_eps: the large radius of the "accuracy must reach ~0" check (``None``: skip);
            it runs PGD with ``pgd.steps`` steps and one start.
        sanity_max_acc: the accuracy at ``sanity_eps`` above which the check fails.
        score: Algorithm 2's selection score (``"ppd"`` | ``"soe"``). unfused: reference ops.
        progress: tqdm progress bars (stderr).
    """

    attacks: Tuple[str, ...] = ATTACK_GROUPS
    eps: Tuple[float, ...] = DEFAULT_EPS
    n_samples: int = 1000
    seed: int = 0
    batch_size: int = 250
    pgd: PGDConfig = field(default_factory=PGDConfig)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    square_queries: int = 5000
    square_eps: Tuple[float, ...] = (0.03,)
    square_p_init: float = 0.8
    sanity_eps: Optional[float] = 0.3
    sanity_max_acc: float = 0.05
    score: str = "ppd"
    unfused: bool = False
    progress: bool = True

    def validate(self) -> "EvalConfig":
        bad = [a for a in self.attacks if a not in ATTACK_GROUPS]
        if bad:
            raise ValueError(f"attacks: unknown {bad}; expected some of {ATTACK_GROUPS}")
        for e in (*self.eps, *self.square_eps):
            if not (math.isfinite(e) and 0 <= e <= 1):
                raise ValueError(f"eps: every radius must be in [0, 1], got {e}")
        if self.n_samples < 1 or self.batch_size < 1:
            raise ValueError("n_samples and batch_size must be >= 1")
        if self.square_queries < 1:
            raise ValueError(f"square queries: must be >= 1, got {self.square_queries}")
        if self.pgd.steps < 0 or self.pgd.restarts < 1:
            raise ValueError("pgd: steps must be >= 0 and restarts >= 1")
        self.adaptive.validate()
        self.transfer.validate()
        return self

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["pgd"], d["adaptive"], d["transfer"] = (self.pgd.to_dict(), self.adaptive.to_dict(),
                                                  self.transfer.to_dict())
        return d


def select_subset(n_total: int, n: int, seed: int) -> Tensor:
    """``min(n, n_total)`` distinct test indices drawn with ``seed`` (sorted)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_total, generator=g)[:min(n, n_total)].sort().values


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100.0 * x:.1f}"


def _bits(t: Tensor) -> str:
    return "".join("1" if b else "0" for b in t.tolist())


@dataclass
class EvalReport:
    """Results of :func:`evaluate_robustness`.

    Attributes:
        config: the :class:`EvalConfig` as a dict. indices: the test subset.
        clean: ``{model: accuracy}``.
        acc: ``{model: {attack_row: {eps: accuracy}}}`` (rows in display order).
        per_sample: ``{model: {attack_row: {eps: "0101..."}}}`` robust flags in subset order.
        details: per-attack extras (transfer per-variant accuracy, Square queries/budget, times).
        checks: the gradient-masking checks, one sentence each (``OK``/``WARNING``/``NOTE``).
    """

    config: Dict[str, Any]
    indices: List[int]
    clean: Dict[str, float] = field(default_factory=dict)
    acc: Dict[str, Dict[str, Dict[float, float]]] = field(default_factory=dict)
    per_sample: Dict[str, Dict[str, Dict[float, str]]] = field(default_factory=dict)
    details: Dict[str, Any] = field(default_factory=dict)
    checks: List[str] = field(default_factory=list)
    seconds: float = 0.0

    def eps_columns(self) -> List[float]:
        cols = sorted({e for rows in self.acc.values() for r in rows.values() for e in r})
        return cols

    def rows(self) -> List[Tuple[str, str, Optional[float], Dict[float, float]]]:
        """``(model, attack_row, clean, {eps: acc})`` in display order."""
        out = []
        for model, rows in self.acc.items():
            for attack, by_eps in rows.items():
                out.append((model, attack, self.clean.get(model), by_eps))
        return out

    def format_table(self) -> str:
        """The paper's layout: one row per model and attack, clean then one column per eps (%)."""
        cols = self.eps_columns()
        head = ["model", "attack", "clean"] + [f"{e:g}" for e in cols]
        body = [[m, a, _pct(c)] + [_pct(r.get(e)) for e in cols] for m, a, c, r in self.rows()]
        widths = [max(len(str(row[i])) for row in [head] + body) for i in range(len(head))]
        fmt = lambda row: "  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w)  # noqa: E731
                                    for i, (v, w) in enumerate(zip(row, widths)))
        lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
        return "\n".join(lines)

    def to_csv(self, path: Union[str, Path]) -> Path:
        cols = self.eps_columns()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["model", "attack", "clean"] + [f"{e:g}" for e in cols])
            for m, a, c, r in self.rows():
                w.writerow([m, a, "" if c is None else f"{100 * c:.2f}"]
                           + ["" if e not in r else f"{100 * r[e]:.2f}" for e in cols])
        return path

    def to_dict(self) -> Dict[str, Any]:
        key = lambda d: {f"{e:g}": v for e, v in d.items()}  # noqa: E731  JSON keys are strings
        return {"config": self.config, "n": len(self.indices), "indices": self.indices,
                "clean": self.clean,
                "robust_accuracy": {m: {a: key(r) for a, r in rows.items()} for m, rows in self.acc.items()},
                "per_sample_robust": {m: {a: key(r) for a, r in rows.items()}
                                      for m, rows in self.per_sample.items()},
                "details": self.details, "checks": self.checks, "seconds": round(self.seconds, 2)}

    def to_json(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def plot(self, path: Union[str, Path]) -> Path:
        """PNG of robust accuracy vs eps, one line per model/attack (eps 0 = clean accuracy)."""
        from ..plotting import new_figure, save_figure

        fig, ax = new_figure(figsize=(8, 5.5))
        for m, a, c, r in self.rows():
            xs = sorted(r)
            ys = [100 * r[e] for e in xs]
            if len(r) > 1:  # a curve: start it at the clean accuracy (eps = 0)
                if c is not None:
                    xs, ys = [0.0] + xs, [100 * c] + ys
                style: Dict[str, Any] = dict(marker="o", markersize=4, linewidth=1.2)
            else:  # an attack run at one radius only (Square at 0.03): a lone marker
                style = dict(marker="*", markersize=12, linestyle="none")
            if a == WORST:
                style.update(color="black", linewidth=2.4)
            label = a if len(self.acc) == 1 else f"{m}: {a}"
            ax.plot(xs, ys, label=label, **style)
        ax.set_xlabel("L-inf radius eps (images in [0, 1]; 0 = clean)")
        ax.set_ylabel("robust accuracy (%)")
        top = max([100 * v for *_, r in self.rows() for v in r.values()]
                  + [100 * c for c in self.clean.values()] + [1.0])
        ax.set_ylim(-2, min(102, top * 1.15 + 5))  # low accuracies stay readable
        ax.grid(alpha=0.3)
        n = len(self.indices)
        ax.set_title(f"Robust accuracy vs eps ({n} test images, seed {self.config.get('seed')})")
        ax.legend(fontsize=7, loc="upper right")
        return save_figure(fig, path)


class _Progress:
    """A tqdm bar over attack batches (or nothing when disabled)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc="eval", unit="batch", dynamic_ncols=True)

    def step(self, desc: str) -> None:
        if self.bar is not None:
            self.bar.set_description(desc[:60])
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_collaboration(model: Any) -> bool:
    return isinstance(model, nn.Module) and hasattr(model, "num_models")


def evaluate_robustness(models: Mapping[str, Any], images: Tensor, labels: Tensor,
                        config: Optional[EvalConfig] = None, *,
                        surrogates: Optional[Mapping[str, Callable[[Tensor], Tensor]]] = None,
                        transfer_sets: Optional[Mapping[float, TransferSet]] = None,
                        save_transfer_dir: Optional[Union[str, Path]] = None,
                        device: Optional[Union[str, torch.device]] = None,
                        log: Callable[[str], None] = print) -> EvalReport:
    """Evaluate ``models`` under the configured attacks on a seeded test subset.

    Args:
        models: ``{name: model}``: collaborations (``x -> (logits, ppd_logit)``, attacked through
            Algorithm 2 and with the adaptive attacks) or plain model functions
            (``x -> logits``; "adaptive" then means APGD only).
        images: the whole test split, ``uint8`` or float in [0, 1], ``[N, C, H, W]``; labels ``[N]``.
        surrogates: ``{name: model function}`` for the transfer attacks (hold-out ensembles).
        transfer_sets: precomputed sets ``{eps: TransferSet}`` to evaluate instead of generating
            (their samples must be this run's subset).
        save_transfer_dir: write every generated set there as ``transfer_eps{eps}.safetensors``.
        log: where one-line notes go (skipped attacks, saved files).
    """
    cfg = (config or EvalConfig()).validate()
    t_start = time.perf_counter()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    backend = ops_backend(fused=not cfg.unfused)
    idx = select_subset(int(labels.shape[0]), cfg.n_samples, cfg.seed)
    x_all = to_float(images[idx]).to(dev)
    y_all = labels[idx].to(dev)
    n = int(y_all.shape[0])
    batches = [(i, slice(i, min(i + cfg.batch_size, n))) for i in range(0, n, cfg.batch_size)]
    report = EvalReport(cfg.to_dict(), idx.tolist())
    targets = {name: as_model_fn(m, "collaboration", cfg.score, backend) for name, m in models.items()}
    for m in models.values():
        if isinstance(m, nn.Module):
            m.to(dev).eval()
    surrogates = dict(surrogates or {})
    transfer_sets = dict(transfer_sets or {})
    run_transfer = "transfer" in cfg.attacks and (surrogates or transfer_sets)
    if "transfer" in cfg.attacks and not run_transfer:
        report.checks.append("NOTE: transfer attack not run: no surrogate and no transfer set given, "
                             "so the white-box vs transfer check was skipped.")
    if transfer_sets:
        for e, ts in transfer_sets.items():
            if ts.indices is not None and ts.indices.tolist() != report.indices:
                raise ValueError(f"transfer set for eps={e:g} was made on other test samples "
                                 "(use the same --seed and --n-samples as when it was generated)")
    # per-sample robust flags: flags[model][row][eps] = Tensor[n] bool (on CPU)
    flags: Dict[str, Dict[str, Dict[float, Tensor]]] = {m: {} for m in models}
    clean_ok: Dict[str, Tensor] = {}
    details: Dict[str, Any] = {"seconds": {}, "transfer": {}, "square": {}}
    sq_eps = [e for e in cfg.square_eps] if "square" in cfg.attacks else []
    n_units = len(models) * len(batches) * (
        len(cfg.eps) * sum(a in cfg.attacks for a in ("pgd", "adaptive")) + len(sq_eps)
        + (1 if cfg.sanity_eps else 0)) + (len(cfg.eps) * len(batches) * len(surrogates)
                                           if run_transfer else 0)
    bar = _Progress(n_units, cfg.progress)

    def timed(key: str, seconds: float) -> None:
        details["seconds"][key] = round(details["seconds"].get(key, 0.0) + seconds, 2)

    def put(model: str, row: str, eps: float, ok: Tensor) -> None:
        flags[model].setdefault(row, {})[eps] = ok.cpu() & clean_ok[model]

    try:
        for name, target in targets.items():
            with torch.no_grad():
                clean_ok[name] = torch.cat([predict_correct(target, x_all[s], y_all[s]).cpu()
                                            for _, s in batches])
            report.clean[name] = clean_ok[name].float().mean().item()

        pgd_row = f"PGD-{cfg.pgd.steps}x{cfg.pgd.restarts} ({cfg.pgd.loss})"
        for eps in cfg.eps:
            for name, target in targets.items():
                net = models[name]
                if "pgd" in cfg.attacks:
                    t0 = time.perf_counter()
                    oks = []
                    for b, s in batches:
                        r = pgd_attack(target, x_all[s], y_all[s], eps, cfg.pgd,
                                       generator=derive_generator(cfg.seed, "pgd", eps, b), backend=backend)
                        oks.append(r.correct.cpu())
                        bar.step(f"{name} pgd eps={eps:g}")
                    put(name, pgd_row, eps, torch.cat(oks))
                    timed("pgd", time.perf_counter() - t0)
                if "adaptive" in cfg.attacks:
                    t0 = time.perf_counter()
                    parts: Dict[str, List[Tensor]] = {}
                    for b, s in batches:
                        if _is_collaboration(net):
                            seed_b = derive_generator(cfg.seed, "adaptive", b).initial_seed()
                            res = adaptive_attacks(net, x_all[s], y_all[s], eps, cfg.adaptive,
                                                   seed=int(seed_b), backend=backend)
                        else:
                            res = {}
                            for loss in ("ce", "dlr"):
                                if f"apgd-{loss}" in cfg.adaptive.attacks:
                                    res[f"apgd-{loss}"] = apgd_attack(
                                        target, x_all[s], y_all[s], eps, cfg.adaptive.apgd_steps, loss,
                                        cfg.adaptive.apgd_restarts,
                                        generator=derive_generator(cfg.seed, f"apgd-{loss}", eps, b), backend=backend)
                            if res:
                                res["worst"] = merge_worst(list(res.values()))
                        for k, r in res.items():
                            parts.setdefault(k, []).append(r.correct.cpu())
                        bar.step(f"{name} adaptive eps={eps:g}")
                    for k, v in parts.items():
                        put(name, "adaptive (worst)" if k == "worst" else f"adaptive: {k}", eps, torch.cat(v))
                    timed("adaptive", time.perf_counter() - t0)
            if run_transfer:
                t0 = time.perf_counter()
                tset = transfer_sets.get(eps)
                if tset is None and not surrogates:
                    log(f"transfer: no set for eps={eps:g} among the given files; skipped at this eps")
                if tset is None and surrogates:
                    for s_model in surrogates.values():
                        if isinstance(s_model, nn.Module):
                            s_model.to(dev).eval()
                    pieces = []
                    for b, s in batches:
                        pieces.append(generate_transfer_set(
                            surrogates, x_all[s], y_all[s], eps, cfg.transfer,
                            seed=int(derive_generator(cfg.seed, "transfer", b).initial_seed()),
                            indices=idx[s], backend=backend, extra_config={"eval_seed": cfg.seed}))
                        for _ in surrogates:
                            bar.step(f"transfer eps={eps:g}")
                    tset = TransferSet.concat(pieces)
                    tset.config["n_samples"] = cfg.n_samples
                    if save_transfer_dir is not None:
                        p = tset.save(Path(save_transfer_dir) / f"transfer_eps{eps:g}.safetensors")
                        log(f"saved transfer set ({len(tset.names)} variants x {n} images): {p}")
                if tset is not None:
                    row = f"transfer (all {len(tset.names)} variants)"
                    for name, target in targets.items():
                        corr = transfer_correct(target, tset, cfg.batch_size)
                        put(name, row, eps, all_variants_correct(corr))
                        details["transfer"].setdefault(name, {})[f"{eps:g}"] = {
                            v: round(corr[i].float().mean().item(), 4) for i, v in enumerate(tset.names)}
                timed("transfer", time.perf_counter() - t0)
            if eps in sq_eps:
                _square(report, cfg, targets, x_all, y_all, batches, eps, put, details, bar, timed, backend)
        for eps in sq_eps:
            if eps not in cfg.eps:
                _square(report, cfg, targets, x_all, y_all, batches, eps, put, details, bar, timed, backend)
        sanity: Dict[str, float] = {}
        if cfg.sanity_eps:
            t0 = time.perf_counter()
            scfg = PGDConfig(steps=cfg.pgd.steps, restarts=1, alpha_factor=cfg.pgd.alpha_factor,
                             loss=cfg.pgd.loss)
            for name, target in targets.items():
                oks = []
                for b, s in batches:
                    r = pgd_attack(target, x_all[s], y_all[s], cfg.sanity_eps, scfg,
                                   generator=derive_generator(cfg.seed, "sanity", b), backend=backend)
                    oks.append(r.correct.cpu())
                    bar.step(f"{name} sanity eps={cfg.sanity_eps:g}")
                sanity[name] = (torch.cat(oks) & clean_ok[name]).float().mean().item()
            timed("sanity", time.perf_counter() - t0)
            details["sanity"] = {"eps": cfg.sanity_eps, "steps": cfg.pgd.steps, "accuracy": sanity}
    finally:
        bar.close()

    # worst case over every attack at each eps, then the tables
    for name in models:
        rows = flags[name]
        by_eps: Dict[float, List[Tensor]] = {}
        for row, d in rows.items():
            if row.startswith("adaptive: "):
                continue  # contained in "adaptive (worst)"
            for e, ok in d.items():
                by_eps.setdefault(e, []).append(ok)
        if len(rows) > 1:
            rows[WORST] = {e: torch.stack(v).all(0) for e, v in by_eps.items()}
        report.acc[name] = {row: {e: ok.float().mean().item() for e, ok in sorted(d.items())}
                            for row, d in rows.items()}
        report.per_sample[name] = {row: {e: _bits(ok) for e, ok in sorted(d.items())}
                                   for row, d in rows.items()}
    report.details = details
    report.checks += _checks(report, flags, sanity, cfg, pgd_row)
    report.seconds = time.perf_counter() - t_start
    return report


def _square(report: EvalReport, cfg: EvalConfig, targets: Mapping[str, Any], x_all: Tensor,
            y_all: Tensor, batches: Sequence[Tuple[int, slice]], eps: float, put: Callable,
            details: Dict[str, Any], bar: _Progress, timed: Callable, backend: Any) -> None:
    row = f"Square-{cfg.square_queries}"
    t0 = time.perf_counter()
    for name, target in targets.items():
        oks, qs, oob = [], [], []
        for b, s in batches:
            r = square_attack(target, x_all[s], y_all[s], eps, cfg.square_queries,
                              p_init=cfg.square_p_init,
                              generator=derive_generator(cfg.seed, "square", eps, b), backend=backend)
            oks.append(r.correct.cpu())
            qs.append(r.queries.cpu())
            oob.append(r.out_of_budget.cpu())
            bar.step(f"{name} square eps={eps:g}")
        put(name, row, eps, torch.cat(oks))
        q, o = torch.cat(qs), torch.cat(oob)
        details["square"].setdefault(name, {})[f"{eps:g}"] = {
            "budget": cfg.square_queries, "mean_queries": round(q.float().mean().item(), 1),
            "max_queries": int(q.max()), "out_of_budget": int(o.sum())}
    timed("square", time.perf_counter() - t0)


def _checks(report: EvalReport, flags: Mapping[str, Mapping[str, Mapping[float, Tensor]]],
            sanity: Mapping[str, float], cfg: EvalConfig, pgd_row: str) -> List[str]:
    """The gradient-masking checks, as sentences."""
    out: List[str] = []
    n = len(report.indices)
    tol = 1.0 / max(n, 1)
    for name, rows in flags.items():
        if name in sanity:
            a = sanity[name]
            if a <= cfg.sanity_max_acc:
                out.append(f"OK [{name}]: PGD at eps={cfg.sanity_eps:g} leaves {100 * a:.1f}% accuracy "
                           "(near 0, as it must at a radius this large).")
            else:
                out.append(f"WARNING [{name}]: PGD at eps={cfg.sanity_eps:g} still leaves {100 * a:.1f}% "
                           f"accuracy (> {100 * cfg.sanity_max_acc:.0f}%); at this radius any image can be "
                           "changed beyond recognition, so the attack is not working: gradient masking or "
                           "too small a budget. Do not trust the robust accuracies below.")
        for row, d in rows.items():
            eps_sorted = sorted(d)
            for e0, e1 in zip(eps_sorted, eps_sorted[1:]):
                a0, a1 = d[e0].float().mean().item(), d[e1].float().mean().item()
                if a1 > a0 + tol:
                    out.append(f"WARNING [{name}]: {row} accuracy rises from {100 * a0:.1f}% at "
                               f"eps={e0:g} to {100 * a1:.1f}% at eps={e1:g}; a stronger attack at the "
                               "larger radius would do at least as well, so the attack is not converging.")
        white = [rows[r] for r in (pgd_row, "adaptive (worst)") if r in rows]
        for label, key in (("transfer", "transfer ("), ("Square", "Square-")):
            for row, d in rows.items():
                if not row.startswith(key):
                    continue
                for e, bb_ok in d.items():
                    wb = [w[e] for w in white if e in w]
                    if not wb:
                        continue
                    wb_ok = torch.stack(wb).all(0)
                    only_bb = int((wb_ok & ~bb_ok).sum())
                    wa, ba = wb_ok.float().mean().item(), bb_ok.float().mean().item()
                    if wa > ba:
                        out.append(f"WARNING [{name}]: at eps={e:g} the white-box attacks leave "
                                   f"{100 * wa:.1f}% but the {label} attack only {100 * ba:.1f}% "
                                   f"({only_bb} samples broken by {label} and not by any white-box "
                                   "attack): white-box gradients are "
                                   "misleading (gradient masking); the worst case over all attacks is the "
                                   "number to report.")
                    else:
                        out.append(f"OK [{name}]: at eps={e:g} white-box ({100 * wa:.1f}%) is not weaker "
                                   f"than {label} ({100 * ba:.1f}%); {only_bb} samples were broken only by "
                                   f"{label}.")
        if pgd_row in rows and "adaptive (worst)" in rows:
            for e in sorted(rows[pgd_row]):
                if e not in rows["adaptive (worst)"]:
                    continue
                p_ok, a_ok = rows[pgd_row][e], rows["adaptive (worst)"][e]
                extra = int((p_ok & ~a_ok).sum())
                if extra > 0:
                    out.append(f"NOTE [{name}]: at eps={e:g} the adaptive attacks break {extra} samples "
                               f"that plain PGD does not (PGD {100 * p_ok.float().mean().item():.1f}% -> "
                               f"worst {100 * (p_ok & a_ok).float().mean().item():.1f}%): PGD through the "
                               "selected sub-model alone overstates robustness.")
        for e, d in report.details.get("square", {}).get(name, {}).items():
            if d["out_of_budget"]:
                out.append(f"NOTE [{name}]: Square at eps={e}: {d['out_of_budget']} of {n} samples survived "
                           f"only until the budget of {d['budget']} queries ran out.")
    return out
