"""Data parallelism: a 2-process gloo run (torchrun, CPU) follows a 1-process run of the same
global batch; the cross-process BatchNorm matches BatchNorm over the whole batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cda2_ext.training.distributed import DistContext, SyncBatchNorm2d, convert_sync_batchnorm
from helpers import free_port, tiny_train

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(tmp_path: Path, world: int, sync: bool) -> dict:
    out = tmp_path / f"w{world}_{sync}.json"
    args = [str(WORKER), str(out), "sync" if sync else "local"]
    if world > 1:
        args = ["-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_processes_follow_one_process_with_the_same_global_batch(tmp_path):
    one = _run(tmp_path, 1, sync=True)
    two = _run(tmp_path, 2, sync=True)
    assert two["world_size"] == 2 and len(one["losses"]) == len(two["losses"]) == 3
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]),
                               rtol=1e-4, atol=1e-5)
    assert abs(two["param_sum"] - one["param_sum"]) <= 1e-3 * max(1.0, abs(one["param_sum"]))
    assert abs(two["param_norm"] - one["param_norm"]) <= 1e-4 * one["param_norm"]
    # and per-process BatchNorm (the default) is a different trajectory, not the same one
    local = _run(tmp_path, 2, sync=False)
    assert local["losses"][0] != pytest.approx(one["losses"][0], rel=1e-6)


@pytest.mark.slow
def test_cda2_train_under_torchrun_ends_cleanly(tmp_path):
    # The CLI path: from_environment() picks the backend, Trainer.close() ends the job. Every
    # rank must exit 0 (a process group left to interpreter shutdown can abort with SIGABRT).
    run = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "cda2_ext.cli", "train",
         *tiny_train(depth=8, batch_size=8, test_limit=None, sync_bn=True), "--out-dir", str(run)],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["epochs"] == 1  # rank 0 alone prints
    assert (run / "metrics.json").is_file()


def test_sync_batchnorm_conversion_keeps_parameters_and_statistics():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.normal_(), bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    ref = torch.nn.BatchNorm2d(6)
    ref.load_state_dict(bn.state_dict())
    sync = convert_sync_batchnorm(torch.nn.Sequential(bn))[0]
    assert isinstance(sync, SyncBatchNorm2d) and sync.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(4, 6, 5, 5)
    for mode in (True, False):  # alone, both modes are plain BatchNorm
        sync.train(mode), ref.train(mode)
        torch.testing.assert_close(sync(x), ref(x))
    torch.testing.assert_close(sync.running_var, ref.running_var)


def test_shards_are_contiguous_equal_slices():
    t = torch.arange(8)
    assert DistContext(1, 2).shard(t).tolist() == [4, 5, 6, 7]
    assert DistContext().shard(t) is t
    with pytest.raises(ValueError, match="equal shards"):
        DistContext(0, 3).shard(t)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        DistContext(0, 3).check_batch(8)
