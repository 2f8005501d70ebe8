"""Image folders and zips of them as CIFAR-10 (``cda2_ext.data.image_folder``, ``cda2_ext.data``):
same images from a folder and its zip, the decode cache, one-line errors for bad input, the notes,
and where the data are looked for.

The sets are made here: a few 32x32 PNG images (lossless, so pixels can be checked exactly) per
class, whose first pixel encodes (class, index). One slow test reads the real
``shared/data/cifar-10-jpeg.zip`` when it is there.
"""
from __future__ import annotations

import io
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

import cda2_ext.data as data_mod
import cda2_ext.data.image_folder as imf
from cda2_ext.data import (CIFAR10_CLASSES, DATA_ENV, DataError, data_locations, data_note,
                           default_data_dir, download_dir, ensure_cifar10, load_cifar10,
                           load_image_folder, load_images, note_data_source, resolve_data)
from cda2_ext.data.image_folder import CACHE_ENV, cache_dir, read_image_folder

SHARED = Path(__file__).resolve().parents[1].parent / "shared/data"
JPEG_ZIP = SHARED / "cifar-10-jpeg.zip"
CLASSES = ("cat", "dog", "frog")  # written unsorted below: labels follow the sorted names
N_TRAIN, N_TEST = 4, 2


# ----- making sets --------------------------------------------------------------------------------

def _pixels(label: int, index: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(100 * label + index)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    arr[0, 0] = (label, index, 7)
    return arr


def _save(path: Path, arr: np.ndarray, fmt: str = "PNG", mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path, format=fmt)


def make_folder(root: Path, classes: Sequence[str] = CLASSES, n_train: int = N_TRAIN,
                n_test: int = N_TEST) -> Path:
    """``root/train/<class>/NNNN.png`` and ``root/test/...``; label = index in sorted(classes)."""
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in reversed(classes):
            for i in range(n):
                _save(root / split / cls / f"{i:04d}.png", _pixels(sorted(classes).index(cls), i))
    return root


def make_zip(folder: Path, path: Path, top: str = "", compression: int = zipfile.ZIP_STORED) -> Path:
    """A zip of ``folder``'s files (with their folder entries), under ``top/`` when given."""
    with zipfile.ZipFile(path, "w", compression) as z:
        for p in sorted(folder.rglob("*")):
            z.write(p, top + p.relative_to(folder).as_posix())
    return path


def expected_split(split: str, classes: Sequence[str] = CLASSES, n: int = 0) -> tuple:
    """Images and labels in the loader's round-robin order."""
    n = n or (N_TRAIN if split == "train" else N_TEST)
    order = [(label, i) for i in range(n) for label in range(len(classes))]
    images = np.stack([_pixels(label, i).transpose(2, 0, 1) for label, i in order])
    return images, np.array([label for label, _ in order])


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Every test has its own cache folder (never the user's)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture
def decodes(monkeypatch) -> list:
    """Counts the images decoded (a cache hit decodes none)."""
    calls: list = []
    real = imf._decode

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(imf, "_decode", counting)
    return calls


def one_line_error(fn: Callable[[], object], *names: str) -> str:
    """Call ``fn``: it must raise a one-line DataError naming each of ``names``."""
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and all(n in msg for n in names), msg
    return msg


# ----- loading ------------------------------------------------------------------------------------

def test_folder_and_zips_load_the_same_images_and_labels(tmp_path):
    folder = make_folder(tmp_path / "set")
    sources = [folder, make_zip(folder, tmp_path / "root.zip"),
               make_zip(folder, tmp_path / "top.zip", top="cifar/", compression=zipfile.ZIP_DEFLATED)]
    for split in ("train", "test"):
        want_images, want_labels = expected_split(split)
        for src in sources:
            got = read_image_folder(src, split)
            assert got.classes == tuple(sorted(CLASSES)), src
            assert np.array_equal(got.images, want_images), src
            assert np.array_equal(got.labels, want_labels), src
            assert got.images.dtype == np.uint8 and got.labels.dtype == np.int64


def test_round_robin_order_spreads_a_prefix_over_the_classes(tmp_path):
    """Unequal classes: the first images cover every class; the rest keep each class's order."""
    folder = make_folder(tmp_path / "set")
    for i in range(N_TRAIN, N_TRAIN + 3):  # 'dog' (label 1) has 3 more training images
        _save(folder / "train" / "dog" / f"{i:04d}.png", _pixels(1, i))
    labels = read_image_folder(folder, "train").labels.tolist()
    assert labels[:3] == [0, 1, 2] and labels[-3:] == [1, 1, 1] and labels.count(1) == N_TRAIN + 3


def test_jpeg_images_load_close_to_their_pixels(tmp_path):
    folder = make_folder(tmp_path / "set")
    smooth = np.kron(np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5, np.ones((8, 8, 1), np.uint8))
    (folder / "test" / "cat" / "0000.png").unlink()
    _save(folder / "test" / "cat" / "0000.jpg", smooth, fmt="JPEG")
    got = read_image_folder(folder, "test")
    assert np.abs(got.images[0].transpose(1, 2, 0).astype(int) - smooth).mean() < 6


def test_imageset_carries_source_and_note(tmp_path):
    folder = make_folder(tmp_path / "set")
    s = load_image_folder(folder, "train")
    assert isinstance(s.images, torch.Tensor) and s.images.shape == (12, 3, 32, 32)
    assert s.source == str(folder) and "image folder" in s.note and str(folder) in s.note
    sub = s.subset(5)
    assert len(sub) == 5 and sub.note == s.note and sub.source == s.source
    z = load_image_folder(make_zip(folder, tmp_path / "set.zip"), "test")
    assert "zip" in z.note and str(tmp_path / "set.zip") in z.note


def test_hidden_entries_are_ignored(tmp_path):
    folder = make_folder(tmp_path / "set")
    clean = read_image_folder(folder, "train", use_cache=False)
    (folder / "train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "train" / "cat" / "._0000.png").write_bytes(b"\0\5\26\7 AppleDouble")
    (folder / "train" / "dog" / "Thumbs.db").write_bytes(b"not an image")
    path = make_zip(folder, tmp_path / "set.zip")
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("__MACOSX/train/cat/._0000.png", b"resource fork")
        z.writestr("README.txt", b"beside train/ and test/: ignored")
    for src in (folder, path):
        got = read_image_folder(src, "train", use_cache=False)
        assert np.array_equal(got.images, clean.images) and got.classes == clean.classes


# ----- the cache ----------------------------------------------------------------------------------

def _cache_files(split: str = "train") -> list:
    return sorted((cache_dir() / "images").glob(f"*-{split}-*.bin"))


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_second_load_comes_from_the_cache(tmp_path, decodes, as_zip):
    folder = make_folder(tmp_path / "set")
    src = make_zip(folder, tmp_path / "set.zip") if as_zip else folder
    first = read_image_folder(src, "train")
    assert len(decodes) == 12 and len(_cache_files()) == 1
    decodes.clear()
    again = read_image_folder(src, "train")
    assert decodes == [] and np.array_equal(again.images, first.images)
    assert np.array_equal(again.labels, first.labels) and again.classes == first.classes
    read_image_folder(src, "train", use_cache=False)
    assert len(decodes) == 12


def test_changed_data_miss_the_cache_and_replace_it(tmp_path, decodes):
    folder = make_folder(tmp_path / "set")
    read_image_folder(folder, "train")
    new = _pixels(0, 99)
    path = folder / "train" / "cat" / "0000.png"
    _save(path, new)
    os.utime(path, ns=(1, 1))  # even a rewritten file with an old time: its size or time differs
    decodes.clear()
    got = read_image_folder(folder, "train")
    assert len(decodes) == 12 and np.array_equal(got.images[0], new.transpose(2, 0, 1))
    assert len(_cache_files()) == 1  # the stale one was removed


@pytest.mark.parametrize("damage", ["flip-pixel", "flip-label", "truncate", "extend", "header",
                                    "empty", "other-data"])
def test_damaged_cache_is_rebuilt_not_trusted(tmp_path, decodes, capsys, damage):
    folder = make_folder(tmp_path / "set")
    want = read_image_folder(folder, "train")
    cached = _cache_files()[0]
    blob = bytearray(cached.read_bytes())
    if damage == "flip-pixel":
        blob[-200] ^= 0xFF
    elif damage == "flip-label":
        blob[-8] ^= 0x01
    elif damage == "truncate":
        blob = blob[:-1000]
    elif damage == "extend":
        blob += b"\0"
    elif damage == "header":
        blob[20:30] = b"#" * 10
    elif damage == "empty":
        blob = bytearray()
    else:  # an intact cache, of other data (same names and sizes, other pixels), under this name
        other = make_folder(tmp_path / "other")
        _save(other / "train" / "cat" / "0000.png", _pixels(0, 99))
        read_image_folder(other, "train")
        blob = bytearray(next(p for p in _cache_files() if p != cached).read_bytes())
    cached.write_bytes(bytes(blob))
    decodes.clear()
    got = read_image_folder(folder, "train")
    assert len(decodes) == 12, "the damaged cache was used"
    assert np.array_equal(got.images, want.images) and np.array_equal(got.labels, want.labels)
    assert "damaged" in capsys.readouterr().err
    decodes.clear()
    read_image_folder(folder, "train")
    assert decodes == [], "the cache was not rewritten"


def test_an_unwritable_cache_is_a_note_not_an_error(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocker))
    folder = make_folder(tmp_path / "set")
    assert len(read_image_folder(folder, "test")) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not write the image cache" in err[0]


def test_cache_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv(CACHE_ENV)
    assert cache_dir() == tmp_path / "xdg" / "cda2_ext"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "cda2_ext"


# ----- bad input: one DataError line naming the file ----------------------------------------------

def _remove(rel: str, shown: str) -> Callable[[Path], str]:
    def fn(folder: Path) -> str:
        for p in sorted((folder / rel).rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        (folder / rel).rmdir()
        return shown
    return fn


def _write(rel: str, make: Callable[[], bytes], shown: str = "") -> Callable[[Path], str]:
    def fn(folder: Path) -> str:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(make())
        return shown or rel
    return fn


def _encoded(arr: np.ndarray, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def _empty_class(folder: Path) -> str:
    for split in ("train", "test"):
        (folder / split / "bird").mkdir()
    return "train/bird/"


BAD_SETS = {  # case -> (change to a good set, returning the name the message must hold;
    #                    the split to load; what the message must say, a regex)
    "missing-test": (_remove("test", "test/"), "train", "no test/ folder"),
    "class-only-in-train": (_remove("test/frog", "frog"), "test", r"only in train/: frog\)"),
    "class-only-in-test": (_write("test/bird/0000.png", lambda: _encoded(_pixels(0, 0)), "bird"),
                           "train", r"\(only in test/: bird\)"),
    "empty-class": (_empty_class, "test", "holds no images"),
    "file-beside-classes": (_write("train/labels.csv", lambda: b"a,b\n"), "test",
                            "is a file beside the class folders"),
    "nested-folder": (_write("train/cat/more/0000.png", lambda: _encoded(_pixels(0, 0)),
                             "train/cat/more"), "train", "a folder inside a class folder"),
    "not-an-image": (_write("train/dog/notes.txt", lambda: b"hello"), "train", "not an image file"),
    "truncated-jpeg": (_write("test/cat/0000.jpg", lambda: _encoded(_pixels(0, 0), "JPEG")[:300]),
                       "test", "truncated or corrupt"),
    "truncated-png": (_write("test/frog/0001.png", lambda: _encoded(_pixels(2, 1))[:-500]), "test",
                      "truncated or corrupt"),
    "wrong-size": (_write("train/frog/0002.png", lambda: _encoded(_pixels(2, 2, size=16))), "train",
                   "16x16 pixels, expected 32x32 like "),
    "grayscale": (_write("test/dog/0001.png", lambda: _encoded(_pixels(1, 1), mode="L")), "test",
                  "mode L, expected RGB"),
    "rgba": (_write("train/cat/0003.png", lambda: _encoded(_pixels(0, 3), mode="RGBA")), "train",
             "mode RGBA, expected RGB"),
}


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
@pytest.mark.parametrize("case", list(BAD_SETS))
def test_bad_image_folder_is_one_line_naming_the_file(tmp_path, case, as_zip):
    folder = make_folder(tmp_path / "set")
    change, split, pattern = BAD_SETS[case]
    name = change(folder)
    src = make_zip(folder, tmp_path / "set.zip") if as_zip else folder
    msg = one_line_error(lambda: read_image_folder(src, split), str(src), name)
    assert re.search(pattern, msg), msg


def _zip_bytes(folder: Path, tmp_path: Path) -> bytes:
    return make_zip(folder, tmp_path / "good.zip").read_bytes()


@pytest.mark.parametrize("case", ["not-a-zip", "truncated", "crc", "no-splits", "unsafe-name"])
def test_bad_zip_is_one_line_naming_the_file(tmp_path, case):
    folder = make_folder(tmp_path / "set")
    path = tmp_path / "bad.zip"
    if case == "not-a-zip":
        path.write_bytes(b"CIFAR-10 is not in here\n" * 10)
        one_line_error(lambda: read_image_folder(path, "train"), str(path), "not a readable zip")
    elif case == "truncated":
        path.write_bytes(_zip_bytes(folder, tmp_path)[:5000])
        one_line_error(lambda: read_image_folder(path, "train"), str(path), "not a readable zip")
    elif case == "crc":  # a stored member's bytes damaged: the CRC-32 says so, not Pillow
        blob = bytearray(_zip_bytes(folder, tmp_path))
        at = blob.index(_encoded(_pixels(0, 3))[-300:])  # in train/ only
        blob[at + 10] ^= 0xFF
        path.write_bytes(bytes(blob))
        one_line_error(lambda: read_image_folder(path, "train"), str(path),
                       "corrupt zip member", "train/cat/0003.png")
    elif case == "no-splits":
        make_zip(folder / "train", path, top="a/")
        with zipfile.ZipFile(path, "a") as z:
            z.writestr("b/readme.txt", b"x")
        one_line_error(lambda: read_image_folder(path, "train"), str(path), "no train/ and test/")
    else:
        make_zip(folder, path)
        with zipfile.ZipFile(path, "a") as z:
            z.writestr("train/cat/../../../evil.png", _encoded(_pixels(0, 0)))
        one_line_error(lambda: read_image_folder(path, "train"), str(path), "not a plain relative path")


def test_cifar10_needs_ten_classes_and_the_run_its_num_classes(tmp_path):
    three = make_folder(tmp_path / "three")
    one_line_error(lambda: load_cifar10(three, "train"), str(three), "3 class folders", "10")
    ten = make_zip(make_folder(tmp_path / "ten", CIFAR10_CLASSES, 2, 1), tmp_path / "ten.zip")
    s = load_images("cifar10", "test", ten)
    assert len(s) == 10 and s.classes == tuple(sorted(CIFAR10_CLASSES)) and "zip" in s.note
    one_line_error(lambda: load_images("cifar10", "test", ten, num_classes=5), "num_classes=5")
    assert len(load_images("synthetic", "test", num_classes=4).classes) == 4


# ----- notes --------------------------------------------------------------------------------------

def test_data_note_names_what_is_not_the_official_files(tmp_path, cifar_dir):
    folder = make_folder(tmp_path / "set", CIFAR10_CLASSES, 1, 1)
    assert "image folder" in data_note(folder) and str(folder) in data_note(folder)
    fake = make_zip(folder, tmp_path / "cifar-10-jpeg.zip")  # the name, not the size: generic
    assert "JPEG" not in data_note(fake) and "zip" in data_note(fake)
    assert data_note(cifar_dir) is None and data_note(tmp_path / "nowhere") is None
    if JPEG_ZIP.is_file():
        assert data_note(JPEG_ZIP).startswith("CIFAR-10 re-encoded as JPEG (q75, ≈5/255")
        assert data_note(SHARED) is None  # the official batches come first there


def test_the_note_is_printed_once_per_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data_mod, "_data_noted", False)
    monkeypatch.delenv("RANK", raising=False)
    folder = make_folder(tmp_path / "set", CIFAR10_CLASSES, 1, 1)
    load_images("cifar10", "train", folder)
    load_images("cifar10", "test", folder)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "note:" in ln]
    assert len(lines) == 1 and "image folder" in lines[0] and str(folder) in lines[0]
    monkeypatch.setattr(data_mod, "_data_noted", False)
    monkeypatch.setenv("RANK", "1")
    assert note_data_source(load_image_folder(folder, "test")) is False


# ----- where the data are looked for ---------------------------------------------------------------

@pytest.fixture
def places(tmp_path, monkeypatch):
    """A working folder and a cache folder, neither holding data yet, and no $CDA2_DATA."""
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setenv(CACHE_ENV, str(cache))
    return work, cache


def test_default_location_order(tmp_path, monkeypatch, places):
    work, cache = places
    msg = one_line_error(resolve_data, str(cache / "data"), "CIFAR-10 not found", DATA_ENV)
    assert "./data" not in msg  # not tried: it does not exist
    assert default_data_dir() == download_dir() == cache / "data"
    in_cache = make_folder(cache / "data")
    assert resolve_data() == ("folder", in_cache, "cache")
    (work / "data").mkdir()  # ./data exists: the default, and looked in first
    assert default_data_dir() == download_dir() == work / "data"
    assert resolve_data().path == in_cache  # ... but holds nothing yet
    local = make_zip(make_folder(tmp_path / "src"), work / "data" / "cifar-10-jpeg.zip")
    assert resolve_data() == ("zip", local, "./data")
    env = make_folder(tmp_path / "env")
    monkeypatch.setenv(DATA_ENV, str(env))  # $CDA2_DATA beats ./data
    assert resolve_data() == ("folder", env, f"${DATA_ENV}") and download_dir() == env
    given = make_folder(tmp_path / "given")
    assert resolve_data(given) == ("folder", given, "given")  # --data beats everything
    assert [o for o, _ in data_locations(given)] == ["given"]


def test_a_named_location_without_data_is_an_error(tmp_path, monkeypatch, places):
    work, cache = places
    make_folder(cache / "data")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "missing"))  # no falling back to the cache
    one_line_error(resolve_data, str(tmp_path / "missing"), "does not exist")
    one_line_error(lambda: resolve_data(tmp_path), str(tmp_path), "CIFAR-10 not found")


def test_batches_come_before_an_image_folder_in_one_place(tmp_path, cifar_dir):
    assert resolve_data(cifar_dir.parent).kind == "batches"
    assert resolve_data(cifar_dir).path == cifar_dir


def test_download_is_not_needed_for_an_image_folder_or_zip(tmp_path, places):
    work, cache = places
    path = make_zip(make_folder(tmp_path / "set"), tmp_path / "set.zip")
    assert ensure_cifar10(path) == path  # nothing downloaded, nothing created
    folder = make_folder(cache / "data")
    assert ensure_cifar10() == folder


# ----- the real thing -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not JPEG_ZIP.is_file(), reason=f"{JPEG_ZIP} not found")
def test_real_jpeg_zip_test_split():
    """All 10,000 test images (decoding them takes a few seconds), 1,000 per class, in CIFAR-10's
    class order; the first of each class is CIFAR-10's first test image of that class, ≈5/255 off."""
    s = load_cifar10(JPEG_ZIP, "test")
    assert s.images.shape == (10_000, 3, 32, 32) and s.classes == CIFAR10_CLASSES
    assert torch.bincount(s.labels).tolist() == [1000] * 10
    assert s.note.startswith("CIFAR-10 re-encoded as JPEG")
    official = SHARED / "cifar-10-batches-py"
    if (official / "test_batch").is_file():
        ref = load_cifar10(official, "test")
        firsts = torch.stack([ref.images[(ref.labels == c).nonzero()[0, 0]] for c in range(10)])
        diff = (s.images[:10].float() - firsts.float()).abs().mean(dim=(1, 2, 3))
        assert bool((diff < 12).all()), diff  # the same pictures, JPEG-blurred (others: ~60)


# ----- through the command line -------------------------------------------------------------------

@pytest.mark.slow
def test_train_and_eval_clean_on_a_zip_with_download_a_no_op(tmp_path, monkeypatch, capsys):
    """``cda2 train --data ZIP --download`` trains on the zip (nothing to download) and says it
    once; ``cda2 eval-clean`` reads the same zip from the run's options."""
    from cda2_ext.cli import main

    monkeypatch.setattr(data_mod, "_data_noted", False)
    monkeypatch.delenv("RANK", raising=False)
    path = make_zip(make_folder(tmp_path / "set", CIFAR10_CLASSES, 2, 1), tmp_path / "ten.zip")
    run = str(tmp_path / "run")
    assert main(["train", "--data", str(path), "--download", "--phases", "standard", "--depth", "2",
                 "--num-models", "1", "--epochs", "1", "--batch-size", "10", "--device", "cpu",
                 "--no-progress", "--out-dir", run]) == 0
    out = capsys.readouterr()
    assert [ln for ln in out.err.splitlines() if "note: data:" in ln] == [
        f"cda2: note: data: images from the zip of an image folder {path}, not the official "
        "CIFAR-10 files"]
    assert main(["eval-clean", run, "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 10
