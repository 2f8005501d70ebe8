"""``cda2 compare``: finished runs side by side, in the paper's layout (Tables 1-4).

Reads, per run folder, its checkpoint's config (which method, options), its ``metrics.json``
(training time and images/s per epoch) and its rows in a ``robustness.json`` written by
``cda2 eval --out DIR`` (one file may hold several runs: ``cda2 eval --checkpoint RUN...``). Prints
one table - a row per run; columns clean, white-box PGD per eps (Table 1), the adaptive worst case
per eps where the model has a selection (CDA²; an ensemble has none), transfer per eps (Tables
2/5), Square (Table 3), the worst case over everything per eps, and training time and images/s
(Table 4) - and writes ``compare.json``, ``compare.csv`` and ``compare.png`` into ``--out``.

Example (after ``cda2 eval --checkpoint runs/cda2 runs/adp ... --out runs/eval``)::

    cda2 compare runs/cda2 runs/ens runs/adp runs/gal runs/dverge --eval runs/eval --out runs/compare
"""
from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..data import dataset_name
from ..storage.checkpoint import atomic_write, checkpoint_files, read_document
from ..errors import CheckpointError, CLIError, one_line
from ..evaluation.rows import ADAPTIVE_WORST, WORST
from ..storage.run_folder import (ROBUSTNESS_NAME, RobustnessRecord, check_output, save_or_rescue,
                                training_time)
from ..training.config import TrainConfig

__all__ = ["register", "run", "RunSummary", "summarize_run", "find_robustness", "GROUPS",
           "format_table", "to_csv", "plot"]

#: Output files of ``cda2 compare`` (in ``--out``).
COMPARE_FILES = ("compare.json", "compare.csv", "compare.png")
#: Table column groups, in the paper's order: key -> heading.
GROUPS: Dict[str, str] = {"pgd": "PGD", "adaptive": "adaptive worst", "transfer": "transfer",
                          "square": "Square", "worst": "worst case"}


def _group(label: str) -> Optional[str]:
    """The column group of a robustness row label (the labels of
    :mod:`cda2_ext.evaluation.rows`), or ``None`` for rows the table leaves out (the parts of the
    adaptive worst case, checks); every row stays in ``compare.json``."""
    if label == ADAPTIVE_WORST.label:
        return "adaptive"
    if label == WORST.label:
        return "worst"
    for prefix, group in (("PGD-", "pgd"), ("transfer", "transfer"), ("Square-", "square")):
        if label.startswith(prefix):
            return group
    return None


@dataclass
class RunSummary:
    """One run's line of the comparison.

    Attributes:
        run: the run folder. method: ``--method`` (``+adv`` appended for adversarial variants).
        config: the run's training options that identify it (method, M, depth, epochs, ...).
        train_seconds: summed epoch times of the run itself; ``init_seconds``: those of the run it
            started from (DVERGE's ``--init-from``), or ``None``.
        images_per_s: training images per second over all its epochs.
        clean: clean accuracy in ``cda2 eval`` (``None`` if not evaluated).
        groups: ``{group: {eps: accuracy}}`` for the :data:`GROUPS` found.
        rows: every row ``cda2 eval`` reported for this run, ``{label: {eps: accuracy}}``.
        source: the robustness.json the rows come from. notes: warnings about this run.
    """

    run: str
    method: str
    config: Dict[str, Any]
    train_seconds: float
    images_per_s: float
    init_seconds: Optional[float] = None
    clean: Optional[float] = None
    groups: Dict[str, Dict[float, float]] = field(default_factory=dict)
    rows: Dict[str, Dict[str, float]] = field(default_factory=dict)
    source: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    @property
    def data(self) -> str:
        """What the run was trained on, and its K: ``"CIFAR-10 (10 classes)"``."""
        name = dataset_name(self.config.get("dataset", "cifar10"), self.config.get("data_dir"))
        return f"{name} ({self.config.get('num_classes', 10)} classes)"

    @property
    def has_selection(self) -> bool:
        """CDA² answers through Algorithm 2's selection; the ensemble methods do not."""
        return self.config.get("method", "cda2") == "cda2"

    def to_dict(self) -> Dict[str, Any]:
        key = lambda d: {f"{e:g}": v for e, v in sorted(d.items())}  # noqa: E731
        return {"run": self.run, "method": self.method, "config": self.config,
                "train_seconds": round(self.train_seconds, 2),
                "init_seconds": None if self.init_seconds is None else round(self.init_seconds, 2),
                "images_per_s": round(self.images_per_s, 2), "clean": self.clean,
                "has_selection": self.has_selection, "data": self.data,
                **{g: key(v) for g, v in self.groups.items()}, "all_rows": self.rows,
                "source": self.source, "notes": self.notes}


_CONFIG_KEYS = ("method", "adv", "arch", "num_models", "depth", "epochs", "batch_size", "optimizer",
                "lr", "eps", "alpha", "steps", "train_limit", "dataset", "data_dir", "num_classes",
                "init_from", "seed")


def summarize_run(run: str) -> RunSummary:
    """A run folder's method, options and training cost (no robustness yet); the run's options
    come from its checkpoint document, digest-checked and validated like the command line's."""
    folder = checkpoint_files(run)[0].parent
    doc = read_document(run)
    cfg = TrainConfig.from_meta(doc, checkpoint_files(run)[1]).to_dict()
    cost = training_time(folder)
    method = cfg.get("method", "cda2") + ("+adv" if cfg.get("adv") else "")
    s = RunSummary(str(run), method, {k: cfg.get(k) for k in _CONFIG_KEYS if k in cfg}, cost.seconds,
                   cost.images_per_s)
    if cfg.get("init_from"):
        try:
            s.init_seconds = training_time(cfg["init_from"]).seconds
        except CheckpointError as err:
            s.notes.append(f"the starting run's time is unknown ({err})")
    return s


def _same_run(a: str, b: Path) -> bool:
    return checkpoint_files(a)[0].resolve() == checkpoint_files(b)[0].resolve()


def find_robustness(summary: RunSummary, sources: Sequence[Path]) -> None:
    """Fill ``summary``'s clean accuracy and rows from the first robustness.json of ``sources``
    whose ``config.checkpoints`` names this run (compared as resolved paths)."""
    for src in sources:
        if _take_rows(summary, RobustnessRecord.read(src)):
            return
    summary.notes.append("no robustness.json among the given ones evaluates this run "
                         "(cda2 eval --checkpoint RUN --out DIR, then --eval DIR)")


def _take_rows(summary: RunSummary, record: RobustnessRecord) -> bool:
    """Fill ``summary`` from one evaluation's record if it evaluates this run."""
    src = record.source
    try:
        name = next((n for n, path in record.checkpoints.items()
                     if _same_run(path, Path(summary.run))), None)
        if name is None:
            return False
        summary.source = str(src)
        clean = record.clean.get(name)
        summary.clean = None if clean is None else float(clean)
        summary.rows = record.robust_accuracy.get(name, {})
        for label, by_eps in summary.rows.items():
            group = _group(label)
            if group is not None:
                summary.groups.setdefault(group, {}).update(
                    {float(e): float(v) for e, v in by_eps.items()})
        targets = record.targets
    except (AttributeError, TypeError, ValueError, OSError) as err:  # not what cda2 eval writes
        raise CheckpointError(f"{src} is not a robustness.json of cda2 eval "
                              f"({one_line(err)})") from None
    selection_rows = [lab for lab in summary.rows if lab.startswith("adaptive: ")
                      and not lab.startswith("adaptive: apgd-ce") and
                      not lab.startswith("adaptive: apgd-dlr")]
    if not summary.has_selection and (targets.get(name) == "collaboration" or
                                      (not targets and selection_rows)):
        summary.notes.append(
            f"{summary.method} has no selection, but {src} evaluated it through Algorithm 2 "
            "(its untrained PPD heads pick the answering sub-model): these rows are not the "
            "ensemble's; evaluate it as an ensemble (mean probability)")
    return True


def _eps_columns(summaries: Sequence[RunSummary]) -> Dict[str, List[float]]:
    cols: Dict[str, List[float]] = {}
    for g in GROUPS:
        es = sorted({e for s in summaries for e in s.groups.get(g, {})
                     if g != "adaptive" or s.has_selection})
        if es:
            cols[g] = es
    return cols


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100.0 * x:.1f}"


def _cells(s: RunSummary, cols: Dict[str, List[float]]) -> List[str]:
    out = [s.method, Path(s.run).name or s.run, _pct(s.clean)]
    for g, es in cols.items():
        if g == "adaptive" and not s.has_selection:
            out += ["n/a"] * len(es)
        else:
            out += [_pct(s.groups.get(g, {}).get(e)) for e in es]
    init = "" if s.init_seconds is None else f" (+{s.init_seconds:.0f})"
    out += [f"{s.train_seconds:.0f}{init}", f"{s.images_per_s:.1f}"]
    return out


def format_table(summaries: Sequence[RunSummary]) -> str:
    """The comparison as text: a group heading line, an eps line, one line per run (% accuracy;
    ``n/a``: no selection to attack; ``-``: not evaluated). Training seconds show ``(+N)`` for
    the run a method started from (DVERGE's ensemble)."""
    cols = _eps_columns(summaries)
    head1 = ["", "", ""] + [GROUPS[g] if i == 0 else "" for g, es in cols.items()
                            for i in range(len(es))] + ["train", "train"]
    head2 = ["method", "run", "clean"] + [f"{e:g}" for es in cols.values() for e in es] + ["s", "img/s"]
    body = [_cells(s, cols) for s in summaries]
    rows = [head1, head2] + body
    widths = [max(len(r[i]) for r in rows) for i in range(len(head2))]
    fmt = lambda r: "  ".join(v.ljust(w) if i < 2 else v.rjust(w)  # noqa: E731
                              for i, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head1), fmt(head2), "  ".join("-" * w for w in widths)] +
                     [fmt(r) for r in body])


def to_csv(summaries: Sequence[RunSummary], path: Path) -> Path:
    """One row per run; accuracy columns ``{group}@{eps}`` in %, empty where not evaluated."""
    cols = _eps_columns(summaries)
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["method", "run", "clean"] + [f"{g}@{e:g}" for g, es in cols.items() for e in es]
               + ["train_seconds", "init_seconds", "images_per_s"])
    for s in summaries:
        acc = [s.groups.get(g, {}).get(e) if (g != "adaptive" or s.has_selection) else None
               for g, es in cols.items() for e in es]
        w.writerow([s.method, s.run, "" if s.clean is None else f"{100 * s.clean:.2f}"]
                   + ["" if a is None else f"{100 * a:.2f}" for a in acc]
                   + [f"{s.train_seconds:.2f}",
                      "" if s.init_seconds is None else f"{s.init_seconds:.2f}",
                      f"{s.images_per_s:.2f}"])
    atomic_write(path, buf.getvalue().encode())  # replaced, never written through a link
    return path


def plot(summaries: Sequence[RunSummary], path: Path) -> Path:
    """PNG: robust accuracy vs eps under PGD and under the worst case (eps 0 = clean), transfer
    vs eps, and training time per run."""
    from ..plotting import new_figure, save_figure

    fig, axes = new_figure(1, 3, figsize=(15, 4.8))
    for ax, groups, title in ((axes[0], ("pgd", "worst"), "white-box: PGD (solid), worst case (dotted)"),
                              (axes[1], ("transfer",), "transfer from hold-out ensembles")):
        for k, s in enumerate(summaries):
            color = f"C{k % 10}"
            for g in groups:
                d = s.groups.get(g, {})
                if not d:
                    continue
                xs, ys = sorted(d), [100 * d[e] for e in sorted(d)]
                if s.clean is not None:
                    xs, ys = [0.0] + xs, [100 * s.clean] + ys
                ax.plot(xs, ys, marker="o", markersize=4, color=color,
                        linestyle=":" if g == "worst" else "-",
                        label=s.method if g == groups[0] else None)
        ax.set_xlabel("L-inf radius eps (0 = clean)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    names = [f"{s.method}\n{Path(s.run).name}" for s in summaries]
    own = [s.train_seconds for s in summaries]
    init = [s.init_seconds or 0.0 for s in summaries]
    axes[2].bar(names, own, color=[f"C{k % 10}" for k in range(len(summaries))])
    if any(init):
        axes[2].bar(names, init, bottom=own, color="lightgrey", label="starting run")
        axes[2].legend(fontsize=7)
    axes[2].set_ylabel("training time (s)")
    axes[2].set_title("training cost (images/s on the bars)", fontsize=9)
    for k, s in enumerate(summaries):
        axes[2].text(k, own[k], f"{s.images_per_s:.1f}/s", ha="center", va="bottom", fontsize=7)
    axes[2].tick_params(axis="x", labelsize=7)
    return save_figure(fig, path)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``cda2 compare``."""
    p = sub.add_parser(
        "compare", help="finished runs side by side: accuracy under each attack, training cost",
        description="One table in the paper's layout for several finished runs (any --method): clean, "
        "PGD per eps, the adaptive worst case where the model has a selection, transfer, Square, the "
        "worst case, training seconds and images/s. Reads each run's checkpoint config and "
        "metrics.json and its rows in a robustness.json written by `cda2 eval --out`; writes "
        "compare.{json,csv,png} to --out.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or checkpoint files)")
    p.add_argument("--eval", nargs="*", default=[], metavar="PATH",
                   help="robustness.json files, or folders holding one (default: RUN/eval/ and RUN/ "
                   "of each run)")
    p.add_argument("--out", default="compare", help="folder for compare.{json,csv,png}")
    p.add_argument("--force", action="store_true", help="overwrite an earlier comparison in --out")
    p.set_defaults(func=run)


def _sources(args: argparse.Namespace) -> List[Path]:
    found: List[Path] = []
    for given in args.eval:
        p = Path(given)
        p = p / ROBUSTNESS_NAME if p.is_dir() else p
        if not p.is_file():
            raise CLIError(f"--eval: no {ROBUSTNESS_NAME} at {given}")
        found.append(p)
    for r in args.runs:
        folder = checkpoint_files(r)[0].parent
        found += [q for q in (folder / "eval" / ROBUSTNESS_NAME, folder / ROBUSTNESS_NAME)
                  if q.is_file()]
    return list(dict.fromkeys(found))


def run(args: argparse.Namespace) -> int:
    """``cda2 compare``: print the table and notes; write compare.{json,csv,png}."""
    out = check_output(args.out, option="--out", folder=True, force=args.force, results=COMPARE_FILES)
    sources = _sources(args)
    summaries = [summarize_run(r) for r in args.runs]
    for s in summaries:
        find_robustness(s, sources)
    print(format_table(summaries))
    print(f"data: {'; '.join(dict.fromkeys(s.data for s in summaries))}")
    notes = [f"NOTE [{Path(s.run).name}]: {n}" for s in summaries for n in s.notes]
    for n in notes:
        print(n)
    doc = {"runs": [s.to_dict() for s in summaries], "sources": [str(p) for p in sources],
           "columns": {g: [f"{e:g}" for e in es] for g, es in _eps_columns(summaries).items()},
           "notes": notes}
    json_file, csv_file, png_file = (out / name for name in COMPARE_FILES)

    def write() -> List[Path]:
        atomic_write(json_file, (json.dumps(doc, indent=2) + "\n").encode())
        return [json_file, to_csv(summaries, csv_file), plot(summaries, png_file)]

    paths = save_or_rescue(write, json.dumps(doc, indent=2), option="--out")
    print(f"\nwrote {', '.join(str(p) for p in paths)}")
    return 0
