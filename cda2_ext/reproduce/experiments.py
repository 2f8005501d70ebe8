"""The experiments of ``cda2 reproduce``: one :class:`Experiment` entry each in :data:`EXPERIMENTS`.

An entry says, per budget, which jobs to run (``plan``: :mod:`cda2_ext.jobs`, each what one ``cda2``
command does) and how to turn their outputs into a table with the paper's numbers beside the
measured ones (``report``, reading them through :mod:`cda2_ext.storage.run_folder`). Adding an
experiment is one more entry: a ``plan`` that lists train and evaluation steps and a ``report``.

Budgets: ``small`` fits a 2-core CPU on the shared CIFAR-10 subset in minutes; ``cpu`` (where an
experiment has one) all of CIFAR-10 in about an hour of 2 CPU cores; ``gpu`` one device call of a
few minutes; ``paper`` is the paper's setting (a GPU, the full data set, hours). Each budget states
what it can and cannot show.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..data import data_note
from ..storage.run_folder import ROBUSTNESS_NAME, RobustnessRecord, training_time
from ..jobs.evaluate import EvalJob
from ..jobs.train import TrainJob
from ..jobs.xor import XorJob
from . import capacity, paper
from .runner import Step, output_step, train_step

#: Options of a job, in the order given: ``(name, value)`` pairs (see :class:`~cda2_ext.jobs.base.Job`).
Options = Tuple[Tuple[str, Any], ...]

__all__ = ["Budget", "Context", "Report", "Experiment", "EXPERIMENTS", "BUDGETS", "XorParams",
           "TimeParams", "DefenseParams", "WhiteboxParams", "TransferParams", "SquareParams",
           "markdown_table"]



@dataclass(frozen=True)
class Budget:
    """One budget of an experiment: its parameters (a frozen dataclass of the experiment's own
    type, e.g. :class:`~cda2_ext.reproduce.capacity.DepthParams`) and what it can and cannot
    show."""

    params: Any
    shows: str
    cannot_show: str


@dataclass(frozen=True)
class XorParams:
    """A budget of the XOR experiment: one run per seed."""

    seeds: Tuple[int, ...]


@dataclass(frozen=True)
class TimeParams:
    """A budget of the training-cost experiment: every method trained at this size
    (``train_limit``: the first N images, ``None``: all)."""

    depth: int
    num_models: int
    epochs: int
    train_limit: Optional[int]


@dataclass(frozen=True)
class DefenseParams:
    """What the white-box, transfer and Square experiments of one budget share.

    Attributes:
        runs: the folder beside the experiment's own that holds the defenses' training runs
            (whichever of the three experiments runs first trains them, the others reuse them).
        depth, num_models: of every defense. epochs, train_limit, train_steps: ``None`` is each
            method's own default (all images).
        surrogates: the hold-out ensembles of the transfer attacks, ``(M, seed)`` each.
        n_samples, subset, last_iterate: the evaluation's test images and PGD protocol.
    """

    runs: str
    depth: int
    num_models: int
    epochs: Optional[int]
    train_limit: Optional[int]
    train_steps: Optional[int]
    surrogates: Tuple[Tuple[int, int], ...]
    n_samples: int
    subset: str
    last_iterate: bool


@dataclass(frozen=True)
class WhiteboxParams(DefenseParams):
    """Table 1: PGD with ``steps`` x ``restarts`` at every eps; then every defense under every
    white-box attack (PGD, the adaptive family, their budget check) with ``adaptive_restarts``
    starts and ``apgd_steps`` APGD iterations (``None``: ``cda2 eval``'s defaults)."""

    eps: Tuple[float, ...]
    steps: int
    restarts: int
    adaptive_restarts: Optional[int] = None
    apgd_steps: Optional[int] = None


@dataclass(frozen=True)
class TransferParams(DefenseParams):
    """Tables 2 and 5: transfer attacks of ``transfer_steps`` iterations at every eps."""

    eps: Tuple[float, ...]
    transfer_steps: int


@dataclass(frozen=True)
class SquareParams(DefenseParams):
    """Table 3: Square with ``queries`` per sample at ``square_eps``."""

    queries: int
    square_eps: float


@dataclass
class Context:
    """Where an experiment runs and the options every step shares.

    Attributes:
        folder: this experiment's output folder (runs, evaluations, figure).
        data: ``--data`` for the CIFAR-10 steps (``None``: the default folder).
        download: add ``--download`` to the training steps.
        device: ``--device`` of every step.
    """

    folder: Path
    data: Optional[str] = None
    download: bool = False
    device: str = "auto"

    def train_options(self) -> Dict[str, Any]:
        """The options every training job gets from the context."""
        out: Dict[str, Any] = {"device": self.device, "progress": False}
        if self.data is not None:
            out["data_dir"] = self.data
        if self.download:
            out["download"] = True
        return out

    def eval_options(self) -> Dict[str, Any]:
        """The options every evaluation job gets (evaluations read the run's own data folder)."""
        out: Dict[str, Any] = {"device": self.device}
        if self.data is not None:
            out["data_dir"] = self.data
        return out


@dataclass
class Report:
    """An experiment's result: a table (paper beside measured), notes, an optional figure."""

    columns: List[str]
    rows: List[List[Any]]
    notes: List[str] = field(default_factory=list)
    figure: Optional[Path] = None
    measured: Dict[str, Any] = field(default_factory=dict)
    #: the conclusions in words, printed before any number
    findings: List[str] = field(default_factory=list)
    #: further tables after the main one: ``(title, columns, rows)``
    tables: List[Tuple[str, List[str], List[List[Any]]]] = field(default_factory=list)

    def markdown(self) -> str:
        """The main table as GitHub markdown (numbers with one decimal, ``-`` for none)."""
        return markdown_table(self.columns, self.rows)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (floats with one decimal, ``-`` for ``None``)."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.1f}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class Experiment:
    """One experiment of the paper as commands.

    Attributes:
        name: the ``cda2 reproduce`` argument. title, paper_ref: what it reproduces.
        budgets: ``{"small": Budget, "paper": Budget}``, and ``"gpu"`` where the experiment has
            a budget between the two.
        plan: ``(params, ctx) -> steps`` in the order they run.
        report: ``(params, ctx) -> Report`` from the steps' outputs.
        methods: the training methods (``--method``) it needs; missing ones are reported before
            anything runs (the baselines of Tables 1-5 arrive with their own issue).
    """

    name: str
    title: str
    paper_ref: str
    budgets: Mapping[str, Budget]
    plan: Callable[[Any, Context], List[Step]]
    report: Callable[[Any, Context], Report]
    methods: Tuple[str, ...] = ()


def _pct(v: Optional[float]) -> Optional[float]:
    return None if v is None else 100.0 * v


# ----- XOR (Section 4.2, Figure 4) ------------------------------------------------------------------
def _xor_file(ctx: Context, seed: int) -> Path:
    return ctx.folder / f"xor_seed{seed}.json"


def _xor_plan(params: XorParams, ctx: Context) -> List[Step]:
    steps = []
    for i, seed in enumerate(params.seeds):
        out = _xor_file(ctx, seed)
        figure = str(ctx.folder / "fig4.png") if i == 0 else ""  # Fig. 4 from the first seed
        # --force: a rerun replaces this experiment's own Fig. 4 (the runner already removed
        # the step's earlier JSON)
        steps.append(output_step(XorJob.of(seed=seed, json=str(out), figure=figure, force=True),
                                 out))
    return steps


def _xor_report(params: XorParams, ctx: Context) -> Report:
    res = [json.loads(_xor_file(ctx, s).read_text()) for s in params.seeds]
    rows, measured = [], {}
    # A linear rule is right on at most 3 of XOR's 4 equal clusters, so an ensemble (still linear,
    # Sec. 4.2) stays near 75%; "solves XOR" is read as >= 95% of fresh test points.
    for key, holds, bar in (("ensemble", lambda a: a <= 0.80, "<= 80%"),
                            ("collaboration", lambda a: a >= 0.95, ">= 95%")):
        accs = [r[f"{key}_acc"] for r in res]
        ok = sum(holds(a) for a in accs)
        measured[key] = accs
        rows.append([key, paper.FIG4[key], 100 * sum(accs) / len(accs), 100 * min(accs),
                     100 * max(accs), f"{ok}/{len(accs)} seeds {bar}"])
    split = [min(r["assignment"]) for r in res]
    notes = [f"{len(res)} seeds ({', '.join(map(str, params.seeds))}), "
             f"{res[0]['config']['n_train']} training / {res[0]['config']['n_test']} test points, "
             f"{res[0]['config']['steps']} full-batch Adam steps each; Fig. 4 has no numbers, so the "
             "paper column is its claim.",
             f"Collaboration: the smaller sub-model answers {100 * min(split):.0f}-{100 * max(split):.0f}% "
             "of the test points (Fig. 4b: both sub-models take part)."]
    measured["assignment"] = [r["assignment"] for r in res]
    fig = ctx.folder / "fig4.png"
    return Report(["model", "paper (Fig. 4)", "measured mean %", "min %", "max %", "paper's claim"],
                  rows, notes, fig if fig.is_file() else None, measured)


# ----- model capacity (Appendix E.1, Table 6): four arms, see .capacity ------------------------------
def _depth_plan(params: capacity.DepthParams, ctx: Context) -> List[Step]:
    return capacity.depth_plan(params, ctx.folder, ctx.train_options(), ctx.eval_options())


def _depth_report(params: capacity.DepthParams, ctx: Context) -> Report:
    columns, rows, notes, measured, findings, tables = capacity.depth_report(
        params, ctx.folder, data_note(ctx.data))
    return Report(columns, rows, notes, None, measured, findings, tables)


# ----- training cost (Appendix C, Table 4) ------------------------------------------------------------
#: The compared methods of Tables 1-5, in the tables' order, and how each is trained there: GAL and
#: ADP on PGD examples of the averaged ensemble (App. C: "all methods except DVERGE achieve
#: adversarial training by generating adversarial samples using PGD attack"), DVERGE by its
#: feature distillation, CDA² by Algorithm 1.
_DEFENSES: Tuple[Tuple[str, Options], ...] = (
    ("gal", (("adv", True),)), ("dverge", ()), ("adp", (("adv", True),)), ("cda2", ()))
#: CDA²'s adversarial training as the authors' code runs it (Synergy-of-Experts, github.com/cuis15/
#: synergy-of-experts, ``models/learn_rectified_v2.py`` and ``distillation.py``; docs/training.md):
#: their detector weighting, the BCE of max-prob x sigmoid(PPD) training the trunk, the PGD
#: attacking the detector's pick (``select_score soe``); every update adds the clean batch's loss
#: and BCE to the adversarial one (``loss_soft + adv_loss_soft``); the attack runs with the
#: experts in train mode (``m.train()`` for the whole epoch); ``Linf_PGD`` with
#: ``rand_start=False`` (``run.sh`` never passes ``--rand_start``), 10 steps (``'steps': 10``) of
#: ``--alpha 0.01``. These options win over a budget's shorter training PGD: they are the row.
_AUTHORS_ADVERSARIAL: Options = (
    ("weights", "detector"), ("ppd_grad", "trunk"), ("ppd_loss", "soe"), ("select_score", "soe"),
    ("clean_weight", 1.0), ("pgd_bn", "train"), ("random_start", False), ("steps", 10),
    ("alpha", 0.01))
#: The defenses of the white-box, transfer and Square tables: the paper's four, then CDA² trained
#: as the authors' code does: ``(row name, method, options, eval --score)``.
_COMPARED: Tuple[Tuple[str, str, Options, str], ...] = (
    *((m, m, options, "ppd") for m, options in _DEFENSES),
    ("cda2-authors", "cda2", _AUTHORS_ADVERSARIAL, "soe"))


def _time_run(ctx: Context, method: str) -> Path:
    return ctx.folder / method


def _time_plan(params: TimeParams, ctx: Context) -> List[Step]:
    steps = []
    for method, options in _DEFENSES:
        limit = {"train_limit": params.train_limit} if params.train_limit else {}
        steps.append(train_step(TrainJob.of(
            method=method, **dict(options), depth=params.depth, num_models=params.num_models,
            epochs=params.epochs, seed=0, eval_every=0, **ctx.train_options(), **limit,
            out_dir=str(_time_run(ctx, method)))))
    return steps


def _time_report(params: TimeParams, ctx: Context) -> Report:
    per_epoch: Dict[str, float] = {}
    every: Dict[str, List[float]] = {}
    images = None
    for method, _ in _DEFENSES:
        cost = training_time(_time_run(ctx, method))
        every[method] = [round(s, 1) for s in cost.epoch_seconds]
        per_epoch[method] = cost.warm_seconds_per_epoch  # the first epoch also pays for warm-up
        images = cost.images_per_epoch
    rows = []
    for method, _ in _DEFENSES:
        p_min = paper.TABLE4[method]
        rows.append([method, p_min * 60 / 100, p_min / paper.TABLE4["cda2"], per_epoch[method],
                     per_epoch[method] / per_epoch["cda2"], " / ".join(map(str, every[method]))])
    notes = [f"Seconds per epoch of {images:,} training images, ResNet-{params.depth} x "
             f"{params.num_models}, mean of epochs 2..{params.epochs} (epoch 1 when only one); "
             "the paper's per epoch is Table 4's 100-epoch time on a GeForce RTX 2080 Ti / 100. "
             "Compare the ratios: absolute times depend on the machine.",
             "GAL and ADP train on PGD of the averaged ensemble (--adv), DVERGE on its feature "
             "distillation alone, CDA² with Algorithm 1 (App. C)."]
    spread = max(max(v) / min(v) for v in every.values() if min(v) > 0)
    notes.append(f"Every epoch's time is in the last column: on a machine shared with other jobs "
                 f"the same run's epochs differed up to {spread:.1f}x here, so read the ratios as "
                 "rough (the record's environment has the load average).")
    return Report(["method", "paper s/epoch", "paper / CDA²", "s/epoch", "/ CDA²",
                   "each epoch s"], rows, notes, None,
                  {"seconds_per_epoch": per_epoch, "epoch_seconds": every})


# ----- the compared defenses (Tables 1, 2, 3 and 5) ------------------------------------------------
#: What the white-box, transfer and Square experiments of one budget share: the defenses'
#: training runs (``OUT/defenses-<budget>/<method>``: whichever of the three runs first trains
#: them, the others reuse them) and the hold-out surrogates of the transfer attacks.
_TRAIN_SMALL: Dict[str, Any] = {"runs": "defenses-small", "depth": 8, "num_models": 3,
                                "epochs": 6, "train_limit": None, "train_steps": 3,
                                "surrogates": ((3, 1),)}
_TRAIN_PAPER: Dict[str, Any] = {"runs": "defenses-paper", "depth": 20, "num_models": 3,
                                "epochs": None, "train_limit": None, "train_steps": None,
                                "surrogates": ((3, 1), (5, 2), (8, 3))}
_EVAL_SMALL: Dict[str, Any] = {"n_samples": 200, "subset": "seeded", "last_iterate": False}
_EVAL_PAPER: Dict[str, Any] = {"n_samples": 1000, "subset": "dverge", "last_iterate": True}


def _runs_dir(params: DefenseParams, ctx: Context) -> Path:
    return ctx.folder.parent / params.runs


def _train_job(params: DefenseParams, ctx: Context, method: str, options: Options,
               run: Path, num_models: Optional[int] = None, seed: int = 0) -> TrainJob:
    """The training of one defense or surrogate at the budget's size (``None``: the method's own
    default, cited in ``cda2_ext/training/methods/``)."""
    adversarial = dict(options).get("adv", False) or method == "cda2"  # steps: the training PGD's
    sized = {name: value for name, value in (("epochs", params.epochs),
                                             ("train_limit", params.train_limit),
                                             ("steps", params.train_steps if adversarial else None))
             if value is not None}
    own = dict(options)  # a row's own options win over the budget's sizes (the authors' PGD-10)
    return TrainJob.of(method=method, **own, depth=params.depth,
                       num_models=num_models or params.num_models, seed=seed, eval_every=0,
                       **ctx.train_options(), **{k: v for k, v in sized.items() if k not in own},
                       out_dir=str(run))


def _defense_steps(params: DefenseParams, ctx: Context) -> List[Step]:
    """Train the plain ensemble DVERGE starts from, then the compared defenses."""
    runs = _runs_dir(params, ctx)
    steps = [train_step(_train_job(params, ctx, "ensemble", (), runs / "ensemble"))]
    for name, method, options, _ in _COMPARED:
        extra = (("init_from", str(runs / "ensemble")),) if method == "dverge" else ()
        steps.append(train_step(_train_job(params, ctx, method, (*options, *extra), runs / name)))
    return steps


def _surrogate_runs(params: DefenseParams, ctx: Context) -> List[Path]:
    return [_runs_dir(params, ctx) / f"surrogate_m{m}_seed{seed}" for m, seed in params.surrogates]


def _surrogate_steps(params: DefenseParams, ctx: Context) -> List[Step]:
    """The hold-out ensembles the transfer attacks come from (plain training, other seeds)."""
    return [train_step(_train_job(params, ctx, "ensemble", (), run, num_models=m, seed=seed))
            for (m, seed), run in zip(params.surrogates, _surrogate_runs(params, ctx))]


def _eval_folder(ctx: Context, name: str, score: str) -> Path:
    return ctx.folder / (name if score == "ppd" else f"{name}-{score}")


def _eval_steps(params: DefenseParams, ctx: Context, name: str, attack: Mapping[str, Any],
                extra_reads: Sequence[Path] = ()) -> List[Step]:
    """``cda2 eval`` of the compared defenses (same images and seeds for all), one per selection
    score (a CDA² run answers by the rule it was trained for), into
    ``ctx.folder/<name>[-<score>]/robustness.json``; :func:`_eval_results` merges them."""
    steps = []
    for score in dict.fromkeys(d[3] for d in _COMPARED):
        runs = [_runs_dir(params, ctx) / d[0] for d in _COMPARED if d[3] == score]
        out = _eval_folder(ctx, name, score)
        job = EvalJob.of(checkpoint=[str(r) for r in runs], **attack, n_samples=params.n_samples,
                         subset=params.subset, seed=0,
                         **({"score": score} if score != "ppd" else {}), **ctx.eval_options(),
                         progress=False, out=str(out), force=True)
        steps.append(output_step(job, out / ROBUSTNESS_NAME, reads=[*runs, *extra_reads]))
    return steps


def _eval_results(ctx: Context, name: str) -> RobustnessRecord:
    """The evaluations of :func:`_eval_steps` as one record: every defense's rows side by side
    (the evaluations share images and seeds), their checks one after the other."""
    return RobustnessRecord.merge([RobustnessRecord.read(_eval_folder(ctx, name, score))
                                   for score in dict.fromkeys(d[3] for d in _COMPARED)])


def _defense_table(results: RobustnessRecord, prefix: str, keys: Sequence[str],
                   paper_rows: Mapping[str, Mapping[str, float]], with_clean: bool
                   ) -> Tuple[List[str], List[List[Any]]]:
    """Rows ``method, [paper clean, clean], (paper, measured) per key`` from the evaluations."""
    columns = ["method"] + (["paper clean %", "clean %"] if with_clean else [])
    for k in keys:
        columns += [f"paper {k} %", f"{k} %"]
    rows = []
    for name, *_ in _COMPARED:
        measured = results.row(name, prefix)
        paper_row = paper_rows.get(name, {})  # the paper has no row for the authors' CDA²
        row: List[Any] = [name]
        if with_clean:
            row += [paper_row.get("clean"), _pct(results.clean.get(name))]
        for k in keys:
            row += [paper_row.get(k), _pct(measured.get(k))]
        rows.append(row)
    return columns, rows


def _eps_keys(params: WhiteboxParams | TransferParams) -> List[str]:
    return [f"{e:g}" for e in params.eps]


def _protocol_note(params: DefenseParams, results: RobustnessRecord) -> str:
    clean = [100 * v for v in results.clean.values()]
    p_clean = [paper.TABLE1[m]["clean"] for m, _ in _DEFENSES]
    return (f"{results.n} test images ({params.subset} subset, seed 0), the same for every "
            f"method; training: ResNet-{params.depth} x {params.num_models}, "
            + (f"{params.epochs} epochs" if params.epochs else "each method's own epochs")
            + (f" on the first {params.train_limit} images" if params.train_limit else "")
            + (f", training PGD {params.train_steps} steps" if params.train_steps else "")
            + ("; cda2-authors trains as the authors' code does at every budget (PGD-10 with step "
               "0.01, no random start, the attack's BatchNorm in train mode, the clean and the "
               "adversarial term in every step: docs/training.md)"
               if "cda2-authors" in results.clean else "")
            + f". Clean accuracy {min(clean):.1f}-{max(clean):.1f}% (the paper's: "
            f"{min(p_clean):.1f}-{max(p_clean):.1f}%)"
            + (": models this far from trained say little about the trained defenses."
               if max(clean) < 70 else "."))


def _ranking_notes(what: str, keys: Sequence[str], paper_rows: Mapping[str, Mapping[str, float]],
                   measured: Mapping[str, Mapping[str, Optional[float]]]) -> List[str]:
    """One sentence per key: the paper's best method beside the measured order, CDA²'s place."""
    notes = []
    for k in keys:
        got = {m: v for m, v in ((d[0], measured.get(d[0], {}).get(k)) for d in _COMPARED)
               if v is not None and k in paper_rows.get(m, {})}  # rows the paper ranks too
        if not got:
            continue
        top = max(paper_rows[m][k] for m in got)
        p_best = [m for m in got if paper_rows[m][k] == top]  # the paper ties at places
        order = sorted(got, key=lambda m: -got[m])
        place = order.index("cda2") + 1 if "cda2" in order else None
        agree = "agrees with" if order[0] in p_best else "disagrees with"
        authors = measured.get("cda2-authors", {}).get(k)
        with_authors = ""
        if authors is not None:  # not a row of the paper: its place among the measured ones
            rank = 1 + sum(v > authors for v in got.values())
            with_authors = (f" CDA² trained as the authors' code does (cda2-authors) has "
                            f"{authors:.1f}%: place {rank} of {len(order) + 1}.")
        notes.append(f"{what} at {k}: here {', '.join(f'{m} {got[m]:.1f}%' for m in order)}; the "
                     f"paper's best is {' = '.join(p_best)} ({top:.1f}%), so this {agree} it"
                     + (f" (CDA² ranks {place} of {len(order)})." if place else ".")
                     + with_authors)
    return notes


def _whitebox_plan(params: WhiteboxParams, ctx: Context) -> List[Step]:
    attack = {"attack": ["pgd"], "eps": list(params.eps), "steps": params.steps,
              "restarts": params.restarts}
    if params.last_iterate:
        attack["last_iterate"] = True
    # The same PGD plus the adaptive family (CDA²: the attacks on its selection; an ensemble:
    # APGD-CE and -DLR), so that no row's number rests on plain PGD against an argmax.
    adaptive = {**attack, "attack": ["pgd", "adaptive"],
                **({"adaptive_restarts": params.adaptive_restarts}
                   if params.adaptive_restarts is not None else {}),
                **({"apgd_steps": params.apgd_steps} if params.apgd_steps is not None else {})}
    return (_defense_steps(params, ctx) + _eval_steps(params, ctx, "whitebox", attack)
            + _eval_steps(params, ctx, "adaptive", adaptive))


def _whitebox_report(params: WhiteboxParams, ctx: Context) -> Report:
    res = _eval_results(ctx, "whitebox")
    keys = _eps_keys(params)
    # The worst case of PGD and its budget check (the same attack with twice the steps and
    # restarts): what a stronger PGD would at least reach, the paper's budget being 50x5.
    columns, rows = _defense_table(res, "worst case", keys, paper.TABLE1, with_clean=True)
    got = {r[0]: dict(zip(keys, r[4::2])) for r in rows}
    notes = [_protocol_note(params, res), *_ranking_notes("PGD", keys, paper.TABLE1, got),
             f"Per sample the worst of PGD-{params.steps}x{params.restarts} and its budget "
             f"check (PGD-{2 * params.steps}x{2 * params.restarts} on the samples still "
             "standing), step eps/5, CE, on each defense's hard output (CDA²: Algorithm 2's PPD "
             "selection; cda2-authors: the authors' max-prob x sigmoid(PPD) selection; the others: "
             "the averaged ensemble); "
             + ("each restart judged by its last iterate, as the published protocol does."
                if params.last_iterate else "a sample counts as broken if any iterate broke it "
                "(stronger than the paper's last-iterate protocol)."),
             "Table 1 is the paper's white-box row only; the second table attacks each "
             "defense with every white-box attack of `cda2 eval` (docs/evaluation.md).",
             *[f"check: {c}" for c in res.checks]]
    # every attack: the worst case of PGD, the adaptive family and the budget check
    every = _eval_results(ctx, "adaptive")
    _, w_rows = _defense_table(every, "worst case", keys, {}, with_clean=False)
    w_columns = ["method", "clean %"] + [f"every attack {k} %" for k in keys]
    w_rows = [[r[0], _pct(every.clean.get(r[0])), *r[2::2]] for r in w_rows]
    worst = {r[0]: dict(zip(keys, r[2:])) for r in w_rows}
    findings = _ranking_notes("Against every white-box attack (worst case)", keys, paper.TABLE1,
                              worst)
    notes += [f"Every attack: per sample the worst of PGD-{params.steps}x{params.restarts}, the "
              "adaptive family (against CDA²: soft selection, each sub-model, PPD push, BPDA, "
              "APGD-CE/DLR and the decision-margin attacks on its selection; against an "
              "ensemble: APGD-CE and -DLR on its averaged output) and the budget check; the "
              "paper's column it is ranked against is its PGD row (it reports no other).",
              *[f"check (every attack): {c}" for c in every.checks]]
    # cda2 eval's robust accuracy vs eps, of the defenses selecting by PPD (the paper's four)
    fig = ctx.folder / "whitebox" / "robustness.png"
    return Report(columns, rows, notes, fig if fig.is_file() else None,
                  {"robustness": res.robust_accuracy, "clean": res.clean,
                   "every_attack": every.robust_accuracy}, findings,
                  [("Against every white-box attack of `cda2 eval` (robust accuracy %, worst "
                    "case per sample)", w_columns, w_rows)])


#: The transfer tables: ``(preset, paper table, its name)``; Table 2 attacks from the first
#: hold-out ensemble, Table 5 from all of them.
_TRANSFER_TABLES = (("table2", paper.TABLE2, "Table 2"), ("table5", paper.TABLE5, "Table 5"))


def _used_surrogates(preset: str, items: Sequence[Any]) -> Sequence[Any]:
    return items[:1] if preset == "table2" else items


def _transfer_plan(params: TransferParams, ctx: Context) -> List[Step]:
    surrogates = _surrogate_runs(params, ctx)
    steps = _defense_steps(params, ctx) + _surrogate_steps(params, ctx)
    for preset, _, _ in _TRANSFER_TABLES:
        used = _used_surrogates(preset, surrogates)
        attack = {"attack": ["transfer"], "surrogate": [str(u) for u in used],
                  "transfer_preset": preset, "transfer_steps": params.transfer_steps,
                  "eps": list(params.eps)}
        steps += _eval_steps(params, ctx, f"transfer_{preset}", attack, extra_reads=used)
    return steps


def _transfer_report(params: TransferParams, ctx: Context) -> Report:
    keys = _eps_keys(params)
    columns, rows, measured, notes = [], [], {}, []
    for preset, table, ref in _TRANSFER_TABLES:
        res = _eval_results(ctx, f"transfer_{preset}")
        cols, part = _defense_table(res, "transfer (", keys, table, with_clean=False)
        columns = ["table"] + cols
        rows += [[ref] + r for r in part]
        measured[preset] = res.robust_accuracy
        label = next((lbl for by_row in res.robust_accuracy.values() for lbl in by_row
                      if lbl.startswith("transfer (")), "transfer")
        sizes = [m for m, _ in _used_surrogates(preset, params.surrogates)]
        notes.append(f"{ref}: `--transfer-preset {preset}`, {label}, {params.transfer_steps} "
                     f"iterations each, from {len(sizes)} hold-out ensemble(s) of "
                     f"{', '.join(map(str, sizes))} ResNet-{params.depth}s; a sample is robust "
                     "only if every variant is classified correctly.")
    for _, table, ref in _TRANSFER_TABLES:
        got = {r[1]: dict(zip(keys, r[3::2])) for r in rows if r[0] == ref}
        notes += _ranking_notes(f"{ref} transfer", keys[-1:], table, got)
    notes.insert(0, _protocol_note(params, res))
    return Report(columns, rows, notes, None, measured)


def _square_plan(params: SquareParams, ctx: Context) -> List[Step]:
    attack = {"attack": ["square"], "queries": params.queries,
              "square_eps": [params.square_eps], "eps": [params.square_eps]}
    return _defense_steps(params, ctx) + _eval_steps(params, ctx, "square", attack)


def _square_report(params: SquareParams, ctx: Context) -> Report:
    res = _eval_results(ctx, "square")
    key = f"{params.square_eps:g}"
    rows = []
    for name, *_ in _COMPARED:
        got = res.row(name, "Square-").get(key)
        rows.append([name, paper.TABLE3.get(name), _pct(res.clean.get(name)), _pct(got)])
    square = {r[0]: {key: r[3]} for r in rows}
    table3 = {m: {key: v} for m, v in paper.TABLE3.items()}
    notes = [_protocol_note(params, res), *_ranking_notes("Square", [key], table3, square),
             f"Square (query-only) with {params.queries} queries per sample at eps {key} "
             "(Table 3: 5000 queries, eps 0.03) against each defense's hard output."]
    return Report(["method", f"paper Square eps {key} %", "clean %", f"Square eps {key} %"], rows,
                  notes, None, {"robustness": res.robust_accuracy, "clean": res.clean})


_DEFENSES_SHOW = {
    "small": ("the direction of each comparison at a CPU budget (ResNet-8 x 3, 6 epochs on the "
              "shared subset's 5,085 images, 200 test images)",
              "the paper's accuracies (ResNet-20, 50,000 images, 100-200 epochs, 1,000 test images) "
              "or differences of a few points (200 images: about 3 points of noise)"),
    "paper": ("the paper's setting: ResNet-20 x 3, each method's own epochs, all of CIFAR-10 "
              "(--download or --data), DVERGE's 1,000 test images, the published protocol",
              "seed variance (one seed, as the paper); it needs many GPU hours"),
}


def _defense_budgets(kind: type, small: Mapping[str, Any], paper_: Mapping[str, Any]
                     ) -> Dict[str, Budget]:
    """The small and paper budgets of a defense experiment whose parameters are ``kind``: the
    shared training and evaluation sizes, then the experiment's own attack settings."""
    return {"small": Budget(kind(**_TRAIN_SMALL, **_EVAL_SMALL, **small), *_DEFENSES_SHOW["small"]),
            "paper": Budget(kind(**_TRAIN_PAPER, **_EVAL_PAPER, **paper_), *_DEFENSES_SHOW["paper"])}


#: The experiments, by ``cda2 reproduce`` name.
EXPERIMENTS: Dict[str, Experiment] = {e.name: e for e in (
    Experiment(
        "xor", "XOR: ensemble vs collaboration", "Sec. 4.2, Fig. 4",
        {"small": Budget(XorParams(seeds=(0, 1, 2, 3, 4)),
                         "the full experiment (it is cheap): whether averaging stays linear and "
                         "collaboration splits XOR, over 5 seeds",
                         "a tight seed-to-seed spread (5 seeds); there are no paper numbers to "
                         "match, only Fig. 4's claim"),
         "paper": Budget(XorParams(seeds=tuple(range(20))),
                         "the same over 20 seeds (the paper gives no seeds or numbers)",
                         "numbers to compare with: Fig. 4 has none")},
        _xor_plan, _xor_report),
    Experiment(
        "depth", "Does a collaboration beat one model? (standard training, four arms)",
        "Appendix E.1, Table 6",
        {"small": Budget(capacity.DepthParams((2, 8), epochs=15),
                         "on the shared subset (5,085 training, 1,017 test images), at depths 2 and "
                         "8, 15 epochs, one seed: the direction of each arm against one model and "
                         "the control",
                         "the paper's accuracies (50,000 images, ~100 epochs) or gains under ~3 "
                         "points (the standard error of one accuracy is ~1.5 points here)"),
         "cpu": Budget(capacity.DepthParams((2,), epochs=8, full_data=True),
                       "all of CIFAR-10 (--data cifar-10-jpeg.zip: the JPEG re-encoding) at depth "
                       "2, 8 epochs, one seed: about an hour on 2 CPU cores (--jobs 2); the "
                       "capacity-starved end of Table 6 with 10,000 test images (se ~0.5 points)",
                       "depth 20, the paper's 100 epochs, seed-to-seed spread"),
         "converged": Budget(
             capacity.DepthParams((2,), epochs=100, full_data=True,
                                  # the longest first: two at a time finish together
                                  arms=("authors", "authors_lr0.3", "paper", "control", "single"),
                                  # the seed check: the one model and the best CDA² arm of seed 0
                                  extra_seeds=(("authors_lr0.3", 1), ("single", 1))),
             "Table 6's depth-2 column as the paper trained it: all of CIFAR-10 (--data "
             "cifar-10-jpeg.zip: the JPEG re-encoding), 100 epochs, the paper's schedule, seed 0, "
             "five arms (the four above and the authors' arm at learning rate 0.3), 10,000 test "
             "images, and seed 1 of the one model and of the best CDA² arm on seed 0 (authors, lr "
             "0.3); about 2 h 40 min on a quiet 2-core CPU with --jobs 2 (27-31 s per three-model "
             "epoch, two runs side by side)",
             "depths 8-20, the spread over more than two seeds, and on seed 1 the comparison with "
             "the control (not run there)"),
         "gpu": Budget(capacity.DepthParams((2, 20), epochs=10, full_data=True),
                       "all of CIFAR-10 at both ends of Table 6 (depths 2 and 20), every arm, "
                       "10 epochs, one seed, meant for one device call with --jobs 8; not yet "
                       "timed on a GPU (the epochs are an estimate from the H200's 71 s for the "
                       "subset's Table 6 budget; the first GPU session must time it)",
                       "the paper's 100 epochs, seed-to-seed spread"),
         "paper": Budget(capacity.DepthParams((2, 8, 14, 20), epochs=100, seeds=(0, 1, 2),
                                               full_data=True),
                         "Table 6 itself with a control: all four depths, all of CIFAR-10, 100 "
                         "epochs, 3 seeds, 10,000 test images",
                         "hours on a GPU; the paper's exact data (the JPEG set is ~5/255 off)")},
        _depth_plan, _depth_report),
    Experiment(
        "time", "Training cost of each method on the same machine", "Appendix C, Table 4",
        {"small": Budget(TimeParams(depth=8, num_models=3, epochs=2, train_limit=256),
                         "each method's cost relative to CDA² on this machine (ResNet-8, "
                         "256 images, 2 epochs)",
                         "the paper's hours (another GPU, ResNet-20, 50,000 images); the ratios "
                         "shift with depth and with what else the machine runs"),
         "paper": Budget(TimeParams(depth=20, num_models=3, epochs=2, train_limit=None),
                         "Table 4's setting per epoch (ResNet-20 x 3, full CIFAR-10): x100 is "
                         "comparable with its 100-epoch times on similar hardware",
                         "a 2080 Ti's times on other hardware")},
        _time_plan, _time_report, methods=("gal", "dverge", "adp", "cda2")),
    Experiment(
        "whitebox", "White-box PGD against CDA² and the ensemble defenses", "Sec. 4.3, Table 1",
        _defense_budgets(WhiteboxParams,
                         {"eps": (0.01, 0.02, 0.03), "steps": 10, "restarts": 1,
                          "adaptive_restarts": 1, "apgd_steps": 10},
                         {"eps": paper.EPS, "steps": 50, "restarts": 5}),
        _whitebox_plan, _whitebox_report, methods=("ensemble", "gal", "dverge", "adp", "cda2")),
    Experiment(
        "transfer", "Transfer attacks from hold-out ensembles", "Sec. 4.3, Tables 2 and 5",
        _defense_budgets(TransferParams, {"eps": (0.01, 0.02, 0.03), "transfer_steps": 10},
                         {"eps": paper.EPS, "transfer_steps": 100}),
        _transfer_plan, _transfer_report, methods=("ensemble", "gal", "dverge", "adp", "cda2")),
    Experiment(
        "square", "Square (query-only) attack", "Sec. 4.3, Table 3",
        _defense_budgets(SquareParams, {"queries": 200, "square_eps": 0.03},
                         {"queries": 5000, "square_eps": 0.03}),
        _square_plan, _square_report, methods=("ensemble", "gal", "dverge", "adp", "cda2")),
)}


#: Every budget name of some experiment, smallest first (``cda2 reproduce --budget`` choices).
BUDGETS: Tuple[str, ...] = tuple(sorted(
    {b for e in EXPERIMENTS.values() for b in e.budgets},
    key=("small", "cpu", "converged", "gpu", "paper").index))


def missing_methods(exp: Experiment) -> List[str]:
    """The training methods ``exp`` needs that this installation does not have."""
    from ..training.methods import METHODS
    return [m for m in exp.methods if m not in METHODS]


def check_budget(exp: Experiment, budget: str) -> Budget:
    """The named budget of ``exp``, or ``ValueError`` naming the choices."""
    if budget not in exp.budgets:
        raise ValueError(f"budget: expected one of {tuple(exp.budgets)}, got {budget!r}")
    return exp.budgets[budget]


def describe(exp: Experiment) -> Sequence[str]:
    """Lines saying what each budget of ``exp`` can and cannot show."""
    return [f"{name}: shows {b.shows}; cannot show {b.cannot_show}" for name, b in exp.budgets.items()]
