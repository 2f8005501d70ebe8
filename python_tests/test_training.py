"""PGD for training, Algorithm 1, checkpoints and resume (tiny models on synthetic images)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn

from cda2_ext.attacks import collaboration_pgd, per_model_pgd, sign_attack
from cda2_ext.attacks.training_pgd import selected_ce_objective
from cda2_ext.storage.checkpoint import load_checkpoint
from cda2_ext.training.restore import load_collaboration
from cda2_ext.data import synthetic_images
from cda2_ext.models import Collaboration
from cda2_ext.errors import CheckpointError, ConfigError
from cda2_ext.runtime import REFERENCE
from cda2_ext.training import TrainConfig, Trainer
from helpers import pgd_oracle, tiny_config, tiny_trainer

IMG = 16
EPS, ALPHA = 0.03, 0.01


def _data(n=32, seed=0):
    return synthetic_images(n, seed=seed, size=IMG)


def _cfg(tmp_path, **kw) -> TrainConfig:
    """The tiny run at depth 8, for two epochs of batches of 8 at lr 0.05, no image limits."""
    return tiny_config(tmp_path / "run", **{**dict(depth=8, epochs=2, batch_size=8, lr=0.05,
                                                   train_limit=None, test_limit=None), **kw})


def _trainer(cfg, n=16):
    return tiny_trainer(cfg, n, size=IMG, test_set=_data(16, seed=1))


def _model(M=3):
    torch.manual_seed(0)
    return Collaboration(num_models=M, depth=8)


# ----- attacks ------------------------------------------------------------------------------------
def test_natural_phase_makes_m_different_variants_each_attacking_its_own_sub_model():
    m = _model()
    x, y = torch.rand(4, 3, IMG, IMG), torch.randint(0, 10, (4,))
    x_adv = per_model_pgd(m, x, y, EPS, ALPHA, 3, random_start=False, backend=REFERENCE)
    assert x_adv.shape == (3, *x.shape)
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.equal(x_adv[i], x_adv[j])
    # variant m equals a PGD run against sub-model m alone
    m.eval()
    for k in range(3):
        def alone(xa, k=k):  # one copy [1, B, ...] scored by sub-model k only
            return Fn.cross_entropy(m(xa[0])[0][k], y, reduction="none").unsqueeze(0), None
        ref = sign_attack(alone, x, y, EPS, ALPHA, 3, track_worst=False, backend=REFERENCE).x_adv[0]
        assert (ref == x_adv[k]).float().mean() > 0.99  # sign flips only where a gradient is ~0


def test_training_pgd_on_the_engine_gives_the_same_adversarial_examples():
    """Algorithm 1's two attacks, now thin clients of the evaluation engine, reproduce the
    previous dedicated loop bit for bit (same starts from the generator, same steps)."""
    m = _model().eval()
    x, y = torch.rand(4, 3, IMG, IMG), torch.randint(0, 10, (4,))

    def per_model(xa):
        logits = m(xa)[0]
        return Fn.cross_entropy(logits.reshape(-1, 10), y.repeat(3), reduction="sum")

    def collab(xa):
        logits, ppd = m(xa)
        _, chosen = REFERENCE.collaborative_select(ppd, logits)
        return Fn.cross_entropy(chosen, y, reduction="sum")

    for seed in (0, 1):
        new = per_model_pgd(m, x, y, EPS, ALPHA, 3, backend=REFERENCE,
                            generator=torch.Generator().manual_seed(seed))
        old = pgd_oracle(per_model, x, EPS, ALPHA, 3, 3, torch.Generator().manual_seed(seed))
        assert torch.equal(new, old)
        new = collaboration_pgd(m, x, y, EPS, ALPHA, 3, backend=REFERENCE,
                                generator=torch.Generator().manual_seed(seed))
        old = pgd_oracle(collab, x, EPS, ALPHA, 3, None, torch.Generator().manual_seed(seed))
        assert torch.equal(new, old)


def test_attacks_leave_no_grads_and_restore_mode():
    m = _model().train()
    x, y = torch.rand(4, 3, IMG, IMG), torch.randint(0, 10, (4,))
    per_model_pgd(m, x, y, EPS, ALPHA, 2)
    x_adv = collaboration_pgd(m, x, y, EPS, ALPHA, 2)
    assert m.training
    assert all(p.grad is None for p in m.parameters())
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= EPS + 1e-6
    m.eval()
    loss = selected_ce_objective(m, y)
    with torch.no_grad():  # the attack worsens the collaboration's answer
        assert loss(x_adv[None])[0].sum() > loss(x[None])[0].sum()


def test_random_start_is_seeded_by_generator():
    m = _model()
    x, y = torch.rand(2, 3, IMG, IMG), torch.randint(0, 10, (2,))
    a = per_model_pgd(m, x, y, EPS, ALPHA, 1, generator=torch.Generator().manual_seed(3))
    b = per_model_pgd(m, x, y, EPS, ALPHA, 1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ----- Algorithm 1 --------------------------------------------------------------------------------
@pytest.mark.parametrize("phases", ["natural", "both", "standard"])
def test_every_phase_runs(tmp_path, phases):
    tr = _trainer(_cfg(tmp_path, phases=phases), n=8)
    x, y = next(iter(tr.batches()))
    losses = tr.train_step(x, y)
    expect = {"natural": ["natural"], "both": ["natural", "adversarial"], "standard": ["standard"]}
    assert sorted(losses) == sorted(expect[phases])
    assert all(torch.isfinite(v) for v in losses.values())


def test_loss_falls_on_a_tiny_set(tmp_path):
    cfg = _cfg(tmp_path, epochs=6, schedule="constant", eps=0.01, alpha=0.005, augment=False)
    tr = _trainer(cfg, n=16)
    tr.fit()
    first, last = tr.history[0], tr.history[-1]
    assert last["loss"] < 0.8 * first["loss"]
    assert len(last["assign_hist"]) == 2 and abs(sum(last["assign_hist"]) - 1) < 1e-6
    assert abs(sum(last["select_hist"]) - 1) < 1e-6


def test_fused_and_unfused_training_agree(tmp_path):
    runs = []
    for unfused in (False, True):
        tr = _trainer(_cfg(tmp_path / str(unfused), unfused=unfused, steps=2), n=16)
        losses = []
        tr.train_epoch(lambda step, l: losses.append(float(l["adversarial"])))
        runs.append((losses, [p.detach().clone() for p in tr.model.parameters()]))
    (la, pa), (lb, pb) = runs
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-4, atol=1e-5)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, amp):
    """Forward passes under autocast, losses in fp32: the step is finite and moves the weights
    (fp16 through the gradient scaler), close to the fp32 step's loss."""
    full = _trainer(_cfg(tmp_path / "fp32"), n=8)
    half = _trainer(_cfg(tmp_path / amp, amp=amp), n=8)
    assert half.scaler.is_enabled() == (amp == "fp16")
    x, y = next(iter(half.batches()))
    before = [p.detach().clone() for p in half.model.parameters()]
    lh = half.train_step(x, y)["adversarial"]
    lf = full.train_step(x, y)["adversarial"]
    assert lh.dtype == torch.float32 and torch.isfinite(lh)
    assert abs(float(lh) - float(lf)) < 0.1 * abs(float(lf))
    assert any(not torch.equal(a, b) for a, b in zip(before, half.model.parameters()))


def test_checkpoint_round_trip(tmp_path):
    cfg = _cfg(tmp_path, epochs=1, eval_every=1)
    tr = _trainer(cfg)
    tr.fit()
    tensors, meta = load_checkpoint(cfg.out_dir)
    assert meta["epoch"] == 1 and meta["config"]["num_models"] == 2 and len(meta["history"]) == 1
    assert tensors["rng.generator"].dtype == torch.uint8
    ref = tr.state_tensors()
    assert set(ref) == set(tensors)
    for k, v in ref.items():
        assert torch.equal(v.cpu(), tensors[k]), k
    model, _ = load_collaboration(cfg.out_dir)
    x = torch.rand(3, 3, IMG, IMG)
    tr.model.eval()
    with torch.no_grad():
        for a, b in zip(model(x), tr.model(x)):
            torch.testing.assert_close(a, b)
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_resumed_run_continues_with_the_same_next_step_loss(tmp_path):
    cfg = _cfg(tmp_path, epochs=2, steps=2)
    full = _trainer(cfg.replace(out_dir=str(tmp_path / "full")))
    full_losses = []
    full.train_epoch()
    full.train_epoch(lambda s, l: full_losses.append(float(l["adversarial"])))

    first = _trainer(cfg)
    first.train_epoch()
    first.save()                          # ... and the process dies here
    del first
    resumed = Trainer.resume_or_start(cfg, train_set=_data(16), test_set=_data(16, seed=1), log=None)
    assert resumed.epoch == 1
    resumed_losses = []
    resumed.train_epoch(lambda s, l: resumed_losses.append(float(l["adversarial"])))
    torch.testing.assert_close(torch.tensor(resumed_losses), torch.tensor(full_losses),
                               rtol=1e-5, atol=1e-6)


def test_resume_refuses_a_different_run(tmp_path):
    cfg = _cfg(tmp_path, epochs=1)
    tr = _trainer(cfg)
    tr.fit()
    with pytest.raises(ConfigError, match="sigma"):
        _trainer(cfg.replace(sigma=0.5)).load()
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "nowhere")
    bad = tmp_path / "bad" / "checkpoint.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)


@pytest.mark.parametrize("change, match", [(dict(sigma=0.0), "sigma"), (dict(sigma=-1.0), "sigma"),
                                           (dict(num_models=0), "num_models"), (dict(depth=10), "depth"),
                                           (dict(phases="both-ish"), "phases")])
def test_bad_configs_fail_clearly(tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, **change).validate()


def test_steps_zero_is_fine_without_an_attack(tmp_path):
    tiny_config(tmp_path, phases="standard", steps=0).validate()


def test_lr_schedules():
    c = TrainConfig(epochs=100, lr=0.1)
    assert c.lr_at(0) == 0.1 and abs(c.lr_at(50) - 0.01) < 1e-12 and abs(c.lr_at(75) - 0.001) < 1e-12
    cos = c.replace(schedule="cosine")
    assert cos.lr_at(0) == 0.1 and abs(cos.lr_at(50) - 0.05) < 1e-12
