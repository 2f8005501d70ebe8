"""The one trainer: data, optimiser, precision, processes, safety and checkpoints around a method.

What is trained is a *method* (:mod:`cda2_ext.training.methods`, ``TrainConfig.method``; CDA²'s
Algorithm 1 by default): per batch it makes its inputs (an attack, or none) and calls
:meth:`Trainer.update` with its loss. Everything else is here, once, for every method:

* **Data**: each epoch a permutation of the training set, split into global batches, augmented
  on the device.
* **Randomness**: the model is initialised from ``torch.manual_seed(seed)``; everything afterwards
  (data order, crops, flips, PGD random starts) is drawn from one CPU ``torch.Generator``, whose
  state is checkpointed with the model and optimiser after every epoch. A resumed run therefore
  replays exactly the batches and random starts an uninterrupted run would have seen.
* **Mixed precision** (``amp``): forward passes (attacks included) under ``torch.autocast`` in
  bf16 or fp16 (with a gradient scaler); the losses and the fused ops run in fp32.
* **Processes** (:mod:`.distributed`): under ``torchrun`` each process trains its shard of every
  global batch, with the global batch's randomness, inside ``DistributedDataParallel``; rank 0
  writes checkpoints, metrics and logs.
* **Safety**: :meth:`Trainer.fit` owns ``out_dir`` for the run's lifetime
  (:class:`~cda2_ext.storage.run_folder.RunFolder`: checked, locked, stale temporary files removed), and an
  update whose loss is non-finite is never applied (:mod:`.nonfinite`: decided on the device, so a
  step never waits for it): it stops the run with :class:`~cda2_ext.errors.NonFiniteLossError`,
  raised at the next host read of the verdict (every :attr:`Trainer.check_every` steps and at the
  end of the epoch, before anything is saved; the last checkpoint on disk, from the last finished
  epoch, is finite and kept) or, with ``on_nonfinite="skip"``, is skipped and counted in the
  epoch's ``skipped_steps``.
* **No host sync in a step**: the training set's labels are checked once, here, so the
  ops skip their per-call label checks (:func:`~cda2_ext.ops._checks.labels_checked`); tallies stay on
  the device; the attacks' shapes do not depend on the data on a GPU
  (:func:`~cda2_ext.runtime.sync_free`).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from ..ops._checks import labels_checked, labels_in_range
from ..storage.checkpoint import atomic_write, checkpoint_files, load_checkpoint, load_state, save_checkpoint
from ..data import (ImageSet, channel_stats, crop_padding, load_images, note_training_size,
                    random_crop_flip, to_float)
from ..errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, one_line
from ..evaluation.clean import evaluate_clean
from ..models.architectures import ArchLike, arch_name, named_architectures
from ..models.collaboration import Collaboration
from ..storage.run_folder import METRICS_NAME, RunFolder
from ..runtime import resolve_device
from .config import TrainConfig
from .distributed import DistContext, convert_sync_batchnorm
from .methods import Tally, method_class
from .nonfinite import UpdateGuard

__all__ = ["Trainer"]


_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Optimiser state entries are stored as ``optim.<name>.<parameter>``; SGD's momentum buffer keeps
# the name it had before other optimisers were supported, so older checkpoints still resume.
_STATE_NAMES = {"momentum_buffer": "momentum"}


def _load_average() -> Optional[float]:
    """The machine's 1-minute load average (``None`` where the system has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


class Trainer:
    """Trains ``config.method`` on an image set and checkpoints after every epoch.

    ``check_every``: how many steps apart the host reads whether an update had a non-finite loss
    (and refreshes the progress bar): one device synchronisation per this many steps.

    Args:
        config: the run's options (validated here).
        train_set, test_set: data; loaded from ``config.dataset``/``config.data_dir`` when
            ``None`` (the test set only when ``config.eval_every > 0``).
        log: called with one summary line per epoch (default: print to stderr); ``None`` mutes.
            Only rank 0 of a multi-process job logs.
        dist: this process's place in a ``torchrun`` job (default: alone).
        arch: the constructor ``config.arch`` names when that is a user's
            ``package.module:function`` (the callable, or that path to import), which a config
            read back from a checkpoint never imports by itself; ``None`` for the built-in ones.

    With ``dataset="imagefolder"`` the number of classes comes from the training split's class
    folders, and the normalisation, unless given, from its pixels (:func:`channel_stats`);
    :attr:`config` then holds both, and so does every checkpoint. The random crop pads by
    :func:`crop_padding` of the images' size, and the model config records that size where it
    matters (:meth:`TrainConfig.model_config`).
    """

    def __init__(self, config: TrainConfig, train_set: Optional[ImageSet] = None,
                 test_set: Optional[ImageSet] = None,
                 log: Optional[Callable[[str], None]] = lambda s: print(s, file=sys.stderr),
                 dist: Optional[DistContext] = None, *, arch: Optional[ArchLike] = None) -> None:
        self.config = cfg = config.validate()
        if arch is not None and arch_name(arch) != cfg.arch:
            raise ConfigError(f"arch: the config's arch is {cfg.arch!r}, but the constructor given "
                              f"is {arch_name(arch)!r}")
        self.dist = dist or DistContext()
        self.dist.check_batch(cfg.batch_size)
        self.device = self.dist.device(resolve_device(cfg.device))
        self.log = log if (log is not None and self.dist.is_main) else (lambda s: None)
        loaded = train_set is None  # a caller's own images are the caller's business
        # an image folder's K is its own (checked against the config in _fit_to_data)
        classes = None if cfg.dataset == "imagefolder" else cfg.num_classes
        if loaded:
            train_set = load_images(cfg.dataset, "train", cfg.data_dir, cfg.seed,
                                    num_classes=classes)
        if test_set is None and cfg.eval_every > 0:
            test_set = load_images(cfg.dataset, "test", cfg.data_dir, cfg.seed, num_classes=classes)
        train_set = train_set.subset(cfg.train_limit)
        if cfg.dataset == "imagefolder":
            self.config = cfg = self._fit_to_data(cfg, train_set)
        self.train_set = train_set.to(self.device)
        self.test_set = test_set.subset(cfg.test_limit) if test_set is not None else None
        self.image_size: Tuple[int, int] = tuple(self.train_set.images.shape[-2:])  # type: ignore[assignment]
        if self.test_set is not None and tuple(self.test_set.images.shape[-2:]) != self.image_size:
            h, w = self.test_set.images.shape[-2:]
            raise DataError(f"test set: images of {h}x{w} pixels, but the training images are "
                            f"{self.image_size[0]}x{self.image_size[1]}")
        if len(self.train_set) < 2:  # no batch could train: BatchNorm needs two images
            raise DataError(f"training set: needs at least 2 images, got {len(self.train_set)}")
        try:  # once here, so that no training step reads labels back (see labels_checked)
            labels_in_range(self.train_set.labels, cfg.num_classes, "training set")
        except ValueError as err:
            raise DataError(str(err)) from None
        if self.test_set is not None and cfg.eval_every > 0 and len(self.test_set) == 0:
            raise DataError("test set: has no images (set eval_every to 0 to train without it)")
        if loaded and cfg.dataset == "cifar10" and self.dist.is_main:  # after --train-limit too
            note_training_size(len(self.train_set))

        torch.manual_seed(cfg.seed)
        with named_architectures(*([arch] if arch is not None else [])):
            self.model = Collaboration(cfg.model_config(self.image_size), fused=not cfg.unfused
                                       ).to(self.device)
        self.crop_pad = crop_padding(*self.image_size)
        if cfg.sync_bn and self.dist.enabled:
            convert_sync_batchnorm(self.model)
            # the loop layout runs BatchNorm's arithmetic itself, past the synchronising modules
            self.model.layout = "packed"
        self.backend = self.model.backend
        self.method = method_class(cfg.method)(self)
        self.optimizer = self.method.make_optimizer(self.model.parameters())
        self.train_forward: Callable[[Tensor], Any] = self.model
        if self.dist.enabled:  # gradients averaged across processes during the backward pass
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_forward = DistributedDataParallel(
                self.model, device_ids=ids,
                find_unused_parameters=not self.method.uses_every_parameter)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.guard = UpdateGuard(self.dist, stop=cfg.on_nonfinite == "stop")
        self.check_every = 25                            # steps between host reads of the verdict
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.epoch = 0                                   # completed epochs
        self.history: List[Dict[str, Any]] = []
        self.restored = False                            # state came from load()
        self._where = ""                                 # the batch being trained, for messages
        self._global_x: Optional[Tensor] = None          # the global batch this shard is from

    @staticmethod
    def _fit_to_data(cfg: TrainConfig, train_set: ImageSet) -> TrainConfig:
        """``cfg`` with an image folder's K and (unless given) its training split's per-channel
        mean and std, or a :class:`ConfigError` if ``num_classes`` was set to another K."""
        k = len(train_set.classes)
        if cfg.num_classes not in (k, TrainConfig.num_classes):
            raise ConfigError(f"num_classes: {cfg.num_classes}, but the image folder "
                              f"{train_set.source} has {k} classes (its class folders)")
        changes: Dict[str, Any] = {"num_classes": k}
        if cfg.mean is None:
            changes["mean"], changes["std"] = channel_stats(train_set.images)
        return cfg.replace(**changes).validate()

    # ----- services for methods ------------------------------------------------------------------
    def autocast(self) -> ContextManager[Any]:
        """Mixed precision for a forward pass (``amp``), a no-op in fp32."""
        if self.config.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AMP_DTYPES[self.config.amp])

    def random_start(self, x: Tensor, copies: Optional[int]) -> Optional[Tensor]:
        """This process's slice of the PGD random start drawn for the whole global batch
        (``[copies, B, ...]`` or ``[B, ...]``), so every world size sees the same starts; ``None``
        (the attack draws its own, the same thing) when alone or without a random start."""
        cfg = self.config
        if not (self.dist.enabled and cfg.random_start and cfg.eps > 0):
            return None
        full = self.backend.pgd_random_start(self._global_x, cfg.eps, 0.0, 1.0, num_models=copies,
                                             generator=self.generator)
        if copies is None:
            return self.dist.shard(full)
        return self.dist.shard(full.transpose(0, 1)).transpose(0, 1)

    def update(self, loss_fn: Callable[[], Tuple[Tensor, Any]], phase: str, tally: Tally
               ) -> Tuple[Tensor, Any]:
        """One optimiser step on ``loss_fn()`` (which runs the training forward pass, under
        autocast, and returns ``(loss, aux)``), applied only if the loss is finite.

        Returns ``(loss.detach(), aux)``. The verdict stays on the device (:mod:`.nonfinite`): a
        non-finite loss leaves parameters, optimiser state and BatchNorm statistics as they were,
        counts in ``tally["skipped"]``, and makes what the method adds to ``tally`` afterwards in
        this step count for nothing (:meth:`Tally.count_only_if`); with ``on_nonfinite="stop"``
        :meth:`check_finite` then raises :class:`~cda2_ext.errors.NonFiniteLossError`.
        """
        self.guard.begin(self.model)
        with self.autocast():
            loss, aux = loss_fn()
        ok = self.guard.decide(loss, (phase, self._where or "this step"))
        # Every process runs its backward pass whatever the verdict (the replicas of a
        # multi-process job expect each other's gradients); the step is what is skipped.
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.guard.step(ok, self.model, self.optimizer, self.scaler)
        tally.count_only_if(None)
        tally.add("skipped", ~ok)
        tally.count_only_if(ok)
        return loss.detach(), aux

    def check_finite(self) -> None:
        """Raise :class:`~cda2_ext.errors.NonFiniteLossError` if an update since the last check had
        a non-finite loss and the run stops on one (one host read; nothing with ``"skip"``)."""
        failure = self.guard.first_failure()
        if failure is None:
            return
        (phase, where), value = failure
        raise NonFiniteLossError(
            f"the {phase} loss is {value} at {where}; stopped before applying it ({self._kept()}); "
            "lower --lr or check the data, or pass --on-nonfinite skip to skip such batches")

    # ----- epochs ------------------------------------------------------------------------------
    def batches(self) -> Iterator[Tuple[Tensor, Tensor]]:
        """This epoch's global ``(x, y)`` batches: shuffled, augmented, on the device. With
        several processes a last batch is cut to a multiple of their number."""
        cfg, data, world = self.config, self.train_set, self.dist.world_size
        n = len(data)
        perm = torch.randperm(n, generator=self.generator).to(self.device)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            idx = idx[:idx.numel() - idx.numel() % world]
            if idx.numel() < 2 * world:  # BatchNorm cannot train on a single sample
                continue
            x = to_float(data.images[idx])
            if cfg.augment:
                x = random_crop_flip(x, self.crop_pad, generator=self.generator)
            yield x, data.labels[idx]

    def train_step(self, x: Tensor, y: Tensor, tallies: Optional[Dict[str, Tally]] = None
                   ) -> Dict[str, Tensor]:
        """One global batch ``x [B, C, H, W]`` in [0, 1] (augmented), ``y [B]``: this process's
        shard of it trained by the method. Returns the method's losses (0-d tensors).

        ``y`` must come from the training set (its labels were checked once, at start). Nothing in
        the step reads device data back on the host; a non-finite loss is reported by
        :meth:`check_finite` (which :meth:`train_epoch` calls)."""
        tallies = tallies if tallies is not None else self._new_tallies()
        for tally in tallies.values():  # what the step adds before its first update always counts
            tally.count_only_if(None)
        self.model.train()
        self._global_x = x
        try:
            with labels_checked():
                return self.method.step(self.dist.shard(x), self.dist.shard(y), tallies)
        finally:
            self._global_x = None

    def _new_tallies(self) -> Dict[str, Tally]:
        return {k: Tally(self.device) for k in self.method.tally_keys()}

    def train_epoch(self, step_callback: Optional[Callable[[int, Dict[str, Tensor]], None]] = None
                    ) -> Dict[str, Any]:
        """Run one epoch (the next one), evaluate if due, and return its metrics."""
        from tqdm.auto import tqdm

        cfg = self.config
        lr = cfg.lr_at(self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        tallies = self._new_tallies()
        n_batches = (len(self.train_set) + cfg.batch_size - 1) // cfg.batch_size
        t0, cpu0 = time.perf_counter(), time.process_time()
        bar = tqdm(self.batches(), total=n_batches, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and self.dist.is_main), leave=False,
                   dynamic_ncols=True, file=sys.stderr)
        for step, (x, y) in enumerate(bar):
            self._where = f"epoch {self.epoch + 1}, step {step + 1} of {n_batches}"
            losses = self.train_step(x, y, tallies)
            if step_callback is not None:
                step_callback(step, losses)
            if (step + 1) % self.check_every == 0:  # host reads wait for the device: not every step
                self.check_finite()
                if cfg.progress:
                    bar.set_postfix({k[:3]: f"{float(v):.3f}" for k, v in losses.items()},
                                    refresh=False)
        bar.close()
        self.check_finite()  # before anything of this epoch is reported or saved
        self._where = ""
        self.epoch += 1
        for tally in tallies.values():  # one sum over processes per epoch
            for key in sorted(tally.sums):
                self.dist.sum(tally.sums[key])
        seconds = time.perf_counter() - t0
        # The CPU time this process got, its threads and the machine's load beside the wall
        # time: an epoch slowed by other jobs on a shared machine says so in its own record
        # (cpu_seconds well below seconds x cpu_threads, a load above the cores).
        metrics: Dict[str, Any] = {"epoch": self.epoch, "lr": lr, "seconds": seconds,
                                   "images_per_s": len(self.train_set) / max(seconds, 1e-9),
                                   "cpu_seconds": time.process_time() - cpu0,
                                   "cpu_threads": torch.get_num_threads(),
                                   "load_average": _load_average()}
        metrics.update(self.method.epoch_metrics(tallies))
        metrics["skipped_steps"] = int(sum(float(t.get("skipped")) for t in tallies.values()))
        if (self.dist.is_main and self.test_set is not None and cfg.eval_every > 0
                and (self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs)):
            metrics["test"] = evaluate_clean(self.model, self.test_set.images, self.test_set.labels,
                                             cfg.eval_batch_size, score=cfg.select_score,
                                             device=self.device)
        return metrics

    def fit(self, step_callback: Optional[Callable[[int, Dict[str, Tensor]], None]] = None, *,
            resume: Optional[bool] = None, force: bool = False) -> List[Dict[str, Any]]:
        """Train until ``config.epochs`` epochs are done, checkpointing after each one.

        ``config.out_dir`` is held as a :class:`~cda2_ext.storage.run_folder.RunFolder` meanwhile: a folder
        that already holds a checkpoint is continued with ``resume`` (loaded under the lock,
        unless this trainer was already restored from it; the default, ``None``, means "if it
        was") and started over with ``force``; anything else is refused before any training.
        In a multi-process job rank 0 holds the folder and writes; the others read the same
        checkpoint on resume and wait for each save.
        """
        resume = self.restored if resume is None else resume
        holder = (RunFolder(self.config.out_dir, resume=resume, force=force) if self.dist.is_main
                  else contextlib.nullcontext())
        with holder as folder:
            self.dist.barrier()  # rank 0 has checked (and with force, cleared) the folder
            if folder is not None and folder.removed:
                self.log(f"removed from {folder.path}: {', '.join(folder.removed)}")
            if resume and not self.restored and checkpoint_files(self.config.out_dir)[0].is_file():
                self.load()
                self.log(f"resumed from {self.config.out_dir} after epoch {self.epoch}")
            while self.epoch < self.config.epochs:
                m = self.train_epoch(step_callback)
                self.history.append(m)
                self._check_parameters()
                if self.dist.is_main:
                    try:
                        self.save()
                    except OSError as err:
                        raise CheckpointError(
                            f"could not write the checkpoint of epoch {self.epoch} to "
                            f"{self.config.out_dir}: {err.strerror or one_line(err)} "
                            f"({self._kept(self.epoch - 1)})") from None
                self.dist.barrier()
                self.log(self._summary_line(m))
        return self.history

    def close(self) -> None:
        """End this process's part in a multi-process job (a no-op alone): drop the
        ``DistributedDataParallel`` wrapper, whose reducer holds the process group, then
        :meth:`DistContext.close` (a barrier, then the group destroyed, so that no gloo thread is
        left to abort the process at exit; see there). Call it on every rank after the last
        step or :meth:`fit`, not after an error (a rank that failed never reaches the barrier).
        The trainer cannot train afterwards; its model, history and checkpoints stay usable.
        """
        if self.dist.enabled:
            self.train_forward = self.model
        self.dist.close()

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
        if m.get("adv_acc") is not None:
            parts.append(f"adv {100 * m['adv_acc']:.1f}%")
        parts.extend(self.method.summary(m))
        if m["skipped_steps"]:
            parts.append(f"{m['skipped_steps']} non-finite updates skipped")
        parts.append(f"{m['seconds']:.1f}s")
        return " | ".join(parts)

    # ----- checkpoints -------------------------------------------------------------------------
    def state_tensors(self) -> Dict[str, Tensor]:
        """Model, optimiser state and RNG states as a flat dict of tensors."""
        t: Dict[str, Tensor] = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        names = {p: n for n, p in self.model.named_parameters()}
        for p, st in self.optimizer.state.items():
            for key, value in st.items():
                if isinstance(value, Tensor):
                    t[f"optim.{_STATE_NAMES.get(key, key)}.{names[p]}"] = value
        t["rng.generator"] = self.generator.get_state()
        t["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                t[f"rng.cuda.{i}"] = s
        return t

    def save(self, path: Optional[str] = None) -> None:
        """Write the checkpoint (``<out_dir>/checkpoint.{safetensors,json}``) and the metrics."""
        out = path or self.config.out_dir
        meta = {"epoch": self.epoch, "config": self.config.to_dict(),
                "model": self.model.config.to_dict(), "history": self.history,
                "world_size": self.dist.world_size}
        save_checkpoint(out, self.state_tensors(), meta)
        atomic_write(checkpoint_files(out)[0].parent / METRICS_NAME,
                     (json.dumps(self.history, indent=1) + "\n").encode())

    def load(self, path: Optional[str] = None) -> None:
        """Restore model, optimiser, RNG, epoch and history from a checkpoint of this config.

        Everything is checked before anything is changed: a damaged or foreign checkpoint raises
        one :class:`CheckpointError` line naming the file and leaves this trainer as it was.
        """
        source = checkpoint_files(path or self.config.out_dir)[0]
        tensors, meta = load_checkpoint(source, "cpu")
        stored = TrainConfig.from_meta(meta, source)
        changed = self.config.resume_conflicts(stored)
        if changed:
            raise ConfigError(f"resume: options differ from the checkpoint's ({', '.join(changed)}); "
                              "use a new --out-dir for a different run")
        epoch, history = meta.get("epoch"), meta.get("history", [])
        # A run stops at its config's epochs, so a larger epoch count is damage, not progress.
        if (type(epoch) is not int or not 0 <= epoch <= stored.epochs
                or not isinstance(history, list)):
            raise CheckpointError(f"{source} has damaged metadata (epoch {epoch!r}, history of type "
                                  f"{type(history).__name__})")
        load_state(self.model, tensors, "model.", source, check_only=True)
        by_name = dict(self.model.named_parameters())
        from_stored = {v: k for k, v in _STATE_NAMES.items()}
        optim_state: List[Tuple[str, str, Tensor]] = []   # (parameter, state entry, value)
        for k, v in tensors.items():
            if not k.startswith("optim."):
                continue
            entry, _, name = k[len("optim."):].partition(".")
            shaped = v.dim() == 0 or (name in by_name and by_name[name].shape == v.shape)
            if name not in by_name or not shaped:
                raise CheckpointError(f"{source} has an optimiser state that does not fit the model "
                                      f"({k})")
            optim_state.append((name, from_stored.get(entry, entry), v))
        for key in ("rng.generator", "rng.torch"):
            try:  # a scratch CPU generator validates the state (dtype, size) without using it
                torch.Generator().set_state(tensors[key])
            except (KeyError, RuntimeError, TypeError) as err:
                why = "missing" if isinstance(err, KeyError) else one_line(err)
                raise CheckpointError(f"{source} has no usable random state {key}: {why}") from None
        load_state(self.model, tensors, "model.", source)
        self.optimizer.state.clear()
        for name, entry, v in optim_state:
            p = by_name[name]
            self.optimizer.state[p][entry] = v if v.dim() == 0 else v.to(p.device)
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

