"""End-to-end Algorithm 1 training steps: the project's default path vs the plain path.

Each row is one phase of ``Trainer.train_step`` (``adversarial``: PGD against the collaboration +
update; ``natural``: M per-model PGDs + update on all M*B variants; ``standard``: no attack) at
one shape (M sub-models, batch B, ResNet-20), timed for two paths in the same process, alternately:

* **default** - ``Trainer`` exactly as ``cda2 train`` builds it: fused ops, ``Collaboration``
  with its default layout (``"auto"``: see :mod:`cda2_ext.models.layouts`), the attacks through
  ``Collaboration.frozen()``.
* **packed** (only with ``--paths ... packed``) - the default before ``layouts.py``: fused ops,
  packed grouped convolutions, attacks through the module in eval mode.
* **plain** - the authors' way: M separate standard ResNet-20s called one after another in a
  Python loop (NCHW, BatchNorm as modules, attacks through the module in eval mode), with the
  plain-PyTorch reference ops (``unfused=True``); the same ``Trainer`` drives it, so the
  algorithm, the losses and the bookkeeping are the same work.

Figures per row and path: best ms per step over ``--timed`` steps after ``--warmup`` steps
(wall clock; CUDA events on a GPU), training images per second (``B`` / step time), the peak
memory of a step above what was in use before it (measured on one more, untimed step; see
:class:`PeakMemory`), and the projected wall time of 100 epochs of full CIFAR-10 (50,000 images).
Shapes whose estimated peak memory would not fit are skipped and listed.

    python benchmarks/train_step.py             # full grid -> results/train_step_<device>.json
    python benchmarks/train_step.py --models 3 --batch 128 --phases adversarial    # one row
    python benchmarks/train_step.py --quick     # smoke run (PGD-2, M=2, B=32), writes nothing
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from ops_cpu import machine_info as cpu_machine_info, write_results  # noqa: E402

from cda2_ext.data import ImageSet  # noqa: E402
from cda2_ext.models import Collaboration, CollaborationConfig  # noqa: E402
from cda2_ext.models.layouts import EvalNet  # noqa: E402
from cda2_ext.training import TrainConfig, Trainer  # noqa: E402

PHASES = ("adversarial", "natural", "standard")
PATHS = ("default", "packed", "plain")
CIFAR_TRAIN_IMAGES, EPOCHS = 50_000, 100
# Peak memory of a training step per (sub-model x image) it trains on, ResNet-20, float32, measured
# with this script on CPU (plain path, the larger of the two): used only to skip shapes that
# cannot fit, before trying them.
BYTES_PER_MODEL_IMAGE = 2.6e6


# ----- the plain path ------------------------------------------------------------------------------
class PlainCollaboration(nn.Module):
    """M separate standard ResNet-20s run one after another: the authors' code structure.

    Same contract as :class:`~cda2_ext.models.Collaboration` (``x [B, ...]`` or ``[M, B, ...]``
    -> ``(logits [M, B, K], ppd_logit [M, B])``); each sub-model is a ``num_models=1``
    collaboration on the packed layout, i.e. ordinary ``groups=1`` convolutions in NCHW.
    """

    def __init__(self, config: CollaborationConfig) -> None:
        super().__init__()
        one = dataclasses.replace(config, num_models=1, layout="packed")
        self.config = config
        self.num_models = config.num_models
        self.unfused = True
        self.nets = nn.ModuleList(Collaboration(one) for _ in range(config.num_models))

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        outs = [net(x[m] if x.dim() == 5 else x) for m, net in enumerate(self.nets)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def frozen(self) -> EvalNet:
        """The module itself in eval mode: what the attacks differentiated before ``layouts.py``."""
        return EvalNet(self)


# ----- measuring -----------------------------------------------------------------------------------
def _data(B: int, gen: torch.Generator) -> ImageSet:
    images = (torch.rand(B, 3, 32, 32, generator=gen) * 255).to(torch.uint8)
    return ImageSet(images, torch.randint(0, 10, (B,), generator=gen), tuple(str(k) for k in range(10)))


def make_trainer(path: str, M: int, B: int, phase: str, pgd_steps: int, device: str,
                 **options: object) -> Trainer:
    """A ``Trainer`` for one row and one of :data:`PATHS` (``options``: more ``TrainConfig``
    fields, e.g. ``amp``)."""
    cfg = TrainConfig(num_models=M, batch_size=B, phases=phase, steps=pgd_steps, device=device,
                      progress=False, eval_every=0, out_dir="/nonexistent", unfused=path == "plain",
                      **options)
    tr = Trainer(cfg, train_set=_data(B, torch.Generator().manual_seed(0)), log=None)
    if path == "packed":
        tr.model.layout = "packed"
    elif path == "plain":
        torch.manual_seed(cfg.seed)
        tr.model = tr.train_forward = PlainCollaboration(cfg.model_config()).to(tr.device)
        tr.optimizer = torch.optim.SGD(tr.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                       weight_decay=cfg.weight_decay)
    return tr


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


class _Glibc:
    """glibc's malloc knobs, so that the peak RSS of a step shows its tensors.

    torch's CPU tensors come from ``malloc``; glibc keeps freed blocks below its (adaptive)
    mmap threshold in the heap, where a step can reuse them without the RSS moving. For a memory
    measurement the threshold is lowered (every tensor of 64 KiB or more gets its own mapping,
    returned on free) and the heap trimmed first; for timing it is pinned at 32 MiB, glibc's own
    ceiling, so that every row and both paths run with the same allocator behaviour.
    """

    M_MMAP_THRESHOLD = -3

    def __init__(self) -> None:
        import ctypes
        import ctypes.util
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        self.libc.mallopt  # noqa: B018 - AttributeError here means "not glibc"
        self.libc.malloc_trim  # noqa: B018

    def threshold(self, nbytes: int) -> None:
        self.libc.mallopt(self.M_MMAP_THRESHOLD, nbytes)

    def trim(self) -> None:
        self.libc.malloc_trim(0)


class PeakMemory:
    """Peak memory of a block above what was in use when it started, in bytes (``.bytes``).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU on Linux with glibc: the process's peak RSS
    (``VmHWM``, reset through ``/proc/self/clear_refs``) with the allocator set up by
    :class:`_Glibc`; elsewhere the growth of ``ru_maxrss`` (a lower bound: the high-water mark of
    the whole process only ever grows).
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.glibc = device, None
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (Linux >= 4.0)
            _peak_rss_bytes()
            self.glibc = _Glibc()
            self.method = "peak RSS (VmHWM) above the RSS before, glibc mmap threshold 64 KiB"
        except (OSError, AttributeError):
            self.method = "ru_maxrss growth (a lower bound)"

    @staticmethod
    def for_timing(device: torch.device) -> None:
        """Put the CPU allocator into the state timed steps run in (see :class:`_Glibc`)."""
        if device.type != "cuda":
            try:
                _Glibc().threshold(32 << 20)
            except (OSError, AttributeError):
                pass

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.glibc is not None:
            self.glibc.threshold(64 << 10)
            self.glibc.trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _rss_bytes()
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.glibc is not None:
            peak = _peak_rss_bytes()
            self.for_timing(self.device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.bytes = max(0, peak - self.base)


def time_step(step: Callable[[], object], device: torch.device, cpu_time: bool = False) -> float:
    """Milliseconds of one call: CUDA events on a GPU, else the wall clock (or, with ``cpu_time``,
    the process's CPU time: steadier on a shared machine, best with one thread)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    clock = time.process_time if cpu_time else time.perf_counter
    t0 = clock()
    step()
    return (clock() - t0) * 1e3


def available_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    return float((_meminfo_kib("MemAvailable") or 0) * 1024)


def _meminfo_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def estimated_peak(M: int, B: int, phase: str) -> float:
    """Bytes a training step needs at most (the natural phase trains on all M*B variants)."""
    rows = M * B if phase == "natural" else B
    return BYTES_PER_MODEL_IMAGE * M * rows


def measure_row(M: int, B: int, phase: str, args, device: torch.device) -> dict:
    """Both paths at one shape and phase, alternating; the best step of each."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(B, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (B,), generator=gen).to(device)
    paths = args.paths
    trainers = {p: make_trainer(p, M, B, phase, args.pgd_steps, str(device)) for p in paths}
    for p in paths:
        for _ in range(args.warmup):
            trainers[p].train_step(x, y)
    times: Dict[str, List[float]] = {p: [] for p in paths}
    for _ in range(args.timed):
        for p in paths:
            times[p].append(time_step(lambda: trainers[p].train_step(x, y), device, args.cpu_time))
    peak: Dict[str, int] = {}
    method = ""
    for p in paths:  # one more step each, untimed: the memory measurement changes the allocator
        with PeakMemory(device) as mem:
            trainers[p].train_step(x, y)
        peak[p], method = mem.bytes, mem.method
    row: dict = {"M": M, "B": B, "phase": phase, "pgd_steps": args.pgd_steps if phase != "standard" else 0,
                 "memory_method": method}
    for p in paths:
        best = min(times[p])
        ips = B / (best / 1e3)
        row[p] = {"ms_per_step": round(best, 1), "all_ms": [round(t, 1) for t in times[p]],
                  "images_per_s": round(ips, 2), "peak_mib": round(peak[p] / 2 ** 20, 1),
                  "projected_100_epochs_h": round(EPOCHS * CIFAR_TRAIN_IMAGES / ips / 3600, 2)}
    if "default" in row and "plain" in row:
        row["speedup"] = round(row["plain"]["ms_per_step"] / row["default"]["ms_per_step"], 2)
    if args.profile:
        row["profile"] = {p: profile_step(lambda: trainers[p].train_step(x, y), args.profile)
                          for p in paths}
    return row


def profile_step(step: Callable[[], object], top: int) -> List[dict]:
    """The ``top`` operators of one step by self CPU time (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1),
             "self_cpu_pct": round(100 * e.self_cpu_time_total / total, 1), "calls": e.count}
            for e in events[:top]]


def print_profile(r: dict) -> None:
    for p, rows in r.get("profile", {}).items():
        print(f"    profile, {p} path, {r['phase']} M={r['M']} B={r['B']} (self CPU time):")
        for e in rows:
            print(f"      {e['op']:<44}{e['self_cpu_ms']:>10.1f} ms {e['self_cpu_pct']:>6.1f}% "
                  f"{e['calls']:>6} calls")


def print_row(r: dict) -> None:
    for p in PATHS:
        if p not in r:
            continue
        d = r[p]
        vs = r["plain"]["ms_per_step"] / d["ms_per_step"] if "plain" in r else None
        print(f"  {r['phase']:<12}{r['M']:>3}{r['B']:>5}  {p:<8}{d['ms_per_step']:>10.0f}"
              f"{d['images_per_s']:>9.1f}{d['peak_mib']:>9.0f}{d['projected_100_epochs_h']:>9.1f}"
              f"{(f'{vs:.2f}x') if vs is not None else '-':>9}", flush=True)


HEADER = (f"  {'phase':<12}{'M':>3}{'B':>5}  {'path':<8}{'ms/step':>10}{'img/s':>9}{'peak MiB':>9}"
          f"{'100ep h':>9}{'vs plain':>9}")


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        from ops_cuda import gpu_slug
        return gpu_slug(torch.cuda.get_device_name(device))
    return device.type


def machine(device: torch.device) -> dict:
    info = cpu_machine_info()
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2 ** 30, 1),
                    cuda_runtime=torch.version.cuda)
    return info


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, nargs="+", default=[3, 5, 8],
                    help="M values (default 3 5 8)")
    ap.add_argument("--batch", type=int, nargs="+", default=[128, 512],
                    help="batch sizes (default 128 512)")
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    ap.add_argument("--paths", nargs="+", default=["default", "plain"], choices=PATHS,
                    help="default, plain, and packed (the default before the loop layout: "
                         "packed grouped convolutions, attacks through the module)")
    ap.add_argument("--pgd-steps", type=int, default=10, help="PGD steps of the attacks (default 10)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per path and row (default 1)")
    ap.add_argument("--timed", type=int, default=2,
                    help="timed steps per path and row, best kept (default 2)")
    ap.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto (default)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's own)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="CPU: time with the process's CPU clock instead of the wall clock (steadier "
                         "on a shared machine, time spent descheduled does not count; best with "
                         "--threads 1); projections then assume a machine to yourself")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing each row, profile one step of each path and print its top N "
                         "operators by self CPU time (kept in the JSON)")
    ap.add_argument("--max-mem-fraction", type=float, default=0.7,
                    help="skip a row whose estimated peak exceeds this fraction of free memory")
    ap.add_argument("--quick", action="store_true", help="smoke run: M=2, B=32, PGD-2, one timed step")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON output (default benchmarks/results/train_step_<device>.json; "
                         "none for --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.pgd_steps, args.timed = [2], [32], 2, 1
    for name in ("warmup", "pgd_steps"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')}: must be >= 0")
    if args.timed < 1:
        ap.error("--timed: must be >= 1")
    if any(m < 1 for m in args.models) or any(b < 2 for b in args.batch):
        ap.error("--models must be >= 1 and --batch >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    PeakMemory.for_timing(torch.device("cpu"))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device: CUDA is not available, got {args.device!r}")
    out_path = args.out if args.out is not None else (
        None if args.quick else HERE / "results" / f"train_step_{device_slug(device)}.json")

    info = machine(device)
    layout = Collaboration(num_models=1).layout
    print(f"Algorithm 1 training step, ResNet-20 -- {info.get('gpu', info['cpu_model'])}, torch "
          f"{info['torch']}, {torch.get_num_threads()} threads; default = fused ops + layout "
          f"{layout!r}, plain = reference ops + loop over M separate nets; best of {args.timed} "
          f"after {args.warmup} warm-up; PGD-{args.pgd_steps}"
          f"{'; process CPU time' if args.cpu_time and device.type != 'cuda' else ''}")
    print(HEADER)
    rows, skipped = [], []
    for phase in args.phases:
        for M in args.models:
            for B in args.batch:
                need, free = estimated_peak(M, B, phase), available_bytes(device)
                if need > args.max_mem_fraction * free:
                    skipped.append({"M": M, "B": B, "phase": phase, "estimated_gib": round(need / 2 ** 30, 1),
                                    "free_gib": round(free / 2 ** 30, 1)})
                    print(f"  {phase:<12}{M:>3}{B:>5} | skipped: needs ~{need / 2 ** 30:.0f} GiB, "
                          f"{free / 2 ** 30:.0f} GiB free", flush=True)
                    continue
                r = measure_row(M, B, phase, args, device)
                rows.append(r)
                print_row(r)
                print_profile(r)
    target = [r for r in rows if (r["M"], r["B"], r["phase"]) == (3, 128, "adversarial") and "speedup" in r]
    checks = {}
    if target:
        checks["paper_shape_adversarial_speedup_ge_1.5"] = target[0]["speedup"] >= 1.5
        print(f"  target M=3 B=128 adversarial: >= 1.5x -> {target[0]['speedup']}x")
    if all("speedup" in r for r in rows) and rows:
        checks["never_slower"] = min(r["speedup"] for r in rows) >= 1.0
        print(f"  never slower than plain: {checks['never_slower']} "
              f"(lowest {min(r['speedup'] for r in rows)}x)")
    if out_path is not None:
        write_results(out_path, "train_step", {
               "machine": info, "device": str(device), "default_layout": layout,
               "method": {"clock": "CUDA events" if device.type == "cuda" else
                          ("process CPU time" if args.cpu_time else "wall (perf_counter)"),
                          "warmup": args.warmup, "timed": args.timed, "kept": "best step",
                          "order": "paths alternate step by step", "pgd_steps": args.pgd_steps,
                          "projection": f"{EPOCHS} epochs x {CIFAR_TRAIN_IMAGES} images / images_per_s"},
               "rows": rows, "skipped": skipped, "checks": checks})
    return 0


if __name__ == "__main__":
    sys.exit(main())
