"""facepipe.losses.trained_head: the head a checkpoint trained last, rebuilt from its state with
the same scores, and the stages whose classifier was never trained."""
from __future__ import annotations

import pytest
import torch

from facepipe.config import config_from_dict, head_kwargs
from facepipe.losses import ARConvLHead, build_head
from facepipe.losses.trained_head import NO_TRAINED_CLASSIFIER, TrainedHead, load_trained_head

IDENTITIES = ["a", "b", "c", "d", "e"]
COUNTS = [9, 5, 3, 2, 1]
EMBEDDING = 8


def checkpoint(stages: list[dict], head_stage: int, head: torch.nn.Module) -> dict:
    config = config_from_dict({
        "data": {"root": "unused", "image_size": [32, 32]},
        "model": {"depth": 18, "width": 0.125, "embedding_size": EMBEDDING},
        "train": {"stages": stages},
    })
    return {"config": config.to_dict(), "head_stage": head_stage, "identities": IDENTITIES,
            "head": head.state_dict()}


def trained_margin_head(kind: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    head = build_head(kind, len(IDENTITIES), EMBEDDING, **kwargs)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_()  # "trained": not the initialisation a rebuilt head would start from
    return head


@pytest.mark.parametrize("kind", ["softmax", "cosface", "arcface", "lsoftmax"])
def test_the_last_stages_margin_head_comes_back_with_its_scores(kind):
    stages = [{"epochs": 1, "head": {"type": "softmax"}}, {"epochs": 1, "head": {"type": kind}}]
    config = config_from_dict(checkpoint(stages, 1, torch.nn.Linear(1, 1))["config"])
    head = trained_margin_head(kind, **head_kwargs(config.train.stages[1].head))
    features = torch.randn(6, EMBEDDING)
    trained = load_trained_head(checkpoint(stages, 1, head))
    assert isinstance(trained, TrainedHead) and trained.rule == "softmax argmax"
    assert type(trained.head) is type(head)
    torch.testing.assert_close(trained.scores(features), head.inference_logits(features))


def test_an_arconvl_head_needs_the_class_counts_and_scores_as_trained():
    stages = [{"epochs": 1, "head": {"type": "arconvl", "use_prior": True}}]
    torch.manual_seed(0)
    head = ARConvLHead(len(IDENTITIES), EMBEDDING, COUNTS)
    with torch.no_grad():
        head.centers.normal_()
        head.radii.uniform_(0.1, 1.0)
    state = checkpoint(stages, 0, head)
    with pytest.raises(ValueError, match="ARConvL head needs the class counts"):
        load_trained_head(state)
    trained = load_trained_head(state, COUNTS)
    assert trained.rule == "ARConvL nearest centre"
    features = torch.randn(6, EMBEDDING)
    torch.testing.assert_close(trained.scores(features), head.scores(features, use_prior=True))
    # the prior comes from the counts given: other counts, other scores
    other = load_trained_head(state, list(reversed(COUNTS)))
    assert not torch.allclose(other.scores(features), trained.scores(features))


def test_a_clmle_stage_without_classification_term_has_no_trained_classifier():
    clmle = {"type": "clmle", "classification_weight": 0.0}
    stages = [{"epochs": 1, "head": {"type": "softmax"}},
              {"epochs": 1, "head": {"type": "cosface", "s": 16.0, "m": 0.2}, "loss": clmle}]
    head = trained_margin_head("cosface", s=16.0, m=0.2)
    assert load_trained_head(checkpoint(stages, 1, head)) == NO_TRAINED_CLASSIFIER
    # saved in the softmax stage, the same run's head is a trained classifier
    assert load_trained_head(checkpoint(stages, 0, trained_margin_head("softmax"))).rule == "softmax argmax"
    # with a classification term the cluster stage trains its classifier too
    stages[1]["loss"] = {**clmle, "classification_weight": 1.0}
    assert load_trained_head(checkpoint(stages, 1, head)).rule == "softmax argmax"
