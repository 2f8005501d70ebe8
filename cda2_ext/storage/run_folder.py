"""Where results go: every output path checked before work starts, and run folders owned and locked.

* :func:`check_output` - the one check of an output path (a file, or a folder of results) that
  every command runs before any work: not the wrong kind (a folder where a file is wanted, or the
  reverse), no earlier results overwritten unless forced, and writable (created if missing and
  probed with a temporary file, so a read-only disk or a path under ``/proc`` fails at once, not
  after an hour of compute).
* :func:`save_or_rescue` - write finished results; when that fails, save them to a temporary file
  and say where, so computed results are never lost to a full disk or a vanished folder.
* The folder's file names (:data:`METRICS_NAME`, :data:`ROBUSTNESS_NAME`, the checkpoint pair)
  and typed readers of what the commands write there: :func:`training_time` (a run's
  ``metrics.json`` as :class:`TrainingTime`) and :class:`RobustnessRecord` (``cda2 eval``'s
  ``robustness.json``). Whoever reads a run's results reads them here, not by key from raw JSON.
* :class:`RunFolder` - a training run's folder, owned by one process for the run's lifetime:

  - it is a folder that holds a run of this tool (its lock file or checkpoint) or is new/empty;
    anything else (an existing file, a folder of other files) is refused unless ``force``;
  - a checkpoint already there is continued only with ``resume`` and replaced only with ``force``;
  - an exclusive ``flock`` on ``<folder>/.cda2.lock`` (which records the holder's PID) refuses a
    second run at once, naming the holder; the kernel drops the lock when the process dies, even
    on ``kill -9``, so no stale lock can block the next run;
  - the run's own files there (the lock, the checkpoint pair, ``metrics.json``) must be regular
    files: the lock is opened without following links (``O_NOFOLLOW``) and results are replaced,
    never written through, so a link planted under one of those names cannot make the run
    truncate or overwrite a file elsewhere; a folder, link or device under such a name is refused
    before any work (with ``force`` too: it is not ours to remove);
  - stale temporary files of an interrupted save (``.checkpoint.*.tmp``, ``.metrics.json.*.tmp``)
    are removed when the next run takes the folder.
"""
from __future__ import annotations

import fnmatch
import json
import os
import stat
import tempfile
from pathlib import Path
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

from ..errors import CheckpointError, ConfigError, one_line, os_reason
from .checkpoint import CHECKPOINT_NAME, checkpoint_files, fsync_dir

try:  # POSIX; elsewhere runs are not locked (documented in docs/run-folder.md)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["check_output", "save_or_rescue", "RunFolder", "check_run_folder", "LOCK_NAME",
           "RUN_RESULTS", "METRICS_NAME", "ROBUSTNESS_NAME", "read_json", "TrainingTime",
           "training_time", "RobustnessRecord"]

PathLike = Union[str, os.PathLike]
T = TypeVar("T")

LOCK_NAME = ".cda2.lock"
#: A run's per-epoch metrics: a JSON list with one object per finished epoch (its ``seconds``,
#: ``images_per_s``, losses and accuracies), rewritten after every epoch.
METRICS_NAME = "metrics.json"
#: What ``cda2 eval --out DIR`` writes its results to, in ``DIR``.
ROBUSTNESS_NAME = "robustness.json"
#: What a training run writes into its folder (earlier results: kept unless resumed or forced).
RUN_RESULTS = (f"{CHECKPOINT_NAME}.safetensors", f"{CHECKPOINT_NAME}.json", METRICS_NAME)
#: The temporary files of :func:`~cda2_ext.storage.checkpoint.atomic_write` for those results.
_RUN_TMP = tuple(f".{name}.*.tmp" for name in RUN_RESULTS)


def _matching(names: Sequence[str], patterns: Sequence[str]) -> List[str]:
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def check_output(path: PathLike, *, option: str, folder: bool = False, force: bool = False,
                 results: Sequence[str] = (), owned_if: Optional[Sequence[str]] = None,
                 hint: str = "pass --force to overwrite") -> Path:
    """Check an output path before any work starts; create it (or its parent) and probe writing.

    Args:
        path: the file (``folder=False``) or folder (``folder=True``) a command will write.
        option: the option that named it, for the message (``"out_dir"``, ``"--out"``).
        force: allow overwriting earlier results (and writing into a folder of other files).
        results: for a folder, glob patterns of the names the command writes there; any that
            exists is an earlier result and is refused unless ``force``. A file is always one.
        owned_if: for a folder the command must own (a run folder), the names that show it
            already is one; a non-empty folder holding none of them is refused unless ``force``.
        hint: how to proceed, appended to the "earlier results" message.

    Returns ``Path(path)``. Raises :class:`~cda2_ext.errors.ConfigError` naming ``option``.
    """
    p = Path(path)
    where = p if folder else p.parent
    try:
        if folder and p.exists() and not p.is_dir():
            raise ConfigError(f"{option}: {p} is a file, not a folder")
        if not folder and p.is_dir():
            raise ConfigError(f"{option}: {p} is a folder; give a file name")
        names = sorted(os.listdir(p)) if folder and p.is_dir() else []
        if not force:
            if not folder and p.exists():
                raise ConfigError(f"{option}: {p} already exists; {hint}")
            earlier = _matching(names, results)
            if earlier:
                more = f" and {len(earlier) - 1} more" if len(earlier) > 1 else ""
                raise ConfigError(f"{option}: {p} already holds {earlier[0]}{more} from an earlier "
                                  f"run; {hint}")
            if owned_if is not None and names and not _matching(names, owned_if):
                raise ConfigError(f"{option}: {p} is a non-empty folder that holds no cda2 run "
                                  f"(e.g. {names[0]}); choose a new or empty folder, or pass --force")
        where.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".cda2-probe-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:  # the path the system refused (the output's, or a folder above it)
        raise ConfigError(f"{option}: cannot write to {err.filename or where}: "
                          f"{err.strerror or one_line(err)}") from None
    return p


def save_or_rescue(write: Callable[[], T], results_json: str, *, option: str) -> T:
    """Run ``write()`` (which writes finished results); if it fails with ``OSError``, save
    ``results_json`` to a temporary file instead and raise a :class:`ConfigError` naming both."""
    try:
        return write()
    except OSError as err:
        why = err.strerror or one_line(err)
        try:
            fd, rescue = tempfile.mkstemp(prefix="cda2-results-", suffix=".json")
            with os.fdopen(fd, "w") as fh:
                fh.write(results_json + "\n")
            kept = f"the results were saved to {rescue} instead"
        except OSError:
            kept = "the results are printed above"
        raise ConfigError(f"{option}: could not write {getattr(err, 'filename', None) or 'the results'}"
                          f": {why}; {kept}") from None


def check_run_folder(path: PathLike, *, resume: bool = False, force: bool = False) -> Path:
    """The checks :class:`RunFolder` makes, without taking the folder (the CLI runs them before
    loading data, so a wrong ``--out-dir`` fails in a second)."""
    if resume and force:
        raise ConfigError("out_dir: resume and force exclude each other (force starts over)")
    p = check_output(path, option="out_dir", folder=True, force=force,
                     results=() if resume else RUN_RESULTS, owned_if=(LOCK_NAME, *RUN_RESULTS),
                     hint="pass --resume to continue it or --force to start over")
    for name in (LOCK_NAME, *RUN_RESULTS):
        _check_regular(p / name)
    return p


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"


def _check_regular(path: Path) -> None:
    """Refuse ``path`` (a run folder's own file) unless it is absent or a regular file, not
    following a link: the run writes there, and must never write through it."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise ConfigError(f"out_dir: cannot use {os_reason(err)}") from None
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)


def _not_regular(path: Path, mode: int) -> ConfigError:
    return ConfigError(f"out_dir: {path} is {_kind(mode)}, not a regular file; cda2 keeps its own "
                       f"{path.name} there: move it away or choose another --out-dir")


class RunFolder:
    """A training run's folder, owned by this process from ``__enter__`` to ``__exit__``.

    On entry: :func:`check_run_folder`, then the lock (a second run fails at once with a
    :class:`ConfigError` naming the holder's PID), the checks again under the lock (the folder may
    have changed while unlocked), removal of stale temporary files, and with ``force`` removal of
    the previous run's results (files of other programs are never removed).

    Attributes (after entry): ``path``; ``has_checkpoint``; ``removed``: the names removed.
    """

    def __init__(self, path: PathLike, *, resume: bool = False, force: bool = False) -> None:
        self.path = Path(path)
        self.resume, self.force = resume, force
        self.removed: List[str] = []
        self._fd: Optional[int] = None

    @property
    def has_checkpoint(self) -> bool:
        return (self.path / RUN_RESULTS[0]).is_file()

    def __enter__(self) -> "RunFolder":
        check_run_folder(self.path, resume=self.resume, force=self.force)
        self._lock()
        try:
            check_run_folder(self.path, resume=self.resume, force=self.force)
            names = sorted(os.listdir(self.path))
            doomed = _matching(names, _RUN_TMP + (RUN_RESULTS if self.force else ()))
            for name in doomed:
                (self.path / name).unlink()
            if doomed:
                fsync_dir(self.path)
            self.removed = doomed
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self._unlock()

    def _lock(self) -> None:
        # Never through a link (O_NOFOLLOW), never blocking on a pipe (O_NONBLOCK), and only a
        # regular file: the PID below truncates what it opens.
        lock = self.path / LOCK_NAME
        flags = (os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                 | getattr(os, "O_CLOEXEC", 0))
        try:
            fd = os.open(lock, flags, 0o644)
        except OSError as err:
            _check_regular(lock)  # ELOOP: a link, EISDIR: a folder - said as such
            raise ConfigError(f"out_dir: cannot lock {os_reason(err)}") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # a pipe or device made there since the check
            os.close(fd)
            raise _not_regular(lock, mode)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # EWOULDBLOCK: another process holds it
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ConfigError(f"out_dir: {self.path} is in use by another cda2 run (PID {holder}); "
                                  "wait for it to finish or choose another --out-dir") from None
        # The lock file stays after the run (removing it would race with a waiting opener); its
        # content is only the last holder's PID, for the message above.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _unlock(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


# ----- reading what the commands wrote -----------------------------------------------------------
def read_json(path: PathLike, what: str) -> Any:
    """The JSON document at ``path``; a :class:`~cda2_ext.errors.CheckpointError` naming the file
    and ``what`` it should be when it is missing, unreadable or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found ({what})") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {os_reason(err)} ({what})") from None
    except (ValueError, RecursionError) as err:  # RecursionError: nested thousands deep
        raise CheckpointError(f"{path} is unreadable ({what}): {one_line(err)}") from None


@dataclass(frozen=True)
class TrainingTime:
    """What a run's epochs cost, from its ``metrics.json``.

    Attributes:
        epoch_seconds: each finished epoch's wall time.
        epoch_images: each epoch's training images (its ``images_per_s`` x ``seconds``).
    """

    epoch_seconds: Tuple[float, ...]
    epoch_images: Tuple[float, ...]
    #: each epoch's CPU seconds over its wall seconds and threads (1.0: it had its cores to
    #: itself); empty for runs from before the trainer recorded CPU time
    epoch_cpu_share: Tuple[float, ...] = ()

    @property
    def seconds(self) -> float:
        """All epochs' time."""
        return sum(self.epoch_seconds)

    @property
    def images_per_s(self) -> float:
        """Training images per second over all epochs."""
        return sum(self.epoch_images) / max(self.seconds, 1e-9)

    @property
    def warm_seconds_per_epoch(self) -> float:
        """Mean time of epochs 2.. (the first also pays for warm-up; epoch 1 when it is the only)."""
        warm = self.epoch_seconds[1:] or self.epoch_seconds
        return sum(warm) / len(warm)

    @property
    def cpu_share(self) -> Optional[float]:
        """The mean share of its cores the run got (``None`` where not recorded): on a CPU, well
        below 1 means other jobs slowed its epochs."""
        return sum(self.epoch_cpu_share) / len(self.epoch_cpu_share) if self.epoch_cpu_share else None

    @property
    def images_per_epoch(self) -> int:
        """The training images of one epoch (the last one's)."""
        return round(self.epoch_images[-1])


def training_time(run: PathLike) -> TrainingTime:
    """The :class:`TrainingTime` of the run in folder (or checkpoint file) ``run``; a
    :class:`~cda2_ext.errors.CheckpointError` when its metrics are missing, empty or not what
    ``cda2 train`` writes."""
    path = checkpoint_files(run)[0].parent / METRICS_NAME
    history = read_json(path, "the run's per-epoch metrics")
    if not isinstance(history, list) or not history:
        raise CheckpointError(f"{path} holds no finished epoch")
    try:
        seconds = tuple(float(h["seconds"]) for h in history)
        images = tuple(float(h.get("images_per_s", 0.0)) * s for h, s in zip(history, seconds))
        share = tuple(float(h["cpu_seconds"]) / max(s * float(h.get("cpu_threads") or 1), 1e-9)
                      for h, s in zip(history, seconds) if "cpu_seconds" in h)
    except (AttributeError, KeyError, TypeError, ValueError) as err:  # not what cda2 train writes
        raise CheckpointError(f"{path} is not a cda2 run's metrics ({one_line(err)})") from None
    return TrainingTime(seconds, images, share)


@dataclass
class RobustnessRecord:
    """What ``cda2 eval`` wrote to ``robustness.json``, as far as readers use it.

    Attributes:
        n: the number of test images. clean: ``{model: accuracy}``.
        robust_accuracy: ``{model: {row label: {eps: accuracy}}}`` (eps as the strings written).
        checks: the gradient-masking and budget checks, one line each.
        config: the evaluation's configuration, with ``checkpoints`` (``{model: path}``) and
            ``targets`` (``{model: "collaboration" | "ensemble"}``).
        source: the file it was read from.
    """

    n: int
    clean: Dict[str, float]
    robust_accuracy: Dict[str, Dict[str, Dict[str, float]]]
    checks: List[str] = field(default_factory=list)
    config: Dict[str, Any] = field(default_factory=dict)
    source: Optional[Path] = None

    @classmethod
    def read(cls, path: PathLike) -> "RobustnessRecord":
        """Read a ``robustness.json`` file, or the one in the folder ``path``."""
        path = Path(path)
        if path.is_dir():
            path = path / ROBUSTNESS_NAME
        doc = read_json(path, "written by cda2 eval --out")
        try:
            return cls(int(doc.get("n", 0)), dict(doc.get("clean") or {}),
                       dict(doc.get("robust_accuracy") or {}), list(doc.get("checks") or []),
                       dict(doc.get("config") or {}), path)
        except (AttributeError, TypeError, ValueError) as err:  # not what cda2 eval writes
            raise CheckpointError(f"{path} is not a robustness.json of cda2 eval "
                                  f"({one_line(err)})") from None

    @classmethod
    def merge(cls, records: Sequence["RobustnessRecord"]) -> "RobustnessRecord":
        """Several evaluations of the same images (e.g. one per selection score) as one: every
        model's rows side by side, the checks one after the other, the first one's ``n``."""
        first = records[0]
        out = cls(first.n, {}, {}, [], dict(first.config), first.source)
        for r in records:
            out.clean.update(r.clean)
            out.robust_accuracy.update(r.robust_accuracy)
            out.checks += r.checks
        return out

    @property
    def checkpoints(self) -> Dict[str, str]:
        """``{model: checkpoint path}`` of the evaluated runs."""
        return dict(self.config.get("checkpoints") or {})

    @property
    def targets(self) -> Dict[str, str]:
        """``{model: "collaboration" | "ensemble"}``: what was attacked (empty in older records)."""
        return dict(self.config.get("targets") or {})

    def row(self, model: str, prefix: str) -> Mapping[str, float]:
        """``model``'s row whose label starts with ``prefix`` (e.g. ``PGD-``), ``{}`` when none."""
        rows = self.robust_accuracy.get(model, {})
        return next((r for label, r in rows.items() if label.startswith(prefix)), {})
