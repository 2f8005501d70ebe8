"""Checkpoints: one safetensors file (all tensors) + a JSON file beside it (config, progress).

``<dir>/checkpoint.safetensors`` holds the model, optimiser momenta and RNG states as plain
tensors (RNG states are the ``uint8`` tensors torch already uses), so loading never unpickles
anything. Its safetensors metadata also carries the JSON document, which makes the file
self-contained and authoritative; ``<dir>/checkpoint.json`` is the same document for people and
tools.

Integrity: the document records two digests. ``tensors_sha256`` is a SHA-256 of every tensor
(name, dtype, shape and bytes); ``document_sha256`` is a SHA-256 of the canonical JSON of every
other entry of the document (:func:`document_digest`: keys sorted, no whitespace), so it covers the
metadata - the training config, the epoch, the history - *and*, through ``tensors_sha256``, the
tensors. :func:`load_checkpoint` recomputes both and refuses a file where either differs (a flipped
bit, a torn copy, an edited learning rate or seed that would resume silently on another
trajectory). The JSON file carries the same document, so a reader holding both files can tell
whether they belong together (the safetensors file is replaced first, the JSON second), and
:func:`read_document` checks it alone.

A checkpoint without ``document_sha256`` (written before cda2_ext covered the metadata, or with
the digest removed) is refused, since nothing it says can be trusted; setting the environment
variable ``CDA2_ALLOW_UNDIGESTED=1`` (or passing ``allow_undigested=True``) loads such an old
checkpoint anyway, with a one-line warning, still checking its tensors when it has their digest.

Durability: each file is written to a temporary file in the same folder, flushed to disk, moved
into place with ``os.replace`` and the folder is synced, so a crash leaves either the previous
checkpoint or the new one, never a torn file (at worst a stale ``.*.tmp`` file, which the next run
in that folder removes: :class:`cda2_ext.storage.run_folder.RunFolder`).

Every way a file can be unusable (missing, not safetensors, not ours, damaged metadata or tensors,
tensors that do not fit the model) raises :class:`~cda2_ext.errors.CheckpointError` with one line
naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .. import limits
from ..errors import CheckpointError, one_line, os_reason

__all__ = ["FORMAT", "CHECKPOINT_NAME", "DIGEST_KEY", "DOCUMENT_KEY", "ALLOW_UNDIGESTED_ENV",
           "UndigestedCheckpointWarning", "checkpoint_files", "atomic_write", "fsync_dir",
           "tensors_digest", "document_digest", "save_checkpoint", "load_checkpoint",
           "read_document", "load_state"]

FORMAT = "cda2-checkpoint/1"
CHECKPOINT_NAME = "checkpoint"
DIGEST_KEY = "tensors_sha256"
DOCUMENT_KEY = "document_sha256"
#: Set to 1 to load checkpoints written before the metadata digest (see the module docstring).
ALLOW_UNDIGESTED_ENV = "CDA2_ALLOW_UNDIGESTED"
PathLike = Union[str, os.PathLike]


class UndigestedCheckpointWarning(UserWarning):
    """An old checkpoint without ``document_sha256`` was loaded because the user allowed it."""


def checkpoint_files(path: PathLike) -> Tuple[Path, Path]:
    """``(safetensors, json)`` paths for a run folder or either file of a checkpoint."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
        return p.with_suffix(".safetensors"), p.with_suffix(".json")
    return p / f"{CHECKPOINT_NAME}.safetensors", p / f"{CHECKPOINT_NAME}.json"


def fsync_dir(folder: PathLike) -> None:
    """Flush a folder's entries (e.g. a rename) to disk."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms that cannot open a folder (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse to sync a folder; nothing more can be done there
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file (``.<name>.*.tmp``) + fsync + ``os.replace``,
    then sync the folder so the rename survives a power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 (hex) of every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def document_digest(doc: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``doc`` without its own ``document_sha256``: keys
    sorted, no whitespace, so any writer of the same values gets the same digest."""
    body = {k: v for k, v in doc.items() if k != DOCUMENT_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def save_checkpoint(path: PathLike, tensors: Dict[str, Tensor], meta: Dict[str, Any]) -> Path:
    """Save ``tensors`` and the JSON-serialisable ``meta`` atomically, with the tensors' digest and
    the document's (which covers ``meta`` and the tensors' digest); returns the safetensors path."""
    from safetensors.torch import save

    st_path, json_path = checkpoint_files(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    doc = {"format": FORMAT, **meta, DIGEST_KEY: tensors_digest(tensors)}
    doc[DOCUMENT_KEY] = document_digest(doc)
    text = json.dumps(doc, indent=2, sort_keys=True)
    atomic_write(st_path, save(tensors, metadata={"format": FORMAT, "meta": text}))
    atomic_write(json_path, (text + "\n").encode())
    return st_path


def _shown(value: object, limit: int = 60) -> str:
    """A stored value for a message: its repr, shortened (a damaged file may hold anything)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _allowed_undigested(allow: Optional[bool]) -> bool:
    if allow is not None:
        return allow
    return os.environ.get(ALLOW_UNDIGESTED_ENV, "") not in ("", "0")


def _parse_document(text: object, source: Path) -> Dict[str, Any]:
    """The JSON document of a checkpoint as a dict, or one :class:`CheckpointError` line (a
    document nested thousands deep overflows the parser's recursion: that is damage too)."""
    try:
        doc = json.loads(text) if isinstance(text, (str, bytes)) else None
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{source} has damaged metadata (expected a JSON object)")
    return doc


def _check_document(doc: Dict[str, Any], source: Path, allow_undigested: Optional[bool]) -> None:
    """Refuse a document whose digest does not match it, or that has none (unless allowed); then
    the entries every reader uses: ``epoch`` a count, ``history`` a list."""
    stored = doc.get(DOCUMENT_KEY)
    if stored is None:
        if not _allowed_undigested(allow_undigested):
            raise CheckpointError(
                f"{source} has no {DOCUMENT_KEY} (written before cda2_ext checked the metadata, or "
                f"the digest was removed); set {ALLOW_UNDIGESTED_ENV}=1 to load it unverified")
        warnings.warn(f"{source} has no {DOCUMENT_KEY}; loading it unverified because "
                      f"{ALLOW_UNDIGESTED_ENV} is set", UndigestedCheckpointWarning, stacklevel=3)
    elif stored != document_digest(doc):
        raise CheckpointError(f"{source} is damaged: its metadata does not match the "
                              f"{DOCUMENT_KEY} stored with it")
    epoch = doc.get("epoch", 0)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= limits.ITERATIONS:
        raise CheckpointError(f"{source} has damaged metadata (epoch {_shown(epoch)})")
    if not isinstance(doc.get("history", []), list):
        raise CheckpointError(f"{source} has damaged metadata (history of type "
                              f"{type(doc['history']).__name__})")


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu", *,
                    allow_undigested: Optional[bool] = None
                    ) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Load ``(tensors, meta)``; ``meta`` comes from the safetensors file itself, and both the
    tensors and the metadata are checked against the digests stored in it.

    ``allow_undigested``: load a checkpoint that has no ``document_sha256`` (with a warning);
    default: only when ``$CDA2_ALLOW_UNDIGESTED`` is set. Every failure, an unusable path
    included (a name too long, no permission), is one :class:`CheckpointError` line.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    st_path, _ = checkpoint_files(path)
    try:
        present = st_path.is_file()
    except OSError as err:  # a name too long, a folder that may not be read, ...
        raise CheckpointError(f"cannot read checkpoint {os_reason(err)}") from None
    if not present:
        raise CheckpointError(f"no checkpoint at {st_path}")
    try:
        with safe_open(str(st_path), framework="pt") as fh:
            header = fh.metadata() or {}
        tensors = load_file(str(st_path), device="cpu")
    except Exception as err:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"unreadable checkpoint {st_path}: {one_line(err)}") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{st_path} is not a {FORMAT} checkpoint "
                              f"(its metadata has format {_shown(header.get('format'))})")
    meta = _parse_document(header.get("meta", ""), st_path)
    digest = meta.get(DIGEST_KEY)
    if digest is None and not _allowed_undigested(allow_undigested):
        raise CheckpointError(f"{st_path} has no {DIGEST_KEY} (written before cda2_ext checked "
                              f"checkpoints); set {ALLOW_UNDIGESTED_ENV}=1 to load it unverified")
    if digest is not None and digest != tensors_digest(tensors):
        raise CheckpointError(f"{st_path} is damaged: its tensors do not match the {DIGEST_KEY} "
                              "stored with them")
    _check_document(meta, st_path, allow_undigested)
    if torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, meta


def read_document(path: PathLike, *, allow_undigested: Optional[bool] = None) -> Dict[str, Any]:
    """The checked JSON document of a checkpoint from its ``checkpoint.json`` alone (no tensors
    read: for tools that only need the config or progress); the same checks and one-line
    :class:`CheckpointError` as :func:`load_checkpoint`, which also checks the tensors."""
    json_path = checkpoint_files(path)[1]
    try:
        text = json_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {json_path}") from None
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {os_reason(err)}") from None
    doc = _parse_document(text, json_path)
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{json_path} is not a {FORMAT} checkpoint document")
    _check_document(doc, json_path, allow_undigested)
    return doc


def load_state(module: nn.Module, tensors: Mapping[str, Tensor], prefix: str, source: PathLike, *,
               check_only: bool = False) -> None:
    """Load the ``prefix``-ed ``tensors`` into ``module``, or raise one :class:`CheckpointError`
    line saying how they differ (instead of ``load_state_dict``'s multi-line dump).
    ``check_only``: raise the same error, but load nothing."""
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    want = module.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    shape = sorted(k for k in set(want) & set(state) if want[k].shape != state[k].shape)
    problems = [f"{len(names)} {what} (e.g. {prefix}{names[0]})" for what, names in
                (("missing tensors", missing), ("unexpected tensors", extra),
                 ("tensors of another shape", shape)) if names]
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match its model config: "
                              + ", ".join(problems))
    if not check_only:
        module.load_state_dict(state)
