"""Data: CIFAR-10 from a local folder or zip, on-device augmentation, and synthetic sets.

CIFAR-10 is read from either of:

* the standard ``cifar-10-batches-py`` folder (``data_batch_1..5``, ``test_batch``; a folder
  with fewer images per batch, such as a 5x1017 subset, works too), given as itself or as the
  folder that contains it;
* an image folder (``train/<class>/*``, ``test/<class>/*``; sorted class folder names are the
  labels) or a zip of one, such as ``cifar-10-jpeg.zip`` (all of CIFAR-10 re-encoded as JPEG q75),
  read by :mod:`cda2_ext.data.image_folder` and decoded once into a cache (:func:`cache_dir`). A folder
  that holds ``cifar-10-jpeg.zip`` also works.

Where to look (:func:`data_locations`): the ``root`` argument (``--data``), else ``$CDA2_DATA``,
else ``./data`` if that folder exists, then ``data/`` in the user's cache folder
(``~/.cache/cda2_ext/data``), which is also where ``--download`` puts CIFAR-10 when neither
``--data`` nor ``$CDA2_DATA`` names a folder and ``./data`` does not exist
(:func:`download_dir`). A location that is named (``root``, ``$CDA2_DATA``) and holds no CIFAR-10
is an error, not a hint to look elsewhere. Nothing is downloaded unless asked
(:func:`download_cifar10`, which verifies the official MD5). Data that are not the official files
carry a note (:attr:`ImageSet.note`, :func:`data_note`) that reports should repeat.

The batch files are pickles, and a damaged or hostile one must fail as one :class:`DataError`
line, never run code or exhaust memory. So a file is read whole (at most 256 MiB), its opcodes
are walked first without running them (every length field must fit in the file, every memo index
must be small: nothing is allocated for a size the data do not back), and only then unpickled by
an unpickler whose few admitted globals are stand-ins that build nothing from a size field
(:class:`_CifarUnpickler`). The result must be uint8 ``[N, 3072]`` images and ``N`` integer labels
in ``[0, 9]``, checked before any conversion.

Images are kept as ``uint8 [N, 3, 32, 32]`` (150 MB for all of CIFAR-10, so the whole set can sit
on the training device); :func:`to_float` and :func:`random_crop_flip` turn a batch into augmented
floats in [0, 1] with tensor ops on that device (no torchvision).

Other image data (``dataset="imagefolder"``): an image folder or zip of any number of classes
K >= 2 and any one image size, read the same way (:func:`load_images`); CIFAR-10's rule of 10
classes applies only where CIFAR-10 is named. :func:`infer_dataset` says which of the two a
``--data`` given without ``--dataset`` is; :func:`channel_stats` is the per-channel normalisation
a run computes from its training split; :func:`crop_padding` scales the random crop's padding
with the image size (CIFAR-10's 4 pixels at 32x32).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import pickletools
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError, one_line
from .image_folder import CACHE_ENV, cache_dir, folder_classes, is_image_folder, read_image_folder

__all__ = [
    "ImageSet", "CIFAR10_CLASSES", "CIFAR10_URL", "CIFAR10_MD5", "DATA_ENV", "CACHE_ENV",
    "JPEG_ZIP_NAME", "DataSource", "cache_dir", "default_data_dir", "download_dir",
    "data_locations", "resolve_data", "resolve_cifar10_dir", "load_cifar10", "load_image_folder",
    "data_note", "note_data_source", "download_cifar10", "ensure_cifar10", "synthetic_images",
    "load_images", "to_float", "random_crop_flip", "make_xor", "CIFAR10_TRAIN_SIZE",
    "note_training_size", "IMAGE_DATASETS", "infer_dataset", "dataset_name", "channel_stats",
    "crop_padding",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
DATA_ENV = "CDA2_DATA"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
_FOLDER = "cifar-10-batches-py"
_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILES = ("test_batch",)
#: The public JPEG re-encoding of all of CIFAR-10 (an image-folder zip), found by this name in a
#: data folder and recognised (name and size, or SHA-256) to say what it is.
JPEG_ZIP_NAME = "cifar-10-jpeg.zip"
_JPEG_ZIP_SIZE = 62_190_935
_JPEG_ZIP_SHA256 = "af4cafd889cd0b58f1b1ad2755fd6cb2bbef385c0f85508f1443e90c8f890438"
_JPEG_NOTE = "CIFAR-10 re-encoded as JPEG (q75, ≈5/255 from the official pixels)"

PathLike = Union[str, os.PathLike]



@dataclass
class ImageSet:
    """Images and labels of one split.

    Attributes:
        images: ``uint8 [N, C, H, W]``.
        labels: ``int64 [N]``.
        classes: class names.
        source: the file or folder the images were read from (``None``: made in memory).
        note: what a report should say about the data, when they are not the official files
            (e.g. ``"CIFAR-10 re-encoded as JPEG (...): PATH"``); ``None`` for the official
            CIFAR-10 batches and for synthetic sets.
    """

    images: Tensor
    labels: Tensor
    classes: Tuple[str, ...]
    source: Optional[str] = None
    note: Optional[str] = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, limit: Optional[int]) -> "ImageSet":
        """The first ``limit`` samples (all when ``None``)."""
        if limit is None or limit >= len(self):
            return self
        return dataclasses.replace(self, images=self.images[:limit], labels=self.labels[:limit])

    def to(self, device: Union[str, torch.device]) -> "ImageSet":
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))


# ---------------------------------------------------------------------------------------------
# CIFAR-10 on disk

_MAX_BATCH_BYTES = 256 << 20  # a CIFAR-10 batch file is 31 MB
_NDARRAY = object()  # what the pickle gets for numpy.ndarray: a token for _reconstruct, not callable


def _reconstruct(subtype: object, shape: object, dtype: object) -> np.ndarray:
    """Stand-in for numpy's ``_reconstruct``: numpy pickles an array as an empty ``(0,)`` array
    whose state (shape, dtype, bytes) is then set, and numpy checks that state against its bytes;
    any other shape here would allocate for a number the file does not back."""
    if subtype is not _NDARRAY or shape != (0,):
        raise pickle.UnpicklingError("unexpected numpy array reconstruction")
    return np.empty(0, np.uint8)


def _dtype(spec: object, align: object = False, copy: object = True) -> np.dtype:  # noqa: ARG001
    """Stand-in for ``numpy.dtype``: plain data types only (object arrays hold Python objects),
    and always a copy, because the pickle then sets its state: without ``copy`` that would be
    numpy's shared ``uint8`` descriptor, changed for the whole process."""
    dt = np.dtype(spec, bool(align), True)
    if dt.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed in a CIFAR batch")
    return dt


def _latin1(text: object, encoding: object = "utf-8") -> bytes:
    """Stand-in for ``_codecs.encode``, how Python 3 writes bytes in protocol-2 pickles."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("unexpected _codecs.encode call")
    return text.encode("latin-1")


def _empty_bytes(*args: object) -> bytes:
    """Stand-in for ``bytes``, which protocol 2 calls with no argument for ``b""`` (the data of
    an empty array); ``bytes(n)`` would allocate ``n`` bytes."""
    if args:
        raise pickle.UnpicklingError("unexpected bytes() call")
    return b""


class _CifarUnpickler(pickle.Unpickler):
    """Admits only the globals a CIFAR batch pickle references, as the stand-ins above."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
                ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
                ("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _dtype,
                ("_codecs", "encode"): _latin1, ("__builtin__", "bytes"): _empty_bytes,
                ("builtins", "bytes"): _empty_bytes}

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch"
                                         ) from None


def _scan_pickle(blob: bytes) -> None:
    """Walk the opcodes without running them. ``genops`` reads each length-prefixed argument and
    raises ``ValueError`` when fewer bytes remain than the length says; a memo index may not
    exceed the number of opcodes so far (the unpickler sizes its memo by the largest index)."""
    for count, (op, arg, _) in enumerate(pickletools.genops(blob)):
        if op.name.endswith("PUT") and not (isinstance(arg, int) and 0 <= arg <= count):
            raise pickle.UnpicklingError(f"memo index {arg} out of range")


# ---------------------------------------------------------------------------------------------
# Where the data are

def default_data_dir() -> Path:
    """The conventional data folder: ``./data`` if it exists, else ``data`` in :func:`cache_dir`
    (absolute, not created here)."""
    local = Path.cwd() / "data"
    return local if local.is_dir() else cache_dir() / "data"


def download_dir() -> Path:
    """Where ``--download`` puts CIFAR-10 when ``--data`` is not given: ``$CDA2_DATA``, else
    :func:`default_data_dir`."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else default_data_dir()


def data_locations(root: Optional[PathLike] = None) -> List[Tuple[str, Path]]:
    """``(origin, path)`` of every place looked in for CIFAR-10, in order: ``root`` alone when
    given, else ``$CDA2_DATA`` alone when set, else ``./data`` (if it exists) and the cache
    folder's ``data``."""
    if root is not None:
        return [("given", Path(root))]
    env = os.environ.get(DATA_ENV)
    if env:
        return [(f"${DATA_ENV}", Path(env))]
    local = Path.cwd() / "data"
    return ([("./data", local)] if local.is_dir() else []) + [("cache", cache_dir() / "data")]


class DataSource(NamedTuple):
    """Where CIFAR-10 was found: ``kind`` is ``"batches"`` (a ``cifar-10-batches-py`` folder),
    ``"folder"`` (an image folder) or ``"zip"`` (a zip of one); ``origin`` says which location of
    :func:`data_locations` held it."""

    kind: str
    path: Path
    origin: str


def _has_batches(folder: Path) -> bool:
    return (folder / _TEST_FILES[0]).is_file() or (folder / _TRAIN_FILES[0]).is_file()


def _source_in(path: Path) -> Optional[Tuple[str, Path]]:
    """What CIFAR-10 ``path`` holds, in order of preference (the official files first)."""
    if path.is_file():
        return "zip", path  # a named file can only be a zip here; opening it says if it is not
    for folder in (path, path / _FOLDER):
        if _has_batches(folder):
            return "batches", folder
    if is_image_folder(path):
        return "folder", path
    if (path / JPEG_ZIP_NAME).is_file():
        return "zip", path / JPEG_ZIP_NAME
    return None


def resolve_data(root: Optional[PathLike] = None) -> DataSource:
    """The CIFAR-10 to read (see :func:`data_locations` for the order), or a :class:`DataError`
    that lists every place looked in."""
    tried = []
    for origin, path in data_locations(root):
        found = _source_in(path)
        if found is not None:
            return DataSource(found[0], found[1], origin)
        tried.append(f"{path} ({origin}{'' if path.exists() else ', does not exist'})")
    raise DataError(f"CIFAR-10 not found: looked in {', '.join(tried)} for a '{_FOLDER}' folder, "
                    f"an image folder (train/, test/) or {JPEG_ZIP_NAME}; pass --data DIR or ZIP, "
                    f"set {DATA_ENV}, or run with --download")


def resolve_cifar10_dir(root: Optional[PathLike] = None) -> Path:
    """The ``cifar-10-batches-py`` folder to read, or :class:`DataError` saying where it looked
    (or that the data found there are an image folder or zip: see :func:`resolve_data`)."""
    src = resolve_data(root)
    if src.kind != "batches":
        raise DataError(f"{src.path} is an image {'folder' if src.kind == 'folder' else 'zip'}, "
                        f"not a '{_FOLDER}' folder")
    return src.path


def _is_jpeg_cifar10(path: Path) -> bool:
    """Whether ``path`` is the shared JPEG re-encoding: its size and name, or (renamed) its
    SHA-256, computed only for a file of exactly its size."""
    try:
        if not path.is_file() or path.stat().st_size != _JPEG_ZIP_SIZE:
            return False
        if path.name == JPEG_ZIP_NAME:
            return True
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest() == _JPEG_ZIP_SHA256
    except OSError:
        return False


def _source_note(kind: str, path: Path) -> Optional[str]:
    if kind == "batches":
        return None
    if _is_jpeg_cifar10(path):
        return f"{_JPEG_NOTE}: {path}"
    what = "image folder" if kind == "folder" else "zip of an image folder"
    return f"images from the {what} {path}, not the official CIFAR-10 files"


def data_note(data_dir: Optional[PathLike] = None) -> Optional[str]:
    """What a report should say about the CIFAR-10 that ``data_dir`` (``--data``; ``None``: the
    default locations) resolves to: e.g. ``"CIFAR-10 re-encoded as JPEG (q75, ≈5/255 from the
    official pixels): PATH"`` for ``cifar-10-jpeg.zip``, a line naming the image folder or zip
    for others, and ``None`` for the official batch files or when no data are found."""
    try:
        src = resolve_data(data_dir)
    except DataError:
        return None
    return _source_note(src.kind, src.path)


def _read_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """``(data uint8 [N, 3072], labels int64 [N])`` of one batch file, or a one-line DataError."""
    def corrupt(why: str) -> DataError:
        return DataError(f"corrupt CIFAR-10 file {path}: {why}")

    if not path.is_file():
        raise DataError(f"missing CIFAR-10 file {path}")
    try:
        size = path.stat().st_size
        if size > _MAX_BATCH_BYTES:
            raise corrupt(f"{size} bytes, more than a CIFAR-10 batch can be")
        blob = path.read_bytes()
    except OSError as err:
        raise DataError(f"unreadable CIFAR-10 file {path}: {err.strerror or err}") from None
    try:
        _scan_pickle(blob)
        obj = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    # Whatever the unpickler raises on a damaged file, it means the same: not a CIFAR batch.
    # (SystemError: numpy's dtype.__setstate__ fails that way on some malformed states.)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, LookupError, AttributeError,
            OverflowError, RecursionError, SystemError) as err:
        raise corrupt(f"{type(err).__name__}: {one_line(err)}") from None
    if not isinstance(obj, dict):
        raise corrupt(f"expected a dict, got {type(obj).__name__}")
    data = obj.get(b"data")
    labels = obj.get(b"labels", obj.get(b"fine_labels"))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3072):
        got = f"{data.dtype}{list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise corrupt(f"expected uint8 data [N, 3072], got {got}")
    try:  # Python ints of any size stay exact here (dtype object), to be refused below
        labels = np.asarray(labels) if isinstance(labels, (list, np.ndarray)) else None
    except ValueError:  # ragged nesting
        labels = None
    n = data.shape[0]
    # (the type of an empty array does not matter: [] becomes float64)
    if labels is None or labels.shape != (n,) or (labels.size and labels.dtype.kind not in "iu"):
        raise corrupt(f"expected {n} integer labels in [0, 9], got "
                      + (f"{labels.dtype}{list(labels.shape)}" if labels is not None else "none"))
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise corrupt("labels outside [0, 9]")
    return data, labels.astype(np.int64)


def load_cifar10(root: Optional[PathLike] = None, split: str = "train") -> ImageSet:
    """Load the ``"train"`` or ``"test"`` split as ``uint8 [N, 3, H, W]`` + ``int64 [N]``, from
    wherever :func:`resolve_data` finds CIFAR-10 (an image folder or zip must have 10 classes)."""
    if split not in ("train", "test"):
        raise ConfigError(f"split: expected 'train' or 'test', got {split!r}")
    src = resolve_data(root)
    if src.kind != "batches":
        data = load_image_folder(src.path, split)
        if len(data.classes) != len(CIFAR10_CLASSES):
            raise DataError(f"{src.path}: {len(data.classes)} class folders "
                            f"({', '.join(data.classes[:12])}), CIFAR-10 has {len(CIFAR10_CLASSES)} "
                            "(for an image folder of any number of classes: --dataset imagefolder)")
        return data
    parts = [_read_batch(src.path / f) for f in (_TRAIN_FILES if split == "train" else _TEST_FILES)]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return ImageSet(images, torch.from_numpy(labels), CIFAR10_CLASSES, source=str(src.path))


def load_image_folder(path: PathLike, split: str, *, use_cache: bool = True) -> ImageSet:
    """One split of an image folder or a zip of one, any number of classes (see
    :func:`cda2_ext.data.image_folder.read_image_folder`: layout, order, cache, errors), with its
    :attr:`ImageSet.note`."""
    images, labels, classes = read_image_folder(path, split, use_cache=use_cache)
    kind = "zip" if Path(path).is_file() else "folder"
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), classes,
                    source=str(path), note=_source_note(kind, Path(path)))


#: CIFAR-10's training images; the paper's numbers are for all of them.
CIFAR10_TRAIN_SIZE = 50_000
_size_noted = False  # the note below is printed once per process


def note_training_size(n: int, full: int = CIFAR10_TRAIN_SIZE) -> bool:
    """Print one line on stderr, once per process (rank 0 only under ``torchrun``), when a run
    trains on ``n < full`` CIFAR-10 images: the paper's numbers need the full set, and nothing
    else would say that the default data folder is a ~10% subset. Returns whether it printed."""
    global _size_noted
    if n >= full or _size_noted or os.environ.get("RANK", "0") != "0":
        return False
    _size_noted = True
    print(f"cda2: note: training on {n:,} CIFAR-10 images, not the full {full:,}; the paper's "
          "numbers need the full set (--download, or --data DIR with all of CIFAR-10)",
          file=sys.stderr, flush=True)
    return True


_data_noted = False  # like _size_noted


def note_data_source(data: ImageSet) -> bool:
    """Print ``data.note`` on stderr, once per process (rank 0 only under ``torchrun``), so that
    whoever reads a run's log knows it did not use the official CIFAR-10 pixels. Returns whether
    it printed."""
    global _data_noted
    if data.note is None or _data_noted or os.environ.get("RANK", "0") != "0":
        return False
    _data_noted = True
    text = f"cda2: note: data: {data.note}"
    try:
        print(text, file=sys.stderr, flush=True)
    except UnicodeEncodeError:  # a stderr that cannot write "≈" (an ASCII-only locale)
        print(text.replace("≈", "~"), file=sys.stderr, flush=True)
    return True


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_cifar10(root: PathLike, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> Path:
    """Download and unpack CIFAR-10 into ``root`` (opt-in; never called implicitly).

    The archive's MD5 must equal the official ``c58f3010...`` or nothing is unpacked. Returns the
    ``cifar-10-batches-py`` folder. Existing complete folders (``root`` itself or its
    ``cifar-10-batches-py``) are left alone.
    """
    root = Path(root)
    for folder in (root, root / _FOLDER):
        if all((folder / f).is_file() for f in _TRAIN_FILES + _TEST_FILES):
            return folder
    if root.is_file():
        raise DataError(f"cannot download CIFAR-10 into {root}: it is a file, not a folder")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / "cifar-10-python.tar.gz"
        try:
            with urllib.request.urlopen(url) as resp, open(archive, "wb") as out:  # noqa: S310
                shutil.copyfileobj(resp, out)
        except OSError as err:
            raise DataError(f"download of {url} failed: {err}") from None
        got = _md5(archive)
        if got != md5:
            raise DataError(f"download of {url} is corrupt: MD5 {got}, expected {md5}")
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(_FOLDER + "/")
                       and ".." not in Path(m.name).parts]
            tar.extractall(tmp, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(Path(tmp) / _FOLDER, folder)
    return folder


def ensure_cifar10(root: Optional[PathLike] = None) -> Path:
    """``--download``: the CIFAR-10 to train from, downloaded first if missing.

    ``root`` (``--data``; ``None``: :func:`download_dir`) is returned as found when it already
    holds an image folder or zip (there is nothing to download); otherwise the official batches
    are downloaded into it unless complete there (:func:`download_cifar10`)."""
    target = Path(root) if root is not None else download_dir()
    found = _source_in(target)
    if found is not None and found[0] != "batches":
        return found[1]
    return download_cifar10(target)


# ---------------------------------------------------------------------------------------------
# Synthetic images (tests, smoke runs, machines without CIFAR-10)

def synthetic_images(n: int, num_classes: int = 10, seed: int = 0, size: int = 32,
                     noise: float = 0.15) -> ImageSet:
    """A learnable CIFAR-shaped toy set: class prototypes (fixed, 4x4 colour blocks upsampled)
    plus Gaussian noise, as ``uint8``. Train and test sets share prototypes; ``seed`` picks the
    samples."""
    protos = torch.rand(num_classes, 3, 4, 4, generator=torch.Generator().manual_seed(12345))
    protos = protos.repeat_interleave(size // 4, 2).repeat_interleave(size // 4, 3)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    x = protos[labels] + noise * torch.randn(n, 3, size, size, generator=g)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageSet(images, labels, tuple(f"class{k}" for k in range(num_classes)))


#: The values of ``dataset`` (``--dataset``).
IMAGE_DATASETS = ("cifar10", "imagefolder", "synthetic")


def load_images(dataset: str, split: str, root: Optional[PathLike] = None, seed: int = 0,
                synthetic_size: Optional[Dict[str, int]] = None,
                num_classes: Optional[int] = None) -> ImageSet:
    """``dataset="cifar10"`` (from disk, see :func:`load_cifar10`; its note, if any, is printed
    once: :func:`note_data_source`), ``"imagefolder"`` (an image folder or zip of any number of
    classes and any image size, found like CIFAR-10: ``root``, else ``$CDA2_DATA``, ...) or
    ``"synthetic"`` (:func:`synthetic_images`).

    ``num_classes`` (a run's): when given, the data must have that many classes."""
    if dataset == "cifar10":
        data = load_cifar10(root, split)
        note_data_source(data)
    elif dataset == "imagefolder":
        src = resolve_data(root)
        if src.kind == "batches":
            raise DataError(f"{src.path} is a '{_FOLDER}' folder: that is dataset cifar10, not an "
                            "image folder")
        # its own data, not a stand-in for CIFAR-10: no note that it is not the official files
        data = dataclasses.replace(load_image_folder(src.path, split), note=None)
    elif dataset == "synthetic":
        sizes = {"train": 512, "test": 256, **(synthetic_size or {})}
        data = synthetic_images(sizes[split], num_classes=num_classes or 10,
                                seed=seed * 2 + (split == "test"))
    else:
        raise ConfigError(f"dataset: expected one of {IMAGE_DATASETS}, got {dataset!r}")
    if num_classes is not None and len(data.classes) != num_classes:
        raise DataError(f"{data.source}: {len(data.classes)} classes, but the run has "
                        f"num_classes={num_classes}")
    return data


def infer_dataset(root: Optional[PathLike] = None) -> str:
    """The dataset that ``root`` (``--data``; ``None``: the default locations) holds when
    ``--dataset`` is not given: ``"imagefolder"`` for an image folder or zip whose number of
    classes is not CIFAR-10's 10, else ``"cifar10"`` - also for a 10-class image folder (as before
    image folders of any K were read: name another 10-class set ``imagefolder`` yourself) and when
    nothing readable is found (training then says what is wrong). Reads the listing only."""
    try:
        src = resolve_data(root)
        if src.kind == "batches" or _is_jpeg_cifar10(src.path):
            return "cifar10"
        classes = folder_classes(src.path)
    except DataError:
        return "cifar10"
    return "cifar10" if len(classes) == len(CIFAR10_CLASSES) else "imagefolder"


def dataset_name(dataset: str, source: Optional[PathLike] = None) -> str:
    """What reports call a run's data: ``"CIFAR-10"``, ``"synthetic"``, or an image folder's
    name (its folder, or its zip without ``.zip``) from ``source`` (the run's ``--data``)."""
    if dataset == "cifar10":
        return "CIFAR-10"
    if dataset == "imagefolder" and source:
        path = Path(source)
        return path.stem if path.suffix.lower() == ".zip" else (path.name or str(path))
    return "image folder" if dataset == "imagefolder" else dataset


def channel_stats(images: Tensor, chunk: int = 4096) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and standard deviation of ``uint8`` images ``[N, C, H, W]`` as floats in
    [0, 1] (rounded to 6 digits, as a run stores them), summed in float64 a chunk at a time so a
    large set is never copied whole."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise DataError(f"images: expected a non-empty [N, C, H, W] set, got {list(images.shape)}")
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for i in range(0, images.shape[0], chunk):
        x = to_float(images[i:i + chunk]).to("cpu", torch.float64)
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(0).sqrt()
    # a constant channel (std 0) would divide by zero inside the model: leave it unscaled
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return (tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std))


def crop_padding(height: int, width: int) -> int:
    """The random crop's padding for images of ``height x width``: an eighth of the shorter side,
    at least 1 - CIFAR-10's 4 pixels at 32x32, 6 at 48x48, 8 at 64x64."""
    return max(1, round(min(height, width) / 8))


# ---------------------------------------------------------------------------------------------
# On-device augmentation

def to_float(images: Tensor) -> Tensor:
    """``uint8`` images to ``float32`` in [0, 1] (float inputs pass through)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


def random_crop_flip(x: Tensor, pad: int = 4, flip: bool = True,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """Random ``pad``-pixel zero-padded crop + horizontal flip of a batch ``[B, C, H, W]``.

    The standard CIFAR augmentation (``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``)
    as two gathers on the tensor's device; for other image sizes the trainer passes
    :func:`crop_padding`'s ``pad``. The random offsets are drawn on the CPU from
    ``generator`` (a few bytes per image), so a seeded generator gives the same batch on every
    device and its state is all a checkpoint needs to resume the stream.
    """
    B, C, H, W = x.shape
    dev = x.device
    offs = torch.randint(0, 2 * pad + 1, (2, B), generator=generator)
    flips = torch.rand(B, generator=generator) < 0.5 if flip else torch.zeros(B, dtype=torch.bool)
    offs, flips = offs.to(dev), flips.to(dev)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = offs[0, :, None] + torch.arange(H, device=dev)                   # [B, H]
    cols = torch.arange(W, device=dev).expand(B, W)                         # [B, W]
    cols = torch.where(flips[:, None], W - 1 - cols, cols) + offs[1, :, None]
    idx_r = rows.view(B, 1, H, 1).expand(B, C, H, W + 2 * pad)
    xr = xp.gather(2, idx_r)                                                # [B, C, H, W+2p]
    return xr.gather(3, cols.view(B, 1, 1, W).expand(B, C, H, W))


# ---------------------------------------------------------------------------------------------
# XOR (Section 4.2)

def make_xor(n: int, seed: int = 0, variance: float = 0.1) -> Tuple[Tensor, Tensor]:
    """The 4-Gaussian XOR set of Section 4.2: ``(x float32 [n, 2], y int64 [n])``.

    Label +1 (here 1) from N([1, 1], 0.1 I) and N([-1, -1], 0.1 I); label -1 (here 0) from
    N([-1, 1], 0.1 I) and N([1, -1], 0.1 I). ``n`` is split evenly over the four Gaussians
    (the remainder goes to the first ones); the order is shuffled.
    """
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0]])
    labels = torch.tensor([1, 1, 0, 0])
    comp = torch.arange(n) % 4
    comp = comp[torch.randperm(n, generator=g)]
    x = centers[comp] + variance ** 0.5 * torch.randn(n, 2, generator=g)
    return x, labels[comp]
