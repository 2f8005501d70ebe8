"""Checkpoints: one safetensors file (all tensors) + a JSON file beside it (config, progress).

``<dir>/checkpoint.safetensors`` holds the model, optimiser momenta and RNG states as plain
tensors (RNG states are the ``uint8`` tensors torch already uses), so loading never unpickles
anything. Its safetensors metadata also carries the JSON document, which makes the file
self-contained and authoritative; ``<dir>/checkpoint.json`` is the same document for people and
tools.

Integrity: the document records ``tensors_sha256``, a SHA-256 of every tensor (name, dtype, shape
and bytes). :func:`load_checkpoint` recomputes it and refuses a file whose tensors changed (a
flipped bit, a torn copy). The JSON file carries the same digest, so a reader holding both files
can tell whether they belong together (the safetensors file is replaced first, the JSON second).
Checkpoints from before the digest load with a warning.

Durability: each file is written to a temporary file in the same folder, flushed to disk, moved
into place with ``os.replace`` and the folder is synced, so a crash leaves either the previous
checkpoint or the new one, never a torn file (at worst a stale ``.*.tmp`` file, which the next run
in that folder removes: :class:`cda2_ext.run_dir.RunFolder`).

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
from typing import Any, Dict, Mapping, Tuple, Union

import torch
from torch import Tensor, nn

from .errors import CheckpointError, one_line

__all__ = ["FORMAT", "CHECKPOINT_NAME", "DIGEST_KEY", "checkpoint_files", "atomic_write",
           "fsync_dir", "tensors_digest", "save_checkpoint", "load_checkpoint", "load_state",
           "load_collaboration"]

FORMAT = "cda2-checkpoint/1"
CHECKPOINT_NAME = "checkpoint"
DIGEST_KEY = "tensors_sha256"
PathLike = Union[str, os.PathLike]


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


def save_checkpoint(path: PathLike, tensors: Dict[str, Tensor], meta: Dict[str, Any]) -> Path:
    """Save ``tensors`` and the JSON-serialisable ``meta`` atomically (with the tensors' digest);
    returns the safetensors path."""
    from safetensors.torch import save

    st_path, json_path = checkpoint_files(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    doc = {"format": FORMAT, **meta, DIGEST_KEY: tensors_digest(tensors)}
    text = json.dumps(doc, indent=2, sort_keys=True)
    atomic_write(st_path, save(tensors, metadata={"format": FORMAT, "meta": text}))
    atomic_write(json_path, (text + "\n").encode())
    return st_path


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu"
                    ) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Load ``(tensors, meta)``; ``meta`` comes from the safetensors file itself and the tensors
    are checked against the digest stored in it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    st_path, _ = checkpoint_files(path)
    if not st_path.is_file():
        raise CheckpointError(f"no checkpoint at {st_path}")
    try:
        with safe_open(str(st_path), framework="pt") as fh:
            header = fh.metadata() or {}
        tensors = load_file(str(st_path), device="cpu")
    except Exception as err:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"unreadable checkpoint {st_path}: {one_line(err)}") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{st_path} is not a {FORMAT} checkpoint "
                              f"(its metadata has format {header.get('format')!r})")
    try:
        meta = json.loads(header.get("meta", ""))
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{st_path} has damaged metadata (expected a JSON object)")
    digest = meta.get(DIGEST_KEY)
    if digest is None:
        warnings.warn(f"{st_path} has no tensor digest (written before cda2_ext checked "
                      "checkpoints); loading it unverified", stacklevel=2)
    elif digest != tensors_digest(tensors):
        raise CheckpointError(f"{st_path} is damaged: its tensors do not match the {DIGEST_KEY} "
                              "stored with them")
    if torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, meta


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


def load_collaboration(path: PathLike, device: Union[str, torch.device] = "cpu", *,
                       fused: bool = True):
    """Rebuild the :class:`~cda2_ext.models.Collaboration` of a checkpoint (eval mode).

    ``fused`` chooses the operator backend of the rebuilt model (see
    :class:`~cda2_ext.models.Collaboration`). Returns ``(model, meta)``.
    """
    from .models.collaboration import Collaboration

    tensors, meta = load_checkpoint(path, device)
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"checkpoint {path} has no model config in its metadata")
    try:
        model = Collaboration.from_config(meta["model"], fused=fused)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"checkpoint {path} has no usable model config: {one_line(err)}") from None
    load_state(model, tensors, "model.", path)
    return model.to(device).eval(), meta
