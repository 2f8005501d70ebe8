"""Shared pytest fixtures and markers for cda2_ext (plain helpers are in ``helpers.py``).

* ``gen`` -- a ``torch.Generator`` seeded per test: the seed mixes the test's node id with
  ``CDA2_TEST_SEED`` (default 0), so every test draws its own fresh inputs and a failure replays
  exactly; set ``CDA2_TEST_SEED`` to another integer to draw a different set.
* ``device`` -- ``"cpu"`` and ``"cuda"`` (as pytorch/extension-cpp's tests do): a test that takes it
  runs once per device, with the device in its id, so ``pytest -k cuda`` selects the CUDA cases.
  The CUDA case is skipped without a GPU or without the extension's CUDA kernels; with
  ``CDA2_REQUIRE_CUDA=1`` (the GPU job) it fails instead (as it does with
  ``CDA2_REQUIRE_EXTENSION=1`` on a GPU machine whose build lacks the CUDA kernels), so a CPU-only
  build or machine cannot pass as a green run of skips. ``cuda`` is the same for tests that only
  exist on CUDA.
* ``@pytest.mark.requires_extension`` -- for tests that only mean something against the compiled
  operators (fused vs reference comparisons, opcheck, torch.compile). Without the extension they
  are skipped, or FAIL when ``CDA2_REQUIRE_EXTENSION=1`` (CI sets it, so a broken build cannot pass
  as a green run of skips).
* ``@pytest.mark.slow`` (registered in pyproject.toml) -- CNN training and subprocess runs; CI runs
  them, ``-m "not slow"`` leaves them out of a quick local loop.
* ``trained`` -- the folder of a finished one-epoch run of ``helpers.TINY_TRAIN`` (through its
  library twin ``tiny_config``), trained once per session; ``run_copy`` -- a copy of it for the
  test to change (damage, resume, write into). Never change ``trained`` itself.
* ``cifar_dir`` -- the CIFAR-10 folder in ``shared/data``; the test is skipped when it is absent.
  When it is there, ``CDA2_DATA`` points at it for the whole session (subprocesses included): the
  library itself no longer looks beside the repository, only in ``--data``, ``$CDA2_DATA``,
  ``./data`` and the user's cache folder.
"""
from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import pytest
import torch

import cda2_ext
from helpers import (HAS_EXTENSION, REQUIRE_CUDA, REQUIRE_EXTENSION, cuda_missing, tiny_config,
                     tiny_trainer)

CIFAR_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/cifar-10-batches-py"
if (CIFAR_DIR / "data_batch_1").is_file():
    os.environ["CDA2_DATA"] = str(CIFAR_DIR)  # what the tests that load CIFAR-10 by default read


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires_extension: needs the compiled cda2_ext._C; skipped without it, "
        "failed without it when CDA2_REQUIRE_EXTENSION=1")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if HAS_EXTENSION or item.get_closest_marker("requires_extension") is None:
        return
    why = f"the compiled extension is not built ({cda2_ext.BUILD_INFO})"
    if REQUIRE_EXTENSION:
        pytest.fail(f"CDA2_REQUIRE_EXTENSION=1 but {why}", pytrace=False)
    pytest.skip(why)


def _use_cuda() -> str:
    why = cuda_missing()
    if not why:
        return "cuda"
    if REQUIRE_CUDA:
        pytest.fail(f"CDA2_REQUIRE_CUDA=1 but {why}", pytrace=False)
    if REQUIRE_EXTENSION and torch.cuda.is_available():  # a GPU, but the build left its kernels out
        pytest.fail(f"CDA2_REQUIRE_EXTENSION=1 but {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(params=["cpu", "cuda"])
def device(request: pytest.FixtureRequest) -> str:
    """The device a test's tensors live on (see the module docstring)."""
    return _use_cuda() if request.param == "cuda" else request.param


@pytest.fixture
def cuda() -> str:
    """``"cuda"``, for tests that only exist on CUDA (CUDA vs CPU kernels, streams)."""
    return _use_cuda()


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    base = int(os.environ.get("CDA2_TEST_SEED", "0"))
    seed = (zlib.crc32(request.node.nodeid.encode()) + 1_000_003 * base) % 2 ** 63
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    if not (CIFAR_DIR / "data_batch_1").is_file():
        pytest.skip(f"CIFAR-10 not found at {CIFAR_DIR}")
    return CIFAR_DIR


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch run of TINY_TRAIN (copy it before changing it: ``run_copy``)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    tiny_trainer(tiny_config(out)).fit()
    return out


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path) -> Path:
    """A copy of ``trained`` that the test may change."""
    return Path(shutil.copytree(trained, tmp_path / "run"))
