"""Training CDA² collaborations (Algorithm 1): options and the trainer."""
from __future__ import annotations

from .config import DATASETS, NONFINITE, PHASES, SCHEDULES, TrainConfig
from .trainer import RESUMABLE_CHANGES, Trainer

__all__ = ["DATASETS", "NONFINITE", "PHASES", "SCHEDULES", "TrainConfig", "RESUMABLE_CHANGES", "Trainer"]
