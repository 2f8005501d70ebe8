"""The largest counts cda2_ext accepts, in one place, and the one check of a count (and of an
L-inf radius: :func:`radius`).

A count option (steps, epochs, images, restarts, ...) far beyond any real use is a typo or an
attack, not a plan: ``cda2 xor --steps 2**70`` would run until the machine is switched off, and
``num_classes = 10**12`` in a checkpoint's metadata asks for terabytes before anything fails.
Every command-line count and every count read back from a checkpoint is therefore checked
against a sane maximum here, and refused with one line naming the option (exit status 2 in the
``cda2`` command), before any work starts.

The maxima are generous - orders of magnitude above the paper's settings - so that no real run
meets them:

=================  ==========  ======================================================
kind               maximum     what it bounds
=================  ==========  ======================================================
``ITERATIONS``     10**6       steps, epochs, restarts, queries, attack iterations
``ITEMS``          10**9       images, points, samples, batch sizes, sample limits
``MODELS``         1024        sub-models M
``CLASSES``        10**5       classes K (the heads are ``M x features x K``)
``DEPTH``          2000        ResNet depth (the deepest CIFAR ResNet is 1202)
``CHANNELS``       4096        input channels or features
``IMAGE_SIDE``     16384       an image's height or width
=================  ==========  ======================================================
"""
from __future__ import annotations

import math
from typing import Optional

from .ops._checks import exact_int
from .errors import ConfigError

__all__ = ["ITERATIONS", "ITEMS", "MODELS", "CLASSES", "DEPTH", "CHANNELS", "IMAGE_SIDE", "count",
           "radius"]

ITERATIONS = 10 ** 6
ITEMS = 10 ** 9
MODELS = 1024
CLASSES = 10 ** 5
DEPTH = 2000
CHANNELS = 4096
IMAGE_SIDE = 16384


def count(name: str, value: object, lo: int, hi: int, *, optional: bool = False) -> Optional[int]:
    """``value`` as an ``int`` in ``[lo, hi]``, or :class:`~cda2_ext.errors.ConfigError` naming
    ``name`` (``optional``: ``None`` passes). Booleans are not counts."""
    if optional and value is None:
        return None
    try:
        v = exact_int(value)
    except TypeError:
        raise ConfigError(f"{name}: expected an integer in [{lo}, {hi}], got {value!r}") from None
    if not lo <= v <= hi:
        raise ConfigError(f"{name}: must be an integer in [{lo}, {hi}], got {v}")
    return v


def radius(name: str, value: object) -> float:
    """``value`` if it is an L-inf radius (or step) cda2 can use - a finite number in [0, 1], as
    images are in [0, 1] - else :class:`~cda2_ext.errors.ConfigError` naming ``name``. The one
    rule of every ``eps`` (training, ``cda2 eval``'s radii, the attacks themselves)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and 0 <= value <= 1):  # type: ignore[operator]
        raise ConfigError(f"{name}: the L-inf radius must lie in [0, 1] (images are in [0, 1]), "
                          f"got {value!r}")
    return float(value)  # type: ignore[arg-type]
