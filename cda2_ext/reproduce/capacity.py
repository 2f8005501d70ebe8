"""``cda2 reproduce depth``: does a collaboration beat one model? (Appendix E.1, Table 6)

Table 6 claims that M = 3 collaborating ResNets beat one ResNet of the same depth under standard
training, by 2.0 points at depth 2 down to 0.6 at depth 20. Four **arms** answer it, each trained
with the same data, epochs, schedule and seed, and evaluated on the same test images:

* ``single``: one model (``--num-models 1``; Eq. 7 over one model is its cross-entropy).
* ``paper``: CDA² as the paper writes it: M = 3, Eq. 7's soft-min at sigma = 1, the paper's PPD
  head (BCE of sigmoid(s) against p_y, detached features), Algorithm 2's PPD selection.
* ``authors``: CDA² as the authors' latest code trains it: the detector weighting
  (``--weights detector``), the BCE of max-prob x sigmoid(s) training the trunk too
  (``--ppd-grad trunk --ppd-loss soe``), and selection by that detector (``soe``).
* ``control``: M = 3 models trained independently (``--method ensemble``: each on its own
  cross-entropy), answering by the most confident one (``maxprob``): what three models give
  without any collaboration training.

Per arm, depth and seed: the arm's answer, the ensemble (mean probability), the best sub-model and
the oracle (some sub-model right), each with its standard error over test images; means and their
standard error over seeds where there are several. The verdict per depth follows the criteria in
:data:`CRITERIA`, fixed before any number is seen.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..jobs.evaluate_clean import CleanEvalJob
from ..jobs.train import TrainJob
from . import paper
from .runner import Step, output_step, train_step

__all__ = ["Arm", "ARMS", "CRITERIA", "DepthParams", "depth_plan", "depth_report", "verdict"]


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


ARMS: Tuple[Arm, ...] = (
    Arm("single", "one model", 1, (("phases", "standard"),), "ppd"),
    Arm("paper", "CDA², paper (Eq. 7, sigma 1)", 3, (("phases", "standard"),), "ppd"),
    Arm("authors", "CDA², authors' weighting", 3,
        (("phases", "standard"), ("weights", "detector"), ("ppd_grad", "trunk"),
         ("ppd_loss", "soe"), ("select_score", "soe")), "soe"),
    Arm("control", "3 independent, most confident", 3, (("method", "ensemble"),), "maxprob"),
)
_BY_NAME = {a.name: a for a in ARMS}
#: The arms that are CDA², each judged against ``single`` and ``control``.
_CDA2_ARMS = ("paper", "authors")

#: The verdict rule, written before the numbers and printed in every report.
CRITERIA = (
    "Verdict per depth and CDA² arm, fixed before the runs: 'confirms' if on every seed the arm's "
    "accuracy beats both the single model and the control by more than two standard errors of the "
    "difference (sqrt(se1² + se2²), se = sqrt(p(1-p)/n) over the n test images); 'contradicts' if "
    "on every seed it is more than two such standard errors below the single model; otherwise "
    "'inconclusive'.")


@dataclass(frozen=True)
class DepthParams:
    """A budget of the experiment: what every arm runs.

    Attributes:
        depths: the ResNet depths (Table 6: 2, 8, 14, 20). epochs, seeds: of every run.
        arms: the arms' names (:data:`ARMS`).
        full_data: meant for all of CIFAR-10 (the report warns when the data were smaller).
        train_limit, test_limit: only the first N training / test images (``None``: all).
    """

    depths: Tuple[int, ...]
    epochs: int
    seeds: Tuple[int, ...] = (0,)
    arms: Tuple[str, ...] = tuple(a.name for a in ARMS)
    full_data: bool = False
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None


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
        for seed in params.seeds:
            for arm in (_BY_NAME[n] for n in params.arms):
                run = _run(folder, depth, arm.name, seed)
                trains.append(train_step(TrainJob.of(
                    **dict(arm.train_options), depth=depth, num_models=arm.num_models,
                    epochs=params.epochs, seed=seed, eval_every=0, **train_options,
                    **train_limit, out_dir=str(run))))
                out = _eval(folder, depth, arm.name, seed)
                evals.append(output_step(CleanEvalJob.of(
                    checkpoint=str(run), score=arm.score, out=str(out), **eval_options,
                    **test_limit), out, reads=[run]))
    return trains + evals


def _se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` over ``n`` test images."""
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def _mean_se(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and its standard error over seeds (``None`` with one seed)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var / len(values))


def verdict(arm: Sequence[float], single: Sequence[float], control: Sequence[float], n: int) -> str:
    """:data:`CRITERIA` on per-seed accuracies (fractions) of one CDA² arm, the single model and
    the control, each over the same ``n`` test images."""
    def z(a: float, b: float) -> float:
        se = math.sqrt(_se(a, n) ** 2 + _se(b, n) ** 2)
        return (a - b) / se if se > 0 else (math.inf if a > b else -math.inf if a < b else 0.0)
    if all(z(a, s) > 2 and z(a, c) > 2 for a, s, c in zip(arm, single, control)):
        return "confirms"
    if all(z(a, s) < -2 for a, s in zip(arm, single)):
        return "contradicts"
    return "inconclusive"


def _pct(v: Optional[float]) -> Optional[float]:
    return None if v is None else 100.0 * v


def depth_report(params: DepthParams, folder: Path, data_note: Optional[str]
                 ) -> Tuple[List[str], List[List[Any]], List[str], Dict[str, Any]]:
    """``(columns, rows, notes, measured)`` from the evaluations: a row per depth and arm."""
    columns = ["depth", "arm", "answer %", "± images", "± seeds", "ensemble %", "best sub-model %",
               "oracle %", "gain vs single", "paper gain", "verdict"]
    rows: List[List[Any]] = []
    measured: Dict[str, Any] = {}
    notes: List[str] = [CRITERIA]
    n_test = None
    for depth in params.depths:
        per_arm: Dict[str, List[Dict[str, Any]]] = {}
        for name in params.arms:
            per_arm[name] = [json.loads(_eval(folder, depth, name, s).read_text())
                             for s in params.seeds]
        measured[str(depth)] = per_arm
        n_test = per_arm[params.arms[0]][0]["n"]
        answer = {a: [r["collaboration"] for r in rs] for a, rs in per_arm.items()}
        verdicts = {a: verdict(answer[a], answer["single"], answer["control"], n_test)
                    for a in _CDA2_ARMS if a in answer and {"single", "control"} <= set(answer)}
        single_mean = _mean_se(answer["single"])[0] if "single" in answer else None
        for name, rs in per_arm.items():
            mean, seed_se = _mean_se(answer[name])
            stat = {k: _mean_se([max(r["submodels"]) if k == "best" else r[k] for r in rs])[0]
                    for k in ("ensemble", "best", "oracle")}
            multi = _BY_NAME[name].num_models > 1
            gain = None if single_mean is None or name == "single" else 100 * (mean - single_mean)
            rows.append([depth, _BY_NAME[name].label, _pct(mean), _pct(_se(mean, n_test)),
                         _pct(seed_se), _pct(stat["ensemble"]) if multi else None,
                         _pct(stat["best"]) if multi else None,
                         _pct(stat["oracle"]) if multi else None, gain,
                         paper.TABLE6.get(depth, {}).get("gain") if name in _CDA2_ARMS else None,
                         verdicts.get(name, "")])
        measured[str(depth)]["verdicts"] = verdicts
    seeds = params.seeds
    notes.append(f"Standard training (no attack), {params.epochs} epochs, seed(s) "
                 f"{', '.join(map(str, seeds))}; every arm on the same data, schedule and seed, "
                 f"evaluated on the same {n_test} test images. '± images' is the standard error "
                 "over test images, '± seeds' over seeds (blank with one seed); gain is in points.")
    notes.append("answer = the arm's own rule: Algorithm 2's PPD (paper arm), the authors' "
                 "max-prob x sigmoid(PPD) detector (authors' arm), the most confident model "
                 "(control); ensemble = mean probability; oracle = some sub-model is right.")
    notes.append(f"Data: {data_note}" if data_note else
                 f"Data: the official CIFAR-10 files ({n_test} test images).")
    if params.full_data and n_test is not None and n_test < 10000:
        notes.append(f"This budget is meant for all of CIFAR-10, but the test set here has only "
                     f"{n_test} images: pass --data with the full set.")
    return columns, rows, notes, measured
