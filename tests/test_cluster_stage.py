"""CLMLE stages in the trainer (seed 002): clustering on stage entry, cluster mini-batches,
refreshes, the saved state, and an exact resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from facepipe.config import ConfigError, config_from_dict
from facepipe.data.cluster_sampler import ClusterBatchSampler
from facepipe.index.clusters import ClusterAssignment
from facepipe.train.checkpoint import load_checkpoint
from facepipe.train.cluster_stage import RankClusterBatches
from facepipe.train.trainer import Trainer

from conftest import tiny_config

CLMLE_STAGE = {"epochs": 2, "head": {"type": "cosface", "s": 16.0, "m": 0.2},
               "loss": {"type": "clmle", "inter_margin": 0.3, "intra_margin": 0.1}}


def clmle_config(root, out, refresh_every_steps=3, **extra):
    return tiny_config(root, out, train={
        "stages": [{"epochs": 1, "head": {"type": "softmax"}}, CLMLE_STAGE],
        "clusters": {"cluster_size": 3, "refresh_every_steps": refresh_every_steps, "clusters_per_batch": 4,
                     "images_per_cluster": 3, "batch_size": 16},
        "log_every_steps": 2,
    }, **extra)


def weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_clmle_stage_clusters_batches_and_refreshes(tiny_dataset, tmp_path):
    trainer = Trainer(clmle_config(tiny_dataset, tmp_path / "run"), progress=False)
    metrics = trainer.fit()
    assert np.isfinite(metrics["loss"])
    stage = trainer.cluster_stage
    assert isinstance(trainer.sampler, RankClusterBatches) and trainer.loader.batch_size == 12
    assert isinstance(trainer.sampler.sampler, ClusterBatchSampler)
    saved = ClusterAssignment.from_npz(tmp_path / "run" / "clusters.npz")
    np.testing.assert_array_equal(saved.sample_cluster, stage.assignment.sample_cluster)
    # Balanced clusters of about 3 per identity: sizes within one of each other inside an identity.
    labels = trainer.dataset.labels
    for identity in np.unique(labels):
        sizes = np.bincount(saved.sample_cluster[labels == identity])
        sizes = sizes[sizes > 0]
        assert len(sizes) == max(1, (labels == identity).sum() // 3) and sizes.max() - sizes.min() <= 1
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    cluster_events = [e for e in events if e["event"] == "clusters"]
    steps = trainer.steps_per_epoch
    # Clustered on entering the stage (after epoch 1), then every 3 steps until the run ends (a
    # refresh due at an epoch's last step happens at the next epoch's start, the same step).
    assert steps >= 3
    assert [e["step"] for e in cluster_events] == list(range(steps, 3 * steps, 3))
    epoch_events = [e for e in events if e["event"] == "epoch"]
    assert 0 < epoch_events[-1]["cluster_refresh_share"] < 1
    # The loss cache holds a loss for every sample the CLMLE stage drew.
    assert np.isfinite(stage.cache.losses).sum() > 0


def test_clmle_resume_restores_clusters_and_continues_exactly(tiny_dataset, tmp_path):
    straight = Trainer(clmle_config(tiny_dataset, tmp_path / "a", refresh_every_steps=4), progress=False)
    straight.fit()
    split = clmle_config(tiny_dataset, tmp_path / "b", refresh_every_steps=4)
    Trainer(split, progress=False).fit(max_epochs=2)
    state = load_checkpoint(tmp_path / "b" / "latest.pt")
    assert state["cluster_stage"]["stage"] == 1
    resumed = Trainer(split, resume=True, progress=False)
    resumed.fit()
    for key, value in weights(straight).items():
        torch.testing.assert_close(weights(resumed)[key], value, rtol=0, atol=0, msg=key)
    np.testing.assert_array_equal(resumed.cluster_stage.assignment.sample_cluster,
                                  straight.cluster_stage.assignment.sample_cluster)


def test_clmle_with_classification_term_trains_the_head(tiny_dataset, tmp_path):
    stage = {**CLMLE_STAGE, "epochs": 1, "loss": {**CLMLE_STAGE["loss"], "classification_weight": 0.5}}
    config = tiny_config(tiny_dataset, tmp_path / "run", train={
        "stages": [{"epochs": 1, "head": {"type": "softmax"}}, stage],
        "clusters": {"cluster_size": 3, "clusters_per_batch": 4, "images_per_cluster": 3}})
    trainer = Trainer(config, progress=False)
    trainer.fit(max_epochs=1)
    before = trainer.head.weight.detach().clone()
    trainer.fit()
    assert not torch.equal(before, trainer.head.weight.detach())


def test_clmle_config_errors():
    with pytest.raises(ConfigError, match="must exceed intra_margin"):
        config_from_dict({"train": {"stages": [{"epochs": 1, "head": {"type": "softmax"},
                                                "loss": {"type": "clmle", "inter_margin": 0.1, "intra_margin": 0.2}}]}})
    with pytest.raises(ConfigError, match="no drw"):
        config_from_dict({"train": {"stages": [{"epochs": 1, "head": {"type": "softmax"},
                                                "loss": {"type": "clmle"}, "drw": {"start_epoch": 0}}]}})
