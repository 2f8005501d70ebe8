"""CIFAR-10 loading (shared subset when present), safety checks (damaged batch files: one line,
never a huge allocation), augmentation, XOR data, and the note about training on a subset."""
from __future__ import annotations

import hashlib
import os
import pickle
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cda2_ext import data as data_mod
from cda2_ext.data import (DATA_ENV, DataError, download_cifar10, load_cifar10, make_xor,
                           note_training_size, random_crop_flip, resolve_cifar10_dir,
                           synthetic_images)
from cda2_ext.training import TrainConfig, Trainer

SHARED = Path(__file__).resolve().parents[1].parent / "shared/data/cifar-10-batches-py"
needs_shared = pytest.mark.skipif(not (SHARED / "test_batch").is_file(),
                                  reason=f"shared CIFAR-10 subset not found at {SHARED}")


def _write_batch(path: Path, n: int = 4, label: int = 3) -> None:
    obj = {b"data": np.zeros((n, 3072), np.uint8), b"labels": [label] * n}
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _fake_folder(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        _write_batch(folder / f"data_batch_{i}")
    _write_batch(folder / "test_batch")
    return folder


@needs_shared
def test_shared_subset_loads():
    train, test = load_cifar10(SHARED, "train"), load_cifar10(SHARED.parent, "test")
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, 32, 32)
    assert len(train) == train.labels.shape[0] and len(test) > 0
    assert 0 <= int(train.labels.min()) and int(train.labels.max()) <= 9
    assert len(torch.unique(train.labels)) == 10


def test_fake_folder_env_var_and_parent(tmp_path, monkeypatch):
    folder = _fake_folder(tmp_path)
    assert resolve_cifar10_dir(tmp_path) == folder      # the parent works too
    monkeypatch.setenv(DATA_ENV, str(folder))
    s = load_cifar10(split="train")
    assert len(s) == 20 and s.labels.dtype == torch.int64 and int(s.labels[0]) == 3


def test_missing_folder_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="CIFAR-10 not found"):
        load_cifar10(tmp_path / "nope")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "also-nope"))
    with pytest.raises(DataError, match="CDA2_DATA"):
        load_cifar10()


def test_corrupt_and_missing_files(tmp_path):
    folder = _fake_folder(tmp_path)
    (folder / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match="corrupt.*data_batch_3"):
        load_cifar10(folder, "train")
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing.*data_batch_3"):
        load_cifar10(folder, "train")
    _write_batch(folder / "test_batch", label=42)
    with pytest.raises(DataError, match="labels outside"):
        load_cifar10(folder, "test")


def test_pickles_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    folder = _fake_folder(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DataError, match="not allowed"):
        load_cifar10(folder, "test")
    assert not (tmp_path / "pwned").exists()


def test_download_verifies_md5(tmp_path):
    """Offline: a file:// 'download' whose checksum does not match is rejected, a matching one unpacked."""
    src = _fake_folder(tmp_path / "src")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    url = archive.as_uri()
    with pytest.raises(DataError, match="MD5"):
        download_cifar10(tmp_path / "dst", url=url)
    assert not (tmp_path / "dst" / "cifar-10-batches-py").exists()
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    folder = download_cifar10(tmp_path / "dst", url=url, md5=md5)
    assert len(load_cifar10(folder, "train")) == 20


def test_random_crop_flip_matches_manual_crop():
    x = torch.rand(6, 3, 8, 8)
    g = torch.Generator().manual_seed(7)
    offs = torch.randint(0, 9, (2, 6), generator=g)
    flips = torch.rand(6, generator=g) < 0.5
    out = random_crop_flip(x, generator=torch.Generator().manual_seed(7))
    xp = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for b in range(6):
        ref = xp[b, :, offs[0, b]:offs[0, b] + 8, offs[1, b]:offs[1, b] + 8]
        assert torch.equal(out[b], ref.flip(-1) if flips[b] else ref)
    assert torch.equal(random_crop_flip(x, pad=0, flip=False), x)


def test_xor_data():
    x, y = make_xor(4000, seed=1)
    assert x.shape == (4000, 2) and y.dtype == torch.int64 and int(y.sum()) == 2000
    prod = x[:, 0] * x[:, 1]
    assert ((prod > 0) == (y == 1)).float().mean() > 0.95  # label +1 <=> same-sign quadrants
    assert torch.equal(make_xor(10, seed=3)[0], make_xor(10, seed=3)[0])


def test_synthetic_images():
    s = synthetic_images(20, seed=0, size=16)
    assert s.images.shape == (20, 3, 16, 16) and s.images.dtype == torch.uint8
    assert not torch.equal(s.images, synthetic_images(20, seed=1, size=16).images)


# ----- damaged batch files (and test_data_fuzz.py) ------------------------------------------------
def _batch_folder(tmp_path: Path, blob: bytes) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir(exist_ok=True)
    (folder / "test_batch").write_bytes(blob)
    return folder


def test_a_huge_label_is_one_line(tmp_path):
    blob = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2 ** 70]}, protocol=2)
    with pytest.raises(DataError, match="test_batch.*integer labels"):
        load_cifar10(_batch_folder(tmp_path, blob), "test")


@pytest.mark.parametrize("opcode", [pickle.BINBYTES, pickle.BINUNICODE])
def test_a_length_field_is_not_believed_before_allocating(tmp_path, opcode):
    # PROTO 4, then a 4 GiB string whose bytes are not in the file: a reader that believed the
    # length would allocate 4 GiB
    blob = b"\x80\x04" + opcode + struct.pack("<I", 0xFFFFFFFF) + b"abc" + pickle.STOP
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="test_batch.*only 4 remain"):
        load_cifar10(_batch_folder(tmp_path, blob), "test")
    assert time.perf_counter() - t0 < 1


def test_a_huge_memo_index_is_refused(tmp_path):
    blob = b"\x80\x02" + pickle.EMPTY_DICT + pickle.LONG_BINPUT + struct.pack("<I", 0xFFFFFFF0) + pickle.STOP
    with pytest.raises(DataError, match="memo index"):
        load_cifar10(_batch_folder(tmp_path, blob), "test")


def test_an_array_reconstructed_with_a_huge_shape_is_refused(tmp_path):
    blob = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
            b"J\xff\xff\xff\x7f\x85U\x01b\x87R.")  # _reconstruct(ndarray, (2**31 - 1,), b"b")
    with pytest.raises(DataError, match="unexpected numpy array reconstruction"):
        load_cifar10(_batch_folder(tmp_path, blob), "test")


# ----- the note about training on a subset of CIFAR-10 --------------------------------------------
def test_subset_note_appears_once(monkeypatch, capsys):
    monkeypatch.setattr(data_mod, "_size_noted", False)
    monkeypatch.delenv("RANK", raising=False)
    assert note_training_size(50_000) is False  # the full set: nothing to say
    assert note_training_size(5085) is True
    assert note_training_size(5085) is False and note_training_size(100) is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "5,085" in err[0] and "50,000" in err[0] and "--download" in err[0]


def test_subset_note_only_on_rank_0(monkeypatch, capsys):
    monkeypatch.setattr(data_mod, "_size_noted", False)
    monkeypatch.setenv("RANK", "1")
    assert note_training_size(10) is False
    assert capsys.readouterr().err == ""


def test_subset_note_when_training_on_the_shared_subset(cifar_dir, tmp_path, monkeypatch, capsys):
    """The trainer notes the size it will train on (after --train-limit), once; images a caller
    hands it are the caller's business."""
    monkeypatch.setattr(data_mod, "_size_noted", False)
    monkeypatch.delenv("RANK", raising=False)
    cfg = TrainConfig(dataset="cifar10", data_dir=str(cifar_dir), num_models=2, depth=8,
                      eval_every=0, device="cpu", out_dir=str(tmp_path / "r"), train_limit=300)
    Trainer(cfg, train_set=synthetic_images(16, size=16), log=None)
    assert "note:" not in capsys.readouterr().err
    Trainer(cfg, log=None)
    Trainer(cfg, log=None)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "note:" in ln]
    assert len(lines) == 1 and "300" in lines[0] and "50,000" in lines[0]
