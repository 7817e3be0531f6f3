"""BatchNorm mode of a stage's training steps (``StageConfig.bn``).

"frozen" runs every BatchNorm layer of the backbone in eval mode: it normalises with, and no
longer updates, the running statistics gathered so far, while its affine weights keep training
and every other layer (dropout) keeps its training mode. "auto" freezes in a clmle stage: CLMLE
batches (Huang et al., TPAMI 2019, Sec. 3.3) are a query cluster and its nearest neighbours, so
their own statistics describe one small neighbourhood of the data, not the data; normalising
with them reshapes the very geometry the loss measures (on LFW: 86 % of the samples had zero loss
with batch statistics, 41 % with the running ones), and the paper's network has no BatchNorm.
A frozen stage relies on running statistics from earlier training (a pre-training stage or a
loaded model); a freshly initialised backbone has none worth freezing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from facepipe.config import StageConfig

__all__ = ["apply_stage_batchnorm", "freeze_batchnorm", "stage_batchnorm_mode"]


def stage_batchnorm_mode(stage: "StageConfig") -> str:
    """"frozen" or "batch": the stage's ``bn`` setting with "auto" resolved."""
    if stage.bn != "auto":
        return stage.bn
    return "frozen" if stage.loss.type == "clmle" else "batch"


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm layer of ``model`` in eval mode; returns how many there are."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.eval()
    return len(layers)


def apply_stage_batchnorm(model: nn.Module, stage: "StageConfig") -> None:
    """Call right after ``model.train()``: freezes the BatchNorm layers when the stage asks for it."""
    if model.training and stage_batchnorm_mode(stage) == "frozen":
        freeze_batchnorm(model)
