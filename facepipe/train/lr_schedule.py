"""Per-step learning-rate factors: linear warm-up, then cosine, step decay or constant."""
from __future__ import annotations

import bisect
import math

from facepipe.config import SchedulerConfig


def lr_factor(step: int, config: SchedulerConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at optimisation step ``step`` (0-based)."""
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    if step < warmup_steps:
        return config.warmup_start_factor + (1.0 - config.warmup_start_factor) * step / warmup_steps
    if config.name == "constant":
        return 1.0
    if config.name == "step":
        epoch = step // steps_per_epoch
        return config.gamma ** bisect.bisect_right(sorted(config.milestones), epoch)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return config.min_lr_factor + (1.0 - config.min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
