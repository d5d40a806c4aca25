"""Adapter training: one loop (loop.Trainer) for LoRA, B-LoRA, DiffuseKronA and TLoRA."""

from composer.train.config import ADAPTER_KINDS, TrainConfig, TrainConfigError
from composer.train.data import TrainingDataError, TrainingImage, load_images
from composer.train.loop import Trainer, TrainResult

__all__ = [
    "ADAPTER_KINDS",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "Trainer",
    "TrainingDataError",
    "TrainingImage",
    "load_images",
]
