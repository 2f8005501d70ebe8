"""Rebuild a trained collaboration from its run folder or checkpoint file.

It lives with training, not with the checkpoint format (:mod:`cda2_ext.storage.checkpoint`),
because it reads the stored :class:`~cda2_ext.training.config.TrainConfig`: the file layer stays
below the library and knows nothing of what a run trains.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch

from ..errors import ArchitectureError, CheckpointError, one_line
from ..storage.checkpoint import PathLike, checkpoint_files, load_checkpoint, load_state
from ..models.architectures import ArchLike, arch_name, named_architectures
from ..models.collaboration import Collaboration
from .config import TrainConfig

__all__ = ["load_collaboration"]


def load_collaboration(path: PathLike, device: Union[str, torch.device] = "cpu", *,
                       fused: bool = True, arch: Optional[ArchLike] = None
                       ) -> Tuple[Collaboration, Dict[str, Any]]:
    """Rebuild the :class:`~cda2_ext.models.Collaboration` of a checkpoint (eval mode).

    ``fused`` chooses the operator backend of the rebuilt model (see
    :class:`~cda2_ext.models.Collaboration`). ``arch``: for a run of a user's own architecture,
    its constructor, named again (the callable, or its ``package.module:function`` path, which
    is then imported): a checkpoint never imports code by itself, so without it (or a
    :func:`~cda2_ext.models.named_architectures` block) such a run is a one-line
    :class:`~cda2_ext.errors.CheckpointError`; so is a constructor other than the recorded one.
    Returns ``(model, meta)``.
    """
    tensors, meta = load_checkpoint(path, device)
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"checkpoint {path} has no model config in its metadata")
    if "config" in meta:  # what callers read next (dataset, seed, method): checked like options
        TrainConfig.from_meta(meta, checkpoint_files(path)[0])
    stored = meta["model"].get("arch", "resnet")
    if arch is not None and arch_name(arch) != stored:
        raise CheckpointError(f"checkpoint {path} is a model of arch {stored!r}, not of the "
                              f"{arch_name(arch)!r} given")
    with named_architectures(*([arch] if arch is not None else [])):
        try:  # first without memory (shapes only): a config far larger than its tensors allocates nothing
            with torch.device("meta"):
                shell = Collaboration.from_config(meta["model"], fused=fused)
        except ArchitectureError as err:  # a user's constructor not named: say how, in one line
            raise CheckpointError(f"checkpoint {path}: {err}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(f"checkpoint {path} has no usable model config: {one_line(err)}") from None
        load_state(shell, tensors, "model.", path, check_only=True)
        model = Collaboration.from_config(meta["model"], fused=fused)
    load_state(model, tensors, "model.", path)
    return model.to(device).eval(), meta
