"""Deferred re-weighting (Kang et al. / Cao et al. LDAM-DRW, Algorithm 1): a stage with ``drw``
trains with equal class weights until run epoch ``drw.start_epoch``, then with class-balanced
weights (:class:`facepipe.losses.imbalance.DeferredReweighting`). The weights depend on the epoch
only and the loss modules do not save them, so they are set at every epoch start, also right
after a resume.
"""
from __future__ import annotations

from typing import Any

from facepipe.config import StageConfig
from facepipe.train.plugins.base import TrainerPlugin
from facepipe.train.stage_loss import stage_reweighting


class DeferredReweighting(TrainerPlugin):
    name = "drw"

    @classmethod
    def applies_to(cls, stage: StageConfig) -> bool:
        return stage.drw is not None

    def on_epoch_start(self) -> dict[str, Any]:
        ctx = self.ctx
        schedule = stage_reweighting(ctx.stage(), ctx.class_counts)
        ctx.loss_fn().set_class_weights(schedule.weights_for_epoch(ctx.epoch()).to(ctx.device))
        return {}
