"""The attacks' one face: the registry of named attacks, the one result type, the adaptive
attacks registered by name, and configuration errors that name their field.

Tiny models and budgets (a depth-2 collaboration on 16x16 images, one or two steps), so the file
runs in seconds on a CPU.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from cda2_ext.attacks.adaptive import (ADAPTIVE_ATTACKS, ADAPTIVE_REGISTRY, DECISION_ATTACKS,
                                       AdaptiveConfig, AdaptiveSetting, adaptive_attack,
                                       adaptive_attacks)
from cda2_ext.attacks.autoattack import AutoAttackResult, autoattack
from cda2_ext.attacks.engine import AttackResult, merge_worst
from cda2_ext.attacks.registry import ATTACKS, get_attack
from cda2_ext.attacks.square import SquareResult
from cda2_ext.attacks.transfer import TRANSFER_METHODS, TransferConfig
from cda2_ext.attacks.whitebox import CollaborationLogits, EnsembleLogits, PGDConfig, pgd_attack
from cda2_ext.errors import Cda2Error, ConfigError
from cda2_ext.evaluation import EvalConfig, select_subset
from cda2_ext.models import Collaboration

EPS = 0.03
SMALL = AdaptiveConfig(steps=1, apgd_steps=2, decision_targets=1, temperatures=(1.0,))


def hard_answer(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Algorithm 2's answer, which every attack on a collaboration is judged by."""
    with torch.no_grad():
        return CollaborationLogits(net)(x).argmax(-1)


@pytest.fixture(scope="module")
def tiny():
    """An untrained 3-sub-model depth-2 collaboration and 4 images labelled as it answers."""
    torch.manual_seed(0)
    net = Collaboration(num_models=3, depth=2).eval()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return net, x, hard_answer(net, x)


def in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> bool:
    return bool((x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1)


# ----- the registry ---------------------------------------------------------------------------------
def test_the_registry_names_every_attack_once():
    assert list(ATTACKS) == ["pgd", "apgd", *TRANSFER_METHODS, "square", "autoattack",
                             *ADAPTIVE_ATTACKS]
    assert ATTACKS["autoattack"] is autoattack and ATTACKS["pgd"] is pgd_attack
    with pytest.raises(TypeError):
        ATTACKS["mine"] = pgd_attack  # read-only: a new attack is an entry in the module
    with pytest.raises(ConfigError, match=r"^attack: unknown 'pgd-l2'"):
        get_attack("pgd-l2")
    assert get_attack("square") is ATTACKS["square"]


def _options(name: str):
    """What each registered attack needs beside the uniform arguments: tiny budgets."""
    if name == "pgd":
        return {"config": PGDConfig(steps=1, restarts=1)}
    if name == "apgd":
        return {"steps": 2}
    if name in TRANSFER_METHODS:
        return {"config": TransferConfig(steps=1), "generator": torch.Generator().manual_seed(0)}
    if name == "square":
        return {"n_queries": 5, "generator": torch.Generator().manual_seed(0)}
    return {"config": SMALL, "seed": 0}


@pytest.mark.parametrize("name", [n for n in ATTACKS if n != "autoattack"])
def test_every_registered_attack_has_the_one_face(tiny, name):
    """``ATTACKS[name](model, x, y, eps, **options)`` returns an AttackResult in the ball:
    folded and judged for every attack but the transfer methods, whose variants are unjudged."""
    net, x, y = tiny
    model = {"pgd": CollaborationLogits(net), "apgd": CollaborationLogits(net),
             "square": CollaborationLogits(net)}.get(name, net)
    if name in TRANSFER_METHODS:  # a surrogate with residual blocks (SGM needs them)
        model = EnsembleLogits(Collaboration(num_models=1, depth=8).eval())
    r = ATTACKS[name](model, x, y, EPS, **_options(name))
    assert isinstance(r, AttackResult), name
    assert in_ball(r.x_adv, x, EPS), name
    if name in TRANSFER_METHODS:
        assert r.x_adv.shape[1:] == x.shape and r.margin is None and r.correct is None
        with pytest.raises(ValueError, match="no evaluated model"):
            r.worst()
    else:
        assert r.x_adv.shape == x.shape, name
        assert r.correct.shape == r.margin.shape == y.shape, name
        assert torch.equal(hard_answer(net, r.x_adv) == y, r.correct), name  # judged there


@pytest.mark.parametrize("name", ["bpda", "decision-targeted", "apgd-ce", "soft"])
def test_a_registered_adaptive_attack_is_its_row_of_the_suite(tiny, name):
    """One attack by name equals the same attack inside :func:`adaptive_attacks` (same seeds);
    ``soft`` is the per-sample worst case over its temperatures."""
    net, x, y = tiny
    eps = 0.01
    alone = ATTACKS[name](net, x, y, eps, config=SMALL, seed=7, only_correct=False)
    suite = adaptive_attacks(net, x, y, eps, SMALL, seed=7, only_correct=False)
    expect = (merge_worst([r for k, r in suite.items() if k.startswith("soft(")])
              if name == "soft" else suite[name])
    assert torch.equal(alone.x_adv, expect.x_adv)
    assert torch.equal(alone.correct, expect.correct)
    assert torch.equal(alone.margin, expect.margin)
    assert torch.equal(adaptive_attack(net, x, y, eps, SMALL, attack=name, seed=7,
                                       only_correct=False).x_adv, expect.x_adv)


# ----- the adaptive attacks, registered by name -----------------------------------------------------
def test_the_adaptive_registry_is_the_adaptive_attack_list():
    assert tuple(ADAPTIVE_REGISTRY) == ADAPTIVE_ATTACKS == (
        "soft", "submodels", "ppd-push", "bpda", "apgd-ce", "apgd-dlr", *DECISION_ATTACKS)
    cfg = AdaptiveConfig(steps=3, restarts=2, apgd_steps=5, apgd_restarts=4)
    for name, attack in ADAPTIVE_REGISTRY.items():
        assert attack.apgd == name.startswith("apgd-"), name
        assert cfg.budget(name) == ((5, 4) if attack.apgd else (3, 2)), name


def test_each_adaptive_attack_plans_its_runs(tiny):
    """What the registry entries make of one call's setting: labels, copies and seed keys."""
    net, x, y = tiny
    cfg = dataclasses.replace(SMALL, decision_targets=2).validate()
    temps = cfg.choose_temperatures(0.5)
    s = AdaptiveSetting(net, x, y, EPS, cfg, temps, CollaborationLogits(net), seed=0,
                        backend=CollaborationLogits(net).backend)
    runs = {name: ADAPTIVE_REGISTRY[name].runs(s, name) for name in ADAPTIVE_ATTACKS}
    assert [r.label for r in runs["soft"]] == ["soft(T=gap)", "soft(T=0.25*gap)", "soft(T=1)"]
    # a scale-relative temperature draws its starts by its label, a fixed one by its old key
    assert [r.seed_key for r in runs["soft"]] == ["soft(T=gap)", "soft(T=0.25*gap)", "soft1.0"]
    for name in ADAPTIVE_ATTACKS[1:]:
        assert [r.label for r in runs[name]] == [name] and runs[name][0].seed_key is None
    copies = {name: rs[0].copies for name, rs in runs.items() if name != "soft"}
    assert copies == {"submodels": 3, "ppd-push": 3, "bpda": 1, "apgd-ce": 1, "apgd-dlr": 1,
                      "decision": 1, "decision-targeted": 6, "apgd-decision": 1,
                      "apgd-decision-targeted": 6}  # M = 3 sub-models x 2 wrong classes
    idx = torch.tensor([0, 2])
    loss, logits = runs["decision-targeted"][0].objective(idx)(x[idx].expand(6, -1, -1, -1, -1))
    assert loss.shape == (6, 2) and logits.shape == (6, 2, 10)


# ----- one result type ------------------------------------------------------------------------------
def _extra_fields(cls: type) -> set:
    return {f.name for f in dataclasses.fields(cls)} - {f.name for f in dataclasses.fields(AttackResult)}


def test_results_that_know_more_only_add_to_the_one_type(tiny):
    assert issubclass(SquareResult, AttackResult) and issubclass(AutoAttackResult, AttackResult)
    assert _extra_fields(SquareResult) == {"queries", "out_of_budget"}
    assert _extra_fields(AutoAttackResult) == {"flags", "seconds"}
    net, x, y = tiny
    hard = CollaborationLogits(net)
    sq = ATTACKS["square"](hard, x, y, EPS, n_queries=5, generator=torch.Generator().manual_seed(0))
    pgd = ATTACKS["pgd"](hard, x, y, EPS, config=PGDConfig(steps=1, restarts=1))
    both = merge_worst([pgd, sq])  # any two results of the same samples combine
    assert torch.equal(both.correct, pgd.correct & sq.correct)


# ----- configuration errors name their field --------------------------------------------------------
@pytest.mark.parametrize("make, field", [
    (lambda: EvalConfig(attacks=("pgd", "nope")), "attacks"),
    (lambda: EvalConfig(eps=(0.01, 2.0)), "eps"),
    (lambda: EvalConfig(options={"square": {"eps": (-0.1,)}}), "square_eps"),
    (lambda: EvalConfig(options={"square": {"eps": ()}}), "square_eps"),
    (lambda: EvalConfig(options={"square": {"p_init": 1.5}}), "square_p_init"),
    (lambda: EvalConfig(options={"square": {"nope": 1}}), "options"),
    (lambda: EvalConfig(options={"nope": {}}), "options"),
    (lambda: EvalConfig(options={"square": "x"}), "options"),
    (lambda: EvalConfig(options={"square": {"queries": "5"}}), "square_queries"),
    (lambda: EvalConfig(options={"square": {"eps": 0.1}}), "square_eps"),
    (lambda: EvalConfig(n_samples=0), "n_samples"),
    (lambda: EvalConfig(batch_size=0), "batch_size"),
    (lambda: EvalConfig(options={"square": {"queries": 0}}), "square_queries"),
    (lambda: EvalConfig(subset="random"), "subset"),
    (lambda: EvalConfig(pgd=PGDConfig(restarts=0)), "pgd.restarts"),
    (lambda: EvalConfig(adaptive=AdaptiveConfig(steps=-1)), "adaptive.steps"),
    (lambda: EvalConfig(transfer=TransferConfig(mi_restarts=0)), "transfer.mi_restarts"),
    (lambda: PGDConfig(steps=-1), "pgd.steps"),
    (lambda: PGDConfig(loss="l2"), "pgd.loss"),
    (lambda: AdaptiveConfig(attacks=("soft", "nope")), "adaptive.attacks"),
    (lambda: AdaptiveConfig(temperature_fractions=(-1.0,)), "adaptive.temperature_fractions"),
    (lambda: AdaptiveConfig(temperatures=(0.0,)), "adaptive.temperatures"),
    (lambda: AdaptiveConfig(bpda_temperature=float("nan")), "adaptive.bpda_temperature"),
    (lambda: AdaptiveConfig(decision_targets=0), "adaptive.decision_targets"),
    (lambda: AdaptiveConfig(apgd_restarts=0), "adaptive.apgd_restarts"),
    (lambda: AdaptiveConfig(loss="l2"), "adaptive.loss"),
    (lambda: TransferConfig(methods=()), "transfer.methods"),
    (lambda: TransferConfig(losses=("ce", "dlr")), "transfer.losses"),
    (lambda: TransferConfig(steps=-1), "transfer.steps"),
    (lambda: TransferConfig(di_prob=1.5), "transfer.di_prob"),
    (lambda: TransferConfig(di_resize=0.5), "transfer.di_resize"),
])
def test_config_errors_are_config_errors_naming_the_field(make, field):
    # a family parameter's error also names the cda2 eval option: "square_queries (--queries): "
    with pytest.raises(ConfigError, match=rf"^{field}( \(--[a-z-]+\))?: ") as info:
        make().validate()
    assert isinstance(info.value, ValueError) and isinstance(info.value, Cda2Error)
    assert "\n" not in str(info.value)


def test_preset_subset_and_attack_options_raise_config_errors():
    with pytest.raises(ConfigError, match=r"^transfer.preset: "):
        TransferConfig.preset("table9")
    with pytest.raises(ConfigError, match=r"^subset: "):
        select_subset(100, 10, 0, "dvergee")

    class NeverCalled(nn.Module):
        def forward(self, x):  # pragma: no cover - the point is that it is not reached
            raise AssertionError("the model ran before the configuration was checked")

    x, y = torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ConfigError, match=r"^pgd.restarts: "):
        pgd_attack(NeverCalled(), x, y, 0.1, PGDConfig(restarts=0))
