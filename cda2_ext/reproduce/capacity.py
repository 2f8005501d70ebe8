"""``cda2 reproduce depth``: does a collaboration beat one model? (Appendix E.1, Table 6)

Table 6 claims that M = 3 collaborating ResNets beat one ResNet of the same depth under standard
training, by 2.0 points at depth 2 down to 0.6 at depth 20. Up to five **arms** answer it, each
trained with the same data, epochs, schedule and seed, and evaluated on the same test images:

* ``single``: one model (``--num-models 1``; Eq. 7 over one model is its cross-entropy).
* ``paper``: CDA² as the paper writes it: M = 3, Eq. 7's soft-min at sigma = 1, the paper's PPD
  head (BCE of sigmoid(s) against p_y, detached features), Algorithm 2's PPD selection.
* ``authors``: CDA² as the authors' latest code trains it: the detector weighting
  (``--weights detector``), the BCE of max-prob x sigmoid(s) training the trunk too
  (``--ppd-grad trunk --ppd-loss soe``), and selection by that detector (``soe``).
* ``authors_lr0.3``: the same at learning rate 0.3. In both CDA² arms a sample's weights sum to 1
  over the sub-models, so each gets about a third of an independent model's gradient; this arm
  asks whether that split gradient is the loss.
* ``control``: M = 3 models trained independently (``--method ensemble``: each on its own
  cross-entropy), answering by the most confident one (``maxprob``): what three models give
  without any collaboration training.

Per arm, depth and seed, ``cda2 eval-clean --rules all`` scores the run by every label-free rule,
each sub-model, the best sub-model, the oracle and a fitted selector on the same reported half of
the test images (:mod:`cda2_ext.evaluation.rules`), so every difference between arms is paired
over the same images. The verdicts, and where a loss comes from (the experts, the selector, the
PPD head's training, the split gradient), follow :data:`CRITERIA`, fixed before any number is
seen.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..jobs.evaluate_clean import CleanEvalJob
from ..jobs.train import TrainJob
from ..evaluation.rules import entry, paired_between
from . import paper
from .runner import Step, output_step, train_step

__all__ = ["Arm", "ARMS", "CRITERIA", "Comparison", "DepthParams", "depth_plan", "depth_report",
           "verdict", "where_lost", "split_gradient"]


@dataclass(frozen=True)
class Arm:
    """One arm of the experiment: how it is trained and how it answers.

    Attributes:
        name: short name (run folders, JSON keys). label: what the table says.
        num_models: M. train_options: the training options beyond the shared ones
            (:class:`~cda2_ext.training.config.TrainConfig` fields, in the order written).
        score: the evaluation's selection score (how the M sub-models give one answer).
    """

    name: str
    label: str
    num_models: int
    train_options: Tuple[Tuple[str, Any], ...]
    score: str


#: How the authors' latest code trains CDA² (their detector weighting, the BCE of max-prob x
#: sigmoid(PPD) training the trunk, selection by that detector).
_AUTHORS: Tuple[Tuple[str, Any], ...] = (
    ("phases", "standard"), ("weights", "detector"), ("ppd_grad", "trunk"), ("ppd_loss", "soe"),
    ("select_score", "soe"))

ARMS: Tuple[Arm, ...] = (
    Arm("single", "one model", 1, (("phases", "standard"),), "ppd"),
    Arm("paper", "CDA², paper (Eq. 7, sigma 1)", 3, (("phases", "standard"),), "ppd"),
    Arm("authors", "CDA², authors' weighting", 3, _AUTHORS, "soe"),
    # In both CDA² arms a sample's weights sum to 1 over the M sub-models, so each sub-model gets
    # about 1/M of the gradient an independent model gets: this arm gives it back (0.1 x 3).
    Arm("authors_lr0.3", "CDA², authors' weighting, lr 0.3", 3, _AUTHORS + (("lr", 0.3),), "soe"),
    Arm("control", "3 independent, most confident", 3, (("method", "ensemble"),), "maxprob"),
)
_BY_NAME = {a.name: a for a in ARMS}
#: The arms that are CDA², each judged against ``single`` and ``control``.
_CDA2_ARMS = ("paper", "authors", "authors_lr0.3")

#: The verdict rules, written before any 100-epoch run and printed in every report. Every
#: comparison is on the reported half of the test images, with its paired standard error.
CRITERIA = (
    "Verdicts, fixed before the runs; each uses 2 paired standard errors (se of the per-image "
    "difference over the same reported images) and must hold on every seed. Confirms Table 6: a "
    "CDA² arm's own rule beats both the one model and the control's best label-free rule. "
    "Contradicts Table 6: the arm's own rule is below the one model. Otherwise: inconclusive. "
    "The loss is in the experts: the arm's best sub-model (chosen on the fit half) is below the "
    "one model. The loss is in the selector: the best sub-model is within 1 point of the one model "
    "but the arm's rule is below it by more than 1 point (and 2 se). The loss is in how the PPD "
    "head is trained: the fitted selector beats the one model while the arm's rule does not. The "
    "loss is the split gradient: the authors' arm's experts are below the one model and learning "
    "rate 0.3 closes that gap (its best sub-model is not below the one model).")

@dataclass(frozen=True)
class DepthParams:
    """A budget of the experiment: what every arm runs.

    Attributes:
        depths: the ResNet depths (Table 6: 2, 8, 14, 20). epochs, seeds: of every run.
        arms: the arms' names (:data:`ARMS`).
        extra_seeds: ``(arm, seed)`` pairs run besides: a seed check of some arms. An arm's
            comparison on such a seed needs ``single`` on it too; without the control there,
            the seed cannot confirm Table 6 (that needs the control on every seed), but it
            counts for "contradicts" and for where the loss is.
        full_data: meant for all of CIFAR-10 (the report warns when the data were smaller).
        train_limit, test_limit: only the first N training / test images (``None``: all).
    """

    depths: Tuple[int, ...]
    epochs: int
    seeds: Tuple[int, ...] = (0,)
    arms: Tuple[str, ...] = ("single", "paper", "authors", "control")
    extra_seeds: Tuple[Tuple[str, int], ...] = ()
    full_data: bool = False
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None


def _runs(params: DepthParams) -> List[Tuple[int, str]]:
    """Every ``(seed, arm)`` the budget trains, per depth: each arm on each seed, then the
    extra seeds."""
    pairs = [(s, a) for s in params.seeds for a in params.arms]
    return pairs + [(s, a) for a, s in params.extra_seeds if (s, a) not in pairs]


def _run(folder: Path, depth: int, arm: str, seed: int) -> Path:
    return folder / f"resnet{depth}_{arm}_seed{seed}"


def _eval(folder: Path, depth: int, arm: str, seed: int) -> Path:
    # beside the run folder, not in it: the trainer owns its folder
    return folder / f"resnet{depth}_{arm}_seed{seed}.eval_clean.json"


def depth_plan(params: DepthParams, folder: Path, train_options: Mapping[str, Any],
               eval_options: Mapping[str, Any]) -> List[Step]:
    """Every arm x depth x seed: training, then the clean evaluation with the arm's score.
    Train steps first, so that a runner may train them concurrently."""
    trains, evals = [], []
    train_limit = {"train_limit": params.train_limit} if params.train_limit else {}
    test_limit = {"limit": params.test_limit} if params.test_limit else {}
    for depth in params.depths:
        for seed, name in _runs(params):
            arm = _BY_NAME[name]
            run = _run(folder, depth, arm.name, seed)
            trains.append(train_step(TrainJob.of(
                **dict(arm.train_options), depth=depth, num_models=arm.num_models,
                epochs=params.epochs, seed=seed, eval_every=0, **train_options,
                **train_limit, out_dir=str(run))))
            out = _eval(folder, depth, arm.name, seed)
            # every rule, not only the arm's own: where a loss is comes from the others
            evals.append(output_step(CleanEvalJob.of(
                checkpoint=str(run), score=arm.score, rules="all", out=str(out),
                **eval_options, **test_limit), out, reads=[run]))
    return trains + evals


def _eval_json(folder: Path, depth: int, arm: str, seed: int) -> Dict[str, Any]:
    return json.loads(_eval(folder, depth, arm, seed).read_text())


Diff = Tuple[float, float]  # (paired difference, its standard error), fractions


def _beats(d: Diff) -> bool:
    return d[0] > 2 * d[1]


def _below(d: Diff, points: float = 0.0) -> bool:
    return -d[0] > max(2 * d[1], points / 100)


@dataclass(frozen=True)
class Comparison:
    """One CDA² arm against the one model and the control, on one seed (paired differences on
    the reported half)."""

    own_vs_single: Diff
    own_vs_control: Optional[Diff]  # None: the control did not run on this seed
    best_vs_single: Diff
    fitted_vs_single: Diff


def verdict(runs: Sequence[Comparison]) -> str:
    """Table 6's verdict (:data:`CRITERIA`) for one arm over its seeds."""
    if runs and all(_beats(c.own_vs_single) and c.own_vs_control is not None
                    and _beats(c.own_vs_control) for c in runs):
        return "confirms"
    if runs and all(_below(c.own_vs_single) for c in runs):
        return "contradicts"
    return "inconclusive"


def where_lost(runs: Sequence[Comparison]) -> List[str]:
    """Which of :data:`CRITERIA`'s losses hold on every seed: ``experts``, ``selector``,
    ``ppd training`` (none, one or several)."""
    found = []
    if runs and all(_below(c.best_vs_single) for c in runs):
        found.append("experts")
    if runs and all(abs(c.best_vs_single[0]) <= 0.01 and _below(c.own_vs_single, 1.0)
                    for c in runs):
        found.append("selector")
    if runs and all(_beats(c.fitted_vs_single) and not _beats(c.own_vs_single) for c in runs):
        found.append("ppd training")
    return found


def split_gradient(authors: Sequence[Comparison], faster: Sequence[Comparison]) -> Optional[bool]:
    """Whether learning rate 0.3 closes the authors' arm's experts gap on every seed: ``None``
    where there is no gap to close."""
    if not authors or not all(_below(c.best_vs_single) for c in authors):
        return None
    return bool(faster) and all(not _below(c.best_vs_single) for c in faster)


def _compare(arm: Dict[str, Any], single: Dict[str, Any],
             control: Optional[Dict[str, Any]]) -> Comparison:
    """The paired differences of one arm's rule report against the one model's and the
    control's (the control answers by its best label-free rule on the reported half; ``None``:
    no control on this seed)."""
    a, s = arm["rules"], single["rules"]
    own = a["own"]
    vs_control = None
    if control is not None:
        c = control["rules"]
        best = max((e for e in c["entries"] if e["kind"] == "rule"), key=lambda e: e["accuracy"])
        vs_control = paired_between(a, own, c, best["name"])
    return Comparison(paired_between(a, own, s, s["own"]), vs_control,
                      paired_between(a, "best sub-model", s, s["own"]),
                      paired_between(a, "fitted selector", s, s["own"]))


def _pct(v: Optional[float]) -> Optional[float]:
    return None if v is None else 100.0 * v


def _findings(depth: int, label: str, runs: Sequence[Comparison], seeds: Sequence[int],
              table6: str, lost: Sequence[str]) -> str:
    gains = " and ".join(f"{100 * c.own_vs_single[0]:+.1f} ± {100 * c.own_vs_single[1]:.1f}"
                         for c in runs) + " points vs the one model"
    if len(runs) > 1:
        gains += f" on seeds {' and '.join(map(str, seeds))}"
    where = {"experts": "its experts (the best sub-model is below the one model)",
             "selector": "its selector (a sub-model as good as the one model exists, the rule "
                         "does not pick it)",
             "ppd training": "how its PPD head is trained (a fitted selector beats the one model, "
                             "the arm's rule does not)"}
    says = {"inconclusive": "inconclusive on"}.get(table6, table6)
    text = f"Depth {depth}, {label}: {says} Table 6 ({gains})"
    if lost:
        text += "; the loss is in " + " and in ".join(where[w] for w in lost)
    return text + "."


def depth_report(params: DepthParams, folder: Path, data_note: Optional[str]
                 ) -> Tuple[List[str], List[List[Any]], List[str], Dict[str, Any],
                            List[str], List[Tuple[str, List[str], List[List[Any]]]]]:
    """``(columns, rows, notes, measured, findings, tables)`` from the evaluations: a row per
    depth, seed and arm; ``findings`` are the verdicts in words (printed before the numbers),
    ``tables`` the rule-by-rule table of every arm."""
    columns = ["depth", "seed", "arm", "rule", "answer %", "± images", "vs one model", "± paired",
               "best sub-model %", "fitted selector %", "oracle %", "ensemble %", "paper gain",
               "verdict", "loss in"]
    rows: List[List[Any]] = []
    measured: Dict[str, Any] = {}
    findings: List[str] = []
    tables: List[Tuple[str, List[str], List[List[Any]]]] = []
    notes: List[str] = [CRITERIA]
    n_rep = None
    arms = [a for a in ARMS if a.name in params.arms]
    runs = _runs(params)
    seeds = list(dict.fromkeys(s for s, _ in runs))
    for depth in params.depths:
        res = {(a, s): _eval_json(folder, depth, a, s) for s, a in runs}
        comps: Dict[str, List[Comparison]] = {}
        compared: Dict[str, List[int]] = {}  # the seeds of each arm's comparisons
        if {"single", "control"} <= set(params.arms):
            for a in arms:
                if a.name in _CDA2_ARMS:
                    compared[a.name] = [s for s in seeds
                                        if (a.name, s) in res and ("single", s) in res]
                    comps[a.name] = [_compare(res[a.name, s], res["single", s],
                                              res.get(("control", s))) for s in compared[a.name]]
        verdicts = {a: verdict(c) for a, c in comps.items()}
        lost = {a: where_lost(c) for a, c in comps.items()}
        for a in arms:
            if a.name in comps:
                findings.append(_findings(depth, a.label, comps[a.name], compared[a.name],
                                          verdicts[a.name], lost[a.name]))
        if "authors" in comps and "authors_lr0.3" in comps:
            closed = split_gradient(comps["authors"], comps["authors_lr0.3"])
            findings.append(
                f"Depth {depth}, split gradient: " + (
                    "the authors' arm's experts are not below the one model, so there is no gap "
                    "for learning rate 0.3 to close." if closed is None else
                    "learning rate 0.3 closes the authors' arm's experts gap: the loss is the "
                    "split gradient." if closed else
                    "learning rate 0.3 does not close the authors' arm's experts gap."))
        for s in seeds:
            single = res.get(("single", s))
            for a in (a for a in arms if (a.name, s) in res):
                r = res[a.name, s]["rules"]
                n_rep = r["n_report"]
                own = entry(r, r["own"])
                vs = (paired_between(r, r["own"], single["rules"], single["rules"]["own"])
                      if single is not None and a.name != "single" else None)
                multi = a.num_models > 1
                rows.append([
                    depth, s, a.label, r["own"], _pct(own["accuracy"]), _pct(own["se"]),
                    _pct(vs[0]) if vs else None, _pct(vs[1]) if vs else None,
                    _pct(entry(r, "best sub-model")["accuracy"]) if multi else None,
                    _pct(entry(r, "fitted selector")["accuracy"]) if multi else None,
                    _pct(entry(r, "oracle")["accuracy"]) if multi else None,
                    _pct(entry(r, "ensemble")["accuracy"]) if multi else None,
                    paper.TABLE6.get(depth, {}).get("gain") if a.name in _CDA2_ARMS else None,
                    verdicts.get(a.name, ""), ", ".join(lost.get(a.name, []))])
            # the rule-by-rule table: every entry of every multi-model arm, vs the one model
            multi_arms = [a for a in arms if a.num_models > 1 and (a.name, s) in res]
            if multi_arms:
                names = [e["name"] for e in res[multi_arms[0].name, s]["rules"]["entries"]]
                t_rows = []
                for name in names:
                    row: List[Any] = [entry(res[multi_arms[0].name, s]["rules"], name)["label"]
                                      .split(" (sub-model")[0]]
                    for a in multi_arms:
                        r = res[a.name, s]["rules"]
                        e = entry(r, name)
                        cell = f"{100 * e['accuracy']:.1f}"
                        if single is not None:
                            d, se = paired_between(r, name, single["rules"], single["rules"]["own"])
                            cell += f" ({100 * d:+.1f} ± {100 * se:.1f})"
                        row.append(cell + (" own" if name == r["own"] else ""))
                    t_rows.append(row)
                tables.append((f"Depth {depth}, seed {s}: every rule of every arm, accuracy % on "
                               f"the reported half (vs the one model, ± paired se)",
                               ["rule"] + [a.label for a in multi_arms], t_rows))
        measured[str(depth)] = {
            "verdicts": verdicts, "loss_in": lost,
            "arms": {f"{a}_seed{s}": {k: v for k, v in r.items() if k != "rules"}
                     | {"rules": {k: v for k, v in r["rules"].items() if k != "per_image"}}
                     for (a, s), r in res.items()}}
    extra = "".join(f"; {_BY_NAME[a].label} also seed {s}" for a, s in params.extra_seeds)
    notes.append(f"Standard training (no attack), {params.epochs} epochs, seed(s) "
                 f"{', '.join(map(str, params.seeds))}{extra}; every arm on the same data, "
                 f"schedule and seed. Every accuracy is on the same {n_rep} reported test "
                 "images (a fixed random half; the other half chooses the best sub-model and "
                 "fits the selector). "
                 "'± images' is the binomial standard error of one accuracy, '± paired' that of "
                 "the difference over the same images.")
    notes.append("rule = the arm's own: Algorithm 2's PPD (paper arm), the authors' "
                 "max-prob x sigmoid(PPD) detector (soe, authors' arms), the most confident model "
                 "(maxprob, control); ensemble = mean probability; oracle = some sub-model is "
                 "right; fitted selector = per sub-model a logistic model of being right from its "
                 "confidence features (docs/evaluation.md).")
    notes.append(f"Data: {data_note}" if data_note else "Data: the official CIFAR-10 files.")
    if params.full_data and n_rep is not None and 2 * n_rep < 10000:
        notes.append(f"This budget is meant for all of CIFAR-10, but the test set here has only "
                     f"{2 * n_rep} images: pass --data with the full set.")
    return columns, rows, notes, measured, findings, tables
