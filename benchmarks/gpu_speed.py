"""Training at the speed of the GPU: where a training step's time goes, on one GPU.

Parts, each a subcommand that writes its figures to ``<parts>/<part>.json`` as it goes (so a part
stopped by its timeout keeps what it measured); ``report`` folds whatever parts exist into one
JSON (``write_results``) and a markdown summary. ``benchmarks/gpu_speed.sh`` runs them in one
device call, each under its own timeout.

* ``syncdebug`` - a whole training step of every phase under
  ``torch.cuda.set_sync_debug_mode("error")`` (default path, and with CUDA graphs); on a CPU the
  GPU's code path under :class:`~cda2_ext.runtime.HostReads` instead.
* ``profile`` - one step of every phase under ``torch.profiler``: the top kernels by GPU time, the
  GPU's idle time between kernels within the step, the synchronising calls
  (``cudaStreamSynchronize``/``cudaDeviceSynchronize``/``cudaEventSynchronize``, device-to-host
  copies) and the host reads :class:`HostReads` sees.
* ``paths`` - every path timed with CUDA events (best of ``--timed`` after ``--warmup``), each
  phase, each batch size: the variants of :data:`VARIANTS` (loop vs packed layout, fp32 vs bf16
  autocast, with and without CUDA graphs, the sync-free vs the host-reading attack backward, and
  the authors' plain path as the reference).
* ``concurrency`` - 1, 2, 4, 8 training processes on the one GPU at once (adversarial phase,
  default path): each trains for ``--duration`` seconds from a common start; aggregate img/s.

    python benchmarks/gpu_speed.py all --device cpu --quick     # every part, tiny, on a CPU
    python benchmarks/gpu_speed.py paths --device cuda --parts /tmp/parts
    python benchmarks/gpu_speed.py report --parts /tmp/parts --out-dir "$OUT"
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from ops_cpu import write_results  # noqa: E402
from train_step import device_slug, machine, make_trainer, time_step  # noqa: E402

from cda2_ext.runtime import HostReads, cuda_graphs_mode, sync_free_mode  # noqa: E402
from cda2_ext.training import Trainer  # noqa: E402

PHASES = ("standard", "adversarial", "natural")
PARTS = ("syncdebug", "profile", "paths", "concurrency")
#: How many kernels (operators on a CPU) the profile lists per phase.
TOP = 15
#: CUDA runtime calls that make the host wait for the device.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


@dataclass(frozen=True)
class Variant:
    """One way to run the step: a ``train_step.py`` path, ``TrainConfig`` options, and the
    runtime switches (:func:`~cda2_ext.runtime.cuda_graphs_mode`,
    :func:`~cda2_ext.runtime.sync_free_mode`; ``None``: the default)."""

    path: str
    options: Dict[str, Any] = field(default_factory=dict)
    graphs: bool = False
    sync_free: Optional[bool] = None

    @contextlib.contextmanager
    def switches(self) -> Iterator[None]:
        with cuda_graphs_mode(self.graphs), sync_free_mode(self.sync_free):
            yield


VARIANTS: Dict[str, Variant] = {
    "default": Variant("default"),                          # loop layout, fp32, sync-free on a GPU
    "host_reads": Variant("default", sync_free=False),      # attack backward skips zero rows (host reads)
    "graphs": Variant("default", graphs=True),              # training attacks replayed from CUDA graphs
    "bf16": Variant("default", {"amp": "bf16"}),            # autocast (attacks then run the module)
    "packed": Variant("packed"),                            # grouped convolutions
    "plain": Variant("plain"),                              # the authors' way: the reference
}


# ----- shared -----------------------------------------------------------------------------------------
def sizes(args: argparse.Namespace) -> Dict[str, Any]:
    """Model and step sizes: ResNet-20, M=3, PGD-10, B 128 and 512; ``--quick``: tiny."""
    if args.quick:
        return {"M": 2, "batches": [16], "pgd_steps": 2, "options": {"depth": 8}}
    return {"M": 3, "batches": args.batch, "pgd_steps": args.pgd_steps, "options": {}}


def build(args: argparse.Namespace, variant: Variant, phase: str, B: int) -> Trainer:
    s = sizes(args)
    return make_trainer(variant.path, s["M"], B, phase, s["pgd_steps"], args.device,
                        **s["options"], **variant.options)


def batch(trainer: Trainer, B: int):
    """A fixed batch on the trainer's device (the same images every step: timing, not learning)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(B, 3, 32, 32, generator=gen).to(trainer.device)
    return x, torch.randint(0, 10, (B,), generator=gen).to(trainer.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Part:
    """A part's figures, rewritten to ``<parts>/<name>.json`` after every change."""

    def __init__(self, args: argparse.Namespace, name: str) -> None:
        self.path = Path(args.parts) / f"{name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data: Dict[str, Any] = {"device": args.device, "quick": args.quick, "rows": []}
        self.save()

    def add(self, row: Dict[str, Any]) -> None:
        self.data["rows"].append(row)
        self.save()
        print(json.dumps(row), flush=True)

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


# ----- parts ------------------------------------------------------------------------------------------
def part_syncdebug(args: argparse.Namespace) -> bool:
    """Whole steps under the sync debug mode (CPU: the GPU's code path under HostReads); whether
    every step went without a host read."""
    part = Part(args, "syncdebug")
    B = sizes(args)["batches"][0]
    # CUDA graphs change nothing off a GPU (the attacks run as they are): one variant there
    for name in ("default", "graphs") if args.device.startswith("cuda") else ("default",):
        variant = VARIANTS[name]
        for phase in PHASES:
            with variant.switches():
                tr = build(args, variant, phase, B)
                x, y = batch(tr, B)
                tr.train_step(x, y)                      # lazy initialisation, graph capture
                sync(tr.device)
                row: Dict[str, Any] = {"variant": name, "phase": phase, "B": B}
                try:
                    if tr.device.type == "cuda":
                        torch.cuda.set_sync_debug_mode("error")
                        try:
                            tr.train_step(x, y)
                        finally:
                            torch.cuda.set_sync_debug_mode("default")
                        row["check"] = "torch.cuda.set_sync_debug_mode('error')"
                        row["ok"] = True
                    else:
                        with sync_free_mode(True), HostReads() as reads:
                            tr.train_step(x, y)
                        row.update(check="HostReads (CPU)", ok=not reads.reads,
                                   host_reads=len(reads.reads),
                                   host_read_sites=[f"{op}: {where}" for op, where in reads.reads])
                except RuntimeError as err:
                    row.update(ok=False, error=first_line(err))
            part.add(row)
    return all(r["ok"] for r in part.data["rows"])


def _kernel_stats(prof: Any) -> Dict[str, Any]:
    """Top kernels, GPU busy/idle time and synchronising calls of one profiled step."""
    from torch.autograd import DeviceType
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, gaps, end = 0.0, [], None
    for s, e in spans:
        if end is not None and s > end:
            gaps.append(s - end)
        busy += max(0.0, e - max(s, end if end is not None else s))
        end = e if end is None else max(end, e)
    by_name: Dict[str, List[float]] = {}
    for k in kernels:
        by_name.setdefault(k.name, []).append(k.time_range.elapsed_us())
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:TOP]
    names = [e.name for e in events]
    return {
        "kernels": len(kernels),
        "gpu_span_ms": round((spans[-1][1] - spans[0][0]) / 1e3, 3) if spans else None,
        "gpu_busy_ms": round(busy / 1e3, 3),
        "gpu_idle_ms": round(sum(gaps) / 1e3, 3),
        "idle_gaps_over_10us": sum(g > 10 for g in gaps),
        "sync_calls": {c: names.count(c) for c in SYNC_CALLS},
        "dtoh_copies": sum("DtoH" in n or "Device -> Pageable" in n or "Device -> Pinned" in n
                           for n in names),
        "top_kernels": [{"kernel": n[:120], "ms": round(sum(t) / 1e3, 3), "calls": len(t)}
                        for n, t in top],
    }


def _cpu_stats(prof: Any) -> Dict[str, Any]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"top_cpu_ops": [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),
                             "calls": e.count} for e in events[:TOP]]}


def part_profile(args: argparse.Namespace) -> None:
    """One step of each phase (default path, the largest batch) under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    part = Part(args, "profile")
    B = sizes(args)["batches"][-1]
    for phase in PHASES:
        tr = build(args, VARIANTS["default"], phase, B)
        x, y = batch(tr, B)
        for _ in range(2):
            tr.train_step(x, y)
        with HostReads() as reads:                       # an untimed step: the mode costs time
            tr.train_step(x, y)
        sync(tr.device)
        cuda = tr.device.type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            tr.train_step(x, y)
            sync(tr.device)
        row = {"phase": phase, "B": B, "host_reads": len(reads.reads),
               "host_read_ops": sorted({op for op, _ in reads.reads}), **_cpu_stats(prof)}
        if cuda:
            row.update(_kernel_stats(prof))
        part.add(row)


def part_paths(args: argparse.Namespace) -> None:
    """Every variant, phase and batch size: best step time (CUDA events on a GPU)."""
    part = Part(args, "paths")
    device = torch.device(args.device)
    for B in sizes(args)["batches"]:
        for phase in PHASES:
            base = None
            for name in args.variants:
                variant = VARIANTS[name]
                row: Dict[str, Any] = {"variant": name, "phase": phase, "B": B}
                tr = None
                try:
                    with variant.switches():
                        tr = build(args, variant, phase, B)
                        x, y = batch(tr, B)
                        for _ in range(args.warmup):
                            tr.train_step(x, y)
                        times = [time_step(lambda: tr.train_step(x, y), device)
                                 for _ in range(args.timed)]
                    best = min(times)
                    row.update(ms_per_step=round(best, 2), all_ms=[round(t, 2) for t in times],
                               images_per_s=round(B / (best / 1e3), 1))
                    if name == "default":
                        base = best
                    if base is not None:
                        row["vs_default"] = round(base / best, 3)
                except (RuntimeError, ValueError) as err:  # e.g. out of memory: the row says so
                    row["error"] = first_line(err)
                del tr
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                part.add(row)


def part_concurrency(args: argparse.Namespace) -> None:
    """1, 2, 4, 8 processes training at once (adversarial, default path, first batch size)."""
    part = Part(args, "concurrency")
    work = Path(args.parts) / "concurrency"
    for k in args.procs:
        rundir = work / f"k{k}"
        rundir.mkdir(parents=True, exist_ok=True)
        for f in rundir.iterdir():
            f.unlink()
        cmd = [sys.executable, str(Path(__file__).resolve()), "worker", "--device", args.device,
               "--duration", str(args.duration), "--settle", str(args.settle), "--rundir", str(rundir),
               *(["--quick"] if args.quick else []), "--batch", str(sizes(args)["batches"][0])]
        procs = [subprocess.Popen([*cmd, "--index", str(i)]) for i in range(k)]
        deadline = time.time() + args.settle
        while time.time() < deadline and len(list(rundir.glob("ready.*"))) < k:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
        ready = len(list(rundir.glob("ready.*")))
        (rundir / "go").write_text(str(time.time()))
        for p in procs:
            try:
                p.wait(timeout=args.duration + args.settle)
            except subprocess.TimeoutExpired:
                p.kill()
        results = [json.loads(f.read_text()) for f in sorted(rundir.glob("result.*"))]
        row: Dict[str, Any] = {"processes": k, "ready_at_start": ready, "finished": len(results),
                               "B": sizes(args)["batches"][0]}
        if results:
            window = max(r["seconds"] for r in results)
            row.update(images=sum(r["images"] for r in results), seconds=round(window, 2),
                       aggregate_images_per_s=round(sum(r["images"] for r in results) / window, 1),
                       per_process=[round(r["images"] / r["seconds"], 1) for r in results])
        part.add(row)


def worker(args: argparse.Namespace) -> None:
    """One process of ``concurrency``: ready, wait for the common start, train ``--duration`` s."""
    rundir = Path(args.rundir)
    B = sizes(args)["batches"][0]
    tr = build(args, VARIANTS["default"], "adversarial", B)
    x, y = batch(tr, B)
    for _ in range(2):
        tr.train_step(x, y)
    sync(tr.device)
    (rundir / f"ready.{args.index}").write_text("")
    give_up = time.time() + args.settle + 10  # the driver may be gone (killed by its timeout)
    while not (rundir / "go").exists():
        if time.time() > give_up:
            raise SystemExit(f"worker {args.index}: no start signal in {rundir}")
        time.sleep(0.02)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.duration:
        tr.train_step(x, y)
        steps += 1
        if steps % 4 == 0:
            sync(tr.device)                              # keep the queue from running far ahead
    sync(tr.device)
    seconds = time.perf_counter() - t0
    (rundir / f"result.{args.index}").write_text(json.dumps({"images": steps * B, "seconds": seconds}))


# ----- report -----------------------------------------------------------------------------------------
def _table(rows: List[Dict[str, Any]], cols: List[str]) -> List[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return out


def markdown(parts: Dict[str, Any], info: Dict[str, Any]) -> str:
    """The summary: one table per part."""
    lines = [f"# GPU speed check: {info.get('gpu', info.get('cpu_model'))}", "",
             f"torch {info.get('torch')}, CUDA {info.get('cuda_runtime', '-')}; parts run: "
             f"{', '.join(parts) or 'none'}.", ""]
    cols = {"syncdebug": ["variant", "phase", "B", "check", "ok", "error", "host_reads"],
            "profile": ["phase", "B", "kernels", "gpu_span_ms", "gpu_busy_ms", "gpu_idle_ms",
                        "idle_gaps_over_10us", "sync_calls", "dtoh_copies", "host_reads"],
            "paths": ["phase", "B", "variant", "ms_per_step", "images_per_s", "vs_default", "error"],
            "concurrency": ["processes", "ready_at_start", "finished", "aggregate_images_per_s",
                            "per_process"]}
    for name in PARTS:
        if name in parts:
            lines += [f"## {name}", "", *_table(parts[name]["rows"], cols[name]), ""]
    for r in parts.get("profile", {}).get("rows", []):
        if r.get("top_kernels"):
            lines += [f"### top kernels, {r['phase']} B={r['B']}", "",
                      *_table(r["top_kernels"], ["kernel", "ms", "calls"]), ""]
    return "\n".join(lines) + "\n"


def report(args: argparse.Namespace) -> None:
    parts = {}
    for name in PARTS:
        f = Path(args.parts) / f"{name}.json"
        if f.is_file():
            parts[name] = json.loads(f.read_text())
    device = torch.device(args.device)
    info = machine(device)
    stem = f"gpu_speed_{device_slug(device)}{'_quick' if args.quick else ''}"
    for folder in {Path(args.results_dir), Path(args.out_dir)}:
        write_results(folder / f"{stem}.json", "gpu_speed", {"machine": info, "parts": parts})
        (folder / f"{stem}.md").write_text(markdown(parts, info))
        print(f"wrote {folder / f'{stem}.md'}")


# ----- command line -----------------------------------------------------------------------------------
#: The parts and helpers by name; a part that checks something returns whether it held.
COMMANDS: Dict[str, Callable[[argparse.Namespace], Optional[bool]]] = {
    "syncdebug": part_syncdebug, "profile": part_profile, "paths": part_paths,
    "concurrency": part_concurrency, "worker": worker, "report": report}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=[*COMMANDS, "all"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes (M=2, depth 8, B=16, PGD-2, 1-2 processes): a smoke test")
    ap.add_argument("--batch", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--pgd-steps", type=int, default=10)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timed", type=int, default=2)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--duration", type=float, default=10.0, help="concurrency: seconds of training")
    ap.add_argument("--settle", type=float, default=60.0,
                    help="concurrency: most seconds to wait for the processes to be ready")
    ap.add_argument("--parts", default=str(Path(tempfile.gettempdir()) / "cda2_gpu_speed_parts"),
                    help="where the parts keep their figures for the report")
    ap.add_argument("--results-dir", default=str(HERE / "results"))
    ap.add_argument("--out-dir", default=os.environ.get("OUT", str(HERE / "results")))
    ap.add_argument("--rundir", help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.procs = [p for p in args.procs if p <= 2]
        args.duration, args.timed, args.warmup = min(args.duration, 2.0), 1, 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device: CUDA is not available, got {args.device!r}")
    held = [COMMANDS[name](args) is not False
            for name in (PARTS + ("report",) if args.command == "all" else (args.command,))]
    return 0 if all(held) else 1


if __name__ == "__main__":
    sys.exit(main())
