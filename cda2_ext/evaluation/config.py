"""What defines a robustness evaluation: :class:`EvalConfig` and the seeded test subset."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ..attacks.adaptive import AdaptiveConfig
from ..attacks.transfer import TransferConfig
from ..attacks.whitebox import PGDConfig
from .. import limits
from ..errors import ConfigError
from .family import FAMILIES, attack_groups, default_attacks

__all__ = ["DEFAULT_EPS", "EvalConfig", "select_subset"]

DEFAULT_EPS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07)
#: How the evaluated test images are drawn (:func:`select_subset`).
SUBSETS = ("seeded", "dverge")


def _check_subset(subset: str) -> str:
    """``subset`` if it names a way of drawing the test images, else ``ConfigError``."""
    if subset not in SUBSETS:
        raise ConfigError(f"subset: expected one of {SUBSETS}, got {subset!r}")
    return subset


@dataclass
class EvalConfig:
    """Everything that defines an evaluation run (stored in the JSON output).

    Attributes:
        attacks: attack groups to run, names of
            :data:`~cda2_ext.evaluation.family.FAMILIES` (default: those ``in_all``, every
            family but the optional AutoAttack).
        eps: the L-inf radii of the sweep. n_samples: size of the random test subset.
        seed: picks the subset and seeds every attack. batch_size: images per attack batch.
        pgd, adaptive, transfer: the attacks' configurations (paper budgets by default).
        options: ``{family: {param: value}}``, the values of the families' own
            :class:`~cda2_ext.evaluation.family.FamilyParam` s (e.g. Square's ``queries``,
            ``eps``, ``p_init``: Table 3's 5000 and 0.03). Validation fills in the defaults of
            every registered family, so the stored config names every value used.
        sanity_eps: the large radius of the "accuracy must reach ~0" check (``None``: skip);
            it runs PGD with ``pgd.steps`` steps and one start.
        sanity_max_acc: the accuracy at ``sanity_eps`` above which the check fails.
        score: Algorithm 2's selection score (``"ppd"`` | ``"soe"``). unfused: reference ops.
        progress: tqdm progress bars (stderr).
    """

    attacks: Tuple[str, ...] = field(default_factory=default_attacks)
    eps: Tuple[float, ...] = DEFAULT_EPS
    n_samples: int = 1000
    seed: int = 0
    batch_size: int = 250
    pgd: PGDConfig = field(default_factory=PGDConfig)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    options: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    sanity_eps: Optional[float] = 0.3
    sanity_max_acc: float = 0.05
    score: str = "ppd"
    unfused: bool = False
    progress: bool = True
    # ----- which test images (select_subset) -----
    subset: str = "seeded"   # "seeded": a torch permutation of `seed`; "dverge": DVERGE's scripts

    def __post_init__(self) -> None:
        # checked once, where it is built: the job, the protocol and the report take it as valid
        self.validate()

    def validate(self) -> "EvalConfig":
        """Raise :class:`~cda2_ext.errors.ConfigError` (a ``ValueError``, naming the field) for a
        setting no evaluation can run; ``self``. Runs when the config is built; call it again
        only after changing a field."""
        bad = [a for a in self.attacks if a not in FAMILIES]
        if bad:
            raise ConfigError(f"attacks: unknown {bad}; expected some of {attack_groups()}")
        for e in self.eps:
            limits.radius("eps", e)
        if self.sanity_eps is not None:
            limits.radius("sanity_eps", self.sanity_eps)
        self.options = self._family_options()
        for name in ("n_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        self.pgd.validate()
        self.adaptive.validate()
        self.transfer.validate()
        _check_subset(self.subset)
        return self

    def _family_options(self) -> Dict[str, Dict[str, Any]]:
        """``options`` checked against the registered families' parameters, with their defaults
        filled in: a :class:`ConfigError` naming ``{family}_{param}`` for a bad value, or the
        unknown family or parameter."""
        if not isinstance(self.options, dict):
            raise ConfigError(f"options: expected {{family: {{param: value}}}}, got {self.options!r}")
        unknown = [f for f in self.options if f not in FAMILIES]
        if unknown:
            raise ConfigError(f"options: unknown attack families {unknown}; expected some of "
                              f"{attack_groups()}")
        out: Dict[str, Dict[str, Any]] = {}
        for fam in FAMILIES.values():
            given = self.options.get(fam.name) or {}
            if not isinstance(given, Mapping):
                raise ConfigError(f"options: {fam.name} needs {{param: value}}, got {given!r}")
            known = {p.name for p in fam.params}
            extra = sorted(set(given) - known)
            if extra:
                raise ConfigError(f"options: {fam.name} reads no {extra}; its parameters are "
                                  f"{sorted(known)}")
            if fam.params:
                out[fam.name] = {p.name: p.check(fam.name, given.get(p.name, p.default))
                                 for p in fam.params}
        return out

    def option(self, family: str, param: str) -> Any:
        """The value of ``family``'s parameter ``param`` (its default where not given)."""
        return self.options[family][param]

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict (the attack configurations as their own dicts)."""
        d = asdict(self)
        d["pgd"], d["adaptive"], d["transfer"] = (self.pgd.to_dict(), self.adaptive.to_dict(),
                                                  self.transfer.to_dict())
        return d


def select_subset(n_total: int, n: int, seed: int, subset: str = "seeded") -> Tensor:
    """``min(n, n_total)`` distinct test indices drawn with ``seed``.

    ``subset="seeded"``: the first ``n`` of a torch permutation, sorted. ``"dverge"``:
    Python's ``random.seed(seed); random.sample(range(n_total), n)``, in the order drawn - with
    CIFAR-10's 10,000 test images, ``n=1000`` and ``seed=0`` exactly the images DVERGE's
    evaluation scripts (and the paper's tables after them) use. A private ``random.Random`` draws
    them, so the global ``random`` state is left alone.
    """
    k = min(n, n_total)
    if _check_subset(subset) == "dverge":
        return torch.tensor(random.Random(int(seed)).sample(range(n_total), k), dtype=torch.int64)
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_total, generator=g)[:k].sort().values
