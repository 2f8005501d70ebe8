"""Bad input raises a Python exception that names the argument -- and never crashes.

Every case runs against the functional API of ``cda2_ext.reference`` (in this process), the
functional API of ``cda2_ext.ops`` and the raw ``torch.ops.cda2_ext.*`` operators. The last two go
through compiled code, so they run in a child process (one for all of them, restarted past a case
that kills it): a segfault there becomes one failed test with the exit status, not a dead test run.

The contract (``cda2_ext/_checks.py``): the functional API raises ``TypeError`` for a wrong dtype
or a non-tensor and ``ValueError`` for a wrong shape, value, device or reduction, and the message
starts with the argument's name. Raw operators may raise ``RuntimeError``, ``ValueError`` or
``TypeError``, but their message must name the argument too.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Tuple

import pytest
import torch

import cda2_ext
from cda2_ext import ops, reference

requires_extension = pytest.mark.requires_extension

NAN, INF = math.nan, math.inf
M, B, K = 3, 4, 5
IMG = (B, 3, 4, 4)


class Case(NamedTuple):
    api: str  # "functional" (ops and reference) or "raw" (torch.ops.cda2_ext)
    op: str
    make: Callable[[], Tuple[tuple, dict]]  # fresh (args, kwargs) on every call
    names: Tuple[str, ...]  # the message must name one of these
    exc: type  # functional API: the exact exception type


CASES: Dict[str, Case] = {}


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _logits(shape=(M, B, K), dtype=torch.float32):
    return torch.randn(shape, generator=_gen()).to(dtype)


def _target(n=B):
    return torch.arange(n) % K


# ---- functional cases ---------------------------------------------------------------------------

def _defaults(op: str) -> dict:
    if op == "collaboration_loss":
        return dict(logits=_logits(), target=_target(), sigma=1.0, reduction="mean")
    if op == "ppd_bce":
        return dict(ppd_logit=torch.randn(M, B), target_prob=torch.rand(M, B), reduction="mean")
    if op == "pgd_sign_step_":
        return dict(x_adv=torch.rand(M, *IMG), grad=torch.randn(M, *IMG), x_nat=torch.rand(IMG),
                    eps=8 / 255, alpha=2 / 255, lo=0.0, hi=1.0)
    if op == "pgd_random_start":
        return dict(x_nat=torch.rand(IMG), eps=8 / 255, lo=0.0, hi=1.0, num_models=M, seed=1)
    if op == "collaborative_select":
        return dict(ppd_logit=torch.randn(M, B), logits=_logits())
    raise KeyError(op)


def fcase(op: str, label: str, names, exc=ValueError, **overrides):
    """A functional-API case: the op's defaults with some arguments replaced (callables are
    called, so each run gets fresh tensors)."""
    names = (names,) if isinstance(names, str) else tuple(names)

    def make():
        kw = _defaults(op)
        kw.update({k: (v() if callable(v) else v) for k, v in overrides.items()})
        return (), kw

    CASES[f"{op}-{label}"] = Case("functional", op, make, names, exc)


T = TypeError
meta = lambda shape, dtype=torch.float32: (lambda: torch.zeros(shape, dtype=dtype, device="meta"))  # noqa: E731

# collaboration_loss
CL = "collaboration_loss"
fcase(CL, "label_eq_K", "target", target=lambda: torch.tensor([0, 1, K, 2]))
fcase(CL, "label_huge", "target", target=lambda: torch.tensor([0, 1, 2 ** 40, 2]))
fcase(CL, "label_negative", "target", target=lambda: torch.tensor([0, -1, 2, 3]))
for _lbl, _s in [("zero", 0.0), ("negative", -1.0), ("nan", NAN), ("inf", INF), ("neg_inf", -INF)]:
    fcase(CL, f"sigma_{_lbl}", "sigma", sigma=_s)
fcase(CL, "sigma_not_number", "sigma", T, sigma="1.0")
fcase(CL, "logits_int", "logits", T, logits=lambda: torch.ones(M, B, K, dtype=torch.int64))
fcase(CL, "logits_bool", "logits", T, logits=lambda: torch.ones(M, B, K, dtype=torch.bool))
fcase(CL, "logits_not_tensor", "logits", T, logits=[[[0.0] * K] * B] * M)
fcase(CL, "target_float", "target", T, target=lambda: _target().float())
fcase(CL, "target_int32", "target", T, target=lambda: _target().int())
fcase(CL, "logits_2d", "logits", logits=lambda: _logits((B, K)))
fcase(CL, "logits_4d", "logits", logits=lambda: _logits((M, B, K, 1)))
fcase(CL, "target_too_long", "target", target=lambda: _target(B + 1))
fcase(CL, "target_2d", "target", target=lambda: _target().view(1, B))
fcase(CL, "target_other_device", ("target", "logits"), target=meta((B,), torch.int64))
fcase(CL, "logits_other_device", ("target", "logits"), logits=meta((M, B, K)))
fcase(CL, "empty_batch", "logits", logits=lambda: _logits((M, 0, K)), target=lambda: _target(0))
fcase(CL, "one_class", "logits", logits=lambda: _logits((M, B, 1)), target=lambda: torch.zeros(B, dtype=torch.int64))
fcase(CL, "no_models", "logits", logits=lambda: _logits((0, B, K)))
fcase(CL, "reduction_typo", "reduction", reduction="meen")
fcase(CL, "reduction_none_object", "reduction", reduction=None)
fcase(CL, "reduction_int", "reduction", reduction=1)

# ppd_bce
PB = "ppd_bce"
fcase(PB, "ppd_logit_int", "ppd_logit", T, ppd_logit=lambda: torch.ones(M, B, dtype=torch.int32))
fcase(PB, "target_prob_int", "target_prob", T, target_prob=lambda: torch.ones(M, B, dtype=torch.int64))
fcase(PB, "target_prob_shape", "target_prob", target_prob=lambda: torch.rand(M, B + 1))
fcase(PB, "target_prob_transposed_shape", "target_prob", target_prob=lambda: torch.rand(B, M))
fcase(PB, "ppd_logit_1d", "ppd_logit", ppd_logit=lambda: torch.randn(B), target_prob=lambda: torch.rand(B))
fcase(PB, "ppd_logit_3d", "ppd_logit", ppd_logit=lambda: torch.randn(M, B, 1),
      target_prob=lambda: torch.rand(M, B, 1))
fcase(PB, "empty", "ppd_logit", ppd_logit=lambda: torch.randn(M, 0), target_prob=lambda: torch.rand(M, 0))
fcase(PB, "target_prob_other_device", ("target_prob", "ppd_logit"), target_prob=meta((M, B)))
fcase(PB, "reduction_typo", "reduction", reduction="summ")

# pgd_sign_step_
SS = "pgd_sign_step_"
for _n in ("eps", "alpha"):
    for _lbl, _v in [("negative", -0.1), ("nan", NAN), ("inf", INF)]:
        fcase(SS, f"{_n}_{_lbl}", _n, **{_n: _v})
fcase(SS, "eps_not_number", "eps", T, eps="0.1")
fcase(SS, "lo_gt_hi", ("lo", "hi"), lo=1.0, hi=0.0)
fcase(SS, "lo_nan", ("lo", "hi"), lo=NAN)
fcase(SS, "hi_nan", ("hi", "lo"), hi=NAN)  # "lo: expected numbers for lo and hi" is fine
fcase(SS, "grad_shape", "grad", grad=lambda: torch.randn(M, B, 3, 4, 5))
fcase(SS, "x_nat_shape", "x_nat", x_nat=lambda: torch.rand(B + 1, 3, 4, 4))
fcase(SS, "x_nat_one_model_axis_too_many", "x_nat", x_nat=lambda: torch.rand(1, M, *IMG))
fcase(SS, "x_adv_int", "x_adv", T, x_adv=lambda: torch.zeros(M, *IMG, dtype=torch.int32))
fcase(SS, "grad_int", "grad", T, grad=lambda: torch.zeros(M, *IMG, dtype=torch.int64))
fcase(SS, "x_nat_int", "x_nat", T, x_nat=lambda: torch.zeros(IMG, dtype=torch.uint8))
fcase(SS, "grad_other_dtype", "grad", T, grad=lambda: torch.randn(M, *IMG, dtype=torch.float64))
fcase(SS, "x_nat_other_dtype", "x_nat", T, x_nat=lambda: torch.rand(IMG, dtype=torch.float64))
fcase(SS, "grad_other_device", "grad", grad=meta((M, *IMG)))
fcase(SS, "x_nat_other_device", "x_nat", x_nat=meta(IMG))
fcase(SS, "empty", "x_adv", x_adv=lambda: torch.rand(M, 0, 3, 4, 4), grad=lambda: torch.randn(M, 0, 3, 4, 4),
      x_nat=lambda: torch.rand(0, 3, 4, 4))
fcase(SS, "x_adv_not_tensor", "x_adv", T, x_adv=[0.0])

# pgd_random_start
RS = "pgd_random_start"
for _lbl, _v in [("negative", -0.1), ("nan", NAN), ("inf", INF)]:
    fcase(RS, f"eps_{_lbl}", "eps", eps=_v)
fcase(RS, "lo_gt_hi", ("lo", "hi"), lo=0.6, hi=0.4)
fcase(RS, "hi_nan", ("hi", "lo"), hi=NAN)
fcase(RS, "x_nat_int", "x_nat", T, x_nat=lambda: torch.zeros(IMG, dtype=torch.int64))
fcase(RS, "x_nat_not_tensor", "x_nat", T, x_nat=0.5)
fcase(RS, "empty", "x_nat", x_nat=lambda: torch.rand(0, 3, 4, 4))
for _lbl, _v in [("zero", 0), ("negative", -2), ("float", 2.5)]:
    fcase(RS, f"num_models_{_lbl}", "num_models", num_models=_v)

# collaborative_select
SEL = "collaborative_select"
fcase(SEL, "ppd_logit_shape", "ppd_logit", ppd_logit=lambda: torch.randn(M, B + 1))
fcase(SEL, "ppd_logit_1d", "ppd_logit", ppd_logit=lambda: torch.randn(B))
fcase(SEL, "logits_2d", "logits", logits=lambda: _logits((B, K)))
fcase(SEL, "empty_batch", "logits", ppd_logit=lambda: torch.randn(M, 0), logits=lambda: _logits((M, 0, K)))
fcase(SEL, "no_models", "logits", ppd_logit=lambda: torch.randn(0, B), logits=lambda: _logits((0, B, K)))
fcase(SEL, "ppd_logit_int", "ppd_logit", T, ppd_logit=lambda: torch.zeros(M, B, dtype=torch.int64))
fcase(SEL, "logits_int", "logits", T, logits=lambda: torch.zeros(M, B, K, dtype=torch.int64))
fcase(SEL, "ppd_logit_other_device", ("ppd_logit", "logits"), ppd_logit=meta((M, B)))


# ---- raw-operator cases -------------------------------------------------------------------------

def rcase(op: str, label: str, names, make: Callable[[], tuple]):
    names = (names,) if isinstance(names, str) else tuple(names)
    CASES[f"raw.{op}-{label}"] = Case("raw", op, lambda: (make(), {}), names, Exception)


def _cl(**kw):
    a = dict(logits=_logits(), target=_target(), sigma=1.0, reduction=1)
    a.update({k: (v() if callable(v) else v) for k, v in kw.items()})
    return lambda: (a["logits"], a["target"], a["sigma"], a["reduction"])


for _lbl, _t in [("label_eq_K", [0, 1, K, 2]), ("label_huge", [0, 2 ** 40, 1, 2]),
                 ("label_negative", [0, 1, 2, -1]), ("label_very_negative", [-2 ** 40, 0, 1, 2])]:
    rcase("collab_loss", _lbl, "target", _cl(target=torch.tensor(_t)))
for _lbl, _s in [("zero", 0.0), ("negative", -1.0), ("nan", NAN), ("inf", INF)]:
    rcase("collab_loss", f"sigma_{_lbl}", "sigma", _cl(sigma=_s))
for _r in (3, -1):
    rcase("collab_loss", f"reduction_{_r}", "reduction", _cl(reduction=_r))
rcase("collab_loss", "logits_int", "logits", _cl(logits=torch.ones(M, B, K, dtype=torch.int64)))
rcase("collab_loss", "target_float", "target", _cl(target=_target().float()))
rcase("collab_loss", "target_int32", "target", _cl(target=_target().int()))
rcase("collab_loss", "logits_2d", "logits", _cl(logits=_logits((B, K))))
rcase("collab_loss", "target_too_long", "target", _cl(target=_target(B + 1)))
rcase("collab_loss", "target_other_device", ("target", "logits"),
      _cl(target=meta((B,), torch.int64)))
rcase("collab_loss", "empty_batch", "logits", _cl(logits=_logits((M, 0, K)), target=_target(0)))
rcase("collab_loss", "one_class", "logits",
      _cl(logits=_logits((M, B, 1)), target=torch.zeros(B, dtype=torch.int64)))
rcase("collab_loss", "no_models", "logits", _cl(logits=_logits((0, B, K))))


def _clb(**kw):
    """collab_loss_backward's arguments, filled by name from its schema (valid unless replaced)."""
    def make():
        z, y = _logits(), _target()
        fwd = torch.ops.cda2_ext.collab_loss
        outs = fwd(*_by_name(fwd, dict(logits=z, target=y, sigma=1.0, reduction=0)))
        names = [r.name or d for r, d in zip(fwd.default._schema.returns,
                                             ("loss", "ce", "weights", "p_true", "lse", "prob"))]
        vals = dict(zip(names, outs))
        vals.update(grad_loss=torch.ones(B), grad_ce=torch.ones(M, B), grad_weights=torch.ones(M, B),
                    grad_p_true=torch.ones(M, B), logits=z, target=y, sigma=1.0, reduction=0)
        vals.update({k: (v() if callable(v) else v) for k, v in kw.items()})
        return _by_name(torch.ops.cda2_ext.collab_loss_backward, vals)
    return make


def _by_name(op, values: dict) -> tuple:
    """Positional arguments from the op's schema, by name; unnamed ones with a default take it."""
    return tuple(values[a.name] if a.name in values or not a.has_default_value() else a.default_value
                 for a in op.default._schema.arguments)


rcase("collab_loss_backward", "valid_control", (), _clb())  # must NOT raise (see the test)
rcase("collab_loss_backward", "label_eq_K", "target", _clb(target=torch.tensor([0, 1, K, 2])))
rcase("collab_loss_backward", "label_negative", "target", _clb(target=torch.tensor([0, -7, 1, 2])))
rcase("collab_loss_backward", "grad_loss_shape", "grad_loss", _clb(grad_loss=torch.ones(B + 1)))
rcase("collab_loss_backward", "grad_loss_scalar_for_none", "grad_loss", _clb(grad_loss=torch.ones(())))
rcase("collab_loss_backward", "grad_ce_shape", "grad_ce", _clb(grad_ce=torch.ones(M, B + 1)))
rcase("collab_loss_backward", "grad_weights_dtype", "grad_weights",
      _clb(grad_weights=torch.ones(M, B, dtype=torch.float64)))
rcase("collab_loss_backward", "grad_p_true_shape", "grad_p_true", _clb(grad_p_true=torch.ones(B, M)))
rcase("collab_loss_backward", "weights_shape", "weights", _clb(weights=torch.ones(M, B - 1)))
rcase("collab_loss_backward", "logits_shape_vs_stats", ("logits", "weights", "lse", "ce", "p_true", "grad_ce",
                                                      "grad_weights", "grad_p_true"),
      _clb(logits=_logits((M + 1, B, K))))
rcase("collab_loss_backward", "sigma_zero", "sigma", _clb(sigma=0.0))
rcase("collab_loss_backward", "reduction_5", "reduction", _clb(reduction=5))
rcase("collab_loss_backward", "grad_loss_other_device", "grad_loss", _clb(grad_loss=meta((B,))))


def _pb(s=None, t=None, r=1):
    return lambda: (torch.randn(M, B) if s is None else s(), torch.rand(M, B) if t is None else t(), r)


rcase("ppd_bce", "target_prob_other_dtype", "target_prob", _pb(t=lambda: torch.rand(M, B, dtype=torch.float64)))
rcase("ppd_bce", "target_prob_shape", "target_prob", _pb(t=lambda: torch.rand(M, B + 1)))
rcase("ppd_bce", "ppd_logit_int", "ppd_logit", _pb(s=lambda: torch.zeros(M, B, dtype=torch.int64)))
rcase("ppd_bce", "ppd_logit_1d", "ppd_logit", _pb(s=lambda: torch.randn(B), t=lambda: torch.rand(B)))
rcase("ppd_bce", "empty", "ppd_logit", _pb(s=lambda: torch.randn(M, 0), t=lambda: torch.rand(M, 0)))
rcase("ppd_bce", "target_prob_other_device", ("target_prob", "ppd_logit"), _pb(t=meta((M, B))))
rcase("ppd_bce", "reduction_9", "reduction", _pb(r=9))


def _pbb(g=None, s=None, t=None, r=0):
    return lambda: (torch.ones(M, B) if g is None else g(), torch.randn(M, B) if s is None else s(),
                    torch.rand(M, B) if t is None else t(), r)


rcase("ppd_bce_backward", "grad_shape", "grad", _pbb(g=lambda: torch.ones(M, B + 1)))
rcase("ppd_bce_backward", "grad_vector_for_mean", "grad", _pbb(g=lambda: torch.ones(M, B), r=1))
rcase("ppd_bce_backward", "grad_int", "grad", _pbb(g=lambda: torch.ones(M, B, dtype=torch.int64)))
rcase("ppd_bce_backward", "target_prob_shape", "target_prob", _pbb(t=lambda: torch.rand(M + 1, B)))
rcase("ppd_bce_backward", "reduction_3", "reduction", _pbb(r=3))
rcase("ppd_bce_backward", "grad_other_device", "grad", _pbb(g=meta((M, B))))


def _ss(**kw):
    def make():
        a = dict(x_adv=torch.rand(M, *IMG), grad=torch.randn(M, *IMG), x_nat=torch.rand(IMG),
                 eps=8 / 255, alpha=2 / 255, lo=0.0, hi=1.0)
        a.update({k: (v() if callable(v) else v) for k, v in kw.items()})
        return tuple(a.values())
    return make


for _n in ("eps", "alpha"):
    for _lbl, _v in [("negative", -0.1), ("nan", NAN), ("inf", INF)]:
        rcase("sign_step_", f"{_n}_{_lbl}", _n, _ss(**{_n: _v}))
rcase("sign_step_", "lo_gt_hi", ("lo", "hi"), _ss(lo=1.0, hi=0.0))
rcase("sign_step_", "lo_nan", ("lo", "hi"), _ss(lo=NAN))
rcase("sign_step_", "grad_shape", "grad", _ss(grad=lambda: torch.randn(M, B, 3, 4, 5)))
rcase("sign_step_", "grad_fewer_elements", "grad", _ss(grad=lambda: torch.randn(M, B, 3, 4, 3)))
rcase("sign_step_", "x_nat_shape", "x_nat", _ss(x_nat=lambda: torch.rand(B + 1, 3, 4, 4)))
rcase("sign_step_", "x_nat_smaller", "x_nat", _ss(x_nat=lambda: torch.rand(1, 3, 4, 4)))
rcase("sign_step_", "x_adv_int", "x_adv", _ss(x_adv=lambda: torch.zeros(M, *IMG, dtype=torch.int32)))
rcase("sign_step_", "grad_other_dtype", "grad", _ss(grad=lambda: torch.randn(M, *IMG, dtype=torch.float64)))
rcase("sign_step_", "x_nat_other_dtype", "x_nat", _ss(x_nat=lambda: torch.rand(IMG, dtype=torch.float64)))
rcase("sign_step_", "grad_other_device", "grad", _ss(grad=meta((M, *IMG))))
rcase("sign_step_", "x_nat_other_device", "x_nat", _ss(x_nat=meta(IMG)))
rcase("sign_step_", "empty", "x_adv", _ss(x_adv=lambda: torch.rand(M, 0, 3, 4, 4),
                                          grad=lambda: torch.randn(M, 0, 3, 4, 4),
                                          x_nat=lambda: torch.rand(0, 3, 4, 4)))


def _rs(**kw):
    def make():
        a = dict(x_adv=torch.zeros(M, *IMG), x_nat=torch.rand(IMG), eps=8 / 255, lo=0.0, hi=1.0, seed=3)
        a.update({k: (v() if callable(v) else v) for k, v in kw.items()})
        return tuple(a.values())
    return make


rcase("random_start_", "eps_negative", "eps", _rs(eps=-1.0))
rcase("random_start_", "eps_nan", "eps", _rs(eps=NAN))
rcase("random_start_", "lo_gt_hi", ("lo", "hi"), _rs(lo=0.7, hi=0.2))
rcase("random_start_", "x_adv_shape", ("x_adv", "x_nat"), _rs(x_adv=lambda: torch.zeros(M, B + 1, 3, 4, 4)))
rcase("random_start_", "x_nat_other_dtype", ("x_nat", "x_adv"), _rs(x_nat=lambda: torch.rand(IMG, dtype=torch.float64)))
rcase("random_start_", "x_adv_int", "x_adv", _rs(x_adv=lambda: torch.zeros(M, *IMG, dtype=torch.int64)))
rcase("random_start_", "x_nat_other_device", ("x_nat", "x_adv"), _rs(x_nat=meta(IMG)))
rcase("random_start_", "empty", ("x_adv", "x_nat"), _rs(x_adv=lambda: torch.zeros(M, 0, 3, 4, 4),
                                                       x_nat=lambda: torch.rand(0, 3, 4, 4)))

rcase("collab_select", "ppd_logit_shape", "ppd_logit", lambda: (torch.randn(M, B + 1), _logits()))
rcase("collab_select", "ppd_logit_int", "ppd_logit", lambda: (torch.zeros(M, B, dtype=torch.int64), _logits()))
rcase("collab_select", "logits_2d", "logits", lambda: (torch.randn(M, B), _logits((B, K))))
rcase("collab_select", "empty", "logits", lambda: (torch.randn(M, 0), _logits((M, 0, K))))
rcase("collab_select", "ppd_logit_other_device", ("ppd_logit", "logits"), lambda: (meta((M, B))(), _logits()))


def _sb(g=None, idx=None, n=M):
    return lambda: (torch.ones(B, K) if g is None else g(), torch.zeros(B, dtype=torch.int64) if idx is None
                    else idx(), n)


rcase("collab_select_backward", "index_too_large", "index", _sb(idx=lambda: torch.tensor([0, 1, M, 2])))
rcase("collab_select_backward", "index_huge", "index", _sb(idx=lambda: torch.tensor([0, 1, 2 ** 40, 2])))
rcase("collab_select_backward", "index_negative", "index", _sb(idx=lambda: torch.tensor([0, -1, 1, 2])))
rcase("collab_select_backward", "index_int32", "index", _sb(idx=lambda: torch.zeros(B, dtype=torch.int32)))
rcase("collab_select_backward", "index_shape", "index", _sb(idx=lambda: torch.zeros(B + 1, dtype=torch.int64)))
rcase("collab_select_backward", "num_models_zero", "num_models", _sb(n=0))
rcase("collab_select_backward", "grad_chosen_3d", "grad_chosen", _sb(g=lambda: torch.ones(1, B, K)))
rcase("collab_select_backward", "grad_chosen_int", "grad_chosen",
      _sb(g=lambda: torch.ones(B, K, dtype=torch.int64)))
rcase("collab_select_backward", "index_other_device", ("index", "grad_chosen"),
      _sb(idx=meta((B,), torch.int64)))


FUNCTIONAL = [k for k, c in CASES.items() if c.api == "functional"]
RAW = [k for k, c in CASES.items() if c.api == "raw"]


# ---- running a case ------------------------------------------------------------------------------

def _call(key: str, impl_name: str):
    case = CASES[key]
    args, kwargs = case.make()
    if case.api == "raw":
        return getattr(torch.ops.cda2_ext, case.op)(*args, **kwargs)
    impl = ops if impl_name == "ops" else reference
    return getattr(impl, case.op)(*args, **kwargs)


def _outcome(key: str, impl_name: str) -> dict:
    try:
        _call(key, impl_name)
    except Exception as e:  # noqa: BLE001 - the point is to see which
        return {"status": "raised", "type": type(e).__name__,
                "mro": [c.__name__ for c in type(e).__mro__], "msg": str(e)}
    return {"status": "returned"}


def _child_main(todo_path: str, out_path: str) -> None:
    """Child process: run the listed cases in order, one JSON line each, flushed as it goes."""
    todo = json.loads(Path(todo_path).read_text())
    with open(out_path, "a") as out:
        for key, impl_name in todo:
            out.write(json.dumps({"key": key, "impl": impl_name, **_outcome(key, impl_name)}) + "\n")
            out.flush()


_CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_cda2_bad_inputs_child", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
mod._child_main(sys.argv[2], sys.argv[3])
"""


@pytest.fixture(scope="module")
def compiled_outcomes() -> Dict[Tuple[str, str], dict]:
    """Outcomes of every case that runs compiled code, from child processes.

    A case that kills the child is recorded as ``crashed`` with the exit status, and the child is
    restarted after it.
    """
    if not cda2_ext.HAS_EXTENSION:
        pytest.skip("the compiled extension is not built")
    return _run_in_children([(k, "ops") for k in FUNCTIONAL] + [(k, "raw") for k in RAW])


def _run_in_children(pending) -> Dict[Tuple[str, str], dict]:
    results: Dict[Tuple[str, str], dict] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        todo_path, out_path = Path(tmp, "todo.json"), Path(tmp, "out.jsonl")
        while pending:
            todo_path.write_text(json.dumps(pending))
            # cwd=tmp: `python -c` puts the cwd first on sys.path, and from the repository root that
            # would import the source tree (no compiled _C) instead of the installed package.
            proc = subprocess.run([sys.executable, "-c", _CHILD, __file__, str(todo_path), str(out_path)],
                                  env=env, capture_output=True, text=True, timeout=300, cwd=tmp)
            for line in out_path.read_text().splitlines():
                r = json.loads(line)
                results[(r.pop("key"), r.pop("impl"))] = r
            pending = [p for p in pending if p not in results]
            if pending and proc.returncode == 0:
                raise RuntimeError(f"child exited cleanly with cases left:\n{proc.stderr[-3000:]}")
            if pending:
                results[pending.pop(0)] = {"status": "crashed", "returncode": proc.returncode,
                                           "stderr": proc.stderr[-2000:]}
    return results


def _check(outcome: dict, case: Case, strict: bool) -> None:
    if case.names == ():  # a valid control case
        assert outcome["status"] == "returned", outcome
        return
    assert outcome["status"] != "crashed", (
        f"the process died (exit status {outcome.get('returncode')}):\n{outcome.get('stderr')}")
    assert outcome["status"] == "raised", "accepted bad input without an error"
    msg = outcome["msg"]
    if strict:
        assert outcome["type"] == case.exc.__name__, f"{outcome['type']} instead of {case.exc.__name__}: {msg}"
        assert msg.split(":")[0].strip() in case.names, f"message does not start with {case.names}: {msg}"
    else:
        assert {"RuntimeError", "ValueError", "TypeError"} & set(outcome["mro"]), outcome["type"]
        first = msg.strip().splitlines()[0] if msg.strip() else ""
        assert any(re.search(rf"\b{re.escape(n)}\b", first) for n in case.names), (
            f"message does not name {case.names}: {msg[:500]}")


@pytest.mark.parametrize("key", FUNCTIONAL)
def test_reference_rejects(key):
    _check(_outcome(key, "reference"), CASES[key], strict=True)


@requires_extension
@pytest.mark.parametrize("key", FUNCTIONAL)
def test_ops_rejects(key, compiled_outcomes):
    _check(compiled_outcomes[(key, "ops")], CASES[key], strict=True)


@requires_extension
@pytest.mark.parametrize("key", RAW)
def test_raw_op_rejects(key, compiled_outcomes):
    _check(compiled_outcomes[(key, "raw")], CASES[key], strict=False)


def test_every_raw_op_has_cases():
    assert {CASES[k].op for k in RAW} == {
        "collab_loss", "collab_loss_backward", "ppd_bce", "ppd_bce_backward", "sign_step_",
        "random_start_", "collab_select", "collab_select_backward"}


@requires_extension
def test_bad_step_leaves_x_adv_untouched():
    """Checks run before any write: a rejected in-place step must not have modified x_adv."""
    x = torch.rand(M, *IMG)
    x0 = x.clone()
    with pytest.raises(ValueError):
        ops.pgd_sign_step_(x, torch.randn(M, *IMG), torch.rand(IMG), 0.1, 0.1, 1.0, 0.0)
    with pytest.raises(Exception):
        torch.ops.cda2_ext.sign_step_(x, torch.randn(M, *IMG), torch.rand(IMG), -0.1, 0.1, 0.0, 1.0)
    assert torch.equal(x, x0)


@requires_extension
def test_bad_label_rejected_before_any_output():
    """A bad label deep in a large batch is still caught (the whole target is checked)."""
    z = torch.randn(2, 10_000, 3)
    y = torch.randint(0, 3, (10_000,))
    y[-1] = 3
    with pytest.raises(ValueError, match="target"):
        ops.collaboration_loss(z, y)
    with pytest.raises(Exception, match="target"):
        torch.ops.cda2_ext.collab_loss(z, y, 1.0, 1)
