"""The loss on a stage's logits, built from its config and the training set's class counts."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from facepipe.config import StageConfig
from facepipe.losses.imbalance import (
    ClassBalancedLoss,
    DeferredReweighting,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    MaximumMarginLoss,
    WeightedCrossEntropyLoss,
    ldam_margins,
)


def stage_reweighting(stage: StageConfig, class_counts: Sequence[int]) -> DeferredReweighting | None:
    """The stage's DRW schedule (``stage.drw``), or None."""
    if stage.drw is None:
        return None
    return DeferredReweighting(class_counts, stage.drw.start_epoch, stage.drw.kind, stage.drw.beta)


def build_stage_loss(stage: StageConfig, class_counts: Sequence[int]) -> tuple[nn.Module, DeferredReweighting | None]:
    """(loss module taking logits and labels, DRW schedule or None).

    Plain cross-entropy without DRW is ``nn.CrossEntropyLoss``, bit for bit what the trainer
    computed before losses were configurable; DRW needs a loss with settable class weights.
    """
    spec = stage.loss
    drw = stage_reweighting(stage, class_counts)
    if spec.type == "clmle":  # the cluster loss is the clmle plug-in's; this is its optional CE part
        loss: nn.Module = nn.CrossEntropyLoss()
    elif spec.type == "ce":
        loss = WeightedCrossEntropyLoss() if drw is not None else nn.CrossEntropyLoss()
    elif spec.type == "focal":
        loss = FocalLoss(gamma=spec.gamma)
    elif spec.type == "class_balanced":
        loss = ClassBalancedLoss(class_counts, beta=spec.beta, gamma=spec.gamma)
    elif spec.type == "logit_adjusted":
        loss = LogitAdjustedLoss(class_counts, tau=spec.tau)
    elif spec.type == "ldam":
        loss = LDAMLoss(class_counts, max_margin=spec.max_margin, scale=spec.scale)
    elif spec.ldam:  # MM-LDAM: cosines in, LDAM margins and scale, then the MM Delta
        loss = MaximumMarginLoss(delta_minus=spec.delta_minus, beta=spec.beta, scale=spec.scale,
                                 class_margins=ldam_margins(class_counts, spec.max_margin))
    else:
        loss = MaximumMarginLoss(delta_minus=spec.delta_minus, beta=spec.beta)
    return loss, drw
