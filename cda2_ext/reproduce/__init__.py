"""``cda2 reproduce``: the paper's experiments as commands, with the paper's numbers beside ours.

:func:`run_experiment` plans an experiment of :data:`EXPERIMENTS` at a budget (``small``: a CPU,
minutes; ``paper``: the paper's setting), runs its ``cda2`` commands in this process (reusing
finished runs in the output folder and resuming interrupted ones, see :mod:`.runner`), and writes

* ``reproduce_<experiment>_<budget>.md`` - the table (paper beside measured), notes, what the
  budget can and cannot show, and the exact commands;
* ``reproduce_<experiment>_<budget>.json`` - the same as data, with the budget's parameters, each
  command's status (ran / resumed / reused) and time, and the environment;
* ``reproduce_<experiment>_<budget>.png`` - the figure, where the paper has one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from .experiments import (BUDGETS, EXPERIMENTS, Budget, Context, Experiment, Report, check_budget,
                          describe, markdown_table, missing_methods)
from .runner import ReproduceError, Step, StepRunner, command_line

__all__ = ["EXPERIMENTS", "BUDGETS", "Experiment", "Budget", "Context", "Report", "Step",
           "StepRunner", "ReproduceError", "plan_experiment", "run_experiment", "result_paths",
           "describe_all", "command_line"]

PathLike = Union[str, Path]


def _experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise ReproduceError(f"experiment: expected one of {tuple(EXPERIMENTS)}, got {name!r}") from None


def plan_experiment(name: str, budget: str, out: PathLike, *, data: Optional[str] = None,
                    download: bool = False, device: str = "auto") -> List[Step]:
    """The steps of experiment ``name`` at ``budget``, its runs under ``out/<name>-<budget>``."""
    exp = _experiment(name)
    try:
        b = check_budget(exp, budget)
    except ValueError as err:
        raise ReproduceError(str(err)) from None
    missing = missing_methods(exp)
    if missing:
        raise ReproduceError(f"experiment {name} needs the training method(s) {', '.join(missing)}, "
                             "which this installation does not have")
    ctx = Context(Path(out) / f"{name}-{budget}", data, download, device)
    return exp.plan(b.params, ctx)


def result_paths(name: str, budget: str, results: PathLike) -> Dict[str, Path]:
    """Where the table (``md``), the record (``json``) and the figure (``png``) are written."""
    stem = Path(results) / f"reproduce_{name}_{budget}"
    return {ext: stem.with_suffix(f".{ext}") for ext in ("md", "json", "png")}


def _environment(device: str) -> Dict[str, Any]:
    import torch

    from .. import HAS_EXTENSION, __version__
    from ..runtime import resolve_device

    dev = resolve_device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    load = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"cda2_ext": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "device": str(dev), "device_name": name, "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "load_average_1_5_15min": load,
            "fused_ops": bool(HAS_EXTENSION)}


def _portable(text: str, out: PathLike, data: Optional[str]) -> str:
    """``text`` with this machine's folders written as the variables a reader sets: ``$OUT`` for
    ``--out`` and ``$DATA`` for ``--data``, so a committed record names no local path."""
    if data:
        text = text.replace(str(data), "$DATA")
    return text.replace(str(Path(out)), "$OUT")


def _markdown(exp: Experiment, budget: str, b: Budget, report: Report,
              records: List[Dict[str, Any]], figure: Optional[Path]) -> str:
    lines = [f"# `cda2 reproduce {exp.name} --budget {budget}`", "",
             f"{exp.title} ({exp.paper_ref}).", ""]
    if report.findings:  # the conclusions first, then the numbers behind them
        lines += ["**Findings:**", ""] + [f"- {f}" for f in report.findings] + [""]
    lines += [report.markdown(), ""]
    for title, columns, rows in report.tables:
        lines += [f"{title}:", "", markdown_table(columns, rows), ""]
    lines += [f"- {n}" for n in report.notes]
    lines += [f"- Budget `{budget}` shows {b.shows}; it cannot show {b.cannot_show}."]
    if figure is not None:
        lines += ["", f"![{exp.paper_ref}]({figure.name})"]
    lines += ["", "Commands, in order (status in this invocation; `$OUT` is the `--out` folder and "
              "`$DATA` the `--data` argument):", "", "```bash"]
    for r in records:
        trained = (f"; its epochs took {r['train_seconds']} s"
                   if r.get("train_seconds") is not None else "")
        if r.get("cpu_share") is not None:  # below 1: other jobs shared its cores
            trained += f" with {100 * r['cpu_share']:.0f}% of its cores"
        lines.append(f"{r['command']}  # {r['status']}, {r['seconds']} s{trained}")
    lines += ["```", ""]
    return "\n".join(lines)


def run_experiment(name: str, budget: str, out: PathLike, results: Optional[PathLike] = None, *,
                   data: Optional[str] = None, download: bool = False, device: str = "auto",
                   force: bool = False, log: Optional[Callable[[str], None]] = None,
                   runner: Optional[StepRunner] = None, jobs: int = 1) -> Dict[str, Any]:
    """Run experiment ``name`` at ``budget`` and write its table, record and figure.

    Args:
        out: the folder of the runs (``out/<name>-<budget>/``); finished runs there are reused and
            interrupted ones resumed.
        results: where ``reproduce_<name>_<budget>.{md,json,png}`` go (default: ``out``).
        data, download, device: passed to every step (``--data``, ``--download``, ``--device``).
        force: rerun every step from scratch.
        runner: the :class:`StepRunner` to use (tests pass one with a stub CLI).
        jobs: train up to this many runs at once, as child processes (``1``: one after the
            other, in this process).

    Returns:
        The record written as JSON.
    """
    t0 = time.perf_counter()
    exp = _experiment(name)
    steps = plan_experiment(name, budget, out, data=data, download=download, device=device)
    b = exp.budgets[budget]
    ctx = Context(Path(out) / f"{name}-{budget}", data, download, device)
    runner = runner or StepRunner(force=force, log=log)
    runner.run_all(steps, jobs)
    report = exp.report(b.params, ctx)
    paths = result_paths(name, budget, results if results is not None else out)
    paths["md"].parent.mkdir(parents=True, exist_ok=True)
    figure = None
    if report.figure is not None:
        figure = paths["png"]
        if Path(report.figure).resolve() != figure.resolve():
            shutil.copyfile(report.figure, figure)
    portable = [dict(r, command=_portable(r["command"], out, data)) for r in runner.records]
    report = dataclasses.replace(report, notes=[_portable(n, out, data) for n in report.notes],
                                 findings=[_portable(f, out, data) for f in report.findings])
    record = {
        "experiment": name, "title": exp.title, "paper": exp.paper_ref, "budget": budget,
        "params": dataclasses.asdict(b.params),
        "shows": b.shows, "cannot_show": b.cannot_show,
        "commands": [_portable(s.command, out, data) for s in steps], "steps": portable,
        "findings": report.findings, "columns": report.columns, "rows": report.rows,
        "tables": [{"title": t, "columns": c, "rows": r} for t, c, r in report.tables],
        "notes": report.notes,
        # the figure's file name: it lies beside the record, wherever --results put both
        "figure": figure.name if figure else None, "measured": report.measured,
        "environment": _environment(device), "seconds": round(time.perf_counter() - t0, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    # the measured results quote their own inputs (checkpoint paths): portable too
    paths["json"].write_text(_portable(json.dumps(record, indent=1), out, data) + "\n")
    paths["md"].write_text(_markdown(exp, budget, b, report, portable, figure))
    record["files"] = {k: str(p) for k, p in paths.items() if k != "png" or figure}
    record["table"] = report.markdown()
    return record


def describe_all() -> List[str]:
    """One paragraph per experiment: its paper reference and what each budget shows."""
    out = []
    for exp in EXPERIMENTS.values():
        out.append(f"{exp.name}: {exp.title} ({exp.paper_ref})")
        out += [f"  {line}" for line in describe(exp)]
    return out
