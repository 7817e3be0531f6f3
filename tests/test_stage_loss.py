"""Configurable losses on a stage's logits (Kang MM, focal, CB, LA) and deferred re-weighting."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from facepipe.config import ConfigError, config_from_dict
from facepipe.losses.imbalance import drw_weights
from facepipe.train.stage_loss import build_stage_loss
from facepipe.train.trainer import Trainer


def stage(head=None, **fields):
    head = head or {"type": "softmax"}
    return config_from_dict({"train": {"stages": [{"epochs": 1, "head": head, **fields}]}}).train.stages[0]


def test_default_is_exactly_cross_entropy():
    loss, drw = build_stage_loss(stage(), [3, 5, 2])
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    assert drw is None and torch.equal(loss(logits, labels), F.cross_entropy(logits, labels))


@pytest.mark.parametrize("spec", [{"type": "focal", "gamma": 2.0}, {"type": "class_balanced", "beta": 0.99},
                                  {"type": "logit_adjusted", "tau": 1.0}, {"type": "mm", "delta_minus": 0.6}])
def test_each_loss_builds_and_differs_from_cross_entropy_on_imbalanced_counts(spec):
    loss, _ = build_stage_loss(stage(loss=spec), [50, 5, 1])
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    value = loss(logits, labels)
    assert torch.isfinite(value) and not torch.isclose(value, F.cross_entropy(logits, labels))


def test_config_errors():
    with pytest.raises(ConfigError, match="weight them twice"):
        stage(loss={"type": "class_balanced"}, drw={"start_epoch": 1})
    with pytest.raises(ConfigError, match="focal"):
        stage(loss={"type": "focal", "gamma": -1})
    with pytest.raises(ConfigError, match="does not match any of the expected tags|loss"):
        stage(loss={"type": "hinge"})


def test_drw_switches_class_weights_at_the_configured_epoch(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, tmp_path / "run")
    data = config.to_dict()
    data["train"]["stages"] = [{"epochs": 3, "head": {"type": "softmax"}, "loss": {"type": "mm"},
                                "drw": {"start_epoch": 2, "kind": "inverse_frequency"}}]
    trainer = Trainer(config_from_dict(data), progress=False)
    seen = []
    original = trainer._run_epoch

    def record_weights():
        seen.append(trainer.loss_fn.class_weights.clone())
        return original()

    trainer._run_epoch = record_weights
    trainer.fit()
    expected = drw_weights(trainer.class_counts, kind="inverse_frequency")
    assert torch.equal(seen[0], torch.ones(12)) and torch.equal(seen[1], torch.ones(12))
    torch.testing.assert_close(seen[2], expected)
    assert float(expected.sum()) == pytest.approx(12.0)
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records if r["event"] == "epoch")


COSINE_HEAD = {"type": "cosface", "s": 1.0, "m": 0.0}


def test_ldam_and_mm_ldam_take_cosines_from_a_plain_cosine_head():
    from facepipe.losses.imbalance import LDAMLoss, MaximumMarginLoss, ldam_margins

    counts = [40, 10, 2]
    cosines, labels = torch.rand(6, 3) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2])
    loss, _ = build_stage_loss(stage(head=COSINE_HEAD, loss={"type": "ldam", "max_margin": 0.5, "scale": 30.0}), counts)
    torch.testing.assert_close(loss(cosines, labels), LDAMLoss(counts, 0.5, 30.0)(cosines, labels))
    loss, _ = build_stage_loss(stage(head=COSINE_HEAD, loss={"type": "mm", "ldam": True}), counts)
    expected = MaximumMarginLoss(0.6, 1.5, class_margins=ldam_margins(counts, 0.5), scale=30.0)(cosines, labels)
    torch.testing.assert_close(loss(cosines, labels), expected)
    with pytest.raises(ConfigError, match="use the head"):
        stage(head={"type": "cosface", "s": 64.0, "m": 0.35}, loss={"type": "ldam"})
    with pytest.raises(ConfigError, match="use the head"):
        stage(loss={"type": "mm", "ldam": True})


def test_ldam_drw_trains(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, tmp_path / "run")
    data = config.to_dict()
    data["train"]["stages"] = [{"epochs": 2, "head": COSINE_HEAD, "loss": {"type": "ldam"}, "drw": {"start_epoch": 1}}]
    metrics = Trainer(config_from_dict(data), progress=False).fit()
    assert np.isfinite(metrics["loss"]) and metrics["epoch"] == 2
