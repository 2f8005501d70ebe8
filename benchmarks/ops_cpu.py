"""Fused CPU operators vs the plain-PyTorch reference, forward + backward, in one run.

Every row times the same work twice in this process -- once through ``cda2_ext.ops.reference`` (the
math written the way a careful PyTorch user would) and once through the compiled ``cda2_ext.ops``
-- with ``torch.utils.benchmark.Timer.blocked_autorange`` and reports the median. Reference and
fused are measured alternately for ``--rounds`` rounds and the lowest median of each is kept, which
damps the noise of a machine shared with other work. Before timing, each row checks that the two
give the same numbers, so a broken kernel cannot post a fast time.

    python benchmarks/ops_cpu.py            # full run, writes benchmarks/results/ops_cpu.json
    python benchmarks/ops_cpu.py --quick    # smoke run (seconds), writes nothing unless --out
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.benchmark import Timer

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "ops_cpu.json"
EPS, ALPHA = 8 / 255, 2 / 255

# The acceptance bars (speed-up of fused over reference on the 2-core CPU machine).
TARGETS = [
    ("collab_loss fwd+bwd", "M=3 B=128 K=10", 3.0),
    ("collab_loss fwd+bwd", "M=8 B=1024 K=1000", 1.5),
    ("sign_step_", "[3,128,3,32,32]", 2.0),
    ("sign_step_", "[8,512,3,32,32]", 2.0),
]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def portable_command(argv: Optional[List[str]] = None) -> str:
    """The command that ran (``python`` + ``argv``, default ``sys.argv``), as committed records
    quote it: this machine's folders become variables -- the repository ``$REPO``, the
    ``CDA2_DATA`` folder ``$DATA``, the temporary folder ``$TMP``, the home folder ``$HOME`` -- so a
    record says what ran, not where."""
    import re
    import tempfile
    subs = []  # (folder, variable), most specific first; each also in its resolved spelling
    for folder, var in ((HERE.parent, "$REPO"), (os.environ.get("CDA2_DATA"), "$DATA"),
                        (tempfile.gettempdir(), "$TMP"), (Path.home(), "$HOME")):
        if folder and str(folder) not in ("/", "."):
            for spelt in dict.fromkeys((str(folder), os.path.realpath(folder))):
                subs.append((spelt.rstrip("/"), var))
    cmd = " ".join([Path(sys.executable).name, *(sys.argv if argv is None else argv)])
    for folder, var in sorted(subs, key=lambda fv: -len(fv[0])):  # /tmp/x/repo before /tmp
        cmd = re.sub(r"(?<![\w.$-])" + re.escape(folder) + r"(?=[/\s\"',:=]|$)", lambda _: var, cmd)
    return cmd


def write_results(path: Path, benchmark: str, fields: dict) -> None:
    """Write ``benchmarks/results/*.json``: the benchmark's name, the command that ran
    (:func:`portable_command`), the time, then ``fields`` (machine, settings, figures); say where."""
    doc = {"benchmark": benchmark, "command": portable_command(),
           "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")


def machine_info() -> dict:
    import cda2_ext
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cda2_ext": getattr(cda2_ext, "__version__", None),
        "cda2_ext_build": cda2_ext.BUILD_INFO,
        # other work on a shared machine skews small-op timings most (the reference is many ops)
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


# ---- the rows -----------------------------------------------------------------------------------
# Each maker returns {"ref": stmt, "fused": stmt, "check": callable} where a stmt is a zero-argument
# callable doing the whole timed unit of work for one implementation.

def _collab(impl, M, B, K, with_bce: bool, gen):
    z = torch.randn(M, B, K, generator=gen).requires_grad_(True)
    s = torch.randn(M, B, generator=gen).requires_grad_(True)
    y = torch.randint(0, K, (B,), generator=gen)

    def step():
        out = impl.collaboration_loss(z, y, 1.0, "mean")
        if with_bce:
            total = out.loss + impl.ppd_bce(s, out.p_true, "mean")
            return torch.autograd.grad(total, (z, s))
        return torch.autograd.grad(out.loss, (z,))
    return step


def _sign_step(impl, shape, gen):
    x_nat = torch.rand(shape[1:], generator=gen)
    x = (x_nat + (torch.rand(shape, generator=gen) * 2 - 1) * EPS).clamp_(0, 1)
    g = torch.randn(shape, generator=gen)

    def step():  # repeated steps stay in the ball and the box, so the work is the same each time
        return impl.pgd_sign_step_(x, g, x_nat, EPS, ALPHA, 0.0, 1.0)
    return step


def _random_start(impl, shape, gen):
    x_nat = torch.rand(shape[1:], generator=gen)
    return lambda: impl.pgd_random_start(x_nat, EPS, 0.0, 1.0, num_models=shape[0], seed=1234)


def _select(impl, M, B, K, gen):
    ppd = torch.randn(M, B, generator=gen)
    z = torch.randn(M, B, K, generator=gen)
    return lambda: impl.collaborative_select(ppd, z)


def rows(quick: bool) -> List[dict]:
    collab_shapes = [(3, 128, 10), (5, 128, 10), (8, 128, 10), (8, 1024, 1000)]
    img_shapes = [(3, 128, 3, 32, 32), (8, 512, 3, 32, 32)]
    out = []
    for M, B, K in collab_shapes:
        out.append(dict(op="collab_loss fwd+bwd", shape=f"M={M} B={B} K={K}",
                        make=lambda impl, g, a=(M, B, K): _collab(impl, *a, False, g)))
    for M, B, K in collab_shapes:
        out.append(dict(op="collab_loss+ppd_bce fwd+bwd", shape=f"M={M} B={B} K={K}",
                        make=lambda impl, g, a=(M, B, K): _collab(impl, *a, True, g)))
    for shp in img_shapes:
        name = "[" + ",".join(map(str, shp)) + "]"
        out.append(dict(op="sign_step_", shape=name, make=lambda impl, g, s=shp: _sign_step(impl, s, g)))
    for shp in img_shapes:
        name = "[" + ",".join(map(str, shp)) + "]"
        out.append(dict(op="random_start", shape=name, make=lambda impl, g, s=shp: _random_start(impl, s, g)))
    for M, B, K in [(3, 128, 10), (8, 1024, 1000)]:
        out.append(dict(op="collab_select fwd", shape=f"M={M} B={B} K={K}",
                        make=lambda impl, g, a=(M, B, K): _select(impl, *a, g)))
    return out


def _same(a, b) -> None:
    """The fused result must match the reference before it is timed."""
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    for x, y in zip(a, b):
        if x.dtype.is_floating_point:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(x, y)


def time_stmt(fn: Callable, min_run_time: float, threads: int, cpu_time: bool = False) -> dict:
    kw = {"timer": time.process_time} if cpu_time else {}
    t = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, **kw)
    m = t.blocked_autorange(min_run_time=min_run_time)
    return {"median_us": m.median * 1e6, "iqr_us": m.iqr * 1e6, "runs": len(m.times),
            "number_per_run": m.number_per_run}


def run(args) -> dict:
    from cda2_ext import ops
    from cda2_ext.ops import reference
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    results = []
    selected = [r for r in rows(args.quick) if not args.only or any(s in r["op"] for s in args.only)]
    for row in selected:
        gen = torch.Generator().manual_seed(0)
        fns = {"reference": row["make"](reference, gen)}
        gen = torch.Generator().manual_seed(0)
        fns["fused"] = row["make"](ops, gen)
        _same(fns["fused"](), fns["reference"]())  # same seed -> same inputs for both
        for fn in fns.values():  # warm-up
            fn()
        best: Dict[str, dict] = {}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                m = time_stmt(fn, args.min_run_time, threads, args.cpu_time)
                if name not in best or m["median_us"] < best[name]["median_us"]:
                    best[name] = m
        r = {"op": row["op"], "shape": row["shape"], "dtype": "float32",
             "reference_us": round(best["reference"]["median_us"], 2),
             "fused_us": round(best["fused"]["median_us"], 2),
             "speedup": round(best["reference"]["median_us"] / best["fused"]["median_us"], 2),
             "reference": best["reference"], "fused": best["fused"]}
        results.append(r)
        print(f"  {r['op']:<28} {r['shape']:<20} {r['reference_us']:>12.1f} {r['fused_us']:>12.1f}"
              f" {r['speedup']:>8.2f}x", flush=True)
    checks = []
    for op, shape, bar in TARGETS:
        hit = [r for r in results if r["op"] == op and r["shape"] == shape]
        if hit:
            checks.append({"op": op, "shape": shape, "target_speedup": bar,
                           "speedup": hit[0]["speedup"], "met": hit[0]["speedup"] >= bar})
    return {"threads": threads, "clock": "process_cpu_time" if args.cpu_time else "wall",
            "rows": results, "targets": checks}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: short timings, one round")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds per row (default 6)")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement (default 0.4)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with the process's CPU clock instead of the wall clock: steadier on a "
                        "shared machine (time spent descheduled does not count), best with --threads 1")
    p.add_argument("--only", nargs="*", default=None, help="only rows whose op contains one of these")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON output (default {DEFAULT_OUT.relative_to(HERE.parent)}; none for --quick)")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 6)
    args.min_run_time = args.min_run_time or (0.02 if args.quick else 0.4)
    out_path = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)

    import cda2_ext
    if not cda2_ext.HAS_EXTENSION:
        print(f"ops_cpu.py: the compiled cda2_ext extension is not built ({cda2_ext.BUILD_INFO}).\n"
              "Build it first: pip install --no-build-isolation -e .   (there is nothing to compare "
              "the reference against)", file=sys.stderr)
        return 2

    info = machine_info()
    print(f"cda2_ext CPU ops vs plain-PyTorch reference -- {info['cpu_model']}, torch {info['torch']}, "
          f"{args.threads or torch.get_num_threads()} threads, median of blocked_autorange"
          f"{', process CPU time' if args.cpu_time else ''}"
          f"{' (quick)' if args.quick else ''}")
    print(f"  {'op':<28} {'shape':<20} {'reference us':>12} {'fused us':>12} {'speed-up':>9}")
    res = run(args)
    for c in res["targets"]:
        print(f"  target {c['op']} {c['shape']}: >= {c['target_speedup']}x -> {c['speedup']}x "
              f"{'met' if c['met'] else 'NOT met'}")
    if out_path is not None:
        write_results(out_path, "ops_cpu", {"machine": info, "quick": args.quick,
                                            "rounds": args.rounds,
                                            "min_run_time_s": args.min_run_time, **res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
