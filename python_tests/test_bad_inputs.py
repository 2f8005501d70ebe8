"""Bad input raises a Python exception that names the argument -- and never crashes.

Every case runs against the functional API of ``cda2_ext.ops.reference`` (in this process), the
functional API of ``cda2_ext.ops`` and the raw ``torch.ops.cda2_ext.*`` operators. The last two go
through compiled code, so they run in a child process (one for all of them, restarted past a case
that kills it): a segfault there becomes one failed test with the exit status, not a dead test run.

The contract (``cda2_ext/ops/_checks.py``, and ``csrc/checks.h`` for the raw operators): ``TypeError``
for a wrong dtype or a non-tensor and ``ValueError`` for a wrong shape, value, device or reduction,
and the message starts with the argument's name. Every case states the exact type it expects.
The two sets of checks are one contract written twice, so ``test_python_and_cpp_checks_agree``
runs every case that both faces can express through both (a functional case also as the raw call
the face makes, a raw case of a forward op also as the functional call that makes it) and
requires the same exception type naming the same argument.

The last tests run a few of the raw checks in-process on each device (``device`` fixture), so
the CUDA kernels' own checks (labels, shapes, mixed devices) are exercised too.
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
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import pytest
import torch

from cda2_ext import ops
from cda2_ext.ops import reference
from helpers import HAS_EXTENSION, RAW_OPS, RED_CODE, make_logits, make_target, schema_args

requires_extension = pytest.mark.requires_extension

NAN, INF = math.nan, math.inf
M, B, K = 3, 4, 5
IMG = (B, 3, 4, 4)


class Case(NamedTuple):
    api: str  # "functional" (ops and reference) or "raw" (torch.ops.cda2_ext)
    op: str
    make: Callable[[], Tuple[tuple, dict]]  # fresh (args, kwargs) on every call
    names: Tuple[str, ...]  # the message must name one of these
    exc: type  # the exact exception type


CASES: Dict[str, Case] = {}


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _randn(*shape, **kw) -> torch.Tensor:
    """Values do not matter to these cases; a fixed generator keeps them off the global RNG."""
    return torch.randn(*shape, generator=_gen(), **kw)


def _rand(*shape, **kw) -> torch.Tensor:
    return torch.rand(*shape, generator=_gen(), **kw)


def _logits(shape=(M, B, K), dtype=torch.float32):
    return _randn(shape).to(dtype)


def _target(n=B):
    return torch.arange(n) % K


# ---- functional cases ---------------------------------------------------------------------------

def _defaults(op: str) -> dict:
    if op == "collaboration_loss":
        return dict(logits=_logits(), target=_target(), sigma=1.0, reduction="mean")
    if op == "ppd_bce":
        return dict(ppd_logit=_randn(M, B), target_prob=_rand(M, B), reduction="mean")
    if op == "pgd_sign_step_":
        return dict(x_adv=_rand(M, *IMG), grad=_randn(M, *IMG), x_nat=_rand(IMG),
                    eps=8 / 255, alpha=2 / 255, lo=0.0, hi=1.0)
    if op == "pgd_random_start":
        return dict(x_nat=_rand(IMG), eps=8 / 255, lo=0.0, hi=1.0, num_models=M, seed=1)
    if op == "collaborative_select":
        return dict(ppd_logit=_randn(M, B), logits=_logits())
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
fcase(PB, "target_prob_shape", "target_prob", target_prob=lambda: _rand(M, B + 1))
fcase(PB, "target_prob_transposed_shape", "target_prob", target_prob=lambda: _rand(B, M))
fcase(PB, "ppd_logit_1d", "ppd_logit", ppd_logit=lambda: _randn(B), target_prob=lambda: _rand(B))
fcase(PB, "ppd_logit_3d", "ppd_logit", ppd_logit=lambda: _randn(M, B, 1),
      target_prob=lambda: _rand(M, B, 1))
fcase(PB, "empty", "ppd_logit", ppd_logit=lambda: _randn(M, 0), target_prob=lambda: _rand(M, 0))
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
fcase(SS, "grad_shape", "grad", grad=lambda: _randn(M, B, 3, 4, 5))
fcase(SS, "x_nat_shape", "x_nat", x_nat=lambda: _rand(B + 1, 3, 4, 4))
fcase(SS, "x_nat_one_model_axis_too_many", "x_nat", x_nat=lambda: _rand(1, M, *IMG))
fcase(SS, "x_adv_int", "x_adv", T, x_adv=lambda: torch.zeros(M, *IMG, dtype=torch.int32))
fcase(SS, "grad_int", "grad", T, grad=lambda: torch.zeros(M, *IMG, dtype=torch.int64))
fcase(SS, "x_nat_int", "x_nat", T, x_nat=lambda: torch.zeros(IMG, dtype=torch.uint8))
fcase(SS, "grad_other_dtype", "grad", T, grad=lambda: _randn(M, *IMG, dtype=torch.float64))
fcase(SS, "x_nat_other_dtype", "x_nat", T, x_nat=lambda: _rand(IMG, dtype=torch.float64))
fcase(SS, "grad_other_device", "grad", grad=meta((M, *IMG)))
fcase(SS, "x_nat_other_device", "x_nat", x_nat=meta(IMG))
fcase(SS, "empty", "x_adv", x_adv=lambda: _rand(M, 0, 3, 4, 4), grad=lambda: _randn(M, 0, 3, 4, 4),
      x_nat=lambda: _rand(0, 3, 4, 4))
fcase(SS, "x_adv_not_tensor", "x_adv", T, x_adv=[0.0])

# pgd_random_start
RS = "pgd_random_start"
for _lbl, _v in [("negative", -0.1), ("nan", NAN), ("inf", INF)]:
    fcase(RS, f"eps_{_lbl}", "eps", eps=_v)
fcase(RS, "lo_gt_hi", ("lo", "hi"), lo=0.6, hi=0.4)
fcase(RS, "hi_nan", ("hi", "lo"), hi=NAN)
fcase(RS, "x_nat_int", "x_nat", T, x_nat=lambda: torch.zeros(IMG, dtype=torch.int64))
fcase(RS, "x_nat_not_tensor", "x_nat", T, x_nat=0.5)
fcase(RS, "empty", "x_nat", x_nat=lambda: _rand(0, 3, 4, 4))
for _lbl, _v in [("zero", 0), ("negative", -2), ("float", 2.5)]:
    fcase(RS, f"num_models_{_lbl}", "num_models", num_models=_v)

# collaborative_select
SEL = "collaborative_select"
fcase(SEL, "ppd_logit_shape", "ppd_logit", ppd_logit=lambda: _randn(M, B + 1))
fcase(SEL, "ppd_logit_1d", "ppd_logit", ppd_logit=lambda: _randn(B))
fcase(SEL, "logits_2d", "logits", logits=lambda: _logits((B, K)))
fcase(SEL, "empty_batch", "logits", ppd_logit=lambda: _randn(M, 0), logits=lambda: _logits((M, 0, K)))
fcase(SEL, "no_models", "logits", ppd_logit=lambda: _randn(0, B), logits=lambda: _logits((0, B, K)))
fcase(SEL, "ppd_logit_int", "ppd_logit", T, ppd_logit=lambda: torch.zeros(M, B, dtype=torch.int64))
fcase(SEL, "logits_int", "logits", T, logits=lambda: torch.zeros(M, B, K, dtype=torch.int64))
fcase(SEL, "ppd_logit_other_device", ("ppd_logit", "logits"), ppd_logit=meta((M, B)))


# ---- raw-operator cases -------------------------------------------------------------------------

def rcase(op: str, label: str, names, make: Callable[[], tuple], exc: type = ValueError):
    names = (names,) if isinstance(names, str) else tuple(names)
    CASES[f"raw.{op}-{label}"] = Case("raw", op, lambda: (make(), {}), names, exc)


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
rcase("collab_loss", "logits_int", "logits", _cl(logits=torch.ones(M, B, K, dtype=torch.int64)), T)
rcase("collab_loss", "target_float", "target", _cl(target=_target().float()), T)
rcase("collab_loss", "target_int32", "target", _cl(target=_target().int()), T)
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
        outs = fwd(*schema_args(fwd, dict(logits=z, target=y, sigma=1.0, reduction=0)))
        vals = dict(zip([r.name for r in fwd.default._schema.returns], outs))
        vals.update(grad_loss=torch.ones(B), grad_ce=torch.ones(M, B), grad_weights=torch.ones(M, B),
                    grad_p_true=torch.ones(M, B), logits=z, target=y, sigma=1.0, reduction=0)
        vals.update({k: (v() if callable(v) else v) for k, v in kw.items()})
        return schema_args(torch.ops.cda2_ext.collab_loss_backward, vals)
    return make


rcase("collab_loss_backward", "valid_control", (), _clb())  # must NOT raise (see the test)
rcase("collab_loss_backward", "label_eq_K", "target", _clb(target=torch.tensor([0, 1, K, 2])))
rcase("collab_loss_backward", "label_negative", "target", _clb(target=torch.tensor([0, -7, 1, 2])))
rcase("collab_loss_backward", "grad_loss_shape", "grad_loss", _clb(grad_loss=torch.ones(B + 1)))
rcase("collab_loss_backward", "grad_loss_scalar_for_none", "grad_loss", _clb(grad_loss=torch.ones(())))
rcase("collab_loss_backward", "grad_ce_shape", "grad_ce", _clb(grad_ce=torch.ones(M, B + 1)))
rcase("collab_loss_backward", "grad_weights_dtype", "grad_weights",
      _clb(grad_weights=torch.ones(M, B, dtype=torch.float64)), T)
rcase("collab_loss_backward", "grad_p_true_shape", "grad_p_true", _clb(grad_p_true=torch.ones(B, M)))
rcase("collab_loss_backward", "weights_shape", "weights", _clb(weights=torch.ones(M, B - 1)))
rcase("collab_loss_backward", "logits_shape_vs_stats", ("logits", "weights", "lse", "ce", "p_true", "grad_ce",
                                                      "grad_weights", "grad_p_true"),
      _clb(logits=_logits((M + 1, B, K))))
rcase("collab_loss_backward", "sigma_zero", "sigma", _clb(sigma=0.0))
rcase("collab_loss_backward", "reduction_5", "reduction", _clb(reduction=5))
rcase("collab_loss_backward", "grad_loss_other_device", "grad_loss", _clb(grad_loss=meta((B,))))


def _pb(s=None, t=None, r=1):
    return lambda: (_randn(M, B) if s is None else s(), _rand(M, B) if t is None else t(), r)


rcase("ppd_bce", "target_prob_other_dtype", "target_prob", _pb(t=lambda: _rand(M, B, dtype=torch.float64)),
      T)
rcase("ppd_bce", "target_prob_shape", "target_prob", _pb(t=lambda: _rand(M, B + 1)))
rcase("ppd_bce", "ppd_logit_int", "ppd_logit", _pb(s=lambda: torch.zeros(M, B, dtype=torch.int64)), T)
rcase("ppd_bce", "ppd_logit_1d", "ppd_logit", _pb(s=lambda: _randn(B), t=lambda: _rand(B)))
rcase("ppd_bce", "empty", "ppd_logit", _pb(s=lambda: _randn(M, 0), t=lambda: _rand(M, 0)))
rcase("ppd_bce", "target_prob_other_device", ("target_prob", "ppd_logit"), _pb(t=meta((M, B))))
rcase("ppd_bce", "reduction_9", "reduction", _pb(r=9))


def _pbb(g=None, s=None, t=None, r=0):
    return lambda: (torch.ones(M, B) if g is None else g(), _randn(M, B) if s is None else s(),
                    _rand(M, B) if t is None else t(), r)


rcase("ppd_bce_backward", "grad_shape", "grad", _pbb(g=lambda: torch.ones(M, B + 1)))
rcase("ppd_bce_backward", "grad_vector_for_mean", "grad", _pbb(g=lambda: torch.ones(M, B), r=1))
rcase("ppd_bce_backward", "grad_int", "grad", _pbb(g=lambda: torch.ones(M, B, dtype=torch.int64)), T)
rcase("ppd_bce_backward", "target_prob_shape", "target_prob", _pbb(t=lambda: _rand(M + 1, B)))
rcase("ppd_bce_backward", "reduction_3", "reduction", _pbb(r=3))
rcase("ppd_bce_backward", "grad_other_device", "grad", _pbb(g=meta((M, B))))


def _ss(**kw):
    def make():
        a = dict(x_adv=_rand(M, *IMG), grad=_randn(M, *IMG), x_nat=_rand(IMG),
                 eps=8 / 255, alpha=2 / 255, lo=0.0, hi=1.0)
        a.update({k: (v() if callable(v) else v) for k, v in kw.items()})
        return tuple(a.values())
    return make


for _n in ("eps", "alpha"):
    for _lbl, _v in [("negative", -0.1), ("nan", NAN), ("inf", INF)]:
        rcase("sign_step_", f"{_n}_{_lbl}", _n, _ss(**{_n: _v}))
rcase("sign_step_", "lo_gt_hi", ("lo", "hi"), _ss(lo=1.0, hi=0.0))
rcase("sign_step_", "lo_nan", ("lo", "hi"), _ss(lo=NAN))
rcase("sign_step_", "grad_shape", "grad", _ss(grad=lambda: _randn(M, B, 3, 4, 5)))
rcase("sign_step_", "grad_fewer_elements", "grad", _ss(grad=lambda: _randn(M, B, 3, 4, 3)))
rcase("sign_step_", "x_nat_shape", "x_nat", _ss(x_nat=lambda: _rand(B + 1, 3, 4, 4)))
rcase("sign_step_", "x_nat_smaller", "x_nat", _ss(x_nat=lambda: _rand(1, 3, 4, 4)))
rcase("sign_step_", "x_adv_int", "x_adv", _ss(x_adv=lambda: torch.zeros(M, *IMG, dtype=torch.int32)), T)
rcase("sign_step_", "grad_other_dtype", "grad", _ss(grad=lambda: _randn(M, *IMG, dtype=torch.float64)), T)
rcase("sign_step_", "x_nat_other_dtype", "x_nat", _ss(x_nat=lambda: _rand(IMG, dtype=torch.float64)), T)
rcase("sign_step_", "grad_other_device", "grad", _ss(grad=meta((M, *IMG))))
rcase("sign_step_", "x_nat_other_device", "x_nat", _ss(x_nat=meta(IMG)))
rcase("sign_step_", "empty", "x_adv", _ss(x_adv=lambda: _rand(M, 0, 3, 4, 4),
                                          grad=lambda: _randn(M, 0, 3, 4, 4),
                                          x_nat=lambda: _rand(0, 3, 4, 4)))


def _rs(**kw):
    def make():
        a = dict(x_adv=torch.zeros(M, *IMG), x_nat=_rand(IMG), eps=8 / 255, lo=0.0, hi=1.0, seed=3)
        a.update({k: (v() if callable(v) else v) for k, v in kw.items()})
        return tuple(a.values())
    return make


rcase("random_start_", "eps_negative", "eps", _rs(eps=-1.0))
rcase("random_start_", "eps_nan", "eps", _rs(eps=NAN))
rcase("random_start_", "lo_gt_hi", ("lo", "hi"), _rs(lo=0.7, hi=0.2))
rcase("random_start_", "x_adv_shape", ("x_adv", "x_nat"), _rs(x_adv=lambda: torch.zeros(M, B + 1, 3, 4, 4)))
rcase("random_start_", "x_nat_other_dtype", ("x_nat", "x_adv"),
      _rs(x_nat=lambda: _rand(IMG, dtype=torch.float64)), T)
rcase("random_start_", "x_adv_int", "x_adv", _rs(x_adv=lambda: torch.zeros(M, *IMG, dtype=torch.int64)), T)
rcase("random_start_", "x_nat_other_device", ("x_nat", "x_adv"), _rs(x_nat=meta(IMG)))
rcase("random_start_", "empty", ("x_adv", "x_nat"), _rs(x_adv=lambda: torch.zeros(M, 0, 3, 4, 4),
                                                       x_nat=lambda: _rand(0, 3, 4, 4)))

rcase("collab_select", "ppd_logit_shape", "ppd_logit", lambda: (_randn(M, B + 1), _logits()))
rcase("collab_select", "ppd_logit_int", "ppd_logit",
      lambda: (torch.zeros(M, B, dtype=torch.int64), _logits()), T)
rcase("collab_select", "logits_2d", "logits", lambda: (_randn(M, B), _logits((B, K))))
rcase("collab_select", "empty", "logits", lambda: (_randn(M, 0), _logits((M, 0, K))))
rcase("collab_select", "ppd_logit_other_device", ("ppd_logit", "logits"), lambda: (meta((M, B))(), _logits()))


def _sb(g=None, idx=None, n=M):
    return lambda: (torch.ones(B, K) if g is None else g(), torch.zeros(B, dtype=torch.int64) if idx is None
                    else idx(), n)


rcase("collab_select_backward", "index_too_large", "index", _sb(idx=lambda: torch.tensor([0, 1, M, 2])))
rcase("collab_select_backward", "index_huge", "index", _sb(idx=lambda: torch.tensor([0, 1, 2 ** 40, 2])))
rcase("collab_select_backward", "index_negative", "index", _sb(idx=lambda: torch.tensor([0, -1, 1, 2])))
rcase("collab_select_backward", "index_int32", "index", _sb(idx=lambda: torch.zeros(B, dtype=torch.int32)),
      T)
rcase("collab_select_backward", "index_shape", "index", _sb(idx=lambda: torch.zeros(B + 1, dtype=torch.int64)))
rcase("collab_select_backward", "num_models_zero", "num_models", _sb(n=0))
rcase("collab_select_backward", "grad_chosen_3d", "grad_chosen", _sb(g=lambda: torch.ones(1, B, K)))
rcase("collab_select_backward", "grad_chosen_int", "grad_chosen",
      _sb(g=lambda: torch.ones(B, K, dtype=torch.int64)), T)
rcase("collab_select_backward", "index_other_device", ("index", "grad_chosen"),
      _sb(idx=meta((B,), torch.int64)))


FUNCTIONAL = [k for k, c in CASES.items() if c.api == "functional"]
RAW = [k for k, c in CASES.items() if c.api == "raw"]


# ---- the same case through the other face ----------------------------------------------------------
# The Python checks (cda2_ext/ops/_checks.py, what cda2_ext.ops and the reference twins run) and the
# C++ checks (csrc/checks.h, what torch.ops.cda2_ext.* run) are two implementations of one contract.
# To keep them from drifting, every case above that both faces can express runs through both
# (test_python_and_cpp_checks_agree): a functional case also as the raw call the face makes, a raw
# case of a forward op also as the functional call that makes it.

RED_NAME = {v: k for k, v in RED_CODE.items()}  # the raw ops' reduction codes, by name


def raw_twin(op: str, kw: dict) -> Optional[Tuple[str, tuple]]:
    """The raw call ``(raw op, args)`` that the functional op ``op`` makes with the arguments
    ``kw``, or None where there is none: a reduction that is not one of the three names (the raw
    ops take a code, with cases of their own), a ``num_models`` that is no count or an ``x_nat``
    that is no tensor (the face needs both to allocate ``x_adv`` before any raw call)."""
    if op in ("collaboration_loss", "ppd_bce"):
        red = kw["reduction"]
        if not (isinstance(red, str) and red in RED_CODE):
            return None
        if op == "collaboration_loss":
            return "collab_loss", (kw["logits"], kw["target"], kw["sigma"], RED_CODE[red])
        return "ppd_bce", (kw["ppd_logit"], kw["target_prob"], RED_CODE[red])
    if op == "pgd_sign_step_":
        return "sign_step_", tuple(kw[n] for n in ("x_adv", "grad", "x_nat", "eps", "alpha", "lo", "hi"))
    if op == "pgd_random_start":
        x, m = kw["x_nat"], kw["num_models"]
        if not isinstance(x, torch.Tensor) or not (m is None or (type(m) is int and m >= 1)):
            return None
        # the output the face allocates: x_nat's dtype and device, a sub-model axis in front
        x_adv = torch.empty(x.shape if m is None else (m, *x.shape), dtype=x.dtype, device=x.device)
        return "random_start_", (x_adv, x, kw["eps"], kw["lo"], kw["hi"], kw["seed"])
    if op == "collaborative_select":
        return "collab_select", (kw["ppd_logit"], kw["logits"])
    raise KeyError(op)


def face_twin(op: str, args: tuple) -> Optional[Tuple[str, dict]]:
    """The functional call ``(op, kwargs)`` that makes the raw call ``op(*args)``, or None where no
    functional call does: the backward ops (no face of their own), a reduction code outside 0-2,
    an ``x_adv`` other than the one ``pgd_random_start`` allocates from ``x_nat``, a
    ``target_prob`` of another float dtype than ``ppd_logit`` (the face casts it first, by
    design)."""
    if op == "collab_loss":
        z, y, sigma, r = args
        return ("collaboration_loss", dict(logits=z, target=y, sigma=sigma, reduction=RED_NAME[r])) \
            if r in RED_NAME else None
    if op == "ppd_bce":
        s, t, r = args
        cast = s.is_floating_point() and t.is_floating_point() and s.dtype != t.dtype
        return None if cast or r not in RED_NAME else (
            "ppd_bce", dict(ppd_logit=s, target_prob=t, reduction=RED_NAME[r]))
    if op == "sign_step_":
        return "pgd_sign_step_", dict(zip(("x_adv", "grad", "x_nat", "eps", "alpha", "lo", "hi"), args))
    if op == "random_start_":
        x_adv, x, eps, lo, hi, seed = args
        m = x_adv.shape[0] if x_adv.dim() == x.dim() + 1 else None
        own = raw_twin("pgd_random_start", dict(x_nat=x, eps=eps, lo=lo, hi=hi, num_models=m, seed=seed))
        same = own is not None and (own[1][0].shape, own[1][0].dtype, own[1][0].device) == \
            (x_adv.shape, x_adv.dtype, x_adv.device)
        return ("pgd_random_start", dict(x_nat=x, eps=eps, lo=lo, hi=hi, num_models=m, seed=seed)) \
            if same else None
    if op == "collab_select":
        return "collaborative_select", dict(ppd_logit=args[0], logits=args[1])
    return None


def _twin(case: Case):
    args, kwargs = case.make()
    return raw_twin(case.op, kwargs) if case.api == "functional" else face_twin(case.op, args)


#: The cases that run through both faces.
TWINNED = [k for k, c in CASES.items() if _twin(c) is not None]


# ---- running a case ------------------------------------------------------------------------------

def _call(key: str, impl_name: str):
    """Run a case: through ``impl_name`` = ``"ops"`` / ``"reference"`` (a functional case),
    ``"raw"`` (a raw case), or through the other face (:func:`_twin`): ``"twin"`` (a functional
    case's raw call, a raw case's call of ``cda2_ext.ops``) or ``"reference_twin"`` (a raw case's
    call of ``cda2_ext.ops.reference``)."""
    case = CASES[key]
    if impl_name in ("twin", "reference_twin"):
        op, a = _twin(case)
        if case.api == "functional":
            return getattr(torch.ops.cda2_ext, op)(*a)
        return getattr(ops if impl_name == "twin" else reference, op)(**a)
    args, kwargs = case.make()
    if case.api == "raw":
        return getattr(torch.ops.cda2_ext, case.op)(*args, **kwargs)
    impl = ops if impl_name == "ops" else reference
    return getattr(impl, case.op)(*args, **kwargs)


def _outcome(key: str, impl_name: str) -> dict:
    try:
        _call(key, impl_name)
    except Exception as e:  # noqa: BLE001 - the point is to see which
        return {"status": "raised", "type": type(e).__name__, "msg": str(e)}
    return {"status": "returned"}


def _child_main(todo_path: str, out_path: str) -> None:
    """Child process: run the listed cases in order, one JSON line each, flushed as it goes."""
    todo = json.loads(Path(todo_path).read_text())
    with open(out_path, "a") as out:
        for key, impl_name in todo:
            out.write(json.dumps({"key": key, "impl": impl_name, **_outcome(key, impl_name)}) + "\n")
            out.flush()


_CHILD = """
import importlib.util, os, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))  # helpers.py, beside this file
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
    if not HAS_EXTENSION:
        pytest.skip("the compiled extension is not built")
    return _run_in_children([(k, "ops") for k in FUNCTIONAL] + [(k, "raw") for k in RAW]
                            + [(k, "twin") for k in TWINNED])


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


def _check(outcome: dict, case: Case) -> None:
    if case.names == ():  # a valid control case
        assert outcome["status"] == "returned", outcome
        return
    assert outcome["status"] != "crashed", (
        f"the process died (exit status {outcome.get('returncode')}):\n{outcome.get('stderr')}")
    assert outcome["status"] == "raised", "accepted bad input without an error"
    msg = outcome["msg"]
    assert outcome["type"] == case.exc.__name__, f"{outcome['type']} instead of {case.exc.__name__}: {msg}"
    assert msg.split(":")[0].strip() in case.names, f"message does not start with {case.names}: {msg}"


@pytest.mark.parametrize("key", FUNCTIONAL)
def test_reference_rejects(key):
    _check(_outcome(key, "reference"), CASES[key])


@pytest.mark.slow  # every case in child processes (compiled_outcomes)
@requires_extension
@pytest.mark.parametrize("key", FUNCTIONAL)
def test_ops_rejects(key, compiled_outcomes):
    _check(compiled_outcomes[(key, "ops")], CASES[key])


@pytest.mark.slow  # every case in child processes (compiled_outcomes)
@requires_extension
@pytest.mark.parametrize("key", RAW)
def test_raw_op_rejects(key, compiled_outcomes):
    _check(compiled_outcomes[(key, "raw")], CASES[key])


def test_every_raw_op_has_cases():
    assert {CASES[k].op for k in RAW} == set(RAW_OPS)


#: The raw op's name for an argument of the face: pgd_random_start allocates x_adv from x_nat, so
#: what is wrong with x_nat there (its dtype, its emptiness) the raw op finds in x_adv first.
SAME_ARGUMENT = {"random_start_": {"x_adv": "x_nat"}}


def _named(outcome: dict, raw_op: str) -> Tuple[str, str]:
    """(exception type, argument named) of a raised outcome. An argument of the wrong Python type
    never reaches csrc/checks.h: torch's dispatcher checks the schema first and raises
    ``RuntimeError: ... Expected a value of type 'float' for argument 'sigma' ...``, which counts
    as the ``TypeError`` that _checks.py raises for it (the one category the C++ side cannot
    choose)."""
    msg = outcome["msg"]
    schema = re.search(r"Expected a value of type '[^']*' for argument '(\w+)'", msg)
    if outcome["type"] == "RuntimeError" and schema:
        return "TypeError", schema.group(1)
    name = msg.split(":")[0].strip()
    return outcome["type"], SAME_ARGUMENT.get(raw_op, {}).get(name, name)


def test_both_faces_share_cases():
    """The agreement test below has material: every forward op has cases through both faces."""
    twinned_ops = {(_twin(CASES[k]) or ("", None))[0] if CASES[k].api == "functional" else CASES[k].op
                   for k in TWINNED}
    assert {"collab_loss", "ppd_bce", "sign_step_", "random_start_", "collab_select"} <= twinned_ops
    assert len(TWINNED) > 80


@pytest.mark.slow  # the compiled calls in child processes (compiled_outcomes)
@requires_extension
@pytest.mark.parametrize("key", TWINNED)
def test_python_and_cpp_checks_agree(key, compiled_outcomes):
    """One bad input, both faces: the functional ops (``cda2_ext.ops``, and the reference twins:
    the Python checks of _checks.py) and the raw operator (``torch.ops.cda2_ext``: the C++ checks
    of csrc/checks.h) all raise, with the same exception type, naming the same argument first."""
    case = CASES[key]
    if case.api == "functional":
        raw_op = _twin(case)[0]
        raw = compiled_outcomes[(key, "twin")]
        faces = {"reference": _outcome(key, "reference"), "ops": compiled_outcomes[(key, "ops")]}
    else:
        raw_op = case.op
        raw = compiled_outcomes[(key, "raw")]
        faces = {"reference": _outcome(key, "reference_twin"), "ops": compiled_outcomes[(key, "twin")]}
    for name, outcome in {**faces, "raw": raw}.items():
        assert outcome["status"] == "raised", f"{name}: {outcome}"
    want = _named(raw, raw_op)
    for name, outcome in faces.items():
        assert _named(outcome, raw_op) == want, (
            f"{name} raised {outcome['type']}: {outcome['msg']}\n"
            f"raw {raw_op} raised {raw['type']}: {raw['msg']}")


# ---- the random start's seed: [0, 2**63), named when outside ------------------------------------
@pytest.mark.parametrize("impl", [ops, reference], ids=["ops", "reference"])
@pytest.mark.parametrize("seed, exc", [(2 ** 70, ValueError), (2 ** 63, ValueError), (-1, ValueError),
                                       (1.5, TypeError), (True, TypeError)])
def test_random_start_seed_out_of_range_names_the_argument_and_range(impl, seed, exc):
    with pytest.raises(exc, match=r"^seed: .*\[0, 2\*\*63\)"):
        impl.pgd_random_start(torch.rand(2, 3, 4, 4), 0.1, seed=seed)


def test_random_start_largest_seed_gives_the_same_start_everywhere():
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(ops.pgd_random_start(x, 0.1, seed=2 ** 63 - 1),
                               reference.pgd_random_start(x, 0.1, seed=2 ** 63 - 1), rtol=0, atol=0)


@requires_extension
def test_bad_step_leaves_x_adv_untouched(device, gen):
    """Checks run before any write: a rejected in-place step must not have modified x_adv."""
    x = torch.rand(M, *IMG, generator=gen).to(device)
    g, x_nat = torch.randn(M, *IMG, generator=gen).to(device), torch.rand(IMG, generator=gen).to(device)
    x0 = x.clone()
    with pytest.raises(ValueError, match=r"^lo: must be <= hi"):
        ops.pgd_sign_step_(x, g, x_nat, 0.1, 0.1, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"^eps: must be finite and >= 0, got -0.1"):
        torch.ops.cda2_ext.sign_step_(x, g, x_nat, -0.1, 0.1, 0.0, 1.0)
    assert torch.equal(x, x0)


@requires_extension
@pytest.mark.parametrize("K", [3, 4099])  # CUDA: lanes per sample below 2048 classes, a block above
def test_bad_label_at_the_end_of_a_large_batch_is_found(K, device, gen):
    """The whole target is checked, not a prefix: only the last label is out of range, and the
    message (one for both backends, csrc/checks.h) names it and its position."""
    B = 10_000 if K == 3 else 64
    z, y = make_logits((2, B, K), torch.float32, gen, device=device), make_target(B, K, gen, device)
    y[-1] = K
    expect = rf"^target: labels must lie in \[0, {K}\), found {K} at index {B - 1}$"
    with pytest.raises(ValueError, match=expect):
        ops.collaboration_loss(z, y)
    with pytest.raises(ValueError, match=expect):
        torch.ops.cda2_ext.collab_loss(z, y, 1.0, 1)


@requires_extension
@pytest.mark.parametrize("bad", ["negative", "eq_K", "huge"])
@pytest.mark.parametrize("K", [10, 4099])  # CUDA: lanes per sample below 2048 classes, a block above
def test_bad_label_raises_and_leaves_the_device_usable(K, bad, device, gen):
    z, y = make_logits((3, 5, K), torch.float32, gen, device=device), make_target(5, K, gen, device)
    value = {"negative": -1, "eq_K": K, "huge": 1 << 40}[bad]
    y[3] = value
    expect = rf"^target: labels must lie in \[0, {K}\), found {value} at index 3$"
    with pytest.raises(ValueError, match=expect):
        ops.collaboration_loss(z, y, 1.0, "mean")
    with pytest.raises(ValueError, match=expect):
        torch.ops.cda2_ext.collab_loss(z, y, 1.0, 1)
    y[3] = 0
    loss = torch.ops.cda2_ext.collab_loss(z, y, 1.0, 1)[0]  # no sticky error left on the device
    assert bool(torch.isfinite(loss))


def _device_cases(dev: str, other: str,
                  gen: torch.Generator) -> Dict[str, Tuple[type, Tuple[str, ...], Callable]]:
    """Raw calls with one bad argument on ``dev`` (``other`` is a different device): label ->
    (exact exception type, names the message may start with, the call)."""
    op = torch.ops.cda2_ext
    z, y = make_logits((3, 5, 10), torch.float32, gen, device=dev), make_target(5, 10, gen, dev)
    s = torch.randn(3, 5, generator=gen).to(dev)
    x_nat = torch.rand(5, 3, 4, 4, generator=gen).to(dev)
    x_adv = torch.rand(2, 5, 3, 4, 4, generator=gen).to(dev)
    g = torch.randn(2, 5, 3, 4, 4, generator=gen).to(dev)

    def stats():
        return op.collab_loss(z, y, 1.0, 0)

    def bwd(grad_loss=None, lse=None, prob=None):
        _, _, w, p, lse0, prob0 = stats()
        return op.collab_loss_backward(grad_loss, None, None, None, z, y, lse0 if lse is None else lse,
                                       prob0 if prob is None else prob, w, p, 1.0, 0)

    V, T = ValueError, TypeError
    return {
        "collab_loss.target_int32": (T, ("target",), lambda: op.collab_loss(z, y.int(), 1.0, 1)),
        "collab_loss.target_short": (V, ("target",), lambda: op.collab_loss(z, y[:4], 1.0, 1)),
        "collab_loss.target_other_device": (V, ("target", "logits"),
                                            lambda: op.collab_loss(z, y.to(other), 1.0, 1)),
        "collab_loss.sigma_zero": (V, ("sigma",), lambda: op.collab_loss(z, y, 0.0, 1)),
        "collab_loss.reduction_3": (V, ("reduction",), lambda: op.collab_loss(z, y, 1.0, 3)),
        "collab_loss.one_class": (V, ("logits",),
                                  lambda: op.collab_loss(z[..., :1], y.clamp(max=0), 1.0, 1)),
        "collab_loss.logits_int": (T, ("logits",), lambda: op.collab_loss(z.int(), y, 1.0, 1)),
        "collab_loss_backward.lse_float32": (T, ("lse",), lambda: bwd(lse=stats()[4].float())),
        "collab_loss_backward.grad_loss_shape": (V, ("grad_loss",),
                                                 lambda: bwd(grad_loss=torch.ones(4, device=dev))),
        "collab_loss_backward.prob_shape": (V, ("prob",),
                                            lambda: bwd(prob=torch.rand(3, 5, 9, generator=gen).to(dev))),
        "ppd_bce.target_prob_shape": (V, ("target_prob",), lambda: op.ppd_bce(s, s[:, :4], 1)),
        "ppd_bce.target_prob_dtype": (T, ("target_prob",), lambda: op.ppd_bce(s, s.double(), 1)),
        "ppd_bce.target_prob_other_device": (V, ("target_prob", "ppd_logit"),
                                             lambda: op.ppd_bce(s, s.to(other), 1)),
        "sign_step_.eps_negative": (V, ("eps",),
                                    lambda: op.sign_step_(x_adv, g, x_nat, -0.1, 0.01, 0.0, 1.0)),
        "sign_step_.x_nat_shape": (V, ("x_nat",),
                                   lambda: op.sign_step_(x_adv, g, x_nat[:4], 0.1, 0.01, 0.0, 1.0)),
        "sign_step_.grad_shape": (V, ("grad",),
                                  lambda: op.sign_step_(x_adv, g[:1], x_nat, 0.1, 0.01, 0.0, 1.0)),
        "random_start_.lo_gt_hi": (V, ("lo", "hi"),
                                   lambda: op.random_start_(x_adv, x_nat, 0.1, 1.0, 0.0, 3)),
        "collab_select.ppd_logit_shape": (V, ("ppd_logit",), lambda: op.collab_select(s[:2], z)),
        "collab_select.ppd_logit_other_device": (V, ("ppd_logit", "logits"),
                                                 lambda: op.collab_select(s.to(other), z)),
    }


DEVICE_CASES = list(_device_cases("cpu", "meta", torch.Generator()))


@requires_extension
@pytest.mark.parametrize("label", DEVICE_CASES)
def test_raw_op_rejects_on_device(label, device, gen):
    """A few raw checks in this process, on each device (the table above runs CPU tensors only)."""
    exc, names, call = _device_cases(device, "meta" if device == "cpu" else "cpu", gen)[label]
    with pytest.raises(exc) as info:
        call()
    # exactly exc, not a subclass of it
    assert info.type is exc, f"{info.type.__name__} instead of {exc.__name__}: {info.value}"
    assert str(info.value).split(":")[0] in names, f"message does not start with {names}: {info.value}"
