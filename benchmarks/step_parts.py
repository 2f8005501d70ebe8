"""The parts of one Algorithm 1 step, timed for every way of running the M sub-models.

Why the default runs as it does (see ``train_step.py`` for whole steps). For one shape (default
M=3, B=128, ResNet-20, float32) it times, in one process:

* **PGD step** - forward in eval mode + gradient of the collaboration loss w.r.t. the input
  (what each of the 10 attack steps of the adversarial phase costs), and
* **training step** - forward in train mode + backward of surrogate + BCE w.r.t. the parameters,

for each implementation: ``packed`` grouped convolutions (NCHW and channels-last),
``torch.func.vmap`` of ``functional_call`` over stacked single-model parameters, a ``plain`` loop
over M separate nets (NCHW), the ``loop`` layout (channels-last) and, for the attack, the
``frozen`` snapshot (BatchNorm folded, rows with a zero gradient skipped). Then the work an attack
step could throw away, each with its cost: BatchNorm passes, the backward through sub-models the
selection ignores, parameter gradients, the clean forward of the per-batch accuracy.

    python benchmarks/step_parts.py                  # -> benchmarks/results/step_parts_<device>.json
    python benchmarks/step_parts.py --threads 1 --cpu-time --models 3 --batch 128

Method: each statement once as warm-up, then ``--repeats`` calls, the fastest kept; every
implementation is checked against the packed one before it is timed.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as Fn
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from ops_cpu import write_results  # noqa: E402
from train_step import PlainCollaboration, device_slug, machine  # noqa: E402

from cda2_ext import ops  # noqa: E402
from cda2_ext.models import Collaboration  # noqa: E402


class _ChannelsLast(torch.nn.Module):
    """A packed collaboration fed channels-last inputs (its weights converted once)."""

    def __init__(self, model: Collaboration) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(self, x: Tensor):
        return self.model(x.contiguous(memory_format=torch.channels_last))


class _Vmapped(torch.nn.Module):
    """``torch.func.vmap`` over M stacked single-model parameter sets (eval mode only: vmap
    cannot update BatchNorm running statistics in place)."""

    def __init__(self, plain: PlainCollaboration) -> None:
        super().__init__()
        from torch.func import stack_module_state
        self.base = copy.deepcopy(plain.nets[0]).to("meta")
        self.params, self.buffers = stack_module_state(list(plain.nets))

    def forward(self, x: Tensor):
        from torch.func import functional_call, vmap

        def one(p, b, xi):
            return functional_call(self.base, (p, b), (xi,))
        logits, ppd = vmap(one, in_dims=(0, 0, None))(self.params, self.buffers, x)
        return logits.squeeze(1), ppd.squeeze(1)


def _attack_step(fn, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    def step() -> Tensor:
        xa = x.clone().requires_grad_(True)
        logits, ppd = fn(xa)
        _, chosen = ops.collaborative_select(ppd.to(logits.dtype), logits)
        return torch.autograd.grad(Fn.cross_entropy(chosen, y, reduction="sum"), xa)[0]
    return step


def _attack_step_with_param_grads(fn, x: Tensor, y: Tensor, params) -> Callable[[], None]:
    def step() -> None:
        xa = x.clone().requires_grad_(True)
        logits, ppd = fn(xa)
        _, chosen = ops.collaborative_select(ppd.to(logits.dtype), logits)
        Fn.cross_entropy(chosen, y, reduction="sum").backward()
        for p in params:
            p.grad = None
    return step


def _per_model_attack_step(fn, x: Tensor, y: Tensor, M: int) -> Callable[[], Tensor]:
    def step() -> Tensor:
        xa = x.expand(M, *x.shape).clone().requires_grad_(True)
        logits, _ = fn(xa)
        K = logits.shape[-1]
        loss = Fn.cross_entropy(logits.reshape(-1, K), y.repeat(M), reduction="sum")
        return torch.autograd.grad(loss, xa)[0]
    return step


def _train_step(model: torch.nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    params = list(model.parameters())

    def step() -> None:
        logits, ppd = model(x)
        out = ops.collaboration_loss(logits, y, 1.0)
        (out.loss + ops.ppd_bce(ppd, out.p_true)).backward()
        for p in params:
            p.grad = None
    return step


def best_ms(fn: Callable[[], object], repeats: int, cpu_time: bool, device: torch.device) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.process_time() if cpu_time else time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.process_time() if cpu_time else time.perf_counter()) - t0)
    return best * 1e3


def build(M: int, x: Tensor, device: torch.device):
    """The packed, loop and plain models with the same sub-models, in eval mode."""
    torch.manual_seed(0)
    packed = Collaboration(num_models=M, layout="packed").to(device).eval()
    # Centre each PPD head on this batch so that Algorithm 2 picks different sub-models for
    # different samples, as in a trained collaboration (at initialisation one sub-model's PPD is
    # the highest for nearly every sample, and nothing would be skipped).
    with torch.no_grad():
        _, ppd = packed(x)
        packed.net.ppd_head.bias -= ppd.mean(1, keepdim=True)
    loop = Collaboration(num_models=M, layout="loop").to(device).eval()
    loop.load_state_dict(packed.state_dict())
    plain = PlainCollaboration(packed.config).to(device).eval()
    state = packed.state_dict()
    with torch.no_grad():  # sub-model m's slice of every packed tensor (scalars are shared)
        for m, net in enumerate(plain.nets):
            for k, v in net.state_dict().items():
                v.copy_(state[k] if state[k].dim() == 0 else state[k].chunk(M)[m].reshape(v.shape))
    return packed, loop, plain


def run(args, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    M, B = args.models, args.batch
    x = torch.rand(B, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (B,), generator=gen).to(device)
    packed, loop, plain = build(M, x, device)
    frozen = loop.frozen()
    attack = {
        "packed NCHW": packed, "packed channels-last": _ChannelsLast(packed),
        "vmap(functional_call)": _Vmapped(plain), "plain loop NCHW": plain,
        "loop channels-last (autograd)": loop, "frozen (default)": frozen,
    }
    def selected(fn) -> Tensor:
        with torch.no_grad():
            logits, ppd = fn(x)
        return ops.collaborative_select(ppd.to(logits.dtype), logits)[0]

    sel = selected(packed)
    ref = _attack_step(packed, x, y)()
    rows: Dict[str, Dict[str, float]] = {}
    for name, fn in attack.items():
        # The same gradient wherever the same sub-model is selected. Only close, not equal, in
        # float32: rounding may flip a near-tie of two PPD logits, or a ReLU whose input is ~0
        # (the float64 tests in python_tests/test_speed_paths.py check the exact agreement).
        same = selected(fn) == sel
        g = _attack_step(fn, x, y)()
        err = (g[same] - ref[same]).norm() / ref[same].norm()
        assert same.float().mean() > 0.9 and err < 1e-2, (name, same.float().mean(), err)
        rows.setdefault(name, {})["pgd_step_ms"] = round(best_ms(_attack_step(fn, x, y), args.repeats,
                                                                 args.cpu_time, device), 1)
        print(f"  PGD step       {name:<32}{rows[name]['pgd_step_ms']:>9.0f} ms", flush=True)
    train = {"packed NCHW": packed, "packed channels-last": _ChannelsLast(packed),
             "plain loop NCHW": plain, "loop channels-last (autograd)": loop}
    for name, model in train.items():
        model.train()
        rows[name]["train_step_ms"] = round(best_ms(_train_step(model, x, y), args.repeats,
                                                    args.cpu_time, device), 1)
        model.eval()
        print(f"  training step  {name:<32}{rows[name]['train_step_ms']:>9.0f} ms", flush=True)

    waste: List[dict] = []

    def item(what: str, with_ms: float, without_ms: float, note: str) -> None:
        waste.append({"work": what, "with_ms": round(with_ms, 1), "without_ms": round(without_ms, 1),
                      "saved_ms": round(with_ms - without_ms, 1), "note": note})
        print(f"  {what:<58}{with_ms:>8.0f} -> {without_ms:>6.0f} ms  ({note})", flush=True)

    t = lambda f: best_ms(f, args.repeats, args.cpu_time, device)  # noqa: E731
    item("BatchNorm passes in the per-model PGD step", t(_per_model_attack_step(loop, x, y, M)),
         t(_per_model_attack_step(frozen, x, y, M)), "folded into the convolutions")
    item("backward through sub-models the selection ignores", _full_rows_ms(frozen, x, y, t),
         t(_attack_step(frozen, x, y)), f"rows skipped; selection histogram "
         f"{torch.bincount(sel, minlength=M).tolist()}")
    item("parameter gradients in a PGD step (packed)",
         t(_attack_step_with_param_grads(packed, x, y, list(packed.parameters()))),
         t(_attack_step(packed, x, y)), "already avoided: autograd.grad w.r.t. the input")
    with torch.no_grad():
        item("clean forward of the per-batch accuracy (no grad)", t(lambda: packed(x)),
             t(lambda: frozen(x)), "kept (the PGD never evaluates x itself), run frozen")
    item("building the frozen snapshot (once per PGD call)", t(lambda: loop.frozen()), 0.0,
         "the cost of the snapshot itself")
    return {"M": M, "B": B, "implementations": rows, "waste": waste}


def _full_rows_ms(frozen, x: Tensor, y: Tensor, t) -> float:
    """A frozen PGD step whose backward visits every (sub-model, sample) pair: the loss adds a
    zero-weighted term from every sub-model, which makes every row live without changing the
    gradient's value."""
    def step() -> Tensor:
        xa = x.clone().requires_grad_(True)
        logits, ppd = frozen(xa)
        _, chosen = ops.collaborative_select(ppd.to(logits.dtype), logits)
        loss = Fn.cross_entropy(chosen, y, reduction="sum") + 1e-30 * logits.sum()
        return torch.autograd.grad(loss, xa)[0]
    return t(step)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per statement, best kept")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cpu-time", action="store_true", help="CPU: process CPU time instead of wall")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.models < 1 or args.batch < 1 or args.repeats < 1:
        ap.error("--models, --batch and --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine(device)
    print(f"parts of one step, M={args.models} B={args.batch} ResNet-20 -- "
          f"{info.get('gpu', info['cpu_model'])}, {torch.get_num_threads()} threads, "
          f"{'process CPU time' if args.cpu_time else 'wall'}, best of {args.repeats}")
    res = run(args, device)
    out = args.out or HERE / "results" / f"step_parts_{device_slug(device)}.json"
    write_results(out, "step_parts", {
        "machine": info, "clock": "process CPU time" if args.cpu_time else "wall",
        "repeats": args.repeats, **res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
