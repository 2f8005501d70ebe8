"""Training CDA² collaborations (Algorithm 1): options and the trainer."""
from __future__ import annotations

from .config import DATASETS, NONFINITE, PHASES, RESUMABLE_CHANGES, SCHEDULES, TrainConfig
from .trainer import Trainer

__all__ = ["DATASETS", "NONFINITE", "PHASES", "SCHEDULES", "TrainConfig", "RESUMABLE_CHANGES", "Trainer"]
