"""The report of a robustness evaluation: the table, CSV, JSON and PNG of :class:`EvalReport`."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from torch import Tensor

from ..storage.checkpoint import atomic_write
from .rows import WORST, Row

__all__ = ["EvalReport"]


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100.0 * x:.1f}"


def _bits(t: Tensor) -> str:
    return "".join("1" if b else "0" for b in t.tolist())


@dataclass
class EvalReport:
    """Results of :func:`~cda2_ext.evaluation.evaluate_robustness`.

    Attributes:
        config: the :class:`~cda2_ext.evaluation.EvalConfig` as a dict. indices: the test subset.
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

    def add_model(self, model: str, rows: Mapping[Row, Mapping[float, Tensor]]) -> None:
        """Record ``model``'s rows from per-sample robust flags (``Tensor[n]`` bool per radius)."""
        self.acc[model] = {row.label: {e: ok.float().mean().item() for e, ok in sorted(d.items())}
                           for row, d in rows.items()}
        self.per_sample[model] = {row.label: {e: _bits(ok) for e, ok in sorted(d.items())}
                                  for row, d in rows.items()}

    def eps_columns(self) -> List[float]:
        """Every radius any row has, ascending (the table's columns)."""
        return sorted({e for rows in self.acc.values() for r in rows.values() for e in r})

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
        """The table as CSV (accuracies in %, two decimals; empty where a row has no radius)."""
        cols = self.eps_columns()
        path = Path(path)
        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerow(["model", "attack", "clean"] + [f"{e:g}" for e in cols])
        for m, a, c, r in self.rows():
            w.writerow([m, a, "" if c is None else f"{100 * c:.2f}"]
                       + ["" if e not in r else f"{100 * r[e]:.2f}" for e in cols])
        # replaced, never written through: a link planted at `path` cannot redirect the write
        atomic_write(path, buf.getvalue().encode())
        return path

    def to_dict(self) -> Dict[str, Any]:
        """The JSON layout: config, subset, clean and robust accuracy, per-sample flags, details,
        checks, seconds."""
        key = lambda d: {f"{e:g}": v for e, v in d.items()}  # noqa: E731  JSON keys are strings
        return {"config": self.config, "n": len(self.indices), "indices": self.indices,
                "clean": self.clean,
                "robust_accuracy": {m: {a: key(r) for a, r in rows.items()} for m, rows in self.acc.items()},
                "per_sample_robust": {m: {a: key(r) for a, r in rows.items()}
                                      for m, rows in self.per_sample.items()},
                "details": self.details, "checks": self.checks, "seconds": round(self.seconds, 2)}

    def to_json(self, path: Union[str, Path]) -> Path:
        """Write :meth:`to_dict` as indented JSON; returns the path."""
        path = Path(path)
        atomic_write(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())
        return path

    def plot(self, path: Union[str, Path]) -> Path:
        """PNG of robust accuracy vs eps, one line per model/attack (eps 0 = clean accuracy)."""
        from ..plotting import new_figure, save_figure

        fig, ax = new_figure(figsize=(8, 5.5))
        several = len(self.acc) > 1
        # One colour per model when several are compared (their worst case thick, the attack
        # rows thin and dashed), else one per attack with the worst case in black.
        colour = {m: f"C{i % 10}" for i, m in enumerate(self.acc)}
        for m, a, c, r in self.rows():
            xs = sorted(r)
            ys = [100 * r[e] for e in xs]
            if len(r) > 1:  # a curve: start it at the clean accuracy (eps = 0)
                if c is not None:
                    xs, ys = [0.0] + xs, [100 * c] + ys
                style: Dict[str, Any] = dict(marker="o", markersize=4, linewidth=1.2)
            else:  # an attack run at one radius only (Square at 0.03): a lone marker
                style = dict(marker="*", markersize=12, linestyle="none")
            if several:
                style.update(color=colour[m])
                if a == WORST.label:
                    style.update(linewidth=2.6)
                elif len(r) > 1:
                    style.update(linestyle="--", linewidth=0.9, alpha=0.7)
            elif a == WORST.label:
                style.update(color="black", linewidth=2.4)
            label = a if not several else f"{m}: {a}"
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
