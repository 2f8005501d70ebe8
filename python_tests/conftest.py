"""Shared pytest fixtures for cda2_ext.

* ``gen`` -- a ``torch.Generator`` seeded per test: the seed mixes the test's node id with
  ``CDA2_TEST_SEED`` (default 0), so every test draws its own fresh inputs and a failure replays
  exactly; set ``CDA2_TEST_SEED`` to another integer to draw a different set.
* ``@pytest.mark.requires_extension`` -- for tests that only mean something against the compiled
  operators (fused vs reference comparisons, opcheck, torch.compile). Without the extension they
  are skipped, or FAIL when ``CDA2_REQUIRE_EXTENSION=1`` (CI sets it, so a broken build cannot pass
  as a green run of skips).
* ``cifar_dir`` -- the CIFAR-10 folder in ``shared/data``; the test is skipped when it is absent.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
import torch

import cda2_ext

HAS_EXTENSION = bool(cda2_ext.HAS_EXTENSION)
REQUIRE_EXTENSION = os.environ.get("CDA2_REQUIRE_EXTENSION", "") not in ("", "0")
CIFAR_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/cifar-10-batches-py"


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
