"""Transfer (black-box) attacks: adversarial examples made on hold-out surrogates.

Section 4.4 / Appendix D (after Yang et al. 2020, DVERGE): for every surrogate (an ensemble of
ResNet-20s the defender never saw) and loss (cross-entropy, CW), three methods

``mi-pgd``      PGD with momentum (MI-FGSM, Dong et al. 2018) from uniform random starts - one
                variant per start;
``m-di2-fgsm``  momentum + input diversity (Xie et al. 2019): each step differentiates a randomly
                resized-and-padded copy of the input (probability ``di_prob``), tensor ops only;
``sgm``         skip-gradient method (Wu et al. 2020): the gradient through every residual branch
                is scaled by ``gamma`` (backward only; the forward pass is unchanged), which
                favours the skip connections and transfers better.

A sample counts as robust only if the target classifies **every** variant correctly
(:func:`all_variants_correct`): 3 variants per sample for Table 2 (1 surrogate, CE, 1 start) and
30 for Table 5 (3 surrogates x {CE, CW} x (3 starts + 2 methods)) - :meth:`TransferConfig.preset`.

Generated sets are :class:`TransferSet` s: ``x_adv [V, B, C, H, W]``, labels, the test indices
and the generating configuration, saved as safetensors (tensors + JSON metadata) so a fixed
transfer set can be shared and evaluated against any model later.

All gradient steps run through the one PGD loop (:func:`~cda2_ext.attacks.engine.sign_attack`):
the methods differ only in the objective (input transform, SGM hook), the momentum and the start.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.classifier import as_model_fn
from ..runtime import FUSED, OpsBackend, eval_mode
from .engine import (AttackResult, ModelFn, check_attack_args, cw_loss, derive_generator,
                     model_objective, per_sample_loss, sign_attack)
from .whitebox import predict_correct

__all__ = ["TRANSFER_METHODS", "TRANSFER_FORMAT", "TransferConfig", "TransferSet",
           "input_diversity", "residual_blocks", "skip_gradient", "transfer_attack",
           "generate_transfer_set", "transfer_correct", "all_variants_correct"]

TRANSFER_METHODS = ("mi-pgd", "m-di2-fgsm", "sgm")
TRANSFER_FORMAT = "cda2-transfer-set/1"
PathLike = Union[str, os.PathLike]


@dataclass
class TransferConfig:
    """How transfer variants are generated (defaults: Table 2's setting, DVERGE's budgets).

    Attributes:
        methods: subset of :data:`TRANSFER_METHODS`.
        losses: ``"ce"`` and/or ``"cw"`` (each method runs once per loss).
        steps: iterations (DVERGE: 100). alpha_factor: step size as a fraction of eps.
        momentum: MI decay ``mu`` (Dong et al.: 1.0) for ``mi-pgd`` and ``m-di2-fgsm``.
        mi_restarts: random starts of ``mi-pgd``, each its own variant (Table 5: 3).
        di_prob, di_resize: input diversity: probability of transforming, largest resize factor.
        sgm_gamma: gradient scale of the residual branches (Wu et al. for ResNets: 0.2).
        cw_kappa: confidence cap of the CW loss.
    """

    methods: Tuple[str, ...] = TRANSFER_METHODS
    losses: Tuple[str, ...] = ("ce",)
    steps: int = 100
    alpha_factor: float = 0.2
    momentum: float = 1.0
    mi_restarts: int = 1
    di_prob: float = 0.5
    di_resize: float = 1.1
    sgm_gamma: float = 0.2
    cw_kappa: float = 50.0

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "TransferConfig":
        """``"table2"``: 3 variants per surrogate (CE; 1 start). ``"table5"``: 10 per surrogate
        (CE + CW; 3 starts), i.e. 30 with the paper's three surrogates."""
        if name == "table2":
            base = cls()
        elif name == "table5":
            base = cls(losses=("ce", "cw"), mi_restarts=3)
        else:
            raise ConfigError(f"transfer.preset: expected 'table2' or 'table5', got {name!r}")
        return replace(base, **overrides).validate()

    def validate(self) -> "TransferConfig":
        """Raise :class:`~cda2_ext.errors.ConfigError` (naming the field) for a setting no
        transfer attack can run; ``self``."""
        bad = [m for m in self.methods if m not in TRANSFER_METHODS]
        if bad or not self.methods:
            raise ConfigError(f"transfer.methods: expected some of {TRANSFER_METHODS}, "
                              f"got {list(self.methods)}")
        for loss in self.losses:
            if loss not in ("ce", "cw"):
                raise ConfigError(f"transfer.losses: expected 'ce' and/or 'cw', got {loss!r}")
        for name, ok, need in (("steps", self.steps >= 0, ">= 0"),
                               ("mi_restarts", self.mi_restarts >= 1, ">= 1"),
                               ("di_prob", 0 <= self.di_prob <= 1, "in [0, 1]"),
                               ("di_resize", self.di_resize >= 1, ">= 1")):
            if not ok:
                raise ConfigError(f"transfer.{name}: must be {need}, got {getattr(self, name)}")
        return self

    def variants_per_surrogate(self) -> int:
        per_loss = sum(self.mi_restarts if m == "mi-pgd" else 1 for m in self.methods)
        return per_loss * len(self.losses)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# ----- input diversity and skip gradients ---------------------------------------------------------
def input_diversity(x: Tensor, prob: float = 0.5, resize: float = 1.1,
                    generator: Optional[torch.Generator] = None) -> Tensor:
    """Xie et al.'s random resize-and-pad, applied to each image with probability ``prob``.

    One random size ``r`` in ``[H, floor(H * resize)]`` per call: nearest resize to ``r x r``,
    zero-pad at a random offset to ``floor(H * resize)``, then bilinear back to ``H x W`` so any
    model accepts the result. Differentiable (the attack's gradient flows through it).
    """
    B, C, H, W = x.shape
    big_h, big_w = max(int(H * resize), H), max(int(W * resize), W)
    if (big_h == H and big_w == W) or prob <= 0:
        return x
    r = int(torch.randint(H, big_h + 1, (), generator=generator))
    rw = min(W + (r - H), big_w)
    top = int(torch.randint(0, big_h - r + 1, (), generator=generator))
    left = int(torch.randint(0, big_w - rw + 1, (), generator=generator))
    out = Fn.interpolate(x, size=(r, rw), mode="nearest")
    out = Fn.pad(out, (left, big_w - rw - left, top, big_h - r - top))
    out = Fn.interpolate(out, size=(H, W), mode="bilinear", align_corners=False)
    use = (torch.rand(B, generator=generator) < prob).to(x.device).view(B, 1, 1, 1)
    return torch.where(use, out, x)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times ``gamma`` backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, gamma: float) -> Tensor:  # type: ignore[override]
        ctx.gamma = gamma
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.gamma, None


def residual_blocks(model: object) -> List[Tuple[nn.Module, nn.Module]]:
    """``(block, last_module_of_residual_branch)`` for every residual block in ``model``.

    Recognises blocks with ``conv2``/``bn2`` (basic) or ``conv3``/``bn3`` (bottleneck) and a
    ``shortcut`` or ``downsample`` attribute: :class:`~cda2_ext.models.PackedBasicBlock` and
    torchvision's ResNet blocks. The branch's last BatchNorm is where the residual branch ends,
    just before it is added to the skip path, so scaling the gradient there scales exactly the
    gradient that flows through the branch.
    """
    if not isinstance(model, nn.Module):
        return []
    out = []
    for m in model.modules():
        if not (hasattr(m, "shortcut") or hasattr(m, "downsample")):
            continue
        end = getattr(m, "bn3", None) if hasattr(m, "conv3") else getattr(m, "bn2", None)
        if isinstance(end, nn.Module):
            out.append((m, end))
    return out


@contextlib.contextmanager
def skip_gradient(model: object, gamma: float) -> Iterator[None]:
    """SGM: inside the block, gradients through every residual branch of ``model`` are scaled by
    ``gamma`` (forward outputs unchanged). ``ValueError`` if ``model`` has no residual blocks."""
    blocks = residual_blocks(model)
    if not blocks:
        raise ValueError("sgm: the surrogate has no residual blocks (a depth-2 model, or a plain "
                         "CNN?); leave 'sgm' out of the transfer methods (cda2 eval "
                         "--transfer-methods mi-pgd m-di2-fgsm)")
    hooks = [end.register_forward_hook(lambda _m, _i, out: _ScaleGrad.apply(out, gamma))
             for _, end in blocks]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


# ----- generation ---------------------------------------------------------------------------------
def _loss_fn(loss: str, kappa: float):
    return partial(cw_loss, kappa=kappa) if loss == "cw" else per_sample_loss(loss)


def transfer_attack(surrogate: ModelFn, x_nat: Tensor, target: Tensor, eps: float, method: str,
                    loss: str = "ce", config: Optional[TransferConfig] = None, *,
                    generator: Optional[torch.Generator] = None, lo: float = 0.0, hi: float = 1.0,
                    backend: OpsBackend = FUSED) -> AttackResult:
    """One transfer method against ``surrogate``: an :class:`~cda2_ext.attacks.engine.AttackResult`
    whose ``x_adv [V, B, C, H, W]`` holds the variants (``V = mi_restarts`` for ``mi-pgd``, else 1),
    the final iterates; ``margin`` and ``correct`` are ``None``, as nothing of the target is used
    (:func:`transfer_correct` judges the variants). A collaboration as ``surrogate`` is attacked
    through its Algorithm-2 decision (:func:`~cda2_ext.models.classifier.as_model_fn`)."""
    cfg = (config or TransferConfig()).validate()
    surrogate = as_model_fn(surrogate)
    check_attack_args(x_nat, target, eps, cfg.steps)
    if method not in TRANSFER_METHODS:
        raise ValueError(f"method: expected one of {TRANSFER_METHODS}, got {method!r}")
    fn = _loss_fn(loss, cfg.cw_kappa)
    alpha = cfg.alpha_factor * eps
    transform = None
    if method == "m-di2-fgsm":
        transform = partial(input_diversity, prob=cfg.di_prob, resize=cfg.di_resize, generator=generator)
    obj = model_objective(surrogate, target, fn, transform=transform, evaluate=False)
    x_init = None
    if method == "mi-pgd" and eps > 0:  # PGD with momentum starts at random points
        x_init = backend.pgd_random_start(x_nat, eps, lo, hi, num_models=cfg.mi_restarts, generator=generator)
    momentum = cfg.momentum if method in ("mi-pgd", "m-di2-fgsm") else None
    ctx = skip_gradient(surrogate, cfg.sgm_gamma) if method == "sgm" else contextlib.nullcontext()
    with eval_mode(surrogate), ctx:
        return sign_attack(obj, x_nat, target, eps, alpha, cfg.steps, x_init=x_init,
                           momentum=momentum, lo=lo, hi=hi, backend=backend)


@dataclass
class TransferSet:
    """Transfer adversarial examples of ``B`` test samples, ``V`` variants each.

    Attributes:
        x_adv: ``[V, B, C, H, W]`` float32 in [0, 1]. labels: ``[B]``.
        names: ``V`` variant names ``surrogate/loss/method[#restart]``.
        eps: the L-inf radius they were made with.
        indices: ``[B]`` test-set indices of the samples (or ``None``).
        config: the generating configuration (transfer config, surrogates, seed, ...).
    """

    x_adv: Tensor
    labels: Tensor
    names: List[str]
    eps: float
    indices: Optional[Tensor] = None
    config: Dict[str, Any] = field(default_factory=dict)

    def save(self, path: PathLike) -> Path:
        """Write one safetensors file; the names, eps and config travel in its metadata."""
        from safetensors.torch import save

        from ..storage.checkpoint import atomic_write
        path = Path(path)
        tensors = {"x_adv": self.x_adv.detach().float().contiguous().cpu(),
                   "labels": self.labels.detach().long().contiguous().cpu()}
        if self.indices is not None:
            tensors["indices"] = self.indices.detach().long().contiguous().cpu()
        meta = {"format": TRANSFER_FORMAT, "names": json.dumps(self.names), "eps": repr(float(self.eps)),
                "config": json.dumps(self.config, sort_keys=True)}
        atomic_write(path, save(tensors, metadata=meta))  # replaced, never written through a link
        return path

    @classmethod
    def load(cls, path: PathLike, device: Union[str, torch.device] = "cpu") -> "TransferSet":
        """Read a file written by :meth:`save` (``ValueError`` for anything else)."""
        from safetensors import safe_open
        from safetensors.torch import load_file
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            tensors = load_file(str(path), device=str(device))
        except Exception as err:  # safetensors raises several types for a damaged file
            raise ValueError(f"unreadable transfer set {path}: {err}") from None
        if meta.get("format") != TRANSFER_FORMAT:
            raise ValueError(f"{path} is not a {TRANSFER_FORMAT} file (format {meta.get('format')!r})")
        try:  # a file of the right format may still be damaged: one line, not a KeyError
            names, eps = json.loads(meta["names"]), float(meta["eps"])
            config = json.loads(meta.get("config", "{}"))
            x, labels = tensors["x_adv"], tensors["labels"]
            if not (isinstance(names, list) and isinstance(config, dict) and x.dim() >= 2
                    and labels.dim() == 1):
                raise ValueError("unexpected names, config or tensor shapes")
        except (KeyError, TypeError, ValueError, RecursionError) as err:
            raise ValueError(f"{path} is a damaged transfer set: {err!s:.200}") from None
        if x.shape[0] != len(names) or x.shape[1] != labels.shape[0]:
            raise ValueError(f"{path}: x_adv {list(x.shape)} does not match {len(names)} names "
                             f"and {labels.shape[0]} labels")
        return cls(x, labels, names, eps, tensors.get("indices"), config)

    @staticmethod
    def concat(parts: Sequence["TransferSet"]) -> "TransferSet":
        """Join sets of the same variants along the sample axis (batches of one generation)."""
        first = parts[0]
        idx = None if any(p.indices is None for p in parts) else torch.cat([p.indices for p in parts])
        return TransferSet(torch.cat([p.x_adv for p in parts], 1), torch.cat([p.labels for p in parts]),
                           list(first.names), first.eps, idx, dict(first.config))


def generate_transfer_set(surrogates: Mapping[str, ModelFn], x_nat: Tensor, target: Tensor,
                          eps: float, config: Optional[TransferConfig] = None, *, seed: int = 0,
                          indices: Optional[Tensor] = None, lo: float = 0.0, hi: float = 1.0,
                          backend: OpsBackend = FUSED, extra_config: Optional[Dict[str, Any]] = None
                          ) -> TransferSet:
    """All variants (surrogate x loss x method [x start]) for ``x_nat``.

    Each (surrogate, loss, method) draws its randomness from ``derive_generator(seed, ...)``, so a
    set is reproducible from the seed. ``extra_config`` is stored with the set (e.g. checkpoint
    paths of the surrogates).
    """
    cfg = (config or TransferConfig()).validate()
    xs: List[Tensor] = []
    names: List[str] = []
    for sname, surrogate in surrogates.items():
        for loss in cfg.losses:
            for method in cfg.methods:
                g = derive_generator(seed, "transfer", sname, loss, method, eps)
                v = transfer_attack(surrogate, x_nat, target, eps, method, loss, cfg, generator=g,
                                    lo=lo, hi=hi, backend=backend).x_adv
                xs.append(v)
                names += ([f"{sname}/{loss}/{method}#{r}" for r in range(v.shape[0])]
                          if method == "mi-pgd" else [f"{sname}/{loss}/{method}"])
    meta = {"transfer": cfg.to_dict(), "surrogates": list(surrogates), "seed": seed,
            **(extra_config or {})}
    return TransferSet(torch.cat(xs), target.detach().clone(), names, float(eps),
                       None if indices is None else indices.detach().clone(), meta)


@torch.no_grad()
def transfer_correct(model: ModelFn, tset: TransferSet, batch_size: int = 500) -> Tensor:
    """``[V, B]`` bool: ``model`` classifies variant ``v`` of sample ``b`` correctly."""
    V, B = tset.x_adv.shape[:2]
    dev = next((p.device for p in getattr(model, "parameters", lambda: iter(()))()), tset.x_adv.device)
    out = torch.empty(V, B, dtype=torch.bool)
    flat = tset.x_adv.reshape(V * B, *tset.x_adv.shape[2:])
    labels = tset.labels.repeat(V)
    res = []
    for i in range(0, V * B, batch_size):
        res.append(predict_correct(model, flat[i:i + batch_size].to(dev),
                                   labels[i:i + batch_size].to(dev)).cpu())
    out.copy_(torch.cat(res).view(V, B))
    return out


def all_variants_correct(correct: Tensor, clean_correct: Optional[Tensor] = None) -> Tensor:
    """The transfer rule: robust iff every variant ``correct [V, B]`` is right (and the clean
    image, when ``clean_correct [B]`` is given)."""
    ok = correct.all(0)
    return ok if clean_correct is None else ok & clean_correct
