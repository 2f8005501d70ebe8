"""Checkpoints: one safetensors file (all tensors) + a JSON file beside it (config, progress).

``<dir>/checkpoint.safetensors`` holds the model, optimiser momenta and RNG states as plain
tensors (RNG states are the ``uint8`` tensors torch already uses), so loading never unpickles
anything. Its safetensors metadata also carries the JSON document, which makes the file
self-contained and authoritative; ``<dir>/checkpoint.json`` is the same document for people and
tools. Both are written to a temporary file in the same folder, flushed to disk and moved into
place with ``os.replace``, so a crash leaves either the previous checkpoint or the new one, never
a torn file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import torch
from torch import Tensor

from .errors import CheckpointError

__all__ = ["FORMAT", "CHECKPOINT_NAME", "checkpoint_files", "atomic_write",
           "save_checkpoint", "load_checkpoint", "load_collaboration"]

FORMAT = "cda2-checkpoint/1"
CHECKPOINT_NAME = "checkpoint"
PathLike = Union[str, os.PathLike]



def checkpoint_files(path: PathLike) -> Tuple[Path, Path]:
    """``(safetensors, json)`` paths for a run folder or either file of a checkpoint."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
        return p.with_suffix(".safetensors"), p.with_suffix(".json")
    return p / f"{CHECKPOINT_NAME}.safetensors", p / f"{CHECKPOINT_NAME}.json"


def atomic_write(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file + fsync + ``os.replace``."""
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


def save_checkpoint(path: PathLike, tensors: Dict[str, Tensor], meta: Dict[str, Any]) -> Path:
    """Save ``tensors`` and the JSON-serialisable ``meta`` atomically; returns the safetensors path."""
    from safetensors.torch import save

    st_path, json_path = checkpoint_files(path)
    doc = {"format": FORMAT, **meta}
    text = json.dumps(doc, indent=2, sort_keys=True)
    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                metadata={"format": FORMAT, "meta": text})
    atomic_write(st_path, blob)
    atomic_write(json_path, (text + "\n").encode())
    return st_path


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu"
                    ) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Load ``(tensors, meta)``; ``meta`` comes from the safetensors file itself."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    st_path, _ = checkpoint_files(path)
    if not st_path.is_file():
        raise CheckpointError(f"no checkpoint at {st_path}")
    try:
        with safe_open(str(st_path), framework="pt") as fh:
            header = fh.metadata() or {}
        tensors = load_file(str(st_path), device=str(device))
        meta = json.loads(header["meta"])
    except Exception as err:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"unreadable checkpoint {st_path}: {err}") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{st_path} is not a {FORMAT} checkpoint (format {header.get('format')!r})")
    return tensors, meta


def load_collaboration(path: PathLike, device: Union[str, torch.device] = "cpu", *,
                       fused: bool = True):
    """Rebuild the :class:`~cda2_ext.models.Collaboration` of a checkpoint (eval mode).

    ``fused`` chooses the operator backend of the rebuilt model (see
    :class:`~cda2_ext.models.Collaboration`). Returns ``(model, meta)``.
    """
    from .models.collaboration import Collaboration

    tensors, meta = load_checkpoint(path, device)
    try:
        model = Collaboration.from_config(meta["model"], fused=fused)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has no usable model config: {err}") from None
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not match its model config: {err}") from None
    return model.to(device).eval(), meta
