"""The classifier head a checkpoint trained last, rebuilt with its weights, for closed-set
prediction over the training identities (the "softmax argmax" and "ARConvL nearest centre"
rules of the studies' closed-set views).

A checkpoint keeps the head of the stage it was saved in (``head_stage``) with the config that
built it. A CLMLE stage without a classification term never trains its classifier (the cluster
loss does not touch it), so its head predicts nothing: :func:`load_trained_head` says so
instead of returning an untrained classifier.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from facepipe.config import Config, StageConfig, head_kwargs
from facepipe.losses.arconvl import ARConvLHead
from facepipe.losses.margin_heads import build_head

__all__ = ["TrainedHead", "load_trained_head", "NO_TRAINED_CLASSIFIER"]

NO_TRAINED_CLASSIFIER = "none (CLMLE stage without classification term: classifier not trained)"


@dataclass
class TrainedHead:
    head: nn.Module
    rule: str  # "softmax argmax" or "ARConvL nearest centre"
    stage: StageConfig

    @torch.no_grad()
    def scores(self, features: Tensor) -> Tensor:
        """Class scores [B, C] of backbone features (not normalised; the head normalises as it
        did in training); the prediction is their argmax."""
        self.head.eval()
        if isinstance(self.head, ARConvLHead):
            return self.head.scores(features, use_prior=self.stage.head.use_prior)
        return self.head.inference_logits(features)


def load_trained_head(state: dict, class_counts: Sequence[int] | None = None) -> TrainedHead | str:
    """The head of checkpoint ``state`` (a :func:`facepipe.runtime.checkpoint.load_checkpoint`
    dict) with its weights, or the reason there is none (:data:`NO_TRAINED_CLASSIFIER`).

    ``class_counts``: training images per class, in the checkpoint's identity order; ARConvL
    needs them (its alpha and prior are derived from the counts, not saved)."""
    config = Config.model_validate(state["config"])
    stage = config.train.stages[int(state["head_stage"])]
    num_classes = len(state["identities"])
    if stage.head.type == "arconvl":
        if class_counts is None:
            raise ValueError("an ARConvL head needs the class counts of its training set (class_counts)")
        head = ARConvLHead(num_classes, config.model.embedding_size, list(class_counts),
                           gamma=stage.head.gamma, radius_init=stage.head.radius_init)
        rule = "ARConvL nearest centre"
    elif stage.loss.type == "clmle" and not stage.loss.classification_weight:
        return NO_TRAINED_CLASSIFIER
    else:
        head = build_head(stage.head.type, num_classes, config.model.embedding_size, **head_kwargs(stage.head))
        rule = "softmax argmax"
    head.load_state_dict(state["head"])
    return TrainedHead(head.eval(), rule, stage)
