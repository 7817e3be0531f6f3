"""Training: the staged trainer, checkpoints, LR schedule and run logs."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Trainer": "facepipe.train.trainer",
    "TrainingError": "facepipe.train.trainer",
    "train": "facepipe.train.trainer",
    "CheckpointError": "facepipe.train.checkpoint",
    "load_checkpoint": "facepipe.train.checkpoint",
    "save_checkpoint": "facepipe.train.checkpoint",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # Lazy, because facepipe.embed needs facepipe.train.checkpoint while the trainer needs
    # facepipe.embed: importing the package must not import the trainer eagerly.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'facepipe.train' has no attribute '{name}'")
