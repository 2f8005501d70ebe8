"""A new rule is one record: a toy weighting and a toy attack family, registered here only (and
removed after each test), are known to ``cda2 train --help`` / ``cda2 eval --help``, to
``TrainConfig`` / ``EvalConfig`` validation and to training and evaluation through the command
line, with no other edit to the package."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Tuple

import pytest
import torch
from torch import Tensor

from cda2_ext.evaluation.context import EvalContext, Outcome
from cda2_ext.evaluation.family import FAMILIES, AttackFamily, FamilyParam
from cda2_ext.evaluation.rows import Role, Row
from cda2_ext.registry import Registry
from cda2_ext.training.weighting import WEIGHTINGS, LabelPath, Weighting

from helpers import one_line_error, run_cli, tiny_train

TOY = "hardmin"


def _hardmin(path: LabelPath) -> Tuple[Tensor, Tensor, Tensor]:
    """Each sample trains only the sub-model with the lowest cross-entropy (no parameters)."""
    ce = path.fused().ce
    w = torch.nn.functional.one_hot(ce.detach().argmin(0), ce.shape[0]).T.to(ce.dtype)
    return (w * ce).sum(0).mean(), ce, w


def registered(registry: Registry, record: Any) -> Iterator[str]:
    """``record`` in ``registry`` for one test (a fixture's body): removed however it ends."""
    registry.add(record)
    try:
        yield record.name
    finally:
        registry.remove(record.name)


def help_text(command: str, capsys) -> str:
    """``cda2 COMMAND --help`` with argparse's line wrapping undone."""
    from cda2_ext.cli import main
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.fixture
def toy_weighting() -> Iterator[str]:
    """The toy weighting, registered for one test."""
    yield from registered(WEIGHTINGS, Weighting(
        TOY, "a test's toy: each sample trains its best sub-model only", "a test's toy", (), _hardmin))


def test_help_lists_the_toy_weighting(toy_weighting, capsys):
    out = help_text("train", capsys)
    assert f"{TOY} (a test's toy: each sample trains its best sub-model only)" in out


def test_validation_knows_the_toy_weighting(toy_weighting, tmp_path, capsys):
    run = str(tmp_path / "run")
    rc, err = run_cli(["train", *tiny_train(weights="nope", out_dir=run)], capsys)
    assert rc == 2
    one_line_error(err, "weights: must be one of", f"'{TOY}'")
    # the toy reads no parameter: each weighting parameter must keep its default with it
    rc, err = run_cli(["train", *tiny_train(weights=TOY, sigma=2.0, out_dir=run)], capsys)
    assert rc == 2
    one_line_error(err, f"sigma: is not read with weights '{TOY}'")
    rc, err = run_cli(["train", *tiny_train(weights=TOY, temp_c=2.0, out_dir=run)], capsys)
    assert rc == 2
    one_line_error(err, f"temp_c: is not read with weights '{TOY}'")
    assert not Path(run).exists()  # refused before anything was written


def test_train_and_evaluate_with_the_toy_weighting(toy_weighting, tmp_path, capsys):
    run = tmp_path / "run"
    rc, err = run_cli(["train", *tiny_train(weights=TOY, out_dir=str(run))], capsys)
    assert rc == 0, err
    meta = json.loads((run / "checkpoint.json").read_text())
    assert meta["config"]["weights"] == TOY
    hist = json.loads((run / "metrics.json").read_text())
    assert hist  # an epoch was trained and recorded
    rc, err = run_cli(["eval-clean", str(run), "--out", str(tmp_path / "clean.json")], capsys)
    assert rc == 0, err
    assert "collaboration" in json.loads((tmp_path / "clean.json").read_text())


def test_the_toy_is_gone_after_its_test():
    assert TOY not in WEIGHTINGS


# ----- a toy attack family -------------------------------------------------------------------------
NOISE = "noise"


def _run_noise(ctx: EvalContext, eps: float):
    """Uniform noise in the eps ball, ``tries`` draws per image: robust only if every draw is
    still classified correctly (a query attack: its row is black-box)."""
    tries = ctx.cfg.option(NOISE, "tries")
    row = Row(NOISE, Role.BLACK_BOX, f"noise x{tries}", "noise")
    out = []
    for name, target in ctx.targets.items():
        oks = []
        for b, s in ctx.batches:
            g = ctx.generator(NOISE, eps, b)
            x, y = ctx.x[s], ctx.y[s]
            ok = torch.ones_like(y, dtype=torch.bool)
            with torch.no_grad():
                for _ in range(tries):
                    d = (torch.rand(x.shape, generator=g) * 2 - 1).to(x.device) * eps
                    ok &= target((x + d).clamp(0, 1)).argmax(1) == y
            oks.append(ok.cpu())
        out.append(Outcome(name, row, torch.cat(oks), {"tries": tries}))
    return out


@pytest.fixture
def toy_family() -> Iterator[str]:
    """The toy attack family (not in ``--attack all``), registered for one test."""
    yield from registered(FAMILIES, AttackFamily(
        NOISE, _run_noise, "a test's toy: uniform noise in the ball", in_all=False, details=True,
        params=(FamilyParam("tries", 3, "noise draws per image", high=50),)))


def test_eval_help_lists_the_toy_family(toy_family, capsys):
    out = help_text("eval", capsys)
    assert f"{NOISE}: a test's toy: uniform noise in the ball" in out
    assert "--noise-tries NOISE_TRIES noise: noise draws per image (default: 3)" in out
    assert "but the optional autoattack, noise, run only when named" in out


def test_eval_validation_knows_the_toy_family(toy_family, tmp_path, capsys):
    from cda2_ext.evaluation import EvalConfig
    assert EvalConfig().options[NOISE] == {"tries": 3}  # its default, stored with every config
    assert NOISE not in EvalConfig().attacks  # not in_all
    with pytest.raises(ValueError, match=r"^noise_tries \(--noise-tries\): must be an integer in "
                                         r"\[1, 50\], got 0$"):
        EvalConfig(options={NOISE: {"tries": 0}})
    rc, err = run_cli(["eval", "--checkpoint", str(tmp_path / "none"), "--attack", NOISE,
                       "--noise-tries", "51", "--out", str(tmp_path / "e")], capsys)
    assert rc == 2
    one_line_error(err, "noise_tries (--noise-tries): must be an integer in [1, 50], got 51")
    assert not (tmp_path / "e").exists()


def test_train_and_evaluate_with_the_toy_family(toy_family, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "eval"
    rc, err = run_cli(["train", *tiny_train(out_dir=str(run))], capsys)
    assert rc == 0, err
    rc, err = run_cli(["eval", "--checkpoint", str(run), "--attack", "pgd", NOISE, "--noise-tries",
                       "2", "--eps", "0.02", "--steps", "1", "--restarts", "1", "--n-samples", "8",
                       "--sanity-eps", "0", "--device", "cpu", "--no-progress", "--out", str(out)],
                      capsys)
    assert rc == 0, err
    rep = json.loads((out / "robustness.json").read_text())
    assert rep["config"]["attacks"] == ["pgd", NOISE]
    assert rep["config"]["options"][NOISE] == {"tries": 2}
    acc = rep["robust_accuracy"]["run"]
    assert "noise x2" in acc and set(acc["noise x2"]) == {"0.02"}
    # the toy's row joins the worst case and the black-box check like a built-in one
    assert acc["worst case (all attacks)"]["0.02"] <= acc["noise x2"]["0.02"]
    assert rep["details"][NOISE]["run"]["0.02"] == {"tries": 2}
    assert any("noise" in c for c in rep["checks"])


def test_the_toy_family_is_gone_after_its_test():
    from cda2_ext.evaluation import EvalConfig
    assert NOISE not in FAMILIES and NOISE not in EvalConfig().options


def test_a_command_parser_built_before_a_record_is_rebuilt_after_it():
    """Jobs cache their parser; registering a record must invalidate it, or a family added after
    the first job was built would be unknown to validation and ``--help``."""
    from cda2_ext.jobs.evaluate import EvalJob
    EvalJob.of(n_samples=5)  # builds (and caches) the parser without the toy
    toy = registered(FAMILIES, AttackFamily(NOISE, _run_noise, "toy", in_all=False,
                                            params=(FamilyParam("tries", 3, "draws"),)))
    next(toy)
    try:
        job = EvalJob.of(checkpoint=["r"], attack=[NOISE], noise_tries=4)
        assert job.config().option(NOISE, "tries") == 4
    finally:
        next(toy, None)  # runs the generator's cleanup
    assert NOISE not in FAMILIES
    with pytest.raises(ValueError, match="no option 'noise_tries'"):
        EvalJob.of(noise_tries=4)
