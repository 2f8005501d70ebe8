"""A new rule is one record: a toy weighting, registered here only (and removed after each
test), is known to ``cda2 train --help``, to ``TrainConfig`` validation and to training and
evaluation through the command line, with no other edit to the package."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Tuple

import pytest
import torch
from torch import Tensor

from cda2_ext.training.weighting import WEIGHTINGS, LabelPath, Weighting

from helpers import one_line_error, run_cli, tiny_train

TOY = "hardmin"


def _hardmin(path: LabelPath) -> Tuple[Tensor, Tensor, Tensor]:
    """Each sample trains only the sub-model with the lowest cross-entropy (no parameters)."""
    ce = path.fused().ce
    w = torch.nn.functional.one_hot(ce.detach().argmin(0), ce.shape[0]).T.to(ce.dtype)
    return (w * ce).sum(0).mean(), ce, w


@pytest.fixture
def toy_weighting() -> Iterator[str]:
    """The toy weighting, registered for one test."""
    WEIGHTINGS.add(Weighting(TOY, "a test's toy: each sample trains its best sub-model only",
                             "a test's toy", (), _hardmin))
    try:
        yield TOY
    finally:
        WEIGHTINGS.remove(TOY)


def test_help_lists_the_toy_weighting(toy_weighting, capsys):
    from cda2_ext.cli import main
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
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
