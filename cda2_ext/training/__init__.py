"""Training CDA² collaborations (Algorithm 1): options, the trainer, and rebuilding a trained
collaboration from its run."""
from __future__ import annotations

from .config import DATASETS, NONFINITE, PHASES, RESUMABLE_CHANGES, SCHEDULES, TrainConfig
from .restore import load_collaboration
from .trainer import Trainer

__all__ = ["DATASETS", "NONFINITE", "PHASES", "SCHEDULES", "TrainConfig", "RESUMABLE_CHANGES", "Trainer",
           "load_collaboration"]
