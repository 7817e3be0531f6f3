"""ARConvL (Li et al., "Adaptive Region-Based Prototype Learning for Multi-class Imbalance
Classification"): the head of an ``arconvl`` stage and what it needs from the trainer.

- The head (:class:`ARConvLHead`) holds class centres and radii, not a classifier weight: a
  switch to or from ARConvL starts the centres afresh.
- The radii are their own parameter group (``lr_rule: radius``): an absolute rate (Sec. 4.1:
  0.001 for the stage's first 3 epochs, then 0.01, no decay) and their own gradient-norm limit
  (``head.radius_clip_grad_norm``; None: never clipped).
- ``head.init_centers: class_means`` puts each centre at the mean raw feature of its class under
  the current backbone when the stage starts.
- The head's regions give the whole loss; predictions are the nearest centre.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from facepipe.config import StageConfig
from facepipe.losses.arconvl import ARConvLHead
from facepipe.train.plugins.base import LrRule, StepBatch, TrainerPlugin

log = logging.getLogger(__name__)

RADIUS = "radius"  # the lr_rule (and clipping group) name of the radii


class ARConvL(TrainerPlugin):
    name = "arconvl"

    @classmethod
    def applies_to(cls, stage: StageConfig) -> bool:
        return stage.head.type == "arconvl"

    def build_head(self, weight: nn.Parameter | None) -> nn.Module:
        ctx, head = self.ctx, self.ctx.stage().head
        return ARConvLHead(ctx.dataset.num_classes, ctx.config.model.embedding_size, ctx.class_counts,
                           gamma=head.gamma, radius_init=head.radius_init).to(ctx.device)

    # ------------------------------------------------------------------ radii: rate and clipping
    def param_groups(self, params: list[nn.Parameter]) -> list[dict[str, Any]]:
        radii = getattr(self.ctx.head(), "radii", None)
        if not any(p is radii for p in params):
            return []
        # Their own absolute rate (lr 1.0 times the rule), no decay (Eq. 2 has gamma R^2).
        return [{"params": [radii], "weight_decay": 0.0, "lr": 1.0, "lr_rule": RADIUS}]

    def lr_rule(self, group: dict[str, Any], stage_index: int) -> LrRule | None:
        if group.get("lr_rule") != RADIUS:
            return None
        head = self.ctx.config.train.stages[stage_index].head
        stage_start = self.ctx.stage_start_epoch(stage_index)
        steps_per_epoch = self.ctx.steps_per_epoch
        # Li et al. Sec. 4.1: 0.001 for the stage's first 3 epochs, then 0.01; no decay.
        return lambda step: (head.radius_warmup_lr if step // steps_per_epoch - stage_start
                             < head.radius_warmup_epochs else head.radius_lr)

    def clip_limit(self, group_name: str) -> float | None:
        return getattr(self.ctx.stage().head, f"{RADIUS}_clip_grad_norm", None) if group_name == RADIUS else None

    # ------------------------------------------------------------------ stage
    def on_stage_start(self, fresh: bool) -> None:
        """``head.init_centers: class_means``: put each centre C_j at the mean raw feature of class j
        under the current backbone (eval mode, no augmentation). Every rank embeds its share and
        gets all rows, so all ranks compute the same centres."""
        ctx, head = self.ctx, self.ctx.head()
        if not fresh or not isinstance(head, ARConvLHead) or ctx.stage().head.init_centers != "class_means":
            return
        started = time.perf_counter()
        features = ctx.embed_training_images(ctx.config.data.batch_size, normalize=False)
        labels = np.asarray(ctx.dataset.labels)
        num_classes = ctx.dataset.num_classes
        sums = np.zeros((num_classes, features.shape[1]), dtype=np.float64)
        np.add.at(sums, labels, features)
        means = sums / np.bincount(labels, minlength=num_classes)[:, None]
        with torch.no_grad():
            head.centers.copy_(torch.as_tensor(means, dtype=head.centers.dtype))
        log.info("ARConvL centres: class means of %d training features (mean norm %.2f) in %.1f s",
                 len(features), float(np.linalg.norm(means, axis=1).mean()), time.perf_counter() - started)

    def step_loss(self, batch: StepBatch) -> dict[str, Any] | None:
        head = batch.head
        if not isinstance(head, ARConvLHead):
            return None
        parts = head(batch.embeddings.float(), batch.labels)
        return {"loss": parts["loss"],
                "correct": head.scores(batch.embeddings.detach().float()).argmax(1) == batch.labels,
                "stats": {**{k: parts[k].detach() for k in ("beta", "sigma2", "r_ben", "r_upp", "region")},
                          "radius_mean": head.radii.detach().mean()}}

    def class_scores(self, embeddings: torch.Tensor) -> torch.Tensor | None:
        head = self.ctx.head()
        if not isinstance(head, ARConvLHead):
            return None
        return head.scores(embeddings, use_prior=self.ctx.stage().head.use_prior)
