"""CUDA microbenchmarks of the fused operators.

Each fused op (forward, backward, forward+backward) is timed against the eager plain-PyTorch
reference (:mod:`cda2_ext.ops.reference`) and against ``torch.compile`` of that reference, at the
paper's shape (M=3, B=128, K=10), a large shape (M=8, B=4096, K=1000; sign step [8,512,3,32,32])
and a huge-K shape (M=4, B=1024, K=32768).

Timing: CUDA events around every call, median of many calls after a warm-up (the events bracket
the whole call, so host overhead that keeps the GPU waiting counts, as it does in training).
Bandwidth: each op's minimal traffic (every input it must read and every output it must write,
once) divided by its time, reported as a fraction of a device-to-device copy that moves the same
number of bytes (read + write), measured in the same run; the peak copy bandwidth (a 1 GiB copy)
is recorded too, with each row's fraction of it.

Correct first: before a case is timed, its fused op is compared with the eager reference on the
same inputs (outputs and gradients, norm-wise relative error); a mismatch is recorded in the row
and reported as a FAIL line, so a broken kernel cannot post a time unnoticed.

Usage::

    python benchmarks/ops_cuda.py                       # everything, float32
    python benchmarks/ops_cuda.py --dtypes float32 bfloat16 --ops collab_loss --no-compile
    python benchmarks/ops_cuda.py --budget-s 90         # start no new case after 90 s
    python benchmarks/ops_cuda.py --device cpu --shapes paper --runs 3 --no-compile --out /tmp/s.json
                                                        # smoke test of this script, no GPU needed

Writes ``benchmarks/results/ops_cuda_<gpu-name>.json`` (rewritten after every case, so a run cut
short keeps what it measured; ``complete`` says whether it finished) and prints a table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cda2_ext  # noqa: E402
from cda2_ext import ops, reference  # noqa: E402
from ops_cpu import portable_command  # noqa: E402  (this script's folder is on sys.path)

DEVICE = "cuda"  # main() sets "cpu" for the smoke test (--device cpu)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}

LOSS_SHAPES = {"paper": (3, 128, 10), "large": (8, 4096, 1000), "hugeK": (4, 1024, 32768)}
PPD_SHAPES = {"paper": (3, 128), "large": (8, 4096), "hugeK": (4, 1024)}
IMAGE_SHAPES = {"paper": (3, 128, 3, 32, 32), "large": (8, 512, 3, 32, 32), "xl": (8, 2048, 3, 32, 32)}


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def time_cuda(fn: Callable[[], object], runs: int, warmup: int) -> float:
    """Median milliseconds of fn() measured with CUDA events, after `warmup` calls (on the CPU
    smoke-test device: a wall clock around each call)."""
    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for i in range(runs):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def copy_time(nbytes: int, runs: int, warmup: int) -> float:
    """Median ms of a device-to-device copy that reads nbytes/2 and writes nbytes/2."""
    half = max(1, nbytes // 2)
    src = torch.randint(0, 256, (half,), dtype=torch.uint8, device=DEVICE)  # not zeros: see METHOD
    dst = torch.empty_like(src)
    return time_cuda(lambda: dst.copy_(src), runs, warmup)


def peak_copy_bytes() -> int:
    """Bytes (read + written) of the peak-bandwidth copy."""
    return 2 * (2 ** 30 if DEVICE == "cuda" else 2 ** 26)


def peak_copy_gbps(runs: int, warmup: int) -> float:
    """Bandwidth (GB/s, bytes read + written) of a large device-to-device copy: the ceiling that a
    memory-bound op can approach (1 GiB on a GPU, many times its L2; 64 MiB on the CPU)."""
    nbytes = peak_copy_bytes()
    ms = copy_time(nbytes, runs, warmup)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()  # give the 2 GiB back before the cases allocate theirs
    return nbytes / (ms * 1e-3) / 1e9


def rel_err(got, ref) -> float:
    """Largest norm-wise relative error over matching tensors of two (nested) results, in float64;
    values under 1 in size count as 1, so tiny sums formed by cancellation do not dominate."""
    if isinstance(got, torch.Tensor):
        if got.shape != ref.shape:
            return math.inf
        if not torch.is_floating_point(got):  # indices: exact or wrong
            return 0.0 if torch.equal(got, ref) else math.inf
        g, r = got.detach().double(), ref.detach().double()
        d = float((g - r).norm())
        return d / max(float(r.norm()), r.numel() ** 0.5) if math.isfinite(d) else math.inf
    return max((rel_err(a, b) for a, b in zip(got, ref)), default=0.0)


# Bound on rel_err(fused, eager) before a case is timed: both run in the same dtype, so this is the
# rounding of a different summation order (float32 statistics for half inputs, half gradients).
MATCH_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


class Case:
    """One op at one shape: callables for each implementation and each direction, and traffic."""

    def __init__(self, op: str, shape_name: str, shape: tuple, dtype: torch.dtype):
        self.op, self.shape_name, self.shape, self.dtype = op, shape_name, shape, dtype
        self.fns: Dict[str, Dict[str, Callable[[], object]]] = {}
        self.bytes: Dict[str, int] = {}
        # check(): rel_err of the fused op against the eager reference on fresh copies of the inputs
        self.check: Optional[Callable[[], float]] = None


def _grad(out: torch.Tensor, inp: torch.Tensor, g: Optional[torch.Tensor] = None, retain: bool = False):
    return torch.autograd.grad(out, inp, g, retain_graph=retain)


def _compile(fn):
    return torch.compile(fn, dynamic=False)


# ---------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------
def case_collab_loss(shape_name: str, shape: tuple, dtype: torch.dtype, use_compile: bool) -> Case:
    M, B, K = shape
    c = Case("collab_loss", shape_name, shape, dtype)
    z = (torch.randn(M, B, K, device=DEVICE) * 3).to(dtype).requires_grad_(True)
    y = torch.randint(0, K, (B,), device=DEVICE)
    s = z.element_size()
    sd = 8 if dtype == torch.float64 else 4
    # forward: read z, y; write loss_vec, ce, w, p (stat dtype) and lse (float64)
    c.bytes["fwd"] = M * B * K * s + B * 8 + B * sd + 3 * M * B * sd + M * B * 8
    # backward: read z, y, lse, w, p; write dz
    c.bytes["bwd"] = 2 * M * B * K * s + B * 8 + M * B * (8 + 2 * sd)
    c.bytes["fwd+bwd"] = c.bytes["fwd"] + c.bytes["bwd"]
    impls = {"fused": ops.collaboration_loss, "eager": reference.collaboration_loss}
    if use_compile:
        impls["compiled"] = _compile(reference.collaboration_loss)
    for name, f in impls.items():
        saved = {}

        def fwd(f=f):
            return f(z, y, 1.0, "mean").loss

        def bwd(f=f, saved=saved):
            if "loss" not in saved:
                saved["loss"] = f(z, y, 1.0, "mean").loss
            return _grad(saved["loss"], z, retain=True)

        def fb(f=f):
            return _grad(f(z, y, 1.0, "mean").loss, z)

        c.fns[name] = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fb}

    def check() -> float:
        got, ref = (ops.collaboration_loss(z, y, 1.0, "mean"), reference.collaboration_loss(z, y, 1.0, "mean"))
        return rel_err([*got, _grad(got.loss, z)], [*ref, _grad(ref.loss, z)])

    c.check = check
    return c


def case_ppd_bce(shape_name: str, shape: tuple, dtype: torch.dtype, use_compile: bool) -> Case:
    M, B = shape
    c = Case("ppd_bce", shape_name, shape, dtype)
    sl = (torch.randn(M, B, device=DEVICE) * 3).to(dtype).requires_grad_(True)
    t = torch.rand(M, B, device=DEVICE).to(dtype)
    es = sl.element_size()
    c.bytes["fwd"] = 2 * M * B * es
    c.bytes["bwd"] = 3 * M * B * es
    c.bytes["fwd+bwd"] = c.bytes["fwd"] + c.bytes["bwd"]
    impls = {"fused": ops.ppd_bce, "eager": reference.ppd_bce}
    if use_compile:
        impls["compiled"] = _compile(reference.ppd_bce)
    for name, f in impls.items():
        saved = {}

        def bwd(f=f, saved=saved):
            if "out" not in saved:
                saved["out"] = f(sl, t, "mean")
            return _grad(saved["out"], sl, retain=True)

        c.fns[name] = {"fwd": lambda f=f: f(sl, t, "mean"), "bwd": bwd,
                       "fwd+bwd": lambda f=f: _grad(f(sl, t, "mean"), sl)}

    def check() -> float:
        got, ref = ops.ppd_bce(sl, t, "mean"), reference.ppd_bce(sl, t, "mean")
        return rel_err([got, _grad(got, sl)], [ref, _grad(ref, sl)])

    c.check = check
    return c


def case_sign_step(shape_name: str, shape: tuple, dtype: torch.dtype, use_compile: bool) -> Case:
    M = shape[0]
    c = Case("sign_step_", shape_name, shape, dtype)
    x_nat = torch.rand(shape[1:], device=DEVICE).to(dtype)
    x_adv = (x_nat + 0.01 * torch.randn(shape, device=DEVICE)).clamp(0, 1).to(dtype)
    g = torch.randn(shape, device=DEVICE).to(dtype)
    n = x_adv.numel()
    es = x_adv.element_size()
    c.bytes["fwd"] = (3 * n + n // M) * es  # read x, g, x0 (broadcast); write x
    eps, alpha = 8 / 255, 2 / 255
    impls = {"fused": ops.pgd_sign_step_, "eager": reference.pgd_sign_step_}
    if use_compile:
        impls["compiled"] = _compile(reference.pgd_sign_step_)
    for name, f in impls.items():
        c.fns[name] = {"fwd": lambda f=f: f(x_adv, g, x_nat, eps, alpha, 0.0, 1.0)}

    def check() -> float:  # on copies: the timed calls keep stepping x_adv in place
        a, b = x_adv.clone(), x_adv.clone()
        ops.pgd_sign_step_(a, g, x_nat, eps, alpha, 0.0, 1.0)
        reference.pgd_sign_step_(b, g, x_nat, eps, alpha, 0.0, 1.0)
        return rel_err(a, b)

    c.check = check
    return c


def case_random_start(shape_name: str, shape: tuple, dtype: torch.dtype, use_compile: bool) -> Case:
    M = shape[0]
    c = Case("random_start", shape_name, shape, dtype)
    x_nat = torch.rand(shape[1:], device=DEVICE).to(dtype)
    n = M * x_nat.numel()
    es = x_nat.element_size()
    c.bytes["fwd"] = (n + n // M) * es  # read x0, write x
    eps = 8 / 255
    seed = 12345
    c.fns["fused"] = {"fwd": lambda: ops.pgd_random_start(x_nat, eps, 0.0, 1.0, num_models=M, seed=seed)}
    c.fns["eager"] = {"fwd": lambda: reference.random_start_from_seed(x_nat, eps, 0.0, 1.0, seed, M)}
    if use_compile:
        comp = _compile(reference.random_start_from_seed)
        c.fns["compiled"] = {"fwd": lambda: comp(x_nat, eps, 0.0, 1.0, seed, M)}
    c.check = lambda: rel_err(c.fns["fused"]["fwd"](), c.fns["eager"]["fwd"]())
    return c


def case_collab_select(shape_name: str, shape: tuple, dtype: torch.dtype, use_compile: bool) -> Case:
    M, B, K = shape
    c = Case("collab_select", shape_name, shape, dtype)
    sc = torch.randn(M, B, device=DEVICE).to(dtype)
    z = torch.randn(M, B, K, device=DEVICE).to(dtype).requires_grad_(True)
    es = z.element_size()
    c.bytes["fwd"] = M * B * es + 2 * B * K * es + B * 8  # scores, chosen rows in, chosen out, index
    c.bytes["bwd"] = B * K * es + B * 8 + M * B * K * es  # grad_chosen, index in; full grad out
    c.bytes["fwd+bwd"] = c.bytes["fwd"] + c.bytes["bwd"]
    gch = torch.randn(B, K, device=DEVICE).to(dtype)
    impls = {"fused": ops.collaborative_select, "eager": reference.collaborative_select}
    if use_compile:
        impls["compiled"] = _compile(reference.collaborative_select)
    for name, f in impls.items():
        saved = {}

        def bwd(f=f, saved=saved):
            if "chosen" not in saved:
                saved["chosen"] = f(sc, z)[1]
            return _grad(saved["chosen"], z, gch, retain=True)

        c.fns[name] = {"fwd": lambda f=f: f(sc, z), "bwd": bwd,
                       "fwd+bwd": lambda f=f: _grad(f(sc, z)[1], z, gch)}

    def check() -> float:
        got, ref = ops.collaborative_select(sc, z), reference.collaborative_select(sc, z)
        return rel_err([*got, _grad(got[1], z, gch)], [*ref, _grad(ref[1], z, gch)])

    c.check = check
    return c


BUILDERS = {
    "collab_loss": (case_collab_loss, LOSS_SHAPES),
    "ppd_bce": (case_ppd_bce, PPD_SHAPES),
    "sign_step_": (case_sign_step, IMAGE_SHAPES),
    "random_start": (case_random_start, IMAGE_SHAPES),
    "collab_select": (case_collab_select, LOSS_SHAPES),
}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def machine_info() -> dict:
    info = {
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cda2_ext": getattr(cda2_ext, "__version__", "?"),
        "cda2_ext_build": ops.BUILD_INFO,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if DEVICE == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update({"gpu": p.name, "compute_capability": f"{p.major}.{p.minor}",
                     "sm_count": p.multi_processor_count,
                     "l2_cache_mb": round(getattr(p, "L2_cache_size", 0) / 1e6, 1),
                     "gpu_memory_gib": round(p.total_memory / 2 ** 30, 1)})
    else:
        info.update({"gpu": None, "smoke_test_device": "cpu"})
    return info


def run(args, on_case: Callable[[List[dict], bool], None]) -> List[dict]:
    """Time every selected (dtype, op, shape); call on_case(rows, complete) after each case."""
    rows: List[dict] = []
    t_start = time.time()
    todo = [(dt, op, sn, sh) for dt in args.dtypes for op in args.ops
            for sn, sh in BUILDERS[op][1].items() if not args.shapes or sn in args.shapes]
    for i, (dtype_name, op, shape_name, shape) in enumerate(todo):
        if args.budget_s and time.time() - t_start > args.budget_s:
            left = ", ".join(f"{o} {n} {d}" for d, o, n, _ in todo[i:])
            print(f"# budget of {args.budget_s:.0f} s spent: not run: {left}", flush=True)
            break
        dtype = DTYPES[dtype_name]
        torch.manual_seed(0)
        t0 = time.time()
        base = {"op": op, "shape_name": shape_name, "shape": list(shape), "dtype": dtype_name}
        try:
            case = BUILDERS[op][0](shape_name, shape, dtype, not args.no_compile)
            err = case.check() if case.check is not None else None
        except Exception as e:  # a broken case must not cost the others their numbers
            rows.append({**base, "direction": "setup", "error": _err(e)})
            print(f"{op:<14} {shape_name:<18} {dtype_name:<9} ERROR {_err(e)}", flush=True)
            on_case(rows, False)
            continue
        match = err is not None and err <= MATCH_TOL[dtype]
        runs = args.runs if math.prod(shape) < 50_000_000 else max(10, args.runs // 4)
        for direction in ("fwd", "bwd", "fwd+bwd"):
            if direction not in case.fns["fused"]:
                continue
            row = {**base, "direction": direction, "bytes": case.bytes[direction], "runs": runs,
                   "rel_err_vs_eager": err, "matches_eager": match}
            for impl, fns in case.fns.items():
                try:
                    row[f"{impl}_ms"] = time_cuda(fns[direction], runs, args.warmup)
                except Exception as e:  # a compile failure should not stop the run
                    row[f"{impl}_ms"] = None
                    row[f"{impl}_error"] = _err(e)
            row["copy_ms"] = copy_time(case.bytes[direction], runs, args.warmup)
            row["copy_gbps"] = case.bytes[direction] / (row["copy_ms"] * 1e-3) / 1e9
            f_ms = row["fused_ms"]
            if f_ms:
                row["fused_gbps"] = case.bytes[direction] / (f_ms * 1e-3) / 1e9
                row["fraction_of_copy"] = row["copy_ms"] / f_ms
                row["fraction_of_peak_copy"] = row["fused_gbps"] / args.peak_copy_gbps
                for impl in ("eager", "compiled"):
                    if row.get(f"{impl}_ms"):
                        row[f"speedup_vs_{impl}"] = row[f"{impl}_ms"] / f_ms
            rows.append(row)
            print_row(row)
        del case
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        on_case(rows, False)
        if args.verbose:
            print(f"    ({op} {shape_name} {dtype_name}: {time.time() - t0:.1f} s)", flush=True)
    return rows


def _err(e: Exception) -> str:
    lines = str(e).splitlines() or [""]
    return f"{type(e).__name__}: {lines[0][:200]}"


HEADER = (f"{'op':<14} {'shape':<18} {'dtype':<9} {'dir':<8} {'fused us':>9} {'eager us':>9} "
          f"{'compl us':>9} {'x eager':>8} {'x compl':>8} {'GB/s':>8} {'copy GB/s':>9} {'of copy':>8}")


def _fmt(v, width: int, prec: int) -> str:
    return f"{v:{width}.{prec}f}" if v is not None else f"{'-':>{width}}"


def print_row(r: dict) -> None:
    shape = "x".join(map(str, r["shape"]))

    def us(k):
        return r[k] * 1e3 if r.get(k) else None

    note = "" if r.get("matches_eager") else f"  MISMATCH vs eager (rel err {r.get('rel_err_vs_eager')})"
    print(f"{r['op']:<14} {shape:<18} {r['dtype']:<9} {r['direction']:<8} {_fmt(us('fused_ms'), 9, 1)} "
          f"{_fmt(us('eager_ms'), 9, 1)} {_fmt(us('compiled_ms'), 9, 1)} "
          f"{_fmt(r.get('speedup_vs_eager'), 8, 2)} {_fmt(r.get('speedup_vs_compiled'), 8, 2)} "
          f"{_fmt(r.get('fused_gbps'), 8, 1)} {r['copy_gbps']:9.1f} {_fmt(r.get('fraction_of_copy'), 8, 2)}"
          f"{note}", flush=True)


# Below this many bytes an op (and the copy it is compared with) is bound by launch and host
# overhead, not bandwidth; such rows are reported as INFO rather than judged.
LAUNCH_BOUND_BYTES = 8_000_000


def verdicts(rows: List[dict]) -> List[str]:
    """The issue's targets: >= 80% of copy bandwidth at the large shapes; at the paper shape every
    fused op (fwd+bwd where it has a backward) >= 5x eager and not slower than torch.compile."""
    out = []
    for r in rows:
        tag = f"{r['op']} {r['shape_name']} {r['dtype']} {r['direction']}"
        if r["direction"] == "setup" or not r.get("fused_ms"):
            out.append(f"FAIL no time for {tag}: {r.get('error') or r.get('fused_error')}")
            continue
        if not r["matches_eager"]:
            out.append(f"FAIL result of {tag} differs from eager: rel err {r['rel_err_vs_eager']}")
        if r["shape_name"] in ("large", "hugeK", "xl") and r["direction"] in ("fwd", "bwd"):
            ok = r["fraction_of_copy"] >= 0.8
            verdict = "PASS" if ok else "FAIL"
            if r["bytes"] < LAUNCH_BOUND_BYTES:  # e.g. ppd_bce [8, 4096]: launch and host overhead only
                verdict = "INFO"
            out.append(f"{verdict} bandwidth {tag}: {r['fraction_of_copy']:.2f} of copy "
                       f"({r['bytes'] / 1e6:.1f} MB moved)")
        has_bwd = r["op"] not in ("sign_step_", "random_start")
        if r["shape_name"] == "paper" and r["direction"] == ("fwd+bwd" if has_bwd else "fwd"):
            se, sc = r.get("speedup_vs_eager"), r.get("speedup_vs_compiled")
            ok_e = se is not None and se >= 5
            out.append(f"{'PASS' if ok_e else 'FAIL'} paper-shape speedup vs eager {tag}: "
                       f"{se if se is None else round(se, 2)}x (target >= 5x)")
            if sc is not None:
                out.append(f"{'PASS' if sc >= 1 else 'FAIL'} paper-shape vs torch.compile {tag}: "
                           f"{sc:.2f}x (target >= 1x)")
    return out


def main() -> int:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=sorted(DTYPES))
    ap.add_argument("--ops", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    ap.add_argument("--shapes", nargs="+", default=None, help="subset of: paper large hugeK xl")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no new case after this many seconds (0: no limit)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a smoke test of this script (wall-clock timing, no verdicts)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/ops_cuda_<gpu>.json)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    DEVICE = args.device

    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("ops_cuda.py: no CUDA device visible to torch (torch.cuda.is_available() is False); "
              "nothing to benchmark (--device cpu runs a smoke test of this script).", file=sys.stderr)
        return 2
    if DEVICE == "cuda" and not ops.cuda_available():
        print(f"ops_cuda.py: cda2_ext has no CUDA kernels in this build ({ops.BUILD_INFO}); rebuild it "
              "with a CUDA-enabled torch and nvcc on PATH.", file=sys.stderr)
        return 2
    if DEVICE == "cpu" and not args.out:
        print("ops_cuda.py: --device cpu is a smoke test; give --out (it never writes results/).",
              file=sys.stderr)
        return 2

    torch.backends.cuda.matmul.allow_tf32 = False
    info = machine_info()
    args.peak_copy_gbps = peak_copy_gbps(max(10, args.runs // 10), 3)
    info["copy_peak_gbps"] = round(args.peak_copy_gbps, 1)
    if DEVICE == "cuda":
        print(f"# {info['gpu']} (sm_{info['compute_capability'].replace('.', '')}, {info['sm_count']} SMs), "
              f"torch {info['torch']}, CUDA {info['cuda_runtime']}, {info['cda2_ext_build']}")
    else:
        print(f"# SMOKE TEST on the CPU (timings are not meaningful; see ops_cpu.py), {info['cda2_ext_build']}")
    print(f"# median of {args.runs} runs after {args.warmup} warm-up, "
          f"{'CUDA events' if DEVICE == 'cuda' else 'wall clock'}; bandwidth = minimal "
          "traffic / time, 'of copy' = copy time / fused time for a D2D copy of the same bytes; "
          f"peak copy {args.peak_copy_gbps:.0f} GB/s ({peak_copy_bytes() / 2 ** 30:g} GiB moved)")
    print(HEADER)

    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"ops_cuda_{gpu_slug(info['gpu'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(rows: List[dict], complete: bool, checks: Optional[List[str]] = None) -> None:
        doc = {
            "machine": info,
            "command": portable_command(),  # ops_cpu.py: local folders as $REPO, $TMP, ...
            "complete": complete,
            "method": {
                "timer": "torch.cuda.Event around each call, median" if DEVICE == "cuda"
                         else "wall clock around each call, median (CPU smoke test)",
                "runs": args.runs,
                "warmup": args.warmup,
                "bandwidth": "minimal bytes read+written by the op / fused time",
                "copy_baseline": "device-to-device copy_ moving the same bytes (half read, half written), "
                                 "same run; copy_peak_gbps: the same for 2 GiB",
                "reference": "cda2_ext.ops.reference eager; torch.compile(dynamic=False) of the same functions",
                "correctness": "rel_err_vs_eager: norm-wise relative error of outputs and gradients "
                               "against eager, checked before timing; bound per dtype "
                               + json.dumps({str(k)[6:]: v for k, v in MATCH_TOL.items()}),
            },
            "figures": rows,
            "checks": checks if checks is not None else verdicts(rows) if DEVICE == "cuda" else [],
        }
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(out)  # never a half-written file, even if the run is killed mid-write

    rows = run(args, write)
    if DEVICE == "cuda":
        checks = verdicts(rows)
    else:
        checks = [f"FAIL result of {r['op']} {r['shape_name']} {r['dtype']} differs from eager"
                  for r in rows if r["direction"] == "fwd" and not r.get("matches_eager")]
        checks += [f"FAIL {r['op']} {r['shape_name']} {r['dtype']}: {r['error']}"
                   for r in rows if r["direction"] == "setup"]
    print()
    for line in checks:
        print(line)
    write(rows, True, checks)
    print(f"\nwrote {out}")
    return 1 if DEVICE == "cpu" and checks else 0


if __name__ == "__main__":
    sys.exit(main())
