"""A collaboration as a classifier (cda2_ext/models/classifier.py): ``Collaboration.as_classifier``
and ``as_ensemble_classifier`` are modules ``images -> [B, K]`` logits whose answers are
Algorithm 2's and the ensemble's; every attack that takes a classifier, given a collaboration,
attacks its Algorithm-2 decision; and another library's attack (torchattacks, when installed)
runs on the adapter."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cda2_ext.attacks.registry import ATTACKS
from cda2_ext.attacks.transfer import TransferConfig
from cda2_ext.attacks.whitebox import PGDConfig, predict_correct
from cda2_ext.models import Collaboration, CollaborationLogits, EnsembleLogits, as_model_fn
from cda2_ext.models.selection import SCORES

EPS = 8 / 255


@pytest.fixture(scope="module")
def net() -> Collaboration:
    with torch.random.fork_rng(devices=[]):  # the parameters' init, off the global RNG
        torch.manual_seed(0)
        return Collaboration(num_models=3, depth=2).eval()


@pytest.fixture
def data(gen):
    return torch.rand(6, 3, 32, 32, generator=gen), torch.randint(0, 10, (6,), generator=gen)


@pytest.mark.parametrize("score", list(SCORES))
def test_as_classifier_answers_with_algorithm_2(net, data, score):
    x, _ = data
    clf = net.as_classifier(score=score)
    assert isinstance(clf, nn.Module) and isinstance(clf, CollaborationLogits)
    with torch.no_grad():
        logits = clf(x)
        _, chosen = net.collaborate(x, score)
        assert logits.shape == (6, 10)
        assert torch.equal(logits, chosen)
        assert torch.equal(logits.argmax(-1), net.predict(x, score).collaboration)


def test_as_ensemble_classifier_answers_with_the_ensemble(net, data):
    x, _ = data
    clf = net.as_ensemble_classifier()
    assert isinstance(clf, nn.Module) and isinstance(clf, EnsembleLogits)
    with torch.no_grad():
        logits = clf(x)
        assert logits.shape == (6, 10)
        torch.testing.assert_close(logits.exp(), net.ensemble(x))  # log of the mean probability
        assert torch.equal(logits.argmax(-1), net.predict(x).ensemble)


def test_the_classifier_is_differentiable_in_its_input(net, data):
    x, y = data
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(net.as_classifier()(x), y), x)
    assert g.shape == x.shape and float(g.abs().sum()) > 0


def test_as_model_fn_wraps_only_collaborations(net):
    clf = net.as_classifier()
    assert as_model_fn(clf) is clf  # an adapter stays as it is
    plain = nn.Linear(3, 10)
    assert as_model_fn(plain) is plain  # so does any classifier
    assert isinstance(as_model_fn(net), CollaborationLogits) and as_model_fn(net).selection == "hard"
    assert isinstance(as_model_fn(net, "ensemble"), EnsembleLogits)


# the attacks of the registry that take a classifier, each with a small budget
CLASSIFIER_ATTACKS = {
    "pgd": dict(config=PGDConfig(steps=2, restarts=2)),
    "apgd": dict(steps=3, restarts=1),
    "square": dict(n_queries=20),
    "mi-pgd": dict(config=TransferConfig(steps=2, mi_restarts=1)),
    "m-di2-fgsm": dict(config=TransferConfig(steps=2)),
}


@pytest.mark.parametrize("name", CLASSIFIER_ATTACKS)
def test_an_attack_given_a_collaboration_attacks_its_algorithm_2_decision(net, data, name):
    """``ATTACKS[name](collaboration, ...)`` is the same attack as on ``as_classifier()`` (it used
    to fail with "'tuple' object has no attribute 'argmax'")."""
    x, y = data
    kw = CLASSIFIER_ATTACKS[name]
    got = ATTACKS[name](net, x, y, EPS, generator=torch.Generator().manual_seed(3), **kw)
    want = ATTACKS[name](net.as_classifier(), x, y, EPS, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(got.x_adv, want.x_adv)
    if want.correct is not None:  # the transfer attacks judge nothing
        assert torch.equal(got.correct, want.correct)
        # and what they judge is the collaboration's answer at the returned points
        assert not bool((got.correct & ~predict_correct(net.as_classifier(), got.x_adv, y)).any())


def test_an_attack_can_target_another_rule_through_the_adapter(net, data):
    x, y = data
    r = ATTACKS["pgd"](net.as_ensemble_classifier(), x, y, EPS, config=PGDConfig(steps=2, restarts=1),
                       generator=torch.Generator().manual_seed(0))
    assert r.x_adv.shape == x.shape and r.correct.shape == y.shape


@pytest.mark.parametrize("adapter", ["as_classifier", "as_ensemble_classifier"])
def test_torchattacks_pgd_runs_on_the_adapter(net, data, adapter):
    """Another library's attack, unchanged, on the adapter: points in the ball and the box that
    raise the classifier's loss."""
    torchattacks = pytest.importorskip("torchattacks")
    x, y = data
    clf = getattr(net, adapter)()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # torchattacks draws its random start from the global RNG
        x_adv = torchattacks.PGD(clf, eps=EPS, alpha=2 / 255, steps=5)(x, y)
    assert x_adv.shape == x.shape
    assert float((x_adv - x).abs().max()) <= EPS + 1e-6
    assert bool(((x_adv >= 0) & (x_adv <= 1)).all())
    with torch.no_grad():
        assert float(F.cross_entropy(clf(x_adv), y)) > float(F.cross_entropy(clf(x), y))
