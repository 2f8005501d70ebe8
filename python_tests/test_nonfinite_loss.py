"""A non-finite training loss: ``--on-nonfinite stop`` (the default) stops with one line naming the
epoch and step and keeps the last good checkpoint, never a NaN one; ``skip`` skips the batch and
counts it in the epoch's metrics.

(That a skipped update changes nothing, and the check without a host read: ``test_sync_free.py``.)
"""
from __future__ import annotations

import json

import pytest
import torch

from cda2_ext.cli import main
from cda2_ext.errors import NonFiniteLossError
from cda2_ext.storage.checkpoint import checkpoint_files, load_checkpoint
from helpers import TINY_TRAIN, only_error_line, poison_first_batch, tiny_config, tiny_trainer


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path / "run", epochs=2)
    tr = tiny_trainer(cfg)

    def poison(step, losses):  # after epoch 2's first step, the weights go bad
        if tr.epoch == 1 and step == 0:
            with torch.no_grad():
                next(tr.model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, step 2 of 2") as e:
        tr.fit(poison)
    assert "\n" not in str(e.value) and "checkpoint of epoch 1" in str(e.value)
    tensors, meta = load_checkpoint(cfg.out_dir)
    assert meta["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


@pytest.mark.slow
def test_the_cli_stops_with_one_line_and_writes_no_nan_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY_TRAIN, "--lr", "1e30", "--out-dir", str(out)]) == 2
    only_error_line(capsys, "loss is nan at epoch 1, step", "--on-nonfinite skip")
    assert not checkpoint_files(out)[0].exists()


def test_skip_mode_skips_and_counts_non_finite_batches(tmp_path, monkeypatch):
    poison_first_batch(monkeypatch)
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 1 of 2"):
        tiny_trainer(tiny_config(tmp_path / "stop")).fit()
    poison_first_batch(monkeypatch)
    tr = tiny_trainer(tiny_config(tmp_path / "skip", on_nonfinite="skip"))
    history = tr.fit()
    assert history[0]["skipped_steps"] == 1
    assert json.loads((tmp_path / "skip" / "metrics.json").read_text())[0]["skipped_steps"] == 1
    state = tr.model.state_dict().values()  # BatchNorm statistics untouched by the NaN batch
    assert all(torch.isfinite(t).all() for t in state if t.is_floating_point())
