"""Plain margin heads (softmax, CosFace, ArcFace, L-Softmax, SphereFace, prototype): the head's
per-step schedule (:meth:`MarginHead.step`) and the lambda annealing of margin-product heads.

The lambda of Liu et al.'s annealing (L-Softmax / SphereFace, also under UMM) used to live in
each head and restart at lambda_base with every new head: the study's 980-step UMM fine-tuning
then reached a margin weight 1 / (1 + lambda) of only 0.106, and its SUM stage 0.056. The count
of annealed steps is therefore run state (checkpoint key ``anneal_step``): ``lambda_schedule:
continue`` (default) carries it across stages, ``restart`` starts a stage from zero.
"""
from __future__ import annotations

from typing import Any

import torch

from facepipe.config import StageConfig
from facepipe.losses.margin_heads import LSoftmaxHead, MarginHead
from facepipe.train.plugins.base import PluginContext, TrainerPlugin


class MarginHeads(TrainerPlugin):
    """Steps the schedules of margin heads; owns the run's lambda-annealing count."""

    name = "margin_heads"

    @classmethod
    def applies_to(cls, stage: StageConfig) -> bool:
        return True  # acts on whatever head is a MarginHead

    def __init__(self, ctx: PluginContext) -> None:
        super().__init__(ctx)
        self.anneal_step = 0  # steps annealed so far by margin-product heads

    def on_stage_start(self, fresh: bool) -> None:
        """Give a margin-product head the run's annealing position (``restart``: zero)."""
        head = self.ctx.head()
        if not isinstance(head, LSoftmaxHead):
            return
        if self.ctx.stage().head.lambda_schedule == "restart":
            self.anneal_step = 0
        with torch.no_grad():
            head.it.fill_(self.anneal_step)

    def after_step(self, indices: torch.Tensor, outputs: list[dict[str, Any]]) -> None:
        head = self.ctx.head()
        if isinstance(head, MarginHead):
            head.step()
        if isinstance(head, LSoftmaxHead):
            self.anneal_step += 1

    def log_stats(self) -> dict[str, float]:
        """lambda and the margin weight 1 / (1 + lambda) of a margin-product head (else empty)."""
        head = self.ctx.head()
        if not isinstance(head, LSoftmaxHead):
            return {}
        lam = head.current_lambda
        return {"lambda": lam, "margin_weight": 1.0 / (1.0 + lam)}

    def state_dict(self) -> dict[str, Any]:
        return {"anneal_step": self.anneal_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Checkpoints from before the count was run state: the margin head's own counter.
        head = self.ctx.head()
        self.anneal_step = int(state.get("anneal_step", int(head.it) if isinstance(head, LSoftmaxHead) else 0))
