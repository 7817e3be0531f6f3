"""CLMLE stages in the trainer (Huang et al., TPAMI 2019): clustering on stage entry, cluster
mini-batches, refreshes, the saved state, an exact resume, the stored centroid of lone samples and
frozen BatchNorm."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from facepipe.config import ConfigError, config_from_dict
from facepipe.data.cluster_sampler import ClusterBatchSampler
from facepipe.data.clusters import ClusterAssignment
from facepipe.runtime.checkpoint import load_checkpoint
from facepipe.train.batchnorm import stage_batchnorm_mode
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


def cluster_stage(trainer):
    """The CLMLE state of the run (the clmle plug-in's), None outside a clmle stage."""
    return trainer.plugins["clmle"].cluster_stage


def weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_clmle_stage_clusters_batches_and_refreshes(tiny_dataset, tmp_path):
    trainer = Trainer(clmle_config(tiny_dataset, tmp_path / "run"), progress=False)
    metrics = trainer.fit()
    assert np.isfinite(metrics["loss"])
    stage = cluster_stage(trainer)
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
    np.testing.assert_array_equal(cluster_stage(resumed).assignment.sample_cluster,
                                  cluster_stage(straight).assignment.sample_cluster)


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


def batchnorm_layers(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def batchnorm_buffers(model):
    return [(b.running_mean.clone(), b.running_var.clone(), b.num_batches_tracked.clone())
            for b in batchnorm_layers(model)]


def record_step_modes(trainer):
    """Wrap the trainer's step: for each CLMLE step, the BatchNorm/other modules' modes and
    whether a training-mode forward of (a copy of) the model equals its eval-mode forward."""
    steps = []
    original = trainer._train_step

    def step(images, labels, indices=None):
        if cluster_stage(trainer) is not None:
            probe = copy.deepcopy(trainer.model)
            with torch.no_grad():
                as_trained = probe(images)
                probe.eval()
                as_evaluated = probe(images)
            layers = batchnorm_layers(trainer.model)
            others = [m for m in trainer.model.modules() if m not in set(layers)]
            steps.append({"bn_training": any(m.training for m in layers),
                          "others_training": all(m.training for m in others),
                          "same_forward": torch.allclose(as_trained, as_evaluated, rtol=1e-5, atol=1e-6)})
        return original(images, labels, indices)

    trainer._train_step = step
    return steps


@pytest.mark.parametrize("bn", ["auto", "batch"])
def test_clmle_stage_freezes_batchnorm_unless_told_otherwise(tiny_dataset, tmp_path, bn):
    # refresh_every_steps=2: re-clustering mid-epoch (eval-mode feature extraction) must leave
    # the frozen layers frozen. Dropout is 0 in tiny_config, so eval and train forwards can agree.
    config = clmle_config(tiny_dataset, tmp_path / "run", refresh_every_steps=2)
    config.train.stages[1].bn = bn
    trainer = Trainer(config, progress=False)
    initial = batchnorm_buffers(trainer.model)
    trainer.fit(max_epochs=1)  # the softmax stage: "auto" means batch statistics there
    after_softmax = batchnorm_buffers(trainer.model)
    assert not torch.equal(initial[0][0], after_softmax[0][0])
    bn_weights = [b.weight.detach().clone() for b in batchnorm_layers(trainer.model)]
    steps = record_step_modes(trainer)
    trainer.fit()
    assert len(steps) == 2 * trainer.steps_per_epoch
    after_clmle = batchnorm_buffers(trainer.model)
    if bn == "auto":
        for before, after in zip(after_softmax, after_clmle):
            for a, b in zip(before, after):
                torch.testing.assert_close(b, a, rtol=0, atol=0)
        assert all(not s["bn_training"] and s["others_training"] and s["same_forward"] for s in steps)
        # The affine weights still train.
        assert any(not torch.equal(w, b.weight) for w, b in zip(bn_weights, batchnorm_layers(trainer.model)))
    else:
        assert not torch.equal(after_softmax[0][0], after_clmle[0][0])
        assert all(s["bn_training"] and not s["same_forward"] for s in steps)


def test_stage_batchnorm_mode_resolves_auto():
    def stage(loss, **extra):
        return config_from_dict({"train": {"stages": [{"epochs": 1, "head": {"type": "softmax"},
                                                       "loss": {"type": loss}, **extra}]}}).train.stages[0]

    assert stage("clmle").bn == "auto" and stage_batchnorm_mode(stage("clmle")) == "frozen"
    assert stage_batchnorm_mode(stage("ce")) == "batch"
    assert stage_batchnorm_mode(stage("clmle", bn="batch")) == "batch"
    assert stage_batchnorm_mode(stage("ce", bn="frozen")) == "frozen"
    with pytest.raises(ConfigError, match="bn"):
        stage("ce", bn="sync")
    with pytest.raises(ConfigError, match="own_centroid"):
        config_from_dict({"train": {"stages": [{"epochs": 1, "head": {"type": "softmax"},
                                                "loss": {"type": "clmle", "own_centroid": "exclusive"}}]}})


def test_loss_for_uses_the_stored_centroid_of_a_sample_alone_in_its_cluster(tiny_dataset, tmp_path):
    trainer = Trainer(clmle_config(tiny_dataset, tmp_path / "run"), progress=False)
    trainer.fit(max_epochs=2)
    stage = cluster_stage(trainer)
    assert stage.loss.own_centroid == "leave_one_out"
    sample_cluster = stage.assignment.sample_cluster
    sizes = np.bincount(sample_cluster)
    pair_cluster, other_cluster = [int(c) for c in np.flatnonzero(sizes >= 2)[:2]]
    # Two members of one cluster and a single member of another.
    indices = np.concatenate([np.flatnonzero(sample_cluster == pair_cluster)[:2],
                              np.flatnonzero(sample_cluster == other_cluster)[:1]])
    embeddings = torch.nn.functional.normalize(torch.randn(3, stage.assignment.centroids.shape[1]), dim=1)
    labels = torch.as_tensor(trainer.dataset.labels[indices])
    out = stage.loss_for(embeddings, labels, torch.as_tensor(indices))
    stored = torch.nn.functional.normalize(torch.from_numpy(stage.assignment.centroids[other_cluster]), dim=0)
    assert out.alone.tolist() == [False, False, True]
    assert out.own_cosine_leave_one_out[2].item() == pytest.approx(float(embeddings[2] @ stored), abs=1e-5)
    assert out.own_cosine_leave_one_out[0].item() == pytest.approx(float(embeddings[0] @ embeddings[1]), abs=1e-5)
    assert stage.diagnostics["alone"].tolist() == [False, False, True]


def test_batch_stats_count_images_with_a_positive_and_single_image_people(tiny_dataset, tmp_path):
    """Of a batch's distinct images: the share with another image of their identity in the batch
    (repeats of one image are no positive) and the share of single-image people."""
    import dataclasses

    trainer = Trainer(clmle_config(tiny_dataset, tmp_path / "run"), progress=False)
    trainer.fit(max_epochs=2)
    stage = cluster_stage(trainer)
    labels = trainer.dataset.labels
    a, b, c = [np.flatnonzero(labels == k) for k in range(3)]
    # two images of person 0, one image of person 1 drawn twice, one image of person 2
    indices = np.array([a[0], a[1], b[0], b[0], c[0]])
    embeddings = torch.nn.functional.normalize(torch.randn(len(indices), stage.assignment.centroids.shape[1]), dim=1)
    stage.loss_for(embeddings, torch.as_tensor(labels[indices]), torch.as_tensor(indices))
    counts = list(trainer.class_counts)
    counts[2] = 1  # as if person 2 had a single training image
    stage.ctx = dataclasses.replace(stage.ctx, class_counts=counts)
    stats = stage.batch_stats(torch.as_tensor(indices))
    assert stats["clmle_distinct_images"] == 4
    assert stats["clmle_positive_fraction"] == pytest.approx(2 / 4)
    assert stats["clmle_single_image_fraction"] == pytest.approx(1 / 4)


def test_clmle_mechanism_is_logged_with_every_training_record(tiny_dataset, tmp_path):
    trainer = Trainer(clmle_config(tiny_dataset, tmp_path / "run"), progress=False)
    trainer.fit()
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    clmle = [e for e in events if e["event"] == "train" and e["epoch"] >= 1]
    assert clmle and all("clmle_zero_loss_fraction" in e for e in clmle)
    for record in clmle:
        # Distinct draws: a batch of 4 x 3 images holds 12 different images of the tiny set.
        assert record["clmle_distinct_images"] == trainer.loader.batch_size
        assert record["clmle_clusters"] >= 4
        assert 0.0 <= record["clmle_zero_loss_fraction"] <= 1.0
        assert 0.0 <= record["clmle_alone_fraction"] < 1.0
        # every person of the tiny set has several images, and cluster batches hold their mates
        assert record["clmle_single_image_fraction"] == 0.0 and record["clmle_positive_fraction"] > 0.5
        # The sample pulls its own batch centroid towards itself: leaving it out lowers the cosine.
        assert record["clmle_own_cos_with"] > record["clmle_own_cos_without"]
    softmax = [e for e in events if e["event"] == "train" and e["epoch"] == 0]
    assert softmax and not any("clmle_zero_loss_fraction" in e for e in softmax)
