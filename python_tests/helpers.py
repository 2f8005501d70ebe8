"""What the tests share: the CI switches, dtype and reduction tables and input makers of the op
tests (their tables of sample inputs, one per op, are in ``op_samples.py``); the tiny training
run (``TINY_TRAIN`` and its library twin ``tiny_config``) every test that trains starts from; and
the checks of what a command says.

Fixtures (``gen``, ``device``, ``cuda``, ``trained``, ``run_copy``) live in ``conftest.py``; plain
values and functions live here, so a test module (or a test's child process: ``test_bad_inputs.py``,
``ddp_worker.py``, ``cli_fuzz_worker.py``) can import them by name. What needs more than the ops
(training, the command line) is imported inside the function that uses it.

Inputs are drawn on the CPU from the test's ``gen`` in float64 and only then cast and moved, so a
test draws the same numbers on every device and dtype, and no test touches the global RNG.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
from torch import Tensor

import cda2_ext
from cda2_ext import ops
from cda2_ext.ops.reference import _stat_dtype as stat_dtype  # the dtype the ops report statistics in

__all__ = ["HAS_EXTENSION", "HAS_CUDA_KERNELS", "REQUIRE_EXTENSION", "REQUIRE_CUDA", "OUTPUTS",
           "REDUCTIONS", "RED_CODE", "HALF", "RAW_OPS", "FLOATS", "stat_dtype", "eps", "make_logits",
           "make_target", "schema_args", "cuda_missing"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


HAS_EXTENSION: bool = bool(cda2_ext.HAS_EXTENSION)
#: The extension was built with its CUDA kernels (says nothing about a GPU being present).
HAS_CUDA_KERNELS: bool = ops.cuda_available()
#: CI sets CDA2_REQUIRE_EXTENSION=1: a missing build then fails the tests that need it.
REQUIRE_EXTENSION: bool = _flag("CDA2_REQUIRE_EXTENSION")
#: The GPU job sets CDA2_REQUIRE_CUDA=1: no GPU or no CUDA kernels then fails instead of skipping.
REQUIRE_CUDA: bool = _flag("CDA2_REQUIRE_CUDA")

OUTPUTS = ("loss", "ce", "weights", "p_true")  # CollabLoss's fields, in order
REDUCTIONS = ("none", "mean", "sum")
#: The raw ops' integer ``reduction`` (the schema in csrc/ops.cpp; at::Reduction's numbering).
RED_CODE = {"none": 0, "mean": 1, "sum": 2}
HALF = (torch.float16, torch.bfloat16)
#: Every operator csrc/ops.cpp defines, as torch.ops.cda2_ext.<name>.
RAW_OPS = ("collab_loss", "collab_loss_backward", "ppd_bce", "ppd_bce_backward", "sign_step_",
           "random_start_", "collab_select", "collab_select_backward")
FLOATS = (torch.float32, torch.float64, *HALF)

Device = Union[str, torch.device]


def cuda_missing() -> str:
    """Why the CUDA test cases cannot run here, or ``""`` when they can."""
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)"
    if HAS_EXTENSION and not HAS_CUDA_KERNELS:
        # With no build at all, requires_extension skips (or fails) the fused cases, and the
        # reference cases can still run on the GPU.
        return f"cda2_ext was built without its CUDA kernels ({ops.BUILD_INFO})"
    return ""


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of the dtype the statistics are computed in (float32 for half inputs)."""
    return torch.finfo(stat_dtype(dtype)).eps


def make_logits(shape: Sequence[int], dtype: torch.dtype, gen: torch.Generator, scale: float = 3.0,
                device: Device = "cpu") -> Tensor:
    """``scale * N(0, 1)`` logits of ``shape``, drawn from ``gen``, then cast and moved."""
    return (torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale).to(device, dtype)


def make_target(B: int, K: int, gen: torch.Generator, device: Device = "cpu") -> Tensor:
    """``B`` int64 labels uniform in ``[0, K)``, drawn from ``gen``."""
    return torch.randint(0, K, (B,), generator=gen).to(device)


def schema_args(op: Any, values: Dict[str, Any]) -> tuple:
    """A raw op's positional arguments, by name from its schema (``torch.ops.cda2_ext.<name>``):
    every argument must be in ``values`` unless the schema gives it a default."""
    args = []
    for a in op.default._schema.arguments:
        if a.name not in values and not a.has_default_value():
            raise KeyError(f"{op}: no value for argument {a.name!r}")
        args.append(values[a.name] if a.name in values else a.default_value)
    return tuple(args)


def pgd_oracle(loss_fn, x_nat: torch.Tensor, eps: float, alpha: float, steps: int,
               num_models=None, generator=None, backend=None) -> torch.Tensor:
    """The training PGD loop as it stood before it moved onto the attack engine, spelled out:
    a fused random start, then ``steps`` x (input gradient of a summed loss, fused sign step).
    The oracle that training PGD (whatever runs it) must reproduce bit for bit."""
    from cda2_ext.runtime import REFERENCE
    ops = backend if backend is not None else REFERENCE
    x = ops.pgd_random_start(x_nat, eps, 0.0, 1.0, num_models=num_models, generator=generator)
    for _ in range(steps):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x), x)
        x = x.detach()
        ops.pgd_sign_step_(x, grad, x_nat, eps, alpha, 0.0, 1.0)
    return x


# ----- tiny training runs: the one set of options every test that trains starts from --------------
#: ``cda2 train`` options of a run of about a second on a CPU: synthetic images, depth 2, M=2.
#: A test that needs other values says only how it differs: :func:`tiny_train`.
TINY_TRAIN = ["--dataset", "synthetic", "--depth", "2", "--num-models", "2", "--steps", "1",
              "--batch-size", "16", "--train-limit", "32", "--test-limit", "32", "--no-progress",
              "--device", "cpu", "--epochs", "1", "--eval-every", "0"]
#: The library twin of TINY_TRAIN: the TrainConfig fields those options set, so that the command
#: line can resume a run that :func:`tiny_config` trained (``test_cli.py`` checks that it can).
TINY_CONFIG: Dict[str, Any] = dict(dataset="synthetic", depth=2, num_models=2, steps=1, batch_size=16,
                                   train_limit=32, test_limit=32, progress=False, device="cpu",
                                   epochs=1, eval_every=0)


def tiny_train(**changes: Any) -> List[str]:
    """TINY_TRAIN with options changed, by their TrainConfig names: ``tiny_train(depth=8)`` gives
    ``--depth 8`` in place of ``--depth 2``; ``None`` leaves an option (or flag) out, ``True`` adds
    a flag (``sync_bn=True``: ``--sync-bn``); options TINY_TRAIN lacks go at the end."""
    items: List[List[str]] = []  # [option] or [option, value], in TINY_TRAIN's order
    for a in TINY_TRAIN:
        if a.startswith("--") or not items:
            items.append([a])
        else:
            items[-1].append(a)
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        new = [] if value is None else [flag] if value is True else [flag, str(value)]
        at = next((k for k, item in enumerate(items) if item[:1] == [flag]), None)
        if at is None:
            items.append(new)
        else:
            items[at] = new
    return [a for item in items for a in item]


def tiny_options(**changes: Any) -> Dict[str, Any]:
    """TINY_CONFIG with ``changes`` to its fields; ``None`` leaves a field out, so that it takes
    the library's default (as :func:`tiny_train` leaves the option out)."""
    return {k: v for k, v in {**TINY_CONFIG, **changes}.items() if v is not None}


def tiny_config(out_dir: Union[str, os.PathLike], **changes: Any):
    """TINY_TRAIN as a ``TrainConfig`` writing to ``out_dir``, with ``changes`` as in
    :func:`tiny_options`."""
    from cda2_ext.training import TrainConfig
    return TrainConfig(**tiny_options(out_dir=str(out_dir), **changes))


def tiny_trainer(cfg, n: int = 32, size: int = 32, **kwargs: Any):
    """A ``Trainer`` of ``cfg`` on ``n`` synthetic training images (seed 0) of ``size`` x ``size``
    pixels, logging nothing unless ``log`` is given; ``kwargs`` go to the Trainer."""
    from cda2_ext.data import synthetic_images
    from cda2_ext.training import Trainer
    return Trainer(cfg, train_set=synthetic_images(n, size=size), **{"log": None, **kwargs})


def no_training(monkeypatch) -> None:
    """Make any epoch of training fail the test: for runs that must be refused before one."""
    from cda2_ext.training import Trainer

    def refuse(*a, **k):
        raise AssertionError("training started although the run should have been refused")
    monkeypatch.setattr(Trainer, "train_epoch", refuse)


def poison_first_batch(monkeypatch) -> None:
    """NaN in one image of the first training batch only (the data loader cannot make one: uint8);
    the one way the tests make a non-finite loss in a real step."""
    from cda2_ext.training import Trainer
    real, calls = Trainer.train_step, []

    def step(self, x, y, stats=None):
        calls.append(1)
        if len(calls) == 1:
            x = x.clone()
            x[0] = float("nan")
        return real(self, x, y, stats)
    monkeypatch.setattr(Trainer, "train_step", step)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's rendezvous)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- what a command says ------------------------------------------------------------------------
def run_cli(argv: Sequence[str], capsys) -> Tuple[int, str]:
    """``cda2 ARGV`` through :func:`cda2_ext.cli.main` in this process: (exit status, stderr)."""
    from cda2_ext.cli import main
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def one_line_error(err: str, *needles: str) -> str:
    """Assert that ``err`` (a command's stderr) ends in exactly one ``cda2: error:`` line, with
    no traceback, holding every needle; returns that line."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and "Traceback" not in err, err
    last = lines[-1]
    assert last.startswith("cda2: error:") and sum("error:" in ln for ln in lines) == 1, err
    for needle in needles:
        assert needle in last, (needle, last)
    return last


def only_error_line(capsys, *needles: str) -> str:
    """Assert that all a command wrote to stderr (read from ``capsys``) is one ``cda2: error:``
    line holding every needle (stricter than :func:`one_line_error`: nothing before it); returns it."""
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return one_line_error(err, *needles)
