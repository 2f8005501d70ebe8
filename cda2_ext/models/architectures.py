"""The sub-model architectures a collaboration is built from: a registry, and users' own.

Every architecture makes a *trunk* from a
:class:`~cda2_ext.models.collaboration.CollaborationConfig`: a module with ``num_models`` (M) and
``feature_dim`` (F) that maps inputs ``[B, *input]`` (one batch shared by the sub-models) or
``[M, B, *input]`` (one batch per sub-model) to features ``[M, B, F]``. The label head and the PPD
head (:class:`~cda2_ext.models.resnet.DualHeadNet`) sit on top, the same for every architecture.

Built in (:data:`ARCHITECTURES`, ``CollaborationConfig.arch`` / ``cda2 train --arch``):

* ``resnet``: the paper's CIFAR ResNets (``depth`` 2 or 6n+2), stored packed, run packed or as a
  loop (``layout``), with the frozen attack snapshot (:mod:`cda2_ext.models.layouts`);
* ``linear``: the XOR experiment's linear sub-models on vectors;
* ``wrn16-4``: WideResNet-16-4 (:mod:`cda2_ext.models.wide_resnet`), M copies run as a loop.

A new architecture is one entry here: a constructor of one sub-model's trunk (an ``nn.Module``
mapping images ``[B, C, H, W]`` to features ``[B, F]``), run as M copies::

    ARCHITECTURES["vgg11"] = Architecture("vgg11", copies_of(vgg11_features), "VGG-11 (BN)")

**Users' own architectures.** ``arch="package.module:function"`` names a constructor of the same
kind in the user's code (from the command line: ``--arch package.module:function``; in Python,
``Collaboration(arch=function, ...)`` records the function's import path). A run records that
path. Importing a module runs its code, and a run folder may come from anyone, so **a checkpoint
never imports code by itself**: the constructor of a recorded path is only taken from what the
caller names - ``arch=`` in Python, ``--arch`` on the command line, or a
:func:`named_architectures` block - and otherwise loading stops with one
:class:`~cda2_ext.errors.ArchitectureError` line saying how to name it. :func:`import_constructor`
is the one place that imports a user's module, and only the caller's own words reach it.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

from torch import nn

from ..errors import ArchitectureError, ConfigError, one_line
from .copies import CopiesTrunk
from .resnet import PackedLinearTrunk, PackedResNetTrunk
from .wide_resnet import wide_resnet_16_4

# A builder's argument is a CollaborationConfig; collaboration.py imports this module, so it is
# typed ``Any`` here (no import back, not even for annotations).

__all__ = ["Architecture", "ARCHITECTURES", "ArchLike", "copies_of", "is_import_path",
           "import_path", "arch_name", "import_constructor", "named_architectures",
           "check_arch_name", "resolve_architecture"]

#: A constructor of one sub-model's trunk, or a name: a registry entry or ``package.module:function``.
ArchLike = Union[str, Callable[[], nn.Module]]
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclass(frozen=True)
class Architecture:
    """One architecture.

    Attributes:
        name: its ``arch`` name.
        build: config -> trunk (see the module docstring for the trunk's contract).
        summary: one line for help texts.
        input_dims: dimensions of one input: 3 for images ``(C, H, W)``, 1 for vectors.
        snapshot: whether the loop layout's frozen attack snapshot
            (:class:`~cda2_ext.models.layouts.FrozenNet`) applies; otherwise attacks run the module
            itself in eval mode.
    """

    name: str
    build: Callable[[Any], nn.Module]
    summary: str = ""
    input_dims: int = 3
    snapshot: bool = False


def copies_of(constructor: Callable[[], nn.Module], name: Optional[str] = None
              ) -> Callable[[Any], nn.Module]:
    """``build`` for an architecture of M copies of ``constructor()`` (run as a loop)."""
    label = name or import_path(constructor)
    return lambda cfg: CopiesTrunk(cfg.num_models, constructor, label, cfg.in_channels,
                                   cfg.image_size)


#: The built-in architectures by name.
ARCHITECTURES: Dict[str, Architecture] = {a.name: a for a in (
    Architecture("resnet", lambda cfg: PackedResNetTrunk(cfg.num_models, cfg.depth, cfg.in_channels,
                                                         layout=cfg.layout),
                 "the paper's CIFAR ResNet, --depth 2 or 6n+2", snapshot=True),
    Architecture("linear", lambda cfg: PackedLinearTrunk(cfg.num_models, cfg.in_channels),
                 "linear sub-models on vectors (the XOR experiment)", input_dims=1, snapshot=True),
    Architecture("wrn16-4", copies_of(wide_resnet_16_4, "wrn16-4"),
                 "WideResNet-16-4, Zagoruyko & Komodakis 2016"),
)}

# The constructors named in the current block (named_architectures): import path -> callable.
_NAMED: contextvars.ContextVar[Tuple[Tuple[str, Callable[[], nn.Module]], ...]] = \
    contextvars.ContextVar("cda2_named_architectures", default=())


def is_import_path(name: object) -> bool:
    """Whether ``name`` reads ``package.module:function`` (checked by its form; nothing imported)."""
    return isinstance(name, str) and _IMPORT_PATH.fullmatch(name) is not None


def import_path(constructor: Callable[..., object]) -> str:
    """The ``module:qualname`` a run records for a user's ``constructor``."""
    module = getattr(constructor, "__module__", None)
    qualname = getattr(constructor, "__qualname__", None)
    path = f"{module}:{qualname}"
    if not is_import_path(path):  # a lambda or a function defined inside another one
        raise ConfigError(f"arch: {constructor!r} cannot be named by an import path ({path}); "
                          "define it at the top level of a module, so a run can record it")
    return path


def arch_name(arch: ArchLike) -> str:
    """The ``arch`` string of a name (itself) or a constructor (its :func:`import_path`)."""
    return arch if isinstance(arch, str) else import_path(arch)


def check_arch_name(name: object) -> str:
    """``name`` if it is a registered architecture or reads ``package.module:function``, else
    :class:`~cda2_ext.errors.ConfigError` naming ``arch`` (nothing is imported)."""
    if isinstance(name, str) and (name in ARCHITECTURES or is_import_path(name)):
        return name
    raise ConfigError(f"arch: expected one of {tuple(ARCHITECTURES)} or package.module:function "
                      f"(your own constructor), got {name!r}")


def import_constructor(path: str) -> Callable[[], nn.Module]:
    """Import the constructor ``package.module:function`` (the only place user code is imported:
    called for what the caller names, never for what a checkpoint records)."""
    if not is_import_path(path):
        raise ConfigError(f"arch: expected package.module:function, got {path!r}")
    module_name, _, attr = path.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as err:  # noqa: BLE001 - the user's module may raise anything on import
        raise ConfigError(f"arch: cannot import {path} ({type(err).__name__}: {one_line(err)}; "
                          "is its folder on PYTHONPATH?)") from None
    if not callable(obj):
        raise ConfigError(f"arch: {path} is a {type(obj).__name__}, not a constructor")
    return obj  # type: ignore[return-value]


@contextlib.contextmanager
def named_architectures(*archs: ArchLike) -> Iterator[None]:
    """Inside the block, models whose config names one of ``archs`` (constructors, or their
    ``package.module:function`` paths, imported here because the caller named them) can be built
    and loaded. Registered names among ``archs`` need nothing and are skipped."""
    named = []
    for a in archs:
        if isinstance(a, str) and a in ARCHITECTURES:
            continue
        fn = import_constructor(a) if isinstance(a, str) else a
        if not callable(fn):
            raise ConfigError(f"arch: expected a constructor or package.module:function, got {a!r}")
        named.append((a if isinstance(a, str) else import_path(a), fn))
    token = _NAMED.set(_NAMED.get() + tuple(named))
    try:
        yield
    finally:
        _NAMED.reset(token)


def resolve_architecture(name: str, constructor: Optional[Callable[[], nn.Module]] = None
                         ) -> Architecture:
    """The :class:`Architecture` a config's ``arch`` stands for.

    A registered name is its entry. A ``package.module:function`` path is M copies of
    ``constructor`` (whose import path must be ``name``), else of the constructor a
    :func:`named_architectures` block names for it, else an
    :class:`~cda2_ext.errors.ArchitectureError`: nothing is ever imported here.
    """
    check_arch_name(name)
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    if constructor is None:
        named = dict(_NAMED.get())
        constructor = named.get(name)
        if constructor is None:
            others = f" (named here: {', '.join(named)})" if named else ""
            raise ArchitectureError(
                f"arch {name!r} is your own constructor, and a checkpoint never imports code by "
                f"itself: name it again with --arch {name} (or arch=... in Python){others}")
    elif import_path(constructor) != name:
        raise ArchitectureError(f"arch: the model config names {name!r}, but the constructor "
                                f"given is {import_path(constructor)!r}")
    return Architecture(name, copies_of(constructor, name), "your own constructor")
