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

Safety: :meth:`Trainer.fit` owns ``out_dir`` for the run's lifetime
(:class:`~cda2_ext.run_dir.RunFolder`: checked, locked, stale temporary files removed), and every
update checks that its loss is finite before applying it: a non-finite loss stops the run with
:class:`NonFiniteLossError` (the last checkpoint on disk, from the last finished epoch, is finite
and kept) or, with ``on_nonfinite="skip"``, skips that update and counts it in the epoch's
``skipped_steps``.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from ..attacks.training import collaboration_pgd, per_model_pgd
from ..checkpoint import atomic_write, checkpoint_files, load_checkpoint, load_state, save_checkpoint
from ..data import ImageSet, load_images, random_crop_flip, to_float
from ..errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, one_line
from ..evaluation.clean import evaluate_clean
from ..models.collaboration import Collaboration, collaborate
from ..run_dir import RunFolder
from ..runtime import eval_mode, resolve_device
from .config import TrainConfig

__all__ = ["Trainer", "RESUMABLE_CHANGES"]

# Options that may differ between the run that wrote a checkpoint and the run resuming it: they
# change where/how fast/how long the run goes, not the training trajectory (on_nonfinite only
# matters once a loss is non-finite, and a run stopped by one may resume skipping such batches).
RESUMABLE_CHANGES = frozenset({"epochs", "device", "unfused", "progress", "eval_every",
                               "eval_batch_size", "data_dir", "out_dir", "on_nonfinite"})


class _PhaseStats:
    """Running sums for one phase over an epoch, kept on the device (one sync per epoch)."""

    def __init__(self, num_models: int, device: torch.device) -> None:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.surrogate, self.bce, self.correct, self.n = z(()), z(()), z(()), 0
        self.ce, self.assign, self.select = z(num_models), z(num_models), z(num_models)
        self.skipped = 0                                 # updates skipped for a non-finite loss

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
                "samples": self.n, "skipped_steps": self.skipped}


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
        if len(self.train_set) < 2:  # no batch could train: BatchNorm needs two images
            raise DataError(f"training set: needs at least 2 images, got {len(self.train_set)}")
        if self.test_set is not None and cfg.eval_every > 0 and len(self.test_set) == 0:
            raise DataError("test set: has no images (set eval_every to 0 to train without it)")

        torch.manual_seed(cfg.seed)
        self.model = Collaboration(cfg.model_config(), fused=not cfg.unfused).to(self.device)
        self.backend = self.model.backend
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.epoch = 0                                   # completed epochs
        self.history: List[Dict[str, Any]] = []
        self.restored = False                            # state came from load()
        self._where = ""                                 # the batch being trained, for messages

    # ----- one optimisation step ---------------------------------------------------------------
    def _update(self, x: Tensor, y: Tensor, stats: _PhaseStats, phase: str) -> Tensor:
        """Forward ``x`` (train mode), then one SGD step on surrogate + weighted BCE, unless that
        loss is non-finite (see ``on_nonfinite``)."""
        cfg, backend = self.config, self.backend
        # A skipped batch must leave no trace, and the forward pass updates BatchNorm's running
        # statistics: keep a copy to put back (a few KB).
        buffers = [b.clone() for b in self.model.buffers()] if cfg.on_nonfinite == "skip" else None
        logits, ppd = self.model(x)
        out = backend.collaboration_loss(logits, y, cfg.sigma)
        bce = backend.ppd_bce(ppd, out.p_true)
        loss = out.loss + cfg.bce_weight * bce
        # One device sync per update: the price of never applying (or saving) a non-finite step.
        if not bool(torch.isfinite(loss)):
            if buffers is None:
                raise NonFiniteLossError(
                    f"the {phase} loss is {float(loss.detach())} at {self._where or 'this step'}; "
                    f"stopped before applying it ({self._kept()}); lower --lr or check the data, or "
                    "pass --on-nonfinite skip to skip such batches")
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)
            stats.skipped += 1
            return loss.detach()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            index, chosen = collaborate(logits.detach(), ppd.detach(), "ppd", backend)
        stats.add(out, bce, index, chosen, y)
        return loss.detach()

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
            # every sub-model x every variant
            losses["natural"] = self._update(x_adv.reshape(-1, *x.shape[1:]), y.repeat(M),
                                             stats["natural"], "natural")
        if cfg.phases in ("adversarial", "both"):
            x_adv = collaboration_pgd(model, x, y, cfg.eps, cfg.alpha, cfg.steps,
                                      score=cfg.select_score, **atk)
            losses["adversarial"] = self._update(x_adv, y, stats["adversarial"], "adversarial")
        if cfg.phases == "standard":
            losses["standard"] = self._update(x, y, stats["standard"], "standard")
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
            self._where = f"epoch {self.epoch + 1}, step {step + 1} of {n_batches}"
            losses = self.train_step(x, y, stats)
            if step_callback is not None:
                step_callback(step, losses)
            if cfg.progress and step % 10 == 0:  # reading the loss syncs the device: not every step
                bar.set_postfix({k[:3]: f"{float(v):.3f}" for k, v in losses.items()}, refresh=False)
        bar.close()
        self._where = ""
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
        m["skipped_steps"] = sum(s.skipped for s in stats.values())
        return m

    def fit(self, step_callback: Optional[Callable[[int, Dict[str, Tensor]], None]] = None, *,
            resume: Optional[bool] = None, force: bool = False) -> List[Dict[str, Any]]:
        """Train until ``config.epochs`` epochs are done, checkpointing after each one.

        ``config.out_dir`` is held as a :class:`~cda2_ext.run_dir.RunFolder` meanwhile: a folder
        that already holds a checkpoint is continued with ``resume`` (loaded under the lock,
        unless this trainer was already restored from it; the default, ``None``, means "if it
        was") and started over with ``force``; anything else is refused before any training.
        """
        resume = self.restored if resume is None else resume
        with RunFolder(self.config.out_dir, resume=resume, force=force) as folder:
            if folder.removed:
                self.log(f"removed from {folder.path}: {', '.join(folder.removed)}")
            if resume and folder.has_checkpoint and not self.restored:
                self.load()
                self.log(f"resumed from {folder.path} after epoch {self.epoch}")
            while self.epoch < self.config.epochs:
                m = self.train_epoch(step_callback)
                self.history.append(m)
                self._check_parameters()
                try:
                    self.save()
                except OSError as err:
                    raise CheckpointError(f"could not write the checkpoint of epoch {self.epoch} to "
                                          f"{folder.path}: {err.strerror or one_line(err)} "
                                          f"({self._kept(self.epoch - 1)})") from None
                self.log(self._summary_line(m))
        return self.history

    def _kept(self, epoch: Optional[int] = None) -> str:
        """What the run folder still holds, for messages about a run that stops."""
        epoch = self.epoch if epoch is None else epoch
        if epoch < 1:
            return "no checkpoint had been written yet"
        return f"the checkpoint of epoch {epoch} in {self.config.out_dir} is kept"

    def _check_parameters(self) -> None:
        """Refuse to save non-finite weights (e.g. a finite loss whose gradient overflowed)."""
        state = self.model.state_dict().values()
        finite = [torch.isfinite(t).all() for t in state if t.is_floating_point()]
        if not bool(torch.stack(finite).all()):  # one device sync
            raise NonFiniteLossError(f"the model's parameters are non-finite after epoch {self.epoch}; "
                                     f"not saving them ({self._kept(self.epoch - 1)}); lower --lr")

    def _summary_line(self, m: Dict[str, Any]) -> str:
        parts = [f"epoch {m['epoch']}/{self.config.epochs}", f"loss {m['loss']:.4f}",
                 f"clean {100 * m['clean_acc']:.1f}%"]
        if m["adv_acc"] is not None:
            parts.append(f"adv {100 * m['adv_acc']:.1f}%")
        if "test" in m:
            parts.append(f"test collab {100 * m['test']['collaboration']:.1f}% "
                         f"ens {100 * m['test']['ensemble']:.1f}%")
        parts.append("assign " + "/".join(f"{a:.2f}" for a in m["assign_hist"]))
        if m["skipped_steps"]:
            parts.append(f"{m['skipped_steps']} non-finite updates skipped")
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
        """Restore model, optimiser, RNG, epoch and history from a checkpoint of this config.

        Everything is checked before anything is changed: a damaged or foreign checkpoint raises
        one :class:`CheckpointError` line naming the file and leaves this trainer as it was.
        """
        source = checkpoint_files(path or self.config.out_dir)[0]
        tensors, meta = load_checkpoint(source, "cpu")
        stored = TrainConfig.from_meta(meta, source)
        changed = sorted(k for k, v in stored.to_dict().items()
                         if self.config.to_dict()[k] != v and k not in RESUMABLE_CHANGES)
        if changed:
            raise ConfigError(f"resume: options differ from the checkpoint's ({', '.join(changed)}); "
                              "use a new --out-dir for a different run")
        epoch, history = meta.get("epoch"), meta.get("history", [])
        if type(epoch) is not int or epoch < 0 or not isinstance(history, list):
            raise CheckpointError(f"{source} has damaged metadata (epoch {epoch!r}, history of type "
                                  f"{type(history).__name__})")
        load_state(self.model, tensors, "model.", source, check_only=True)
        by_name = dict(self.model.named_parameters())
        prefix = "optim.momentum."
        momenta = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        for name, v in momenta.items():
            if name not in by_name or by_name[name].shape != v.shape:
                raise CheckpointError(f"{source} has an optimiser state that does not fit the model "
                                      f"({prefix}{name})")
        for key in ("rng.generator", "rng.torch"):
            try:  # a scratch CPU generator validates the state (dtype, size) without using it
                torch.Generator().set_state(tensors[key])
            except (KeyError, RuntimeError, TypeError) as err:
                why = "missing" if isinstance(err, KeyError) else one_line(err)
                raise CheckpointError(f"{source} has no usable random state {key}: {why}") from None
        load_state(self.model, tensors, "model.", source)
        self.optimizer.state.clear()
        for name, v in momenta.items():
            p = by_name[name]
            self.optimizer.state[p]["momentum_buffer"] = v.to(p.device)
        self.generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            try:  # no scratch CUDA generator to check these on first: the last step of the load
                torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
            except RuntimeError as err:
                raise CheckpointError(f"{source} has no usable CUDA random state: "
                                      f"{one_line(err)}") from None
        self.epoch, self.history = epoch, list(history)
        self.restored = True

    @classmethod
    def resume_or_start(cls, config: TrainConfig, **kwargs: Any) -> "Trainer":
        """A trainer for ``config`` that continues from ``config.out_dir``'s checkpoint if any."""
        trainer = cls(config, **kwargs)
        if checkpoint_files(config.out_dir)[0].is_file():
            trainer.load()
            trainer.log(f"resumed from {config.out_dir} after epoch {trainer.epoch}")
        return trainer

