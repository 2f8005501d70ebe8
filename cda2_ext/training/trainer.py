"""Algorithm 1: training a CDA² collaboration.

Per batch ``(x, y)`` (augmented on the device), depending on ``TrainConfig.phases``:

* **natural** (lines 2-10): ``per_model_pgd`` makes the M variants ``x~^{θ_i}`` at once
  (``[M, B, C, H, W]``); they are flattened to one shared batch of ``M*B`` images so that *every*
  sub-model scores *every* variant in one forward (``logits [M, M*B, K]``); the loss is the
  soft-min surrogate (Eq. 7) averaged over variants and samples + ``bce_weight`` x the PPD BCE
  against ``p_y`` (lines 6-9). One SGD step.
* **adversarial** (lines 12-19): ``collaboration_pgd`` attacks the collaboration's own answer
  (the highest-PPD sub-model, gradient through ``collaborative_select``); surrogate + BCE on that
  ``x~``. One SGD step. This is the default: the paper's implementation uses this phase alone.
* **both**: a natural-phase step, then an adversarial-phase step on the same batch.
* **standard**: no attack; surrogate + BCE on the clean batch (Table 6's standard training).

The PPD heads read detached features, so one backward of ``surrogate + bce_weight * bce`` gives
Algorithm 1's two separate updates (BCE -> PPD heads only, surrogate -> everything else).

Randomness: the model is initialised from ``torch.manual_seed(seed)``; everything afterwards
(data order, crops, flips, PGD random starts) is drawn from one CPU ``torch.Generator``, whose
state is checkpointed with the model and optimiser after every epoch. A resumed run therefore
replays exactly the batches and random starts an uninterrupted run would have seen.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from ..attacks.training import collaboration_pgd, per_model_pgd
from ..checkpoint import atomic_write, checkpoint_files, load_checkpoint, save_checkpoint
from ..data import ImageSet, load_images, random_crop_flip, to_float
from ..errors import ConfigError
from ..evaluation.clean import evaluate_clean
from ..models.collaboration import Collaboration, collaborate
from ..runtime import eval_mode, resolve_device
from .config import TrainConfig

__all__ = ["Trainer", "RESUMABLE_CHANGES"]

# Options that may differ between the run that wrote a checkpoint and the run resuming it: they
# change where/how fast/how long the run goes, not the training trajectory.
RESUMABLE_CHANGES = frozenset({"epochs", "device", "unfused", "progress", "eval_every",
                               "eval_batch_size", "data_dir", "out_dir"})


class _PhaseStats:
    """Running sums for one phase over an epoch, kept on the device (one sync per epoch)."""

    def __init__(self, num_models: int, device: torch.device) -> None:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.surrogate, self.bce, self.correct, self.n = z(()), z(()), z(()), 0
        self.ce, self.assign, self.select = z(num_models), z(num_models), z(num_models)

    def add(self, out, bce: Tensor, index: Tensor, chosen: Tensor, y: Tensor) -> None:
        n = y.shape[0]
        M = out.ce.shape[0]
        self.n += n
        self.surrogate += out.loss.detach().double() * n
        self.bce += bce.detach().double() * n
        self.correct += (chosen.argmax(-1) == y).sum()
        self.ce += out.ce.detach().double().sum(1)
        self.assign += torch.bincount(out.weights.detach().argmax(0), minlength=M).double()
        self.select += torch.bincount(index, minlength=M).double()

    def summary(self) -> Dict[str, Any]:
        n = max(self.n, 1)
        return {"surrogate": self.surrogate.item() / n, "bce": self.bce.item() / n,
                "acc": self.correct.item() / n, "ce": (self.ce / n).tolist(),
                "assign_hist": (self.assign / n).tolist(), "select_hist": (self.select / n).tolist(),
                "samples": self.n}


class Trainer:
    """Runs Algorithm 1 on an image set and checkpoints after every epoch.

    Args:
        config: the run's options (validated here).
        train_set, test_set: data; loaded from ``config.dataset``/``config.data_dir`` when
            ``None`` (the test set only when ``config.eval_every > 0``).
        log: called with one summary line per epoch (default: print to stderr); ``None`` mutes.
    """

    def __init__(self, config: TrainConfig, train_set: Optional[ImageSet] = None,
                 test_set: Optional[ImageSet] = None,
                 log: Optional[Callable[[str], None]] = lambda s: print(s, file=sys.stderr)) -> None:
        self.config = cfg = config.validate()
        self.device = resolve_device(cfg.device)
        self.log = log or (lambda s: None)
        if train_set is None:
            train_set = load_images(cfg.dataset, "train", cfg.data_dir, cfg.seed)
        if test_set is None and cfg.eval_every > 0:
            test_set = load_images(cfg.dataset, "test", cfg.data_dir, cfg.seed)
        self.train_set = train_set.subset(cfg.train_limit).to(self.device)
        self.test_set = test_set.subset(cfg.test_limit) if test_set is not None else None

        torch.manual_seed(cfg.seed)
        self.model = Collaboration(cfg.model_config(), fused=not cfg.unfused).to(self.device)
        self.backend = self.model.backend
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.epoch = 0                                   # completed epochs
        self.history: List[Dict[str, Any]] = []

    # ----- one optimisation step ---------------------------------------------------------------
    def _update(self, logits: Tensor, ppd: Tensor, y: Tensor, stats: _PhaseStats) -> Tensor:
        cfg, backend = self.config, self.backend
        out = backend.collaboration_loss(logits, y, cfg.sigma)
        bce = backend.ppd_bce(ppd, out.p_true)
        loss = out.loss + cfg.bce_weight * bce
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            index, chosen = collaborate(logits.detach(), ppd.detach(), "ppd", backend)
        stats.add(out, bce, index, chosen, y)
        return loss.detach()  # a tensor: no device sync per step

    def train_step(self, x: Tensor, y: Tensor, stats: Optional[Dict[str, _PhaseStats]] = None
                   ) -> Dict[str, Tensor]:
        """One batch of Algorithm 1: ``x`` float ``[B, C, H, W]`` in [0, 1] (already augmented).

        Returns the total loss (surrogate + weighted BCE, a 0-d tensor) of each phase run,
        computed before that phase's update.
        """
        cfg, model, M = self.config, self.model, self.model.num_models
        stats = stats if stats is not None else self._new_stats()
        atk = dict(random_start=cfg.random_start, generator=self.generator, backend=self.backend)
        model.train()
        losses: Dict[str, Tensor] = {}
        if cfg.phases in ("natural", "both"):
            x_adv = per_model_pgd(model, x, y, cfg.eps, cfg.alpha, cfg.steps, **atk)  # [M, B, ...]
            logits, ppd = model(x_adv.reshape(-1, *x.shape[1:]))  # every sub-model x every variant
            losses["natural"] = self._update(logits, ppd, y.repeat(M), stats["natural"])
        if cfg.phases in ("adversarial", "both"):
            x_adv = collaboration_pgd(model, x, y, cfg.eps, cfg.alpha, cfg.steps,
                                      score=cfg.select_score, **atk)
            logits, ppd = model(x_adv)
            losses["adversarial"] = self._update(logits, ppd, y, stats["adversarial"])
        if cfg.phases == "standard":
            logits, ppd = model(x)
            losses["standard"] = self._update(logits, ppd, y, stats["standard"])
        else:  # clean accuracy of the collaboration on this batch, as it will be evaluated
            with torch.no_grad(), eval_mode(model):
                logits, ppd = model(x)
                _, chosen = collaborate(logits, ppd, "ppd", self.backend)
                stats["clean"].correct += (chosen.argmax(-1) == y).sum()
                stats["clean"].n += y.shape[0]
        return losses

    def _new_stats(self) -> Dict[str, _PhaseStats]:
        return {k: _PhaseStats(self.model.num_models, self.device)
                for k in ("natural", "adversarial", "standard", "clean")}

    # ----- epochs ------------------------------------------------------------------------------
    def batches(self):
        """This epoch's ``(x, y)`` batches: shuffled, augmented, on the device."""
        cfg, data = self.config, self.train_set
        n = len(data)
        perm = torch.randperm(n, generator=self.generator).to(self.device)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            if idx.numel() < 2:  # BatchNorm cannot train on a single sample
                continue
            x = to_float(data.images[idx])
            if cfg.augment:
                x = random_crop_flip(x, generator=self.generator)
            yield x, data.labels[idx]

    def train_epoch(self, step_callback: Optional[Callable[[int, Dict[str, Tensor]], None]] = None
                    ) -> Dict[str, Any]:
        """Run one epoch (the next one), evaluate if due, and return its metrics."""
        from tqdm.auto import tqdm

        cfg = self.config
        lr = cfg.lr_at(self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        stats = self._new_stats()
        n_batches = (len(self.train_set) + cfg.batch_size - 1) // cfg.batch_size
        t0 = time.perf_counter()
        bar = tqdm(self.batches(), total=n_batches, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress, leave=False, dynamic_ncols=True, file=sys.stderr)
        for step, (x, y) in enumerate(bar):
            losses = self.train_step(x, y, stats)
            if step_callback is not None:
                step_callback(step, losses)
            if cfg.progress and step % 10 == 0:  # reading the loss syncs the device: not every step
                bar.set_postfix({k[:3]: f"{float(v):.3f}" for k, v in losses.items()}, refresh=False)
        bar.close()
        self.epoch += 1
        metrics = self._epoch_metrics(stats, lr, time.perf_counter() - t0)
        if self.test_set is not None and cfg.eval_every > 0 and (
                self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs):
            metrics["test"] = evaluate_clean(self.model, self.test_set.images, self.test_set.labels,
                                             cfg.eval_batch_size, device=self.device)
        return metrics

    def _epoch_metrics(self, stats: Dict[str, _PhaseStats], lr: float, seconds: float) -> Dict[str, Any]:
        phases = {k: s.summary() for k, s in stats.items() if k != "clean" and s.n > 0}
        train = [s for k, s in stats.items() if k in phases]
        m: Dict[str, Any] = {"epoch": self.epoch, "lr": lr, "seconds": seconds,
                             "images_per_s": len(self.train_set) / max(seconds, 1e-9)}
        m["surrogate"] = sum(p["surrogate"] for p in phases.values())
        m["bce"] = sum(p["bce"] for p in phases.values())
        m["loss"] = m["surrogate"] + self.config.bce_weight * m["bce"]
        if "standard" in phases:
            m["clean_acc"], m["adv_acc"] = phases["standard"]["acc"], None
        else:
            c = stats["clean"]
            m["clean_acc"] = c.correct.item() / max(c.n, 1)
            m["adv_acc"] = sum(s.correct.item() for s in train) / max(sum(s.n for s in train), 1)
        total = max(sum(s.n for s in train), 1)
        m["assign_hist"] = (sum(s.assign for s in train) / total).tolist()
        m["select_hist"] = (sum(s.select for s in train) / total).tolist()
        m["phases"] = phases
        return m

    def fit(self, step_callback: Optional[Callable[[int, Dict[str, Tensor]], None]] = None
            ) -> List[Dict[str, Any]]:
        """Train until ``config.epochs`` epochs are done, checkpointing after each one."""
        while self.epoch < self.config.epochs:
            m = self.train_epoch(step_callback)
            self.history.append(m)
            self.save()
            self.log(self._summary_line(m))
        return self.history

    def _summary_line(self, m: Dict[str, Any]) -> str:
        parts = [f"epoch {m['epoch']}/{self.config.epochs}", f"loss {m['loss']:.4f}",
                 f"clean {100 * m['clean_acc']:.1f}%"]
        if m["adv_acc"] is not None:
            parts.append(f"adv {100 * m['adv_acc']:.1f}%")
        if "test" in m:
            parts.append(f"test collab {100 * m['test']['collaboration']:.1f}% "
                         f"ens {100 * m['test']['ensemble']:.1f}%")
        parts.append("assign " + "/".join(f"{a:.2f}" for a in m["assign_hist"]))
        parts.append(f"{m['seconds']:.1f}s")
        return " | ".join(parts)

    # ----- checkpoints -------------------------------------------------------------------------
    def state_tensors(self) -> Dict[str, Tensor]:
        """Model, optimiser momenta and RNG states as a flat dict of tensors."""
        t: Dict[str, Tensor] = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        names = {p: n for n, p in self.model.named_parameters()}
        for p, st in self.optimizer.state.items():
            buf = st.get("momentum_buffer")
            if buf is not None:
                t[f"optim.momentum.{names[p]}"] = buf
        t["rng.generator"] = self.generator.get_state()
        t["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                t[f"rng.cuda.{i}"] = s
        return t

    def save(self, path: Optional[str] = None) -> None:
        """Write the checkpoint (``<out_dir>/checkpoint.{safetensors,json}``) and metrics.json."""
        out = path or self.config.out_dir
        meta = {"epoch": self.epoch, "config": self.config.to_dict(),
                "model": self.model.config.to_dict(), "history": self.history}
        save_checkpoint(out, self.state_tensors(), meta)
        atomic_write(checkpoint_files(out)[0].parent / "metrics.json",
                     (json.dumps(self.history, indent=1) + "\n").encode())

    def load(self, path: Optional[str] = None) -> None:
        """Restore model, optimiser, RNG, epoch and history from a checkpoint of this config."""
        tensors, meta = load_checkpoint(path or self.config.out_dir, "cpu")
        stored = TrainConfig.from_dict(meta["config"])
        changed = sorted(k for k, v in stored.to_dict().items()
                         if self.config.to_dict()[k] != v and k not in RESUMABLE_CHANGES)
        if changed:
            raise ConfigError(f"resume: options differ from the checkpoint's ({', '.join(changed)}); "
                              "use a new --out-dir for a different run")
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(state)
        by_name = dict(self.model.named_parameters())
        self.optimizer.state.clear()
        for k, v in tensors.items():
            if k.startswith("optim.momentum."):
                p = by_name[k[len("optim.momentum."):]]
                self.optimizer.state[p]["momentum_buffer"] = v.to(p.device)
        self.generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
        self.epoch = int(meta["epoch"])
        self.history = list(meta.get("history", []))

    @classmethod
    def resume_or_start(cls, config: TrainConfig, **kwargs: Any) -> "Trainer":
        """A trainer for ``config`` that continues from ``config.out_dir``'s checkpoint if any."""
        trainer = cls(config, **kwargs)
        if checkpoint_files(config.out_dir)[0].is_file():
            trainer.load()
            trainer.log(f"resumed from {config.out_dir} after epoch {trainer.epoch}")
        return trainer

