"""Call every fused operator forward and backward on awkward inputs: the compute-sanitizer workload.

Meant to run under ``compute-sanitizer --tool memcheck`` (and ``racecheck``) from
``benchmarks/gpu_check.sh``, with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that every tensor is its
own allocation and a read or write past its end is caught rather than landing in a pooled block.
The inputs are the edge cases of the kernels' row mappings: one sub-model (M=1), two classes
(K=2), one sample (B=1), K just past the 2048 switch between the two loss-forward kernels, an
unaligned K, the huge-K case (K=32768), non-contiguous (permuted, strided) inputs, a side stream,
and float16/bfloat16 next to float32/float64.

Every result is also compared with :mod:`cda2_ext.ops.reference` run on the CPU in float64 on the
same values (no extra GPU kernels for the sanitizer to slow down), so the run doubles as a
correctness check: the norm-wise relative error must stay under a per-dtype bound. ``--device
cpu`` runs the same calls on the CPU kernels (a smoke test of this script on a machine without a
GPU).

Exit status: 0 all calls ran and matched, 1 a mismatch or an exception, 2 no extension / device.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Callable, List, Sequence, Tuple

import torch
from torch import Tensor

import cda2_ext
from cda2_ext import ops
from cda2_ext.ops import reference

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}

# (M, B, K) for the loss and the selection. "quick" (racecheck) keeps one of each kernel mapping.
LOSS_SHAPES: List[Tuple[int, int, int]] = [
    (1, 4, 10),     # M=1
    (3, 5, 2),      # K=2
    (2, 1, 7),      # B=1, odd K (no 16-byte vectors)
    (1, 1, 2),      # everything minimal
    (3, 128, 10),   # the paper's shape (reduced loss finished inside the forward kernel)
    (2, 3, 2049),   # just past the group-of-lanes kernel: one block per sample
    (2, 2, 32768),  # huge K
]
QUICK_LOSS_SHAPES = [(2, 1, 7), (3, 128, 10), (2, 3, 2049)]
# Image batches [M, B, C, H, W] for the sign step and random start.
IMAGE_SHAPES: List[Tuple[int, ...]] = [(1, 1, 1, 1, 1), (3, 5, 3, 7, 9), (2, 4, 3, 32, 32)]
QUICK_IMAGE_SHAPES = [(3, 5, 3, 7, 9)]

# Bound on ||fused - ref|| / ||ref|| (ref in float64): float32 arithmetic lands far under 1e-5;
# half inputs keep their statistics in float32, but gradients and images are rounded to the
# half type itself (bfloat16 keeps 8 significant bits).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# Losses and statistics: kept in float32 for half inputs, so float32 accuracy on the (exact) inputs.
STAT_TOL = {**TOL, torch.float16: TOL[torch.float32], torch.bfloat16: TOL[torch.float32]}


class Checker:
    """Counts calls and collects failures, so one bad case does not hide the others."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.calls = 0
        self.failures: List[str] = []

    def compare(self, what: str, got: Tensor, ref: Tensor, tol: float) -> None:
        """Norm-wise relative error of ``got`` against the float64 CPU ``ref``; values under 1 in
        size count as 1 (an absolute floor), since a tiny loss such as log(1 + e^-d) is formed by
        cancellation and carries the rounding of the logits it came from, not of itself."""
        g = got.detach().to("cpu", torch.float64)
        r = ref.detach().to("cpu", torch.float64)
        if g.shape != r.shape:
            self.failures.append(f"{what}: shape {list(g.shape)} != reference {list(r.shape)}")
            return
        if not bool(torch.isfinite(g).all()):
            self.failures.append(f"{what}: non-finite values in the result")
            return
        err = float((g - r).norm() / max(float(r.norm()), r.numel() ** 0.5))
        if not err <= tol:
            self.failures.append(f"{what}: relative error {err:.3g} > {tol:.1g}")
        elif self.verbose:
            print(f"  ok {what}: {err:.2g}", flush=True)

    def run(self, what: str, fn: Callable[[], None]) -> None:
        self.calls += 1
        try:
            fn()
        except Exception:  # record and go on: the sanitizer should see every other case too
            self.failures.append(f"{what}: raised\n{traceback.format_exc(limit=4)}")


def _f64(t: Tensor, grad: bool = False) -> Tensor:
    """A CPU float64 copy (a leaf, requiring grad if asked) of ``t``'s values."""
    return t.detach().to("cpu", torch.float64).requires_grad_(grad)


def _noncontig_logits(M: int, B: int, K: int, dtype: torch.dtype, dev: str, layout: str) -> Tensor:
    """Logits [M, B, K] in the given memory layout: contiguous, permuted (from [B, M, K]) or
    strided along K (every other element of [M, B, 2K])."""
    if layout == "permuted":
        return (torch.randn(B, M, K, device=dev) * 3).to(dtype).transpose(0, 1)
    if layout == "strided":
        return (torch.randn(M, B, 2 * K, device=dev) * 3).to(dtype)[..., ::2]
    return (torch.randn(M, B, K, device=dev) * 3).to(dtype)


def check_collab_loss(c: Checker, dev: str, dtype: torch.dtype, shapes: Sequence[Tuple[int, int, int]],
                      layouts: Sequence[str]) -> None:
    for (M, B, K) in shapes:
        for layout in layouts:
            for red in ("none", "mean", "sum"):
                tag = f"collab_loss {M}x{B}x{K} {str(dtype)[6:]} {layout} {red}"

                def case(M=M, B=B, K=K, layout=layout, red=red, tag=tag) -> None:
                    z = _noncontig_logits(M, B, K, dtype, dev, layout).requires_grad_(True)
                    # labels as a strided view for the non-contiguous layouts
                    y = torch.randint(0, K, (2 * B,), device=dev)[::2] if layout != "contiguous" \
                        else torch.randint(0, K, (B,), device=dev)
                    out = ops.collaboration_loss(z, y, 1.0, red)
                    # Weigh every output, so the backward gets a gradient for each of them.
                    w = [torch.rand(t.shape, device=dev, dtype=t.dtype) for t in out]
                    gz, = torch.autograd.grad(sum((t * wi).sum() for t, wi in zip(out, w)), z)
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    z64 = _f64(z, True)
                    ref = reference.collaboration_loss(z64, y.cpu(), 1.0, red)
                    rg, = torch.autograd.grad(sum((t * _f64(wi)).sum() for t, wi in zip(ref, w)), z64)
                    for name, a, b in zip(("loss", "ce", "weights", "p_true"), out, ref):
                        c.compare(f"{tag} {name}", a, b, STAT_TOL[dtype])
                    c.compare(f"{tag} grad", gz, rg, TOL[dtype])

                c.run(tag, case)


def check_ppd_bce(c: Checker, dev: str, dtype: torch.dtype, shapes: Sequence[Tuple[int, int]]) -> None:
    for (M, B) in shapes:
        for layout in ("contiguous", "permuted"):
            for red in ("none", "mean", "sum"):
                tag = f"ppd_bce {M}x{B} {str(dtype)[6:]} {layout} {red}"

                def case(M=M, B=B, layout=layout, red=red, tag=tag) -> None:
                    if layout == "permuted":
                        s = (torch.randn(B, M, device=dev) * 3).to(dtype).t()
                        t = torch.rand(B, M, device=dev).to(dtype).t()
                    else:
                        s = (torch.randn(M, B, device=dev) * 3).to(dtype)
                        t = torch.rand(M, B, device=dev).to(dtype)
                    s.requires_grad_(True)
                    out = ops.ppd_bce(s, t, red)
                    w = torch.rand(out.shape, device=dev, dtype=out.dtype)
                    gs, = torch.autograd.grad((out * w).sum(), s)
                    s64 = _f64(s, True)
                    ref = reference.ppd_bce(s64, _f64(t), red)
                    rg, = torch.autograd.grad((ref * _f64(w)).sum(), s64)
                    c.compare(f"{tag} out", out, ref, STAT_TOL[dtype])
                    c.compare(f"{tag} grad", gs, rg, TOL[dtype])

                c.run(tag, case)


def check_select(c: Checker, dev: str, dtype: torch.dtype, shapes: Sequence[Tuple[int, int, int]]) -> None:
    for (M, B, K) in shapes:
        for layout in ("contiguous", "permuted", "strided"):
            tag = f"collab_select {M}x{B}x{K} {str(dtype)[6:]} {layout}"

            def case(M=M, B=B, K=K, layout=layout, tag=tag) -> None:
                z = _noncontig_logits(M, B, K, dtype, dev, layout).requires_grad_(True)
                # Distinct small integers per sample: one arg-max, exact in every dtype.
                sc = torch.stack([torch.randperm(M) for _ in range(B)], 1).to(dev, dtype)
                if layout != "contiguous":
                    sc = sc.t().contiguous().t()  # same values, column-major
                idx, chosen = ops.collaborative_select(sc, z)
                g = torch.randn(chosen.shape, device=dev).to(dtype)
                gz, = torch.autograd.grad(chosen, z, g)
                z64 = _f64(z, True)
                ridx, rch = reference.collaborative_select(_f64(sc), z64)
                rgz, = torch.autograd.grad(rch, z64, _f64(g))
                if not torch.equal(idx.cpu(), ridx):
                    c.failures.append(f"{tag}: index differs from the reference")
                c.compare(f"{tag} chosen", chosen, rch, 0.0)  # a gather: exact
                c.compare(f"{tag} grad", gz, rgz, 0.0)        # a scatter: exact

            c.run(tag, case)


def check_pgd(c: Checker, dev: str, dtype: torch.dtype, shapes: Sequence[Tuple[int, ...]],
              side_stream: bool) -> None:
    eps, alpha = 8 / 255, 2 / 255
    for shape in shapes:
        for bcast in (True, False):
            tag = f"pgd {'x'.join(map(str, shape))} {str(dtype)[6:]} {'x_nat[B..]' if bcast else 'x_nat[M,B..]'}"

            def case(shape=shape, bcast=bcast, tag=tag) -> None:
                x0 = torch.rand(shape[1:] if bcast else shape, device=dev).to(dtype)
                seed = int(torch.randint(0, 2 ** 62, ()).item())
                M = shape[0]
                xa = ops.pgd_random_start(x0, eps, 0.0, 1.0, num_models=M if bcast else None, seed=seed)
                rx = reference.pgd_random_start(_f64(x0), eps, 0.0, 1.0, M if bcast else None, seed)
                c.compare(f"{tag} random_start", xa, rx, TOL[dtype])
                # the sign step on a non-contiguous gradient (every other element of a wider tensor)
                g = torch.randn(*shape[:-1], 2 * shape[-1], device=dev).to(dtype)[..., ::2]
                rxa = _f64(xa)
                ops.pgd_sign_step_(xa, g, x0, eps, alpha)
                reference.pgd_sign_step_(rxa, _f64(g), _f64(x0), eps, alpha)
                c.compare(f"{tag} sign_step_", xa, rxa, TOL[dtype])

            if side_stream and dev == "cuda":
                def on_stream(case=case) -> None:
                    s = torch.cuda.Stream()
                    with torch.cuda.stream(s):
                        case()
                    torch.cuda.current_stream().wait_stream(s)
                    torch.cuda.synchronize()
                c.run(tag + " side-stream", on_stream)
            else:
                c.run(tag, case)


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16", "float64"],
                    choices=sorted(DTYPES))
    ap.add_argument("--quick", action="store_true",
                    help="one shape per kernel mapping, contiguous and one non-contiguous layout "
                         "(for racecheck, which is slower)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="print every comparison")
    args = ap.parse_args(argv)

    dev = args.device
    if not ops.HAS_EXTENSION:
        print(f"sanitize_ops: the extension is not built ({cda2_ext.BUILD_INFO})")
        return 2
    if dev == "cuda" and not (torch.cuda.is_available() and ops.cuda_available()):
        print(f"sanitize_ops: no CUDA device or no CUDA kernels ({cda2_ext.BUILD_INFO}); "
              "use --device cpu for a smoke test")
        return 2
    torch.manual_seed(args.seed)
    loss_shapes = QUICK_LOSS_SHAPES if args.quick else LOSS_SHAPES
    image_shapes = QUICK_IMAGE_SHAPES if args.quick else IMAGE_SHAPES
    layouts = ("contiguous", "permuted") if args.quick else ("contiguous", "permuted", "strided")
    c = Checker(args.verbose)
    t0 = time.perf_counter()
    for name in args.dtypes:
        dtype = DTYPES[name]
        check_collab_loss(c, dev, dtype, loss_shapes, layouts)
        check_ppd_bce(c, dev, dtype, [(M, B) for (M, B, _) in loss_shapes])
        check_select(c, dev, dtype, loss_shapes)
        check_pgd(c, dev, dtype, image_shapes, side_stream=(name == args.dtypes[0]))
        # progress, so a run stopped by its timeout still shows how far it got
        print(f"sanitize_ops: {name} done: {c.calls} cases so far, {len(c.failures)} failures, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    if dev == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    for f in c.failures:
        print(f"sanitize_ops: FAIL {f}")
    status = "FAIL" if c.failures else "OK"
    print(f"sanitize_ops: {status}: {c.calls} cases ({', '.join(args.dtypes)}; {dev}"
          f"{', quick' if args.quick else ''}), {len(c.failures)} failures, {dt:.1f} s")
    return 1 if c.failures else 0


if __name__ == "__main__":
    sys.exit(main())
