"""The choices the paper leaves open (issue 13): each option changes what it says it changes.

Training (``cda2 train``): ``--clean-weight``, ``--ppd-grad``, ``--ppd-loss``, ``--pgd-bn``,
``--pgd-random-start/--no-random-start``; evaluation: ``--subset dverge`` and the engine's
last-iterate bookkeeping; data: the one-line note about training on a CIFAR-10 subset.
"""
from __future__ import annotations

import copy
import json
import random

import pytest
import torch
import torch.nn.functional as Fn

from cda2_ext import data as data_mod
from cda2_ext.attacks.engine import sign_attack
from cda2_ext.attacks.training import attack_mode, collaboration_pgd, per_model_pgd
from cda2_ext.attacks.whitebox import PGDConfig, pgd_attack
from cda2_ext.cli import build_parser
from cda2_ext.cli import main as cda2_main
from cda2_ext.cli.train import _train_config
from cda2_ext.data import load_images, note_training_size, synthetic_images
from cda2_ext.errors import ConfigError
from cda2_ext.evaluation.config import EvalConfig, select_subset
from cda2_ext.evaluation.rows import pgd_row
from cda2_ext.models import Collaboration
from cda2_ext.runtime import REFERENCE
from cda2_ext.training import TrainConfig, Trainer
from cda2_ext.training.methods.cda2 import soe_ppd_bce

IMG = 16


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(dataset="synthetic", num_models=2, depth=2, epochs=1, batch_size=8, steps=2,
                lr=0.05, progress=False, eval_every=0, out_dir=str(tmp_path / "run"), device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _trainer(cfg: TrainConfig) -> Trainer:
    return Trainer(cfg, train_set=synthetic_images(16, seed=0, size=IMG), log=None)


def _train_args(*flags: str) -> TrainConfig:
    return _train_config(build_parser().parse_args(["train", *flags]))


# ----- --clean-weight ------------------------------------------------------------------------------
def test_clean_weight_adds_exactly_w_times_the_clean_batch_loss(tmp_path):
    t0 = _trainer(_cfg(tmp_path / "a"))
    t2 = _trainer(_cfg(tmp_path / "b", clean_weight=2.0))
    (x, y), (x2, y2) = next(iter(t0.batches())), next(iter(t2.batches()))
    assert torch.equal(x, x2) and torch.equal(y, y2)  # same seed: same batch, same start
    # the clean term as the step will compute it: soft-min + BCE of a train-mode forward at x
    saved = copy.deepcopy(t2.model.state_dict())
    t2.model.train()
    with torch.no_grad():
        clean_term = t2.method._terms(x, y)[0]
    t2.model.load_state_dict(saved)  # that forward moved BatchNorm's running statistics
    l0 = t0.train_step(x, y)["adversarial"]
    l2 = t2.train_step(x, y)["adversarial"]
    assert float(clean_term) > 0
    assert float(l2 - l0) == pytest.approx(2.0 * float(clean_term), rel=1e-4, abs=1e-5)


def test_clean_weight_default_is_the_papers_and_the_cli_sets_it():
    assert TrainConfig().clean_weight == 0.0
    assert _train_args("--clean-weight", "1").clean_weight == 1.0
    with pytest.raises(ConfigError, match="clean_weight"):
        TrainConfig(clean_weight=-1).validate()
    with pytest.raises(ConfigError, match="clean_weight"):  # standard training is the clean batch
        TrainConfig(clean_weight=1, phases="standard").validate()


def test_clean_weight_is_in_the_epoch_metrics(tmp_path):
    tr = _trainer(_cfg(tmp_path, clean_weight=0.5))
    m = tr.fit()[-1]
    assert m["clean_term"] > 0
    assert m["loss"] == pytest.approx(m["surrogate"] + m["bce"] + 0.5 * m["clean_term"])


# ----- --ppd-grad -----------------------------------------------------------------------------------
@pytest.mark.parametrize("ppd_grad", ["head", "trunk"])
def test_ppd_grad_trunk_gives_the_trunk_a_gradient_from_the_bce(tmp_path, ppd_grad):
    cfg = _train_args("--ppd-grad", ppd_grad, "--depth", "2", "--num-models", "2")
    assert cfg.model_config().detach_ppd is (ppd_grad == "head")
    tr = _trainer(_cfg(tmp_path, ppd_grad=ppd_grad))
    assert tr.model.config.detach_ppd is (ppd_grad == "head")  # the trainer builds that model
    x = torch.rand(4, 3, IMG, IMG)
    logits, ppd = tr.model(x)
    REFERENCE.ppd_bce(ppd, torch.full_like(ppd, 0.3)).backward()  # the BCE alone
    trunk = [p.grad for n, p in tr.model.named_parameters() if ".trunk." in f".{n}"]
    head = [p.grad for n, p in tr.model.named_parameters() if "ppd_head" in n]
    assert trunk and all(g is not None and g.abs().sum() > 0 for g in head)
    reached = any(g is not None and g.abs().sum() > 0 for g in trunk)
    assert reached is (ppd_grad == "trunk")


# ----- --ppd-loss soe -------------------------------------------------------------------------------
def test_soe_bce_is_bce_of_maxprob_times_sigmoid():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    ppd = torch.randn(3, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    p_y = torch.softmax(logits, -1).gather(-1, y.expand(3, 6).unsqueeze(-1)).squeeze(-1)
    d = torch.softmax(logits, -1).amax(-1) * torch.sigmoid(ppd)
    expected = Fn.binary_cross_entropy(d, p_y)
    got = soe_ppd_bce(logits, ppd, p_y, y, label_grad=True)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    # and not the paper's BCE of sigmoid(s)
    assert abs(float(got) - float(REFERENCE.ppd_bce(ppd.float(), p_y.float()))) > 1e-3


@pytest.mark.parametrize("label_grad", [True, False])
def test_soe_bce_reaches_the_label_path_only_where_the_sub_model_is_wrong(label_grad):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 16, 4, generator=g).requires_grad_(True)
    ppd = torch.randn(2, 16, generator=g).requires_grad_(True)
    y = torch.randint(0, 4, (16,), generator=g)
    p_y = torch.softmax(logits, -1).gather(-1, y.expand(2, 16).unsqueeze(-1)).squeeze(-1).detach()
    soe_ppd_bce(logits, ppd, p_y, y, label_grad=label_grad).backward()
    assert ppd.grad is not None and ppd.grad.abs().sum() > 0
    wrong = logits.argmax(-1) != y
    assert wrong.any() and (~wrong).any()
    if not label_grad:
        assert logits.grad is None
    else:
        per_sample = logits.grad.abs().sum(-1)
        assert (per_sample[~wrong] == 0).all() and (per_sample[wrong] > 0).all()


def test_ppd_loss_soe_is_the_bce_training_uses(tmp_path):
    assert _train_args("--ppd-loss", "soe").ppd_loss == "soe" and TrainConfig().ppd_loss == "paper"
    x = torch.rand(4, 3, IMG, IMG)
    y = torch.randint(0, 10, (4,))
    bces = {}
    for loss in ("paper", "soe"):
        tr = _trainer(_cfg(tmp_path / loss, ppd_loss=loss))
        tr.model.eval()  # same outputs for the check below
        with torch.no_grad():
            _, out, bce, logits, ppd = tr.method._terms(x, y)
        bces[loss] = float(bce)
        if loss == "soe":
            d = torch.softmax(logits, -1).amax(-1) * torch.sigmoid(ppd)
            assert float(bce) == pytest.approx(float(Fn.binary_cross_entropy(d, out.p_true)), rel=1e-4)
    assert bces["paper"] != pytest.approx(bces["soe"])


# ----- --pgd-bn -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bn", ["eval", "train"])
def test_pgd_bn_train_moves_the_running_statistics_and_eval_does_not(bn):
    torch.manual_seed(0)
    m = Collaboration(num_models=2, depth=8)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items() if "running_mean" in k}
    x, y = torch.rand(4, 3, IMG, IMG), torch.randint(0, 10, (4,))
    per_model_pgd(m, x, y, 0.03, 0.01, 2, random_start=False, backend=REFERENCE, bn=bn)
    after = {k: v for k, v in m.state_dict().items() if "running_mean" in k}
    moved = any(not torch.equal(before[k], after[k]) for k in before)
    assert moved is (bn == "train")
    assert m.training  # restored


def test_pgd_bn_reaches_the_trainer_and_is_checked(tmp_path):
    assert TrainConfig().pgd_bn == "eval" and _train_args("--pgd-bn", "train").pgd_bn == "train"
    with pytest.raises(ConfigError, match="pgd_bn"):
        TrainConfig(pgd_bn="frozen").validate()
    with pytest.raises(ValueError, match="bn"):
        with attack_mode(torch.nn.Linear(2, 2), "frozen"):
            pass
    # a training step with train-mode attacks moves the running statistics more than eval mode
    runs = {}
    for bn in ("eval", "train"):
        tr = _trainer(_cfg(tmp_path / bn, pgd_bn=bn, steps=3))
        x, y = next(iter(tr.batches()))
        tr.train_step(x, y)
        runs[bn] = {k: v for k, v in tr.model.state_dict().items() if "num_batches_tracked" in k}
    k = next(iter(runs["eval"]))
    assert int(runs["train"][k]) > int(runs["eval"][k])  # every attack step's forward counted


# ----- --pgd-random-start / --no-random-start ---------------------------------------------------------
def test_random_start_flags_and_default():
    assert _train_args().random_start is True and TrainConfig().random_start is True
    assert _train_args("--no-random-start").random_start is False
    assert _train_args("--pgd-random-start").random_start is True
    with pytest.raises(SystemExit):  # one or the other
        build_parser().parse_args(["train", "--pgd-random-start", "--no-random-start"])
    torch.manual_seed(0)
    m = Collaboration(num_models=2, depth=8)
    x, y = torch.rand(4, 3, IMG, IMG), torch.randint(0, 10, (4,))
    g = torch.Generator().manual_seed(0)
    kw = dict(backend=REFERENCE, generator=g)
    assert torch.equal(collaboration_pgd(m, x, y, 0.03, 0.01, 0, random_start=False, **kw), x)
    start = collaboration_pgd(m, x, y, 0.03, 0.01, 0, random_start=True, **kw)
    assert not torch.equal(start, x) and (start - x).abs().max() <= 0.03 + 1e-6


# ----- --subset dverge --------------------------------------------------------------------------------
def test_subset_dverge_is_exactly_pythons_random_sample_with_seed_0():
    state = random.getstate()
    try:
        random.seed(0)
        expected = random.sample(range(10000), 1000)  # DVERGE's evaluation scripts
        after = random.getstate()
        random.setstate(state)
        got = select_subset(10000, 1000, 0, "dverge").tolist()
        assert random.getstate() == state  # the global stream is left alone
    finally:
        random.setstate(state)
    assert got == expected
    assert after != state  # (the oracle did use the global stream)
    seeded = select_subset(10000, 1000, 0)
    assert seeded.tolist() != sorted(expected) and len(set(seeded.tolist())) == 1000
    with pytest.raises(ValueError, match="subset"):
        select_subset(100, 10, 0, "dvergee")
    with pytest.raises(ValueError, match="subset"):
        EvalConfig(subset="random").validate()


def _tiny_run(tmp_path) -> str:
    """A one-epoch synthetic run to evaluate (seconds)."""
    run = str(tmp_path / "run")
    assert cda2_main(["train", "--dataset", "synthetic", "--depth", "2", "--num-models", "2",
                      "--steps", "1", "--batch-size", "16", "--train-limit", "32", "--no-progress",
                      "--device", "cpu", "--epochs", "1", "--eval-every", "0", "--out-dir", run]) == 0
    return run


def test_eval_cli_records_the_subset(tmp_path):
    run = _tiny_run(tmp_path)
    out = tmp_path / "eval"
    assert cda2_main(["eval", "--checkpoint", run, "--attack", "pgd", "--eps", "0.03",
                      "--n-samples", "8", "--steps", "1", "--restarts", "1", "--sanity-eps", "0",
                      "--no-progress", "--subset", "dverge", "--out", str(out)]) == 0
    res = json.loads((out / "robustness.json").read_text())
    assert res["config"]["subset"] == "dverge"
    n_test = len(load_images("synthetic", "test", None, 0))
    assert res["indices"] == random.Random(0).sample(range(n_test), 8)  # DVERGE's draw, its order


# ----- last iterate vs worst iterate ------------------------------------------------------------------
def test_last_iterate_judges_the_final_point_and_worst_iterate_any_point():
    """A loss that always pushes x up, and a model that is wrong only near x = 0.6: PGD passes
    through the wrong region (0.5 -> 0.6 -> 0.7 -> 0.8) and ends outside it."""
    x_nat = torch.full((1, 1), 0.5)
    y = torch.zeros(1, dtype=torch.long)

    def objective(x):  # x [G, B, 1]
        wrong = ((x[..., 0] - 0.6).abs() < 0.03).float()
        logits = torch.stack([1 - 2 * wrong, torch.zeros_like(wrong)], -1)  # class 1 wins iff wrong
        return x[..., 0] * 1.0, logits.detach()

    kw = dict(x_init=x_nat.unsqueeze(0), lo=0.0, hi=1.0, backend=REFERENCE)
    worst = sign_attack(objective, x_nat, y, 0.3, 0.1, 3, **kw)
    last = sign_attack(objective, x_nat, y, 0.3, 0.1, 3, last_iterate=True, **kw)
    assert not bool(worst.correct.all()) and worst.x_adv.flatten().item() == pytest.approx(0.6)
    assert bool(last.correct.all()) and last.x_adv.flatten().item() == pytest.approx(0.8)


class _PassesThroughAWrongBand(torch.nn.Module):
    """Two classes; the logit gap d(x) = wrong - right is a bump peaking at x = 0.72: negative at
    0.5 and 0.8 (right), positive at 0.7 (wrong), rising at 0.5 and 0.7, so PGD with step 0.2 and
    eps 0.3 goes 0.5 -> 0.7 -> 0.8 through the wrong band and out of it."""

    def forward(self, x):
        d = -1 + 2 * torch.exp(-((x.flatten(1).mean(1) - 0.72) / 0.03) ** 2)
        return torch.stack([torch.zeros_like(d), d], -1)


def test_pgd_config_last_iterate_reaches_the_attack_and_its_row():
    x, y = torch.full((1, 1, 1, 1), 0.5), torch.zeros(1, dtype=torch.long)
    base = dict(steps=2, restarts=1, alpha_factor=2 / 3, random_start=False)
    worst = pgd_attack(_PassesThroughAWrongBand(), x, y, 0.3, PGDConfig(**base), backend=REFERENCE)
    last = pgd_attack(_PassesThroughAWrongBand(), x, y, 0.3, PGDConfig(**base, last_iterate=True),
                      backend=REFERENCE)
    assert worst.x_adv.item() == pytest.approx(0.7) and not bool(worst.correct.any())
    assert last.x_adv.item() == pytest.approx(0.8) and bool(last.correct.all())
    assert pgd_row(PGDConfig(last_iterate=True)).label == "PGD-50x5 (ce, last iterate)"
    assert pgd_row(PGDConfig()).label == "PGD-50x5 (ce)"


def test_eval_cli_last_iterate_flag(tmp_path):
    run = _tiny_run(tmp_path)
    common = ["eval", "--checkpoint", run, "--attack", "pgd", "--eps", "0.03", "--n-samples", "8",
              "--steps", "2", "--restarts", "1", "--sanity-eps", "0", "--no-progress"]
    for flag, name in (([], "worst"), (["--last-iterate"], "last")):
        assert cda2_main([*common, *flag, "--out", str(tmp_path / name)]) == 0
    worst, last = (json.loads((tmp_path / n / "robustness.json").read_text()) for n in ("worst", "last"))
    assert worst["config"]["pgd"]["last_iterate"] is False and last["config"]["pgd"]["last_iterate"]
    assert list(last["robust_accuracy"]["run"])[0] == "PGD-2x1 (ce, last iterate)"
    assert list(worst["robust_accuracy"]["run"])[0] == "PGD-2x1 (ce)"


# ----- the subset note ---------------------------------------------------------------------------------
def test_subset_note_appears_once(monkeypatch, capsys):
    monkeypatch.setattr(data_mod, "_size_noted", False)
    monkeypatch.delenv("RANK", raising=False)
    assert note_training_size(50_000) is False  # the full set: nothing to say
    assert note_training_size(5085) is True
    assert note_training_size(5085) is False and note_training_size(100) is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "5,085" in err[0] and "50,000" in err[0] and "--download" in err[0]


def test_subset_note_only_on_rank_0(monkeypatch, capsys):
    monkeypatch.setattr(data_mod, "_size_noted", False)
    monkeypatch.setenv("RANK", "1")
    assert note_training_size(10) is False
    assert capsys.readouterr().err == ""


def test_subset_note_when_training_on_the_shared_subset(cifar_dir, tmp_path, monkeypatch, capsys):
    """The trainer notes the size it will train on (after --train-limit), once; images a caller
    hands it are the caller's business."""
    monkeypatch.setattr(data_mod, "_size_noted", False)
    monkeypatch.delenv("RANK", raising=False)
    cfg = TrainConfig(dataset="cifar10", data_dir=str(cifar_dir), num_models=2, depth=8,
                      eval_every=0, device="cpu", out_dir=str(tmp_path / "r"), train_limit=300)
    Trainer(cfg, train_set=synthetic_images(16, size=16), log=None)
    assert "note:" not in capsys.readouterr().err
    Trainer(cfg, log=None)
    Trainer(cfg, log=None)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "note:" in ln]
    assert len(lines) == 1 and "300" in lines[0] and "50,000" in lines[0]
