"""The training choices the paper leaves open: each option of ``cda2 train`` changes what it says it
changes, has the paper's default and is checked: ``--clean-weight``, ``--ppd-grad``, ``--ppd-loss``,
``--pgd-bn``, ``--pgd-random-start/--no-random-start``.

(The evaluation's: ``--subset dverge`` in ``test_evaluation_protocol.py`` and ``test_eval_cli.py``,
``--last-iterate`` in ``test_attacks.py`` and ``test_eval_cli.py``.)
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as Fn

from cda2_ext.attacks.training_pgd import attack_mode, collaboration_pgd, per_model_pgd
from cda2_ext.cli import build_parser
from cda2_ext.jobs.train import TrainJob
from cda2_ext.errors import ConfigError
from cda2_ext.models import Collaboration
from cda2_ext.runtime import REFERENCE
from cda2_ext.training import TrainConfig
from cda2_ext.training.methods.cda2 import soe_ppd_bce
from helpers import tiny_config, tiny_trainer

IMG = 16


def _cfg(tmp_path, **kw) -> TrainConfig:
    """The tiny run with batches of 8, two attack steps, lr 0.05 and no image limits."""
    return tiny_config(tmp_path / "run", **{**dict(batch_size=8, steps=2, lr=0.05, train_limit=None,
                                                   test_limit=None), **kw})


def _trainer(cfg: TrainConfig):
    return tiny_trainer(cfg, n=16, size=IMG)


def _train_args(*flags: str) -> TrainConfig:
    return TrainJob.from_args(build_parser().parse_args(["train", *flags])).config()


# ----- --clean-weight -----------------------------------------------------------------------------
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


# ----- --ppd-grad ---------------------------------------------------------------------------------
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


# ----- --ppd-loss soe -----------------------------------------------------------------------------
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


# ----- --pgd-bn -----------------------------------------------------------------------------------
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


# ----- --pgd-random-start / --no-random-start -----------------------------------------------------
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
