"""Fuzzing the CIFAR-10 batch reader: every damaged file is a clean load or one DataError line.

Seeded mutations of small, valid batch pickles (protocol 2 as Python 3 writes it, and protocol 4
as the shared subset is written). Most mutations aim at the pickle's structure (opcodes and their
length fields, found with ``pickletools``) rather than the image bytes, where any value is valid.
A few hundred cases take well under a second or two.
"""
from __future__ import annotations

import pickle
import pickletools
import random
import time
from pathlib import Path

import numpy as np
import pytest

from cda2_ext.data import DataError, load_cifar10

N_CASES = 300


def _base(protocol: int) -> bytes:
    rng = np.random.default_rng(protocol)
    obj = {b"batch_label": b"fuzz", b"labels": [int(v) for v in rng.integers(0, 10, 3)],
           b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
           b"filenames": [b"a.png", b"b.png", b"c.png"]}
    return pickle.dumps(obj, protocol=protocol)


def _mutate(blob: bytes, rng: random.Random) -> bytes:
    """One seeded mutation, mostly at an opcode or its argument bytes."""
    b = bytearray(blob)
    spots = [pos for _, _, pos in pickletools.genops(blob)]
    at = rng.choice(spots) + rng.randrange(0, 9) if rng.random() < 0.8 else rng.randrange(len(b))
    at = min(at, len(b) - 1)
    kind = rng.randrange(6)
    if kind == 0:                                   # one flipped bit
        b[at] ^= 1 << rng.randrange(8)
    elif kind == 1:                                 # one random byte
        b[at] = rng.randrange(256)
    elif kind == 2:                                 # a huge length / index / integer
        b[at:at + 4] = rng.choice([b"\xff\xff\xff\x7f", b"\xff\xff\xff\xff", b"\x00\x00\x00\x80"])
    elif kind == 3:                                 # truncated
        del b[at:]
    elif kind == 4:                                 # bytes inserted
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
    else:                                           # a chunk duplicated
        n = rng.randrange(1, 64)
        b[at:at] = b[max(0, at - n):at]
    return bytes(b)


def test_fuzzed_batches_load_cleanly_or_fail_with_one_line(tmp_path: Path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    target = folder / "test_batch"
    bases = [_base(2), _base(4)]
    rng = random.Random(20261126)
    outcomes = {"loaded": 0, "refused": 0}
    t0 = time.perf_counter()
    for case in range(N_CASES):
        blob = _mutate(bases[case % 2], rng)
        target.write_bytes(blob)
        try:
            s = load_cifar10(folder, "test")
        except DataError as err:
            msg = str(err)
            assert "\n" not in msg and str(target) in msg, (case, msg)
            outcomes["refused"] += 1
        else:  # a mutation the format tolerates must still give a well-formed set
            assert s.images.shape[1:] == (3, 32, 32) and len(s) == s.labels.shape[0], case
            assert len(s) == 0 or 0 <= int(s.labels.min()) <= int(s.labels.max()) <= 9, case
            outcomes["loaded"] += 1
    assert outcomes["refused"] > N_CASES // 3, outcomes  # the mutations did reach the structure
    assert time.perf_counter() - t0 < 20, "the reader should refuse damaged files quickly"


@pytest.mark.parametrize("protocol", [2, 4])
def test_unmutated_bases_load(tmp_path: Path, protocol: int):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(_base(protocol))
    assert len(load_cifar10(folder, "test")) == 3
