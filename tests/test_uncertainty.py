"""Seed 000 UMM/SUM: MC-dropout uncertainty, margin maps, misclassification probability, training."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm

from conftest import tiny_config
from facepipe.config import ConfigError, config_from_dict, load_config
from facepipe.losses import build_head
from facepipe.losses.uncertainty import (
    class_uncertainty,
    mc_embeddings,
    misclassification_probability,
    predictive_uncertainty,
    uncertainty_additive_margins,
    umm_integer_margins,
)
from facepipe.models import build_backbone
from facepipe.train.trainer import Trainer
from facepipe.train.uncertainty_margins import capped_subsample, estimate_class_uncertainty

UMM_STAGES = [
    {"epochs": 1, "head": {"type": "softmax"}},
    {"name": "UMM", "epochs": 2, "head": {"type": "lsoftmax", "m": 3, "margin_source": "uncertainty",
                                          "lambda_base": 10.0, "lambda_min": 1.0}},
    {"name": "UMM + SUM", "epochs": 1, "sample_uncertainty": True,
     "head": {"type": "lsoftmax", "m": 3, "margin_source": "uncertainty", "lambda_base": 10.0, "lambda_min": 1.0}},
]


def umm_config(root, out, dropout=0.5, **train):
    config = tiny_config(root, out, model={"depth": 18, "width": 0.125, "embedding_size": 32, "dropout": dropout})
    data = config.to_dict()
    data["train"].update({"stages": UMM_STAGES, "uncertainty": {"passes": 6, "max_per_class": 4, "batch_size": 32}})
    data["train"].update(train)
    return config_from_dict(data)


def test_predictive_uncertainty_is_the_trace_of_the_covariance():
    probabilities = torch.softmax(torch.randn(7, 5, 4, dtype=torch.float64), dim=2)
    expected = [np.trace(np.cov(probabilities[:, b].numpy().T, bias=True)) for b in range(5)]
    np.testing.assert_allclose(predictive_uncertainty(probabilities).numpy(), expected, rtol=1e-10)


def test_zero_dropout_gives_zero_uncertainty_and_unit_margins(tiny_dataset):
    config = umm_config(tiny_dataset, tiny_dataset.parent / "unused", dropout=0.0)
    model = build_backbone(config.model, (32, 32))
    head = build_head("lsoftmax", 12, 32, m=3)
    from facepipe.data.dataset import IdentityFolderDataset

    dataset = IdentityFolderDataset(tiny_dataset, transform=None)
    images = dataset.eval_view(range(len(dataset)), (32, 32))
    class_u, sample_u = estimate_class_uncertainty(model, head, images, dataset.labels, 12, torch.device("cpu"),
                                                   passes=5)
    assert torch.equal(sample_u, torch.zeros_like(sample_u)) and torch.equal(class_u, torch.zeros(12))
    assert torch.equal(umm_integer_margins(class_u, 3), torch.ones(12, dtype=torch.long))
    assert torch.equal(uncertainty_additive_margins(class_u, 0.35), torch.zeros(12))


def test_mc_passes_sample_dropout_but_freeze_batchnorm():
    config = tiny_config(".", ".", model={"depth": 18, "width": 0.125, "embedding_size": 16, "dropout": 0.5})
    model = build_backbone(config.model, (32, 32)).train()
    maps = model.features(torch.randn(3, 3, 32, 32)).detach()
    running = model.output_stage.bn_maps.running_mean.clone()
    samples = mc_embeddings(model.output_stage, maps, passes=4)
    assert samples.shape == (4, 3, 16)
    assert not torch.allclose(samples[0], samples[1])  # fresh dropout masks per pass
    assert torch.equal(model.output_stage.bn_maps.running_mean, running)  # BatchNorm not updated
    assert model.output_stage.training and model.output_stage.dropout.training  # modes restored
    with pytest.raises(ValueError, match="at least 2 passes"):
        mc_embeddings(model.output_stage, maps, passes=1)


def test_umm_margin_map_closed_form_and_monotone():
    u = torch.tensor([0.0, 0.1, 0.5, 0.67, 1.0])
    # u~ = 2 * 3 * u / 1 = [0, 0.6, 3, 4.02, 6]; floor(0.5 u~) = [0, 0, 1, 2, 3]; max(1, .)
    assert umm_integer_margins(u, 3).tolist() == [1, 1, 1, 2, 3]
    assert umm_integer_margins(u * 7.5, 3).tolist() == [1, 1, 1, 2, 3]  # scale-free
    np.testing.assert_allclose(uncertainty_additive_margins(u, 0.4).numpy(), (0.4 * u).numpy())
    random_u = torch.rand(200)
    order = torch.argsort(random_u)
    for margins in (umm_integer_margins(random_u, 4), uncertainty_additive_margins(random_u, 0.5)):
        assert (margins[order].diff() >= 0).all()
    assert umm_integer_margins(random_u, 4).max() == 4


def test_class_uncertainty_is_the_class_mean():
    sample_u = torch.tensor([1.0, 3.0, 10.0, 0.5])
    labels = torch.tensor([0, 0, 2, 1])
    np.testing.assert_allclose(class_uncertainty(sample_u, labels, 3).numpy(), [2.0, 0.5, 10.0])


def test_misclassification_probability_matches_the_normal_cdf():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(6, 8))
    mean = rng.normal(size=(20, 8))
    variance = rng.uniform(0.01, 0.5, size=(20, 8))
    labels = rng.integers(0, 6, size=20)
    got = misclassification_probability(*(torch.from_numpy(a) for a in (weight, mean, variance)),
                                         torch.from_numpy(labels)).numpy()
    for b in range(20):
        scores = weight @ mean[b]
        scores[labels[b]] = -np.inf
        direction = weight[scores.argmax()] - weight[labels[b]]
        expected = norm.cdf(direction @ mean[b] / np.sqrt((direction ** 2 * variance[b]).sum()))
        assert got[b] == pytest.approx(expected, abs=2e-6)


@pytest.mark.parametrize("m", [1, 3])
def test_no_margin_cases_equal_softmax_cross_entropy(m):
    torch.manual_seed(0)
    embeddings, labels = torch.randn(16, 8), torch.randint(0, 5, (16,))
    head = build_head("lsoftmax", 5, 8, m=m, lambda_base=0.0, lambda_min=0.0)
    softmax_loss = F.cross_entropy(embeddings @ head.weight.t(), labels)
    # m = 1 with full margin (psi = cos), or any m with F = 0: plain softmax.
    weight = None if m == 1 else torch.zeros(16)
    loss = F.cross_entropy(head(embeddings, labels, margin_weight=weight), labels)
    assert loss.item() == pytest.approx(softmax_loss.item(), rel=1e-6)
    if m == 3:  # F = 1 is the full L-Softmax margin, a strictly larger loss
        assert F.cross_entropy(head(embeddings, labels, margin_weight=torch.ones(16)), labels) > softmax_loss


def test_additive_heads_scale_their_margin_by_the_sample_weight():
    torch.manual_seed(1)
    embeddings, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    half = torch.full((4,), 0.5)
    cosface = build_head("cosface", 4, 8, s=10.0, m=0.4)
    reference = build_head("cosface", 4, 8, s=10.0, m=0.2, weight=cosface.weight)
    torch.testing.assert_close(cosface(embeddings, labels, margin_weight=half), reference(embeddings, labels))
    arcface = build_head("arcface", 4, 8, s=10.0, m=0.4)
    reference = build_head("arcface", 4, 8, s=10.0, m=0.2, weight=arcface.weight)
    torch.testing.assert_close(arcface(embeddings, labels, margin_weight=half), reference(embeddings, labels))


def test_capped_subsample_keeps_rare_classes_whole():
    labels = np.array([0] * 10 + [1] * 2 + [2] * 5)
    chosen = capped_subsample(labels, 4, seed=0)
    assert np.bincount(labels[chosen]).tolist() == [4, 2, 4]
    assert np.array_equal(chosen, capped_subsample(labels, 4, seed=0))
    assert len(capped_subsample(labels, None, seed=0)) == 17


def test_curriculum_trains_end_to_end_with_one_backbone_pass_per_step(tiny_dataset, tmp_path):
    config = umm_config(tiny_dataset, tmp_path / "run")
    trainer = Trainer(config, progress=False)
    calls = {"features": 0, "output_stage": 0}
    features, output_stage = trainer.model.features, trainer.model.output_stage.forward

    def count(name, function):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapped

    trainer.model.features = count("features", features)
    trainer.model.output_stage.forward = count("output_stage", output_stage)
    trainer.fit(max_epochs=3)
    # Two UMM refreshes so far, each over up to 4 images per class in batches of 32.
    per_refresh = math.ceil(len(capped_subsample(trainer.dataset.labels, 4, seed=0)) / 32)
    steps, estimate_batches = 3 * trainer.steps_per_epoch, 2 * per_refresh
    # One backbone pass per step; a training step runs the output stage once (no SUM yet).
    assert calls["features"] == steps + estimate_batches
    assert calls["output_stage"] == steps + estimate_batches
    before = dict(calls)
    trainer.fit()  # the SUM epoch: N passes batched into one extra output-stage call per step
    sum_steps = trainer.steps_per_epoch
    assert calls["features"] - before["features"] == sum_steps + per_refresh
    assert calls["output_stage"] - before["output_stage"] == 2 * sum_steps + per_refresh

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stages = [(r["epoch"], r["stage"]) for r in records if r["event"] == "stage"]
    assert stages == [(1, 1), (3, 2)]
    refreshes = [r["epoch"] for r in records if r["event"] == "uncertainty"]
    assert refreshes == [1, 2, 3]
    report = json.loads((tmp_path / "run" / "uncertainty.json").read_text())
    assert report["class_margin"] == trainer.head.margin.long().tolist()
    assert max(report["class_margin"]) == 3 and min(report["class_margin"]) >= 1
    assert (tmp_path / "run" / "uncertainty.png").is_file()


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_sum_step_sends_gradients_to_backbone_and_classifier(tiny_dataset, tmp_path):
    config = umm_config(tiny_dataset, tmp_path / "run")
    trainer = Trainer(config, progress=False)
    trainer._switch_stage(2, announce=False)
    images, labels, _ = next(iter(trainer.loader))
    trainer.optimizer.zero_grad()
    # Stop before the optimizer step: keep the gradients to inspect them.
    trainer.optimizer.step = lambda *a, **k: None
    trainer.optimizer.zero_grad = lambda *a, **k: None
    assert trainer._train_step(images, labels) is not None
    first_conv = next(p for p in trainer.model.parameters() if p.ndim == 4)
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert trainer.head.weight.grad is not None and trainer.head.weight.grad.abs().sum() > 0


def test_configs_parse_and_sum_needs_a_margin():
    config = load_config("configs/umm.yaml")
    assert [s.sample_uncertainty for s in config.train.stages] == [False, False, True]
    assert config.train.stages[1].head.margin_source == "uncertainty" and config.model.dropout == 0.5
    assert load_config("configs/umm_small.yaml").train.total_epochs == 6
    with pytest.raises(ConfigError, match="softmax head has none"):
        config_from_dict({"train": {"stages": [{"epochs": 1, "head": {"type": "softmax"},
                                                "sample_uncertainty": True}]}})


def test_rarer_classes_get_larger_margins_once_trained(tmp_path):
    """The paper's observation, on a synthetic long-tailed set (20 identities, 3..30 images):
    after 20 softmax epochs the rarer half of the classes is more uncertain and gets larger UMM
    margins. (Early in training the order is reversed: bench/umm_tail_recall.py logs the
    correlation per epoch; it turns negative after about 12 of 30 epochs.)"""
    from facepipe.data.synth import generate_dataset

    root = tmp_path / "data"
    generate_dataset(root, num_identities=20, seed=1, max_images=30, min_images=1, gamma=1.0, size=(32, 32),
                     progress=False)
    config = config_from_dict({
        "seed": 0, "output_dir": str(tmp_path / "run"),
        "data": {"root": str(root), "image_size": [32, 32], "batch_size": 32, "num_workers": 0,
                 "augment": {"hflip": 0.5}},
        "model": {"depth": 18, "width": 0.125, "embedding_size": 32, "dropout": 0.5},
        "optim": {"lr": 0.05}, "scheduler": {"name": "cosine", "warmup_epochs": 0.5},
        "train": {"stages": [{"epochs": 20, "head": {"type": "softmax"}},
                             {"epochs": 1, "head": {"type": "lsoftmax", "m": 3, "margin_source": "uncertainty"}}],
                  "uncertainty": {"passes": 10, "max_per_class": 50}},
    })
    Trainer(config, progress=False).fit()
    report = json.loads((tmp_path / "run" / "uncertainty.json").read_text())
    counts = np.array(report["class_images"])
    uncertainty, margins = np.array(report["class_uncertainty"]), np.array(report["class_margin"])
    order = np.argsort(counts, kind="stable")
    rare, frequent = order[:10], order[10:]
    assert counts[rare].max() <= counts[frequent].min()
    assert uncertainty[rare].mean() > uncertainty[frequent].mean()
    assert margins[rare].mean() > margins[frequent].mean()
    assert report["spearman_uncertainty_vs_count"] < 0
