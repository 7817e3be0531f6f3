"""Khan et al. (CVPR 2019), "Striking the Right Balance with Uncertainty": two plug-ins.

- UMM (:class:`UncertaintyMargins`): a stage whose head has ``margin_source: uncertainty`` gets
  its class margins from MC-dropout class uncertainty at the start of every K-th epoch
  (``train.uncertainty.refresh_every_epochs``; :func:`facepipe.train.uncertainty_margins.refresh_margins`).
  A mid-epoch resume keeps the margins saved with the head.
- SUM (:class:`SampleUncertainty`): a stage with ``sample_uncertainty: true`` gives each sample
  the fraction of its class margin that is its misclassification probability, from N extra
  dropout passes of the output stage on the batch's feature maps (no second backbone pass).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from facepipe.config import StageConfig
from facepipe.losses.uncertainty import sum_margin_weights
from facepipe.train.plugins.base import StepBatch, TrainerPlugin
from facepipe.train.uncertainty_margins import UNCERTAINTY_PLOT, UNCERTAINTY_REPORT, refresh_margins


def _margins_from_uncertainty(stage: StageConfig) -> bool:
    return getattr(stage.head, "margin_source", "fixed") == "uncertainty"


class UncertaintyMargins(TrainerPlugin):
    name = "umm"
    run_files = (UNCERTAINTY_REPORT, UNCERTAINTY_PLOT)

    @classmethod
    def applies_to(cls, stage: StageConfig) -> bool:
        return _margins_from_uncertainty(stage)

    def on_epoch_start(self) -> dict[str, Any]:
        ctx = self.ctx
        if ctx.step_in_epoch() or (ctx.epoch() - ctx.stage_start_epoch()) % ctx.config.train.uncertainty.refresh_every_epochs:
            return {}
        record = refresh_margins(ctx)
        ctx.run_log().write("uncertainty", ctx.global_step(), **record)
        return {"uncertainty_seconds": record["seconds"], "uncertainty_spearman": record["spearman_uncertainty_vs_count"]}


class SampleUncertainty(TrainerPlugin):
    name = "sum"

    @classmethod
    def applies_to(cls, stage: StageConfig) -> bool:
        return stage.sample_uncertainty

    def margin_weight(self, batch: StepBatch) -> torch.Tensor:
        weight = batch.head.weight
        if getattr(batch.head, "normalize_weights", False):
            weight = F.normalize(weight.detach().float(), dim=1)
        return sum_margin_weights(
            self.ctx.model.output_stage, batch.feature_maps, weight, batch.labels,
            self.ctx.config.train.uncertainty.passes, normalise=self.ctx.stage().head.type in ("cosface", "arcface"),
        )
