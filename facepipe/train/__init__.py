"""Training: the staged trainer, checkpoints, LR schedule and run logs."""
from __future__ import annotations

from facepipe.utils.lazy import lazy_exports

_EXPORTS = {
    "Trainer": "facepipe.train.trainer",
    "TrainingError": "facepipe.train.trainer",
    "train": "facepipe.train.trainer",
    "CheckpointError": "facepipe.train.checkpoint",
    "load_checkpoint": "facepipe.train.checkpoint",
    "save_checkpoint": "facepipe.train.checkpoint",
}

__all__ = list(_EXPORTS)


# Lazy, because facepipe.embed needs facepipe.train.checkpoint while the trainer needs
# facepipe.embed: importing the package must not import the trainer eagerly.
__getattr__ = lazy_exports(__name__, _EXPORTS)
