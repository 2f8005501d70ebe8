"""Image folders, and zips of them, decoded once into a cache of ``uint8`` arrays.

Layout (the ImageFolder convention): a folder, or a zip of one, holding ``train/`` and ``test/``,
each with one folder per class holding that class's images. The sorted class folder names are the
labels ``0..K-1``, and ``train/`` and ``test/`` must have the same class folders. A zip may hold
``train/`` and ``test/`` at its root or under one top folder (what zipping a folder makes); other
entries there (a README) are ignored. Inside ``train/`` and ``test/`` every file must be an image
in a class folder: no files beside the class folders, no folders inside them, no empty class.
Hidden entries are ignored everywhere: names starting with ``.`` (``.DS_Store``, macOS ``._x.jpg``),
``__MACOSX/`` (macOS zip metadata) and ``Thumbs.db``.

Images: any format Pillow reads, in mode RGB (other modes are refused, not converted), and all
images of a split the same size as its first (32x32 for CIFAR-10). Within a split the images are
ordered round-robin over the classes: the first image (in sorted file-name order) of every class,
then the second, and so on. So the first ``N`` images (``--train-limit``, ``--test-limit``,
``--limit``) are spread evenly over the classes, as a prefix of CIFAR-10's own batches nearly is;
a class-by-class order would make the first 5,000 training images all airplanes.

Cache: Pillow takes ~0.2 ms per small JPEG, most of it Python-level header parsing under the GIL
(so threads do not help), about 10 s for CIFAR-10's 60,000 images. Each decoded split is therefore
written once under :func:`cache_dir` and read back in well under a second. The key is this
loader's format version, the split, and for a zip its resolved path, size and modification time;
for a folder every image's path, size and modification time (a folder's own time does not change
when a file is rewritten). The file holds a header (key, shape, classes, SHA-256 of the payload)
and the pixels and labels; it is written atomically (temporary file, then ``os.replace``, so
concurrent runs at worst decode twice), and reading checks the key, the size and the digest: a
cache that fails any check is decoded again and rewritten, never used. A cache that cannot be
written (a read-only home) costs one note on stderr, not the run.

Errors: every problem is one :class:`~cda2_ext.errors.DataError` line naming the file: not a zip,
a truncated or damaged zip (its CRC-32s also catch damaged bytes that Pillow would decode as
noise), missing ``train/`` or ``test/``, class folders that differ, a file that is not an image, a
truncated or corrupt image, a wrong mode or size.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import ConfigError, DataError, one_line

__all__ = ["CACHE_ENV", "SPLITS", "FolderSplit", "cache_dir", "is_image_folder",
           "folder_classes", "read_image_folder"]

#: Environment variable naming the cache folder (default ``$XDG_CACHE_HOME/cda2_ext``).
CACHE_ENV = "CDA2_CACHE"
SPLITS = ("train", "test")
_FORMAT = 1                 # bump when the decoded result would change: old caches then miss
_MAGIC = b"CDA2IMG\x01"
_MAX_HEADER = 16 << 20      # a cache header: the key, shape and class names
_MAX_FILE = 64 << 20        # one encoded image; a bigger zip member is refused before reading
_MAX_SPLIT = 16 << 30       # decoded pixels of one split, checked before allocating them
_HIDDEN = ("__MACOSX", "Thumbs.db")

PathLike = Union[str, os.PathLike]
Layout = Dict[str, Dict[str, List[str]]]  # split -> class -> member names, sorted


class FolderSplit(NamedTuple):
    """One decoded split: ``images uint8 [N, 3, H, W]``, ``labels int64 [N]``, class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: Tuple[str, ...]


def cache_dir() -> Path:
    """The user's cache folder for cda2_ext: ``$CDA2_CACHE``, else ``$XDG_CACHE_HOME/cda2_ext``,
    else ``~/.cache/cda2_ext`` (absolute; not created here)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"  # XDG: relative = unset
    return base / "cda2_ext"


def is_image_folder(path: PathLike) -> bool:
    """Whether ``path`` is a folder with a ``train/`` or ``test/`` subfolder (one missing is then
    reported by :func:`read_image_folder`, not taken as "no image folder here")."""
    p = Path(path)
    return any((p / s).is_dir() for s in SPLITS)


# ---------------------------------------------------------------------------------------------
# Layout: from a listing of names to split -> class -> images, checked

def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part in _HIDDEN for part in name.split("/"))


def _root_prefix(names: Sequence[str], where: str) -> str:
    """``""`` when ``train/``/``test/`` are at the root, ``"top/"`` when under one top folder."""
    tops = {n.split("/", 1)[0] for n in names}
    if tops & set(SPLITS):
        return ""
    if len(tops) == 1:
        top = tops.pop()
        if any(n.split("/")[1:2] in (["train"], ["test"]) for n in names):
            return top + "/"
    raise DataError(f"image folder {where}: no train/ and test/ folders at its root or under a "
                    f"single top folder (found: {_few(sorted(tops))})")


def _few(items: Sequence[str], limit: int = 5) -> str:
    if not items:
        return "nothing"
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _layout(files: Sequence[str], dirs: Sequence[str], where: str) -> Layout:
    """Group ``files`` (relative ``/``-separated names; ``dirs`` adds folders that may be empty)
    into split -> class -> sorted images, or a one-line :class:`DataError` naming the entry."""
    files = [f for f in files if not _hidden(f)]
    dirs = [d for d in dirs if not _hidden(d)]
    prefix = _root_prefix(files + dirs, where)
    out: Layout = {s: {} for s in SPLITS}
    seen = set()
    for name, is_file in [(d, False) for d in dirs] + [(f, True) for f in files]:
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix):].split("/")
        if parts[0] not in SPLITS or len(parts) == 1:
            continue  # beside train/ and test/ (a README), or one of them
        split = parts[0]
        if len(parts) == 2 and is_file:
            raise DataError(f"image folder {where}: {name} is a file beside the class folders of "
                            f"{split}/ (expected {split}/<class>/<image>)")
        if len(parts) > 3 or (len(parts) == 3 and not is_file):
            what = f"{name} is in" if is_file else f"{name}/ is"
            raise DataError(f"image folder {where}: {what} a folder inside a class folder "
                            f"(expected {split}/<class>/<image>)")
        images = out[split].setdefault(parts[1], [])
        if is_file:
            if name in seen:  # a zip may hold one name twice; which one is meant is unknowable
                raise DataError(f"image folder {where}: {name} appears twice")
            seen.add(name)
            images.append(name)
    _check_classes(out, prefix, where)
    for by_class in out.values():
        for images in by_class.values():
            images.sort()
    return out


def _check_classes(layout: Layout, prefix: str, where: str) -> None:
    for split in SPLITS:
        if not layout[split]:
            raise DataError(f"image folder {where}: no {prefix}{split}/ folder with class folders")
        for cls, images in layout[split].items():
            if not images:
                raise DataError(f"image folder {where}: {prefix}{split}/{cls}/ holds no images")
    train, test = set(layout["train"]), set(layout["test"])
    if train != test:
        only = [f"only in {split}/: {_few(sorted(a - b))}"
                for split, a, b in (("train", train, test), ("test", test, train)) if a - b]
        raise DataError(f"image folder {where}: train/ and test/ have different class folders "
                        f"({'; '.join(only)})")


def _round_robin(by_class: Dict[str, List[str]]) -> List[Tuple[int, str]]:
    """``(label, name)``: the first image of every class, then the second, ... (see the module
    docstring for why)."""
    lists = [by_class[c] for c in sorted(by_class)]
    return [(label, names[i]) for i in range(max(map(len, lists)))
            for label, names in enumerate(lists) if i < len(names)]


# ---------------------------------------------------------------------------------------------
# Sources: a folder or a zip, as a listing, bytes of a member, and a cache key

class _Source:
    """A folder or a zip: ``layout()``, ``read(name)``, ``stamp(split)`` (what the cache key
    covers) and ``describe(name)`` (a member's name in messages)."""

    kind = ""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._layout: Optional[Layout] = None

    def __enter__(self) -> "_Source":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Folder(_Source):
    """An image folder on disk; only its ``train/`` and ``test/`` are walked."""

    kind = "folder"

    def describe(self, name: str) -> str:
        return str(self.path / name)

    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = _layout(*self._listing(), str(self.path))
        return self._layout

    def _listing(self) -> Tuple[List[str], List[str]]:
        """Files and folders two levels into ``train/`` and ``test/``, deeper ones only named
        (they are an error): no walk that a symlink loop or a wrong --data could make endless."""
        files: List[str] = []
        dirs: List[str] = []
        for split in SPLITS:
            if not (self.path / split).is_dir():
                continue  # reported by _layout, with the folder's name
            for entry in self._scan(self.path / split):
                rel = f"{split}/{entry.name}"
                if not entry.is_dir():
                    files.append(rel)
                    continue
                dirs.append(rel)
                for sub in self._scan(Path(entry.path)):
                    (dirs if sub.is_dir() else files).append(f"{rel}/{sub.name}")
        return files, dirs

    @staticmethod
    def _scan(folder: Path) -> List[os.DirEntry]:
        try:
            with os.scandir(folder) as it:
                return list(it)
        except OSError as err:
            raise DataError(f"unreadable image folder {folder}: {err.strerror or err}") from None

    def stamp(self, split: str) -> object:
        """Every image's name, size and modification time: a rewritten file changes the key."""
        def entry(name: str) -> Tuple[str, int, int]:
            st = os.stat(self.path / name)
            return name, st.st_size, st.st_mtime_ns

        return [str(self.path.resolve()),
                [entry(n) for names in self.layout()[split].values() for n in names]]

    def read(self, name: str) -> bytes:
        path = self.path / name
        try:
            size = path.stat().st_size
            if size > _MAX_FILE:
                raise DataError(f"bad image {path}: {size} bytes, more than an image here can be")
            return path.read_bytes()
        except OSError as err:
            raise DataError(f"unreadable image {path}: {err.strerror or err}") from None


class _Zip(_Source):
    """A zip of an image folder; opened only when its listing or bytes are needed, so a cache
    hit costs one ``stat``."""

    kind = "zip"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._zip: Optional[zipfile.ZipFile] = None

    def __exit__(self, *exc: object) -> None:
        if self._zip is not None:
            self._zip.close()

    def describe(self, name: str) -> str:
        return f"{name} in {self.path}"

    def _open(self) -> zipfile.ZipFile:
        if self._zip is None:
            try:
                self._zip = zipfile.ZipFile(self.path)
            # whatever zipfile raises on a damaged archive (truncated: BadZipFile; odd headers:
            # ValueError/EOFError), it means the same to the user
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
                raise DataError(f"not a readable zip file {self.path}: {one_line(err)} (--data takes "
                                "a CIFAR-10 folder, an image folder or a zip of one)") from None
        return self._zip

    def layout(self) -> Layout:
        if self._layout is None:
            infos = self._open().infolist()
            for info in infos:
                parts = info.filename.rstrip("/").split("/")
                if info.filename.startswith("/") or any(p in ("", ".", "..") for p in parts):
                    raise DataError(f"image folder {self.path}: member {info.filename!r} is not a "
                                    "plain relative path")
            self._layout = _layout([i.filename for i in infos if not i.is_dir()],
                                   [i.filename.rstrip("/") for i in infos if i.is_dir()],
                                   str(self.path))
        return self._layout

    def stamp(self, split: str) -> object:  # noqa: ARG002 - one key per archive
        try:
            st = self.path.stat()
        except OSError as err:
            raise DataError(f"unreadable zip file {self.path}: {err.strerror or err}") from None
        return [str(self.path.resolve()), st.st_size, st.st_mtime_ns]

    def read(self, name: str) -> bytes:
        z = self._open()
        info = z.getinfo(name)
        if info.file_size > _MAX_FILE:
            raise DataError(f"bad image {self.describe(name)}: {info.file_size} bytes, more than "
                            "an image here can be")
        try:
            return z.read(info)  # checks the member's CRC-32
        # BadZipFile (bad CRC or header), zlib.error, EOFError (truncated), NotImplementedError
        # (a compression zipfile lacks), RuntimeError (encrypted): a member we cannot read
        except Exception as err:  # noqa: BLE001
            raise DataError(f"corrupt zip member {self.describe(name)}: {one_line(err)}") from None


# ---------------------------------------------------------------------------------------------
# Decoding

def _decode(blob: bytes, where: str, size: Optional[Tuple[int, int]], first: str) -> np.ndarray:
    """One image as ``uint8 [H, W, 3]``: RGB, and ``size`` (W, H) when given (checked before the
    pixels are decoded, so a huge image is refused unread)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(blob)) as im:
            if im.mode != "RGB":
                raise DataError(f"bad image {where}: mode {im.mode}, expected RGB")
            if size is not None and im.size != size:
                raise DataError(f"bad image {where}: {im.size[0]}x{im.size[1]} pixels, expected "
                                f"{size[0]}x{size[1]} like {first}")
            im.load()  # here, not inside np.asarray, where an error could be swallowed
            return np.asarray(im)
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"bad image {where}: not an image file Pillow can read") from None
    # Pillow's decoders raise OSError ("image file is truncated"), SyntaxError, ValueError,
    # struct.error, DecompressionBombError, ... on damaged files: all mean "unreadable image".
    except Exception as err:  # noqa: BLE001
        raise DataError(f"bad image {where}: truncated or corrupt ({one_line(err)})") from None


def _decode_split(src: _Source, split: str) -> FolderSplit:
    by_class = src.layout()[split]
    order = _round_robin(by_class)
    first_name = order[0][1]
    first = _decode(src.read(first_name), src.describe(first_name), None, "")
    h, w = first.shape[:2]
    if len(order) * 3 * h * w > _MAX_SPLIT:
        raise DataError(f"image folder {src.path}: {len(order)} images of {w}x{h} pixels are more "
                        f"than {_MAX_SPLIT >> 30} GiB decoded")
    images = np.empty((len(order), 3, h, w), np.uint8)
    images[0] = first.transpose(2, 0, 1)
    for i, (_, name) in enumerate(order[1:], 1):  # into place: no second copy of the split
        images[i] = _decode(src.read(name), src.describe(name), (w, h), first_name).transpose(2, 0, 1)
    labels = np.array([label for label, _ in order], np.int64)
    return FolderSplit(images, labels, tuple(sorted(by_class)))


# ---------------------------------------------------------------------------------------------
# Cache

def _cache_file(src: _Source, split: str, key: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", src.path.resolve().name)[:40] or "images"
    return cache_dir() / "images" / f"{stem}-{split}-{key[:20]}.bin"


def _payload_digest(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256(memoryview(images).cast("B"))
    h.update(memoryview(labels).cast("B"))
    return h.hexdigest()


def _note(text: str) -> None:
    print(f"cda2: note: {text}", file=sys.stderr, flush=True)


def _write_cache(path: Path, key: str, data: FolderSplit) -> None:
    """Write atomically; failing to write is a note, not an error (the data are in memory)."""
    labels = data.labels.astype("<i8", copy=False)
    header = json.dumps({"format": _FORMAT, "key": key, "shape": list(data.images.shape),
                         "classes": list(data.classes),
                         "sha256": _payload_digest(data.images, labels)}).encode()
    tmp: Optional[str] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(_MAGIC + len(header).to_bytes(8, "little") + header)
            fh.write(memoryview(data.images).cast("B"))
            fh.write(memoryview(labels).cast("B"))
        os.replace(tmp, path)
        _prune_older(path)
    except OSError as err:
        _note(f"could not write the image cache {path} ({err.strerror or err}); the next run "
              "decodes the images again")
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _prune_older(path: Path) -> None:
    """Remove this source's caches for other keys (the data changed since): one per split, not
    one more 150 MB file every time a folder is touched."""
    stem, _, _ = path.name.rpartition("-")
    for old in path.parent.glob(f"{stem}-{'?' * 20}.bin"):
        if old != path:
            old.unlink(missing_ok=True)


def _read_cache(path: Path, key: str) -> Optional[FolderSplit]:
    """The cached split, or ``None`` when absent or failing any check (then noted on stderr)."""
    try:
        fh = open(path, "rb")
    except OSError:  # absent, or no cache folder to be had: a miss (writing it will say why)
        return None
    try:
        with fh:
            return _parse_cache(fh, os.fstat(fh.fileno()).st_size, key)
    except (OSError, ValueError, KeyError, TypeError) as err:
        _note(f"image cache {path} is damaged ({one_line(err)}); decoding the images again")
        return None


def _parse_cache(fh: io.BufferedReader, size: int, key: str) -> FolderSplit:
    """Check everything before trusting anything: magic, header, key, exact size, digest, labels."""
    if fh.read(len(_MAGIC)) != _MAGIC:
        raise ValueError("not a cda2 image cache")
    hlen = int.from_bytes(fh.read(8), "little")
    if not 0 < hlen <= min(_MAX_HEADER, size):
        raise ValueError("bad header length")
    head = json.loads(fh.read(hlen))
    if head["format"] != _FORMAT or head["key"] != key:
        raise ValueError("written for other data")
    shape, classes = tuple(head["shape"]), tuple(head["classes"])
    if (len(shape) != 4 or shape[1] != 3 or not all(isinstance(v, int) and v > 0 for v in shape)
            or not classes or not all(isinstance(c, str) for c in classes)):
        raise ValueError("bad header")
    n = shape[0]
    expected = len(_MAGIC) + 8 + hlen + int(np.prod(shape)) + 8 * n
    if size != expected:
        raise ValueError(f"{size} bytes, expected {expected}")
    images = np.empty(shape, np.uint8)
    labels = np.empty(n, "<i8")
    for arr in (images, labels):
        if fh.readinto(memoryview(arr).cast("B")) != arr.nbytes:
            raise ValueError("truncated")
    if _payload_digest(images, labels) != head["sha256"]:
        raise ValueError("checksum mismatch")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise ValueError("labels out of range")
    return FolderSplit(images, labels.astype(np.int64, copy=False), classes)


# ---------------------------------------------------------------------------------------------

def folder_classes(path: PathLike) -> Tuple[str, ...]:
    """The sorted class names of an image folder or zip, from its listing alone (no image is
    decoded); the same checks of the layout as :func:`read_image_folder`, the same errors."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"image folder {path} does not exist")
    with (_Zip(path) if path.is_file() else _Folder(path)) as src:
        return tuple(sorted(src.layout()["train"]))


def read_image_folder(path: PathLike, split: str, *, use_cache: bool = True) -> FolderSplit:
    """Load one split (``"train"`` or ``"test"``) of an image folder or a zip of one.

    Args:
        path: a folder holding ``train/`` and ``test/``, or a zip file of one (see the module
            docstring for the layout, the order of the images and what is ignored).
        split: ``"train"`` or ``"test"``.
        use_cache: read the decoded split from :func:`cache_dir` when it is there and intact,
            and write it there after decoding.

    Returns:
        ``FolderSplit(images uint8 [N, 3, H, W], labels int64 [N], classes)``.

    Raises:
        DataError: one line naming the file, for anything unreadable or out of layout.
    """
    if split not in SPLITS:
        raise ConfigError(f"split: expected 'train' or 'test', got {split!r}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"image folder {path} does not exist")
    with (_Zip(path) if path.is_file() else _Folder(path)) as src:
        key = hashlib.sha256(json.dumps([_FORMAT, src.kind, split, src.stamp(split)]).encode()
                             ).hexdigest()
        cached = _cache_file(src, split, key) if use_cache else None
        hit = _read_cache(cached, key) if cached is not None else None
        if hit is not None:
            return hit
        data = _decode_split(src, split)
        if cached is not None:
            _write_cache(cached, key, data)
        return data
