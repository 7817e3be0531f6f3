"""The protocol of a trainer plug-in and the narrow view of the run that a plug-in gets.

A plug-in is a :class:`TrainerPlugin` subclass whose methods are no-ops or defaults; a method
overrides the few it needs. It never sees the trainer, only a :class:`PluginContext`: the
run's fixed facts (config, device, data, steps per epoch, run folder, backbone) and calls that
read what changes (the current head and stage loss, the stage, the run's position, the log).

Two kinds of hooks:

- run-level hooks run on every plug-in in every stage, because what they describe outlives a
  stage: parameter groups with their learning-rate rule and clip limit (an optimizer keeps its
  groups), and the checkpoint state (entries of the checkpoint dict, under stable keys);
- stage hooks run only while :meth:`TrainerPlugin.applies_to` says the plug-in shapes the
  current stage, in registry order (:data:`facepipe.train.plugins.PLUGINS`); a hook that returns
  a value (a head, a loss, a sampler, scores) is answered by the first plug-in that returns one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from facepipe.config import Config, StageConfig
    from facepipe.runtime.distributed import DistributedContext
    from facepipe.train.run_log import NullRunLog, RunLog

LrRule = Callable[[int], float]  # optimisation step -> factor on a parameter group's initial rate


@dataclass(frozen=True)
class PluginContext:
    """What a plug-in sees of a run. Fields are fixed for the run; the callables read what changes."""

    config: "Config"
    device: torch.device
    amp_dtype: torch.dtype | None
    dist: "DistributedContext"
    dataset: Any  # the training set: labels, num_classes, identities, eval_view, (image, label, index) items
    class_counts: Sequence[int]  # training images per class
    steps_per_epoch: int
    run_dir: Path
    model: nn.Module  # the backbone (features / output_stage)
    # (batch_size, normalize=True) -> the current model's feature of every training image, in
    # dataset order (eval mode, no augmentation); every rank gets all rows.
    embed_training_images: Callable[..., np.ndarray]
    head: Callable[[], nn.Module]
    loss_fn: Callable[[], nn.Module]  # the stage's loss on logits
    stage_index: Callable[[], int]
    epoch: Callable[[], int]  # epochs completed
    global_step: Callable[[], int]
    step_in_epoch: Callable[[], int]  # steps of the current epoch already trained
    run_log: Callable[[], "RunLog | NullRunLog"]

    def stage(self) -> "StageConfig":
        """The current stage's config."""
        return self.config.train.stages[self.stage_index()]

    def stage_start_epoch(self, stage_index: int | None = None) -> int:
        """The run epoch (0-based) at which a stage (default: the current one) starts."""
        index = self.stage_index() if stage_index is None else stage_index
        return sum(stage.epochs for stage in self.config.train.stages[:index])


@dataclass
class StepBatch:
    """One (micro-)batch of a training step, after the backbone: its feature maps (before the
    output stage), embeddings, labels and dataset indices, with the stage's head and loss.
    ``margin_weight`` is the per-sample share of the class margin a plug-in gave (None: full)."""

    feature_maps: torch.Tensor
    embeddings: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    head: nn.Module
    loss_fn: nn.Module
    margin_weight: torch.Tensor | None = None


class TrainerPlugin:
    """Base class of a method's plug-in: every hook is a no-op or the trainer's default."""

    name = "plugin"  # the key of the plug-in in ``Trainer.plugins``
    run_files: tuple[str, ...] = ()  # files it writes into the run folder (a new run removes them)

    @classmethod
    def applies_to(cls, stage: "StageConfig") -> bool:
        """Whether this plug-in shapes the training of ``stage`` (its stage hooks run then)."""
        return False

    def __init__(self, ctx: PluginContext) -> None:
        self.ctx = ctx

    # ------------------------------------------------------------------ run-level hooks
    def param_groups(self, params: list[nn.Parameter]) -> list[dict[str, Any]]:
        """Optimizer groups for some of ``params`` (new parameters of the head, or all at the
        start), each with an ``lr_rule`` name; the parameters not claimed go to the main groups."""
        return []

    def lr_rule(self, group: dict[str, Any], stage_index: int) -> LrRule | None:
        """The learning-rate factor of one of this plug-in's groups (added in ``stage_index``)."""
        return None

    def clip_limit(self, group_name: str) -> float | None:
        """The gradient-norm limit of the parameter group ``group_name`` (an ``lr_rule`` name)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint entries (top-level keys of the checkpoint, kept stable across versions)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a whole checkpoint (after the head's state); keys may be missing in old ones."""

    # ------------------------------------------------------------------ stage hooks
    def build_head(self, weight: nn.Parameter | None) -> nn.Module | None:
        """The stage's head, or None for the configured margin head around the shared ``weight``."""
        return None

    def on_stage_start(self, fresh: bool) -> None:
        """The stage's head and loss are built. ``fresh``: the stage starts training now (False when
        a resume replays the stage switches; the checkpoint then restores the head's state)."""

    def on_stage_end(self) -> None:
        """The stage is over (the next one's head is about to be built)."""

    def find_unused_parameters(self) -> bool:
        """True when some parameter of backbone or head gets no gradient in this stage (DDP)."""
        return False

    def on_epoch_start(self) -> dict[str, Any]:
        """Before an epoch's steps (also a resumed one); returns metrics for the epoch's record."""
        return {}

    def maybe_refresh(self) -> bool:
        """At an epoch start (not mid-epoch resumes) and after every step but an epoch's last: redo
        an expensive preparation if due; True asks the trainer to checkpoint the result."""
        return False

    def sampler(self) -> Any | None:
        """A batch-index sampler replacing the run's (``set_epoch(epoch, start)``, ``items_per_step``:
        this rank's images of one step), or None."""
        return None

    def on_epoch_end(self, seconds: float) -> dict[str, Any]:
        """After an epoch's steps (``seconds``: its wall time); returns metrics for its record."""
        return {}

    def margin_weight(self, batch: StepBatch) -> torch.Tensor | None:
        """Per-sample share [B] of the class margin in the default head path, or None."""
        return None

    def step_loss(self, batch: StepBatch) -> dict[str, Any] | None:
        """The batch's ``loss`` and per-sample ``correct`` [B] (optionally ``stats``: scalar
        tensors for the log, and entries for :meth:`after_step`), or None for the default: the
        head's logits into the stage loss."""
        return None

    def after_step(self, indices: torch.Tensor, outputs: list[dict[str, Any]]) -> None:
        """After an optimisation step was taken: this rank's batch ``indices`` and each
        micro-batch's :meth:`step_loss` output (without the loss)."""

    def log_stats(self) -> dict[str, float]:
        """Numbers for the next training log record."""
        return {}

    def class_scores(self, embeddings: torch.Tensor) -> torch.Tensor | None:
        """Class scores [B, C] without margins (argmax = prediction), or None for the head's logits."""
        return None
