"""Training at the speed of the GPU: a training step that never waits for the device.

* No host read inside ``Trainer.train_step`` for any phase: on a CPU through
  :class:`~cda2_ext.runtime.HostReads` with the GPU's code path forced
  (:func:`~cda2_ext.runtime.sync_free_mode`); on a GPU under
  ``torch.cuda.set_sync_debug_mode("error")``.
* The guarantees of the non-finite check, now decided on the device: a skipped update leaves
  parameters, optimiser state and BatchNorm statistics bit-identical, with both ``on_nonfinite``
  values, from the very first update on; ``"stop"`` raises at the next host read, naming the step.
* The pieces: labels checked once (the ops still raise for bad ones outside the trainer), tallies
  without ``bincount``, the frozen snapshot's static-shape backward, the CUDA-graph attack path.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import pytest
import torch

from cda2_ext.ops import _checks, reference
from cda2_ext import ops
from cda2_ext.attacks import graphs
from cda2_ext.attacks.training_pgd import collaboration_pgd, per_model_pgd
from cda2_ext.data import DataError, ImageSet, synthetic_images
from cda2_ext.errors import NonFiniteLossError
from cda2_ext.models.collaboration import Collaboration
from cda2_ext.runtime import HostReads, cuda_graphs_mode, sync_free_mode
from cda2_ext.training import Trainer
from cda2_ext.training.methods import Tally
from helpers import poison_first_batch, tiny_config

PHASES = ("standard", "adversarial", "natural")


def _trainer(phase: str = "standard", device: str = "cpu", depth: int = 8,
             train_set: Optional[ImageSet] = None, **kw) -> Trainer:
    three = dict(num_models=3, depth=depth, steps=2, phases=phase, device=device, epochs=None,
                 test_limit=None)  # epochs, test_limit: the library's defaults
    cfg = tiny_config("unused", **{**three, **kw})
    data = train_set if train_set is not None else synthetic_images(cfg.train_limit, size=16)
    return Trainer(cfg, train_set=data, log=None)


def _state(tr: Trainer) -> Dict[str, torch.Tensor]:
    """Parameters, BatchNorm buffers and optimiser state, copied."""
    return {k: v.detach().clone() for k, v in tr.state_tensors().items() if not k.startswith("rng.")}


def _assert_same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    """``b`` is ``a``, but for optimiser state that ``b`` has in addition, which must be zeros
    (SGD's momentum, primed before a first step: the same as none)."""
    extra = b.keys() - a.keys()
    assert all(k.startswith("optim.") and not b[k].any() for k in extra), sorted(extra)
    assert a.keys() <= b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, f"changed by a skipped update: {changed[:5]}"


def _nan_batch(tr: Trainer):
    x, y = next(tr.batches())
    x = x.clone()
    x[0] = float("nan")
    return x, y


# ----- no host read in a step -----------------------------------------------------------------------
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("unfused", [False, True], ids=["fused", "unfused"])
def test_train_step_reads_nothing_back(phase, unfused):
    tr = _trainer(phase, unfused=unfused)
    x, y = next(tr.batches())
    with sync_free_mode(True):
        tr.train_step(x, y)              # first step: optimiser state created
        with HostReads() as mode:
            tr.train_step(x, y)
    assert mode.reads == [], "\n".join(f"{op}: {where}" for op, where in mode.reads)


def test_host_reads_sees_item_bincount_and_mask_indexing():
    t = torch.arange(4)
    with HostReads() as mode:
        t.sum().item()
        torch.bincount(t, minlength=4)
        t[t > 1]
        t.tolist()                       # read on the host directly: no operator, nothing on a GPU
    assert [op for op, _ in mode.reads] == ["_local_scalar_dense", "bincount", "index"]


@pytest.mark.parametrize("phase", PHASES)
def test_train_step_syncs_nothing_on_cuda(cuda, phase):
    tr = _trainer(phase, device=cuda, depth=20, batch_size=32, train_limit=64)
    x, y = next(tr.batches())
    tr.train_step(x, y)                  # warm-up: lazy initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tr.train_step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tr.check_finite()


# ----- non-finite losses: decided on the device, same guarantees ------------------------------------
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("on_nonfinite", ["skip", "stop"])
def test_a_skipped_update_changes_nothing(optimizer, on_nonfinite):
    tr = _trainer(on_nonfinite=on_nonfinite, optimizer=optimizer)
    x, y = next(tr.batches())
    tr.train_step(x, y)                  # optimiser state exists
    before = _state(tr)
    tallies = tr._new_tallies()
    tr.train_step(*_nan_batch(tr), tallies)
    _assert_same(before, _state(tr))
    s = tallies["standard"]
    assert float(s.get("skipped")) == 1 and float(s.get("n")) == 0   # no trace in the metrics
    if on_nonfinite == "stop":
        tr.train_step(x, y)              # a finite update after a stop is not applied either
        _assert_same(before, _state(tr))
        with pytest.raises(NonFiniteLossError, match="the standard loss is nan at this step"):
            tr.check_finite()
    else:
        tr.check_finite()                # skipping: nothing to report, and the next update applies
        tr.train_step(x, y)
        after = _state(tr)
        assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_skipped_first_update_leaves_no_optimizer_state_behind(optimizer):
    """Fused SGD creates its momentum buffers in the step's kernel: a skipped first step must not
    leave them uninitialised (the guard primes them with zeros, which is the same first step)."""
    skipped, plain = _trainer(on_nonfinite="skip", optimizer=optimizer), _trainer(optimizer=optimizer)
    x, y = next(plain.batches())
    skipped.train_step(*_nan_batch(skipped))
    for tr in (skipped, plain):
        tr.train_step(x, y)
    _assert_same(_state(plain), _state(skipped))


def test_stop_raises_at_the_epoch_end_naming_the_first_bad_step(monkeypatch):
    tr = _trainer(epochs=1)
    poison_first_batch(monkeypatch)
    before, steps = _state(tr), []
    with pytest.raises(NonFiniteLossError, match="standard loss is nan at epoch 1, step 1 of 2"):
        tr.train_epoch(lambda step, losses: steps.append(step))
    assert steps == [0, 1]               # read lazily: the epoch ran on, applying nothing
    _assert_same(before, _state(tr))


def test_check_every_reads_the_verdict_within_the_epoch(monkeypatch):
    tr = _trainer(train_limit=64)
    tr.check_every = 1
    reads: List[int] = []
    monkeypatch.setattr(tr.guard, "first_failure", lambda: reads.append(1))
    tr.train_epoch()
    assert len(reads) == 4 + 1           # after each of the 4 steps, and at the end


# ----- labels: checked once by the trainer, by every op called directly ------------------------------
def test_the_trainer_checks_its_labels_once_at_start():
    data = synthetic_images(32, size=16)
    bad = ImageSet(data.images, data.labels.clone().fill_(10), data.classes)
    with pytest.raises(DataError, match=r"training set: labels must lie in \[0, 10\), found 10"):
        _trainer(train_set=bad)


@pytest.mark.parametrize("impl", [ops, reference], ids=["fused", "reference"])
def test_ops_still_raise_for_bad_labels_outside_the_trainer(impl):
    z = torch.randn(2, 4, 3)
    y = torch.tensor([0, 1, 3, 2])
    with pytest.raises(ValueError, match=r"target: labels must lie in \[0, 3\)"):
        impl.collaboration_loss(z, y)
    with _checks.labels_checked():
        assert _checks.labels_trusted()
        if impl is reference:            # trusted: no host read; gather itself still refuses
            with pytest.raises(RuntimeError):
                impl.collaboration_loss(z, y)
    assert not _checks.labels_trusted()


def test_tally_counts_are_bincount_without_the_host_read():
    index = torch.tensor([2, 0, 2, 2, 1])
    t = Tally(torch.device("cpu"))
    t.add_counts("c", index, 4)
    t.add_counts("c", index[:2], 4)
    assert torch.equal(t.get("c"), torch.bincount(torch.cat([index, index[:2]]), minlength=4).double())


# ----- capture-ready attacks ---------------------------------------------------------------------------
def _model(depth: int = 8, device: str = "cpu") -> Collaboration:
    torch.manual_seed(0)
    return Collaboration(num_models=3, depth=depth).to(device)


def _attack_under(attack, model: Collaboration, x: torch.Tensor, y: torch.Tensor, steps: int,
                  *switches) -> List[torch.Tensor]:
    """``attack``'s result once under each of ``switches`` (context managers), same random start."""
    outs = []
    for switch in switches:
        with switch:
            outs.append(attack(model, x, y, 8 / 255, 2 / 255, steps,
                               generator=torch.Generator().manual_seed(1)))
    return outs


@pytest.mark.parametrize("attack", [per_model_pgd, collaboration_pgd])
def test_static_shape_attack_matches_the_row_skipping_one(attack):
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    skipping, static = _attack_under(attack, _model(), x, y, 3, sync_free_mode(False),
                                     sync_free_mode(True))
    # the same gradients up to summation order; a sign step can flip only at an exact tie
    assert (skipping - static).abs().max() <= 4 * 2 / 255 + 1e-6
    assert (skipping == static).float().mean() > 0.99


@pytest.mark.parametrize("attack", [per_model_pgd, collaboration_pgd])
def test_cuda_graphs_setting_falls_back_to_the_same_attack_on_cpu(attack):
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    with sync_free_mode(True):
        plain, graphed = _attack_under(attack, _model(), x, y, 3, cuda_graphs_mode(False),
                                       cuda_graphs_mode(True))
    assert torch.equal(plain, graphed)


def test_graphed_function_calls_through_where_graphs_do_not_apply():
    calls: List[int] = []

    def fn(a: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return a * 2
    g = graphs.GraphedFunction(fn)
    with cuda_graphs_mode(True):
        assert torch.equal(g(torch.ones(3)), torch.full((3,), 2.0))
    assert calls == [1] and not g._graphs


@pytest.mark.parametrize("attack", [per_model_pgd, collaboration_pgd])
def test_cuda_graph_attack_replays_the_plain_one(cuda, attack):
    model = _model(depth=20, device=cuda)
    x = torch.rand(32, 3, 32, 32, device=cuda)
    y = torch.randint(0, 10, (32,), device=cuda)
    # plain, capture + replay, replay; then after the weights change in place (as an optimiser
    # step changes them): plain, replay of the graph recorded before
    outs = _attack_under(attack, model, x, y, 5, cuda_graphs_mode(False), cuda_graphs_mode(True),
                         cuda_graphs_mode(True))
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)
    outs += _attack_under(attack, model, x, y, 5, cuda_graphs_mode(False), cuda_graphs_mode(True))
    for a, b in ((outs[0], outs[1]), (outs[0], outs[2]), (outs[3], outs[4])):
        assert (a == b).float().mean() > 0.99
