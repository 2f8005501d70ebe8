"""DVERGE: Diversifying Vulnerabilities for Enhanced Robust Generation of Ensembles (Yang et al.,
NeurIPS 2020; github.com/zjysteven/DVERGE).

Start from trained ``ensemble`` sub-models (``--init-from RUN``). Each epoch picks a layer ``l``
(uniform in ``1 .. depth``, see :mod:`cda2_ext.models.features` for the numbering). Per batch
``(x, y)`` with ``x'`` another sample of the batch for each image (a random derangement):

1. **Feature distillation**, for every sub-model i at once: starting at ``x``, PGD in the L-inf
   ``distill_eps``-ball *minimises* ``|| h_i^l(x_i) - h_i^l(x') ||^2`` (``h_i^l``: sub-model i's
   pre-ReLU features at layer l) - an image that looks like ``x`` but carries i's non-robust
   features of ``x'``. One engine loop for all M (copies ``[M, B, ...]``, sub-model i reading
   copy i, one packed forward per step), with DVERGE's momentum (mu = 1 on L1-normalised
   gradients: the engine's ``momentum=1.0``), no random start, the model in eval mode.
2. **Cross training**: every sub-model j is trained on the distilled images of every other
   sub-model i with the *original* labels ``y`` - ``L = sum_j sum_{i != j} CE(f_j(x_i), y)`` (each
   CE a batch mean) - so j learns not to share i's vulnerability. The ``M-1`` pairings are batched
   round robin: input ``[M, (M-1)B, ...]`` whose row j holds ``x_{j+1}, ..., x_{j+M-1}`` (mod M),
   one packed forward and the fused per-model cross-entropy.
3. ``--adv`` / ``--plus-adv`` (DVERGE+AdvT): ``L = dverge_coeff * L + sum_j CE(f_j(x~_j), y)`` with
   ``x~_j`` PGD against sub-model j alone (DVERGE's ``Linf_PGD(m, ...)`` per model; here the
   per-model training PGD of CDA²'s natural phase, all M at once), in the same forward pass.

Hyperparameters and where they come from (DVERGE paper Sec. 4 / Appendix; its ``arguments.py``,
``train/train_dverge.py``, ``distillation.py``, ``utils.py``):

* distill_eps 0.07, distill_alpha 0.007, distill_steps 10: ``--distill-eps 0.07
  --distill-alpha 0.007 --distill-steps 10``;
* a random layer per epoch (``random.randint(1, depth)``), unless ``--distill-layer`` fixes one
  (``--distill-fixed-layer --distill-layer``); features before the ReLU (``before_relu=True``);
* SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 128, 200 epochs, x0.1 at 100 and 150:
  ``arguments.py`` and ``utils.get_optimizers``/``get_schedulers``;
* start from the 200-epoch baseline ensemble (``--start-from baseline``);
* dverge_coeff 1.0 (``--dverge-coeff``), adversarial PGD as the project's training PGD (DVERGE's
  code: 8/255, 2/255, 10 steps).

Deviations, for speed or reproducibility: the distillation runs in eval mode (DVERGE's code leaves
BatchNorm in training mode, so the features depend on the batch and the running statistics are
updated 20 times per batch); the target images ``x'`` are a derangement of the batch itself (DVERGE
draws a second shuffled batch); one forward trains every pairing (BatchNorm statistics over the
``(M-1)B`` images instead of ``B`` per pairing); the epoch's layer is a function of the seed and
the epoch, so a resumed run picks the same layers. Under ``torchrun`` the derangement is drawn
within each process's shard.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ...attacks.engine import derive_generator, sign_attack
from ...attacks.training_pgd import per_model_pgd
from ...storage.checkpoint import load_checkpoint, load_state
from ...errors import ConfigError
from ...models.features import feature_layers, packed_features
from ...runtime import FUSED, OpsBackend, eval_mode
from .base import Tally
from .ensemble import BASELINE_SCHEDULE, EnsembleMethod, per_model_ce

__all__ = ["DVERGE", "distill", "round_robin", "dverge_loss", "derangement", "epoch_layer",
           "load_initial_weights"]

#: Model-config fields that must agree between ``--init-from``'s run and this one.
_SAME_MODEL = ("arch", "num_models", "depth", "num_classes", "in_channels", "ppd_input")


def derangement(n: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """A random permutation of ``range(n)`` (``n >= 2``) with no fixed point: one random cycle."""
    if n < 2:
        raise ValueError(f"n: a derangement needs at least 2 elements, got {n}")
    p = torch.randperm(n, generator=generator)
    out = torch.empty_like(p)
    out[p] = p.roll(1)
    return out


def epoch_layer(seed: int, epoch: int, depth: int, fixed: Optional[int] = None) -> int:
    """The distillation layer of (0-based) ``epoch``: ``fixed``, or uniform in ``1 .. depth``
    drawn from ``(seed, epoch)`` alone (a resumed run needs no state to pick the same one)."""
    if fixed is not None:
        return fixed
    g = derive_generator(seed, "dverge-layer", epoch)
    return int(torch.randint(1, depth + 1, (), generator=g))


def distill(model: nn.Module, x: Tensor, x_target: Tensor, layer: int, eps: float, alpha: float,
            steps: int, backend: OpsBackend = FUSED) -> Tensor:
    """Step 1 of the module docstring: ``[M, B, C, H, W]``, copy i within ``eps`` of ``x`` with
    sub-model i's layer-``layer`` features pulled toward those of ``x_target`` (detached)."""
    M = model.num_models
    x = x.detach()
    with eval_mode(model):
        with torch.no_grad():
            target = packed_features(model, x_target, layer).float()

        def objective(xa: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
            f = packed_features(model, xa, layer).float()   # sub-model i reads copy i
            return -(f - target).pow(2).mean(-1), None      # [M, B]; the engine ascends

        start = x.unsqueeze(0).expand(M, *x.shape)
        dummy = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # no worst case kept
        return sign_attack(objective, x, dummy, eps, alpha, steps, x_init=start, momentum=1.0,
                           track_worst=False, backend=backend).x_adv


def round_robin(x: Tensor) -> Tensor:
    """``[M, B, ...] -> [M, (M-1)*B, ...]``: row j holds ``x[(j+1) % M], ..., x[(j+M-1) % M]``
    (every other sub-model's images, never j's own)."""
    M = x.shape[0]
    shifted = torch.stack([x.roll(-k, 0) for k in range(1, M)], 1)   # [M, M-1, B, ...]
    return shifted.reshape(M, (M - 1) * x.shape[1], *x.shape[2:])


def dverge_loss(logits: Tensor, target: Tensor, num_distilled: int, coeff: float = 1.0,
                backend: OpsBackend = FUSED) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Steps 2-3: ``logits [M, (M-1)B (+B), K]`` of :func:`round_robin`'s images (then, with an
    adversarial part, each sub-model's own PGD images), ``target [B]``, ``num_distilled =
    (M-1)B``. Returns ``(loss, terms)``: ``distill_ce`` (``sum_j sum_{i != j}`` of batch means),
    ``distill_acc``, and with an adversarial part ``adv_ce`` and ``adv_acc``."""
    M, N = logits.shape[:2]
    B = target.shape[0]
    if num_distilled != (M - 1) * B or N not in (num_distilled, num_distilled + B):
        raise ValueError(f"logits: expected [M, (M-1)B or M*B, K] for M={M}, B={B}, "
                         f"got {list(logits.shape)}")
    y = target.repeat(N // B)
    ce = per_model_ce(logits, y, backend)                              # [M, N]
    hit = (logits.detach().argmax(-1) == y).to(ce.dtype)
    d = slice(0, num_distilled)
    distill_ce = ce[:, d].mean(1).sum() * (M - 1)      # = sum_j sum_{i != j} mean_b CE
    terms = {"distill_ce": distill_ce.detach(), "distill_acc": hit[:, d].mean()}
    if N == num_distilled:
        return distill_ce, terms
    adv_ce = ce[:, num_distilled:].mean(1).sum()
    terms.update(adv_ce=adv_ce.detach(), adv_acc=hit[:, num_distilled:].mean())
    return coeff * distill_ce + adv_ce, terms


def load_initial_weights(model: nn.Module, path: str, check_only: bool = False) -> int:
    """Copy the weights (and BatchNorm statistics) of run ``path`` into ``model`` (``check_only``:
    only check that they would fit); the two must have the same architecture. Returns the epoch
    the run had reached. ``ConfigError`` (naming ``init_from``) when they differ;
    ``CheckpointError`` when the run cannot be read."""
    tensors, meta = load_checkpoint(path)
    stored = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    mine = model.config.to_dict()
    differ = [f"{k} {stored.get(k)!r} vs {mine[k]!r}" for k in _SAME_MODEL if stored.get(k) != mine[k]]
    if differ:
        raise ConfigError(f"init_from: {path} holds another architecture ({', '.join(differ)} "
                          "in this run); DVERGE starts from an ensemble of the same sub-models")
    load_state(model, tensors, "model.", path, check_only=check_only)
    return int(meta.get("epoch", 0))


class DVERGE(EnsembleMethod):
    """DVERGE (see the module docstring for the algorithm and the source of every default)."""

    name = "dverge"
    defaults = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
                "batch_size": 128, **BASELINE_SCHEDULE}
    terms = ("distill_ce", "distill_acc", "adv_ce", "adv_acc")
    min_models = 2

    def __init__(self, trainer: Any) -> None:
        super().__init__(trainer)
        cfg = trainer.config
        self.depth = feature_layers(trainer.model)
        if cfg.distill_layer is not None and not 1 <= cfg.distill_layer <= self.depth:
            raise ConfigError(f"distill_layer: must lie in [1, {self.depth}] for depth "
                              f"{self.depth}, got {cfg.distill_layer}")
        self.layer: Optional[int] = None
        # The starting weights are copied in at the first step of a fresh run (a resumed run has
        # its own and must not need the starting run any more); read now so a wrong path fails
        # before any training.
        self._pending_init = cfg.init_from
        if cfg.init_from is not None:
            load_initial_weights(trainer.model, cfg.init_from, check_only=True)

    def _start(self) -> None:
        t = self.trainer
        path, self._pending_init = self._pending_init, None
        if path is not None and t.epoch == 0:
            epoch = load_initial_weights(t.model, path)
            t.log(f"dverge: starting from {path} (epoch {epoch})")

    def step(self, x: Tensor, y: Tensor, tallies: Dict[str, Tally]) -> Dict[str, Tensor]:
        t, cfg, B = self.trainer, self.trainer.config, y.shape[0]
        self._start()
        M = t.model.num_models
        self.layer = epoch_layer(cfg.seed, t.epoch, self.depth, cfg.distill_layer)
        x_target = x[derangement(B, t.generator).to(x.device)]
        with t.autocast():
            x_dist = distill(t.model, x, x_target, self.layer, cfg.distill_eps, cfg.distill_alpha,
                             cfg.distill_steps, t.backend)
        inputs = round_robin(x_dist)
        if cfg.adv:
            with t.autocast():
                x_adv = per_model_pgd(t.model, x, y, cfg.eps, cfg.alpha, cfg.steps,
                                      random_start=cfg.random_start, generator=t.generator,
                                      x_init=t.random_start(x, M), backend=t.backend)
            inputs = torch.cat([inputs, x_adv], 1)
        self._clean_accuracy(x, y, tallies["train"])

        def loss_of(logits: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
            return dverge_loss(logits, y, (M - 1) * B, cfg.dverge_coeff, t.backend)

        return {"dverge": self._train(inputs, loss_of, tallies["train"], B, None, None, y)}

    def epoch_metrics(self, tallies: Dict[str, Tally]) -> Dict[str, Any]:
        m = super().epoch_metrics(tallies)
        s = tallies["train"]   # with --adv: the sub-models' accuracy on their own PGD images
        m["adv_acc"] = s.mean("adv_acc") if "adv_acc" in s.sums else None
        m["distill_layer"] = self.layer
        return m

    def summary(self, metrics: Dict[str, Any]) -> List[str]:
        return [f"layer {metrics['distill_layer']}", *super().summary(metrics)]

