"""Training CDA² collaborations (Algorithm 1), checkpoints and clean evaluation."""
from __future__ import annotations

from .checkpoint import (CheckpointError, checkpoint_files, load_checkpoint, load_collaboration,
                         save_checkpoint)
from .config import DATASETS, PHASES, SCHEDULES, ConfigError, TrainConfig
from .evaluate import evaluate_clean
from .trainer import RESUMABLE_CHANGES, Trainer, resolve_device

__all__ = [
    "CheckpointError", "checkpoint_files", "load_checkpoint", "load_collaboration",
    "save_checkpoint", "DATASETS", "PHASES", "SCHEDULES", "ConfigError", "TrainConfig",
    "evaluate_clean", "RESUMABLE_CHANGES", "Trainer", "resolve_device",
]
