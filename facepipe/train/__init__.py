"""Training: the staged trainer, LR schedule and run logs (checkpoints are
:mod:`facepipe.runtime.checkpoint`)."""
from __future__ import annotations

from facepipe.utils.lazy import lazy_exports

_EXPORTS = {
    "Trainer": "facepipe.train.trainer",
    "TrainingError": "facepipe.train.trainer",
    "train": "facepipe.train.trainer",
}

__all__ = list(_EXPORTS)


# Lazy: importing any facepipe.train module imports this package first, which must not import
# the trainer (and every stage it runs) eagerly.
__getattr__ = lazy_exports(__name__, _EXPORTS)
