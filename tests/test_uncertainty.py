"""UMM/SUM (Khan et al., CVPR 2019): MC-dropout uncertainty, margin maps, misclassification
probability, training."""
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
    uncertainty_rank,
    umm_integer_margins,
)
from facepipe.models import build_backbone
from facepipe.train.trainer import Trainer
from facepipe.train.uncertainty_margins import (
    AugmentedView,
    capped_subsample,
    estimate_class_uncertainty,
    margin_histogram,
    margins_from_uncertainty,
    measure_class_uncertainty,
    spearman_uncertainty_vs_size,
    uncertainty_view,
)

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


def test_max_scaled_margin_map_keeps_the_old_closed_form():
    """The former default map, now ``margin_map="max_scaled"``: the same numbers as before."""
    u = torch.tensor([0.0, 0.1, 0.5, 0.67, 1.0])
    # u~ = 2 * 3 * u / 1 = [0, 0.6, 3, 4.02, 6]; floor(0.5 u~) = [0, 0, 1, 2, 3]; max(1, .)
    assert umm_integer_margins(u, 3, "max_scaled").tolist() == [1, 1, 1, 2, 3]
    assert umm_integer_margins(u * 7.5, 3, "max_scaled").tolist() == [1, 1, 1, 2, 3]  # scale-free
    np.testing.assert_allclose(uncertainty_additive_margins(u, 0.4, "max_scaled").numpy(), (0.4 * u).numpy())
    assert margins_from_uncertainty("lsoftmax", 3, u, "max_scaled").tolist() == [1, 1, 1, 2, 3]
    random_u = torch.rand(200)
    order = torch.argsort(random_u)
    for margin_map in ("max_scaled", "rank"):
        for margins in (umm_integer_margins(random_u, 4, margin_map),
                        uncertainty_additive_margins(random_u, 0.5, margin_map)):
            assert (margins[order].diff() >= 0).all()
        assert umm_integer_margins(random_u, 4, margin_map).max() == 4
    with pytest.raises(ValueError, match="unknown margin_map"):
        umm_integer_margins(u, 3, "percentile")


def outlier_uncertainty(classes=300, seed=0):
    """Distinct class uncertainties in [0, 0.01) and one class 1,000x more uncertain."""
    u = torch.rand(classes, generator=torch.Generator().manual_seed(seed)) * 0.01
    u[17] = 10.0
    return u


def test_rank_map_fills_every_margin_level_despite_an_outlier():
    u = outlier_uncertainty(300)
    margins = umm_integer_margins(u, 3)  # the default map
    assert torch.equal(margins, umm_integer_margins(u, 3, "rank"))
    assert np.bincount(margins.numpy(), minlength=4)[1:].tolist() == pytest.approx([100, 100, 100], abs=1)
    assert margins[17] == 3
    order = torch.argsort(u)
    assert (margins[order].diff() >= 0).all()  # still grows with the uncertainty
    assert margins[order[:100]].eq(1).all() and margins[order[-100:]].eq(3).all()
    # What the max-scaled map does with the same values: the outlier flattens everyone else to m = 1.
    assert (umm_integer_margins(u, 3, "max_scaled") == 1).sum() == 299
    # Uneven C and m_max: level sizes differ by at most one class.
    sizes = np.bincount(umm_integer_margins(outlier_uncertainty(301), 4).numpy(), minlength=5)[1:]
    assert sizes.sum() == 301 and sizes.max() - sizes.min() <= 1
    assert margins_from_uncertainty("sphereface", 3, u).tolist() == margins.tolist()


def test_rank_ties_share_the_lowest_rank():
    u = torch.tensor([0.5, 0.5, 0.5, 0.1, 0.9, 0.9])
    assert uncertainty_rank(u).tolist() == [1, 1, 1, 0, 4, 4]
    # 1 + floor(3 rank / 6): the three tied 0.5 classes stay together on level 1.
    assert umm_integer_margins(u, 3).tolist() == [1, 1, 1, 1, 3, 3]
    np.testing.assert_allclose(uncertainty_additive_margins(u, 0.5).numpy(), [0.1, 0.1, 0.1, 0.0, 0.4, 0.4],
                               rtol=1e-6)


@pytest.mark.parametrize("margin_map", ["rank", "max_scaled"])
@pytest.mark.parametrize("value", [0.0, 0.37])
def test_constant_uncertainty_gives_plain_softmax_under_both_maps(margin_map, value):
    """No class more uncertain than another: no class gets a margin (the first max-scaled code gave
    every class m_max when the constant was above zero)."""
    u = torch.full((50,), value)
    assert torch.equal(umm_integer_margins(u, 3, margin_map), torch.ones(50, dtype=torch.long))
    assert torch.equal(uncertainty_additive_margins(u, 0.35, margin_map), torch.zeros(50))
    assert torch.equal(umm_integer_margins(torch.full((1,), value), 3, margin_map), torch.ones(1, dtype=torch.long))
    assert torch.equal(uncertainty_additive_margins(torch.full((1,), value), 0.35, margin_map), torch.zeros(1))


def test_additive_rank_map_spreads_margins_despite_an_outlier():
    u = outlier_uncertainty(300)
    margins = uncertainty_additive_margins(u, 0.35)  # the default map
    order = torch.argsort(u)
    # Evenly spaced over [0, m] by uncertainty rank: the least uncertain none, the most the full m.
    np.testing.assert_allclose(margins[order].numpy(), np.linspace(0.0, 0.35, 300), atol=1e-6)
    assert float(margins.median()) == pytest.approx(0.35 / 2, abs=0.01)
    # The max-scaled map pushes all but the outlier below 0.001 of the margin.
    old = uncertainty_additive_margins(u, 0.35, "max_scaled")
    assert float(old.max()) == pytest.approx(0.35) and (old < 0.35e-3).sum() == 299
    np.testing.assert_allclose(margins_from_uncertainty("cosface", 0.35, u).numpy(), margins.numpy())


def test_margin_histogram_counts_levels_or_gives_quantiles():
    histogram = margin_histogram(torch.tensor([1, 1, 2, 3, 3, 3]))
    assert histogram == {"counts": {"1": 2, "2": 1, "3": 3}, "fractions": {"1": 0.3333, "2": 0.1667, "3": 0.5}}
    spread = margin_histogram(uncertainty_additive_margins(outlier_uncertainty(300), 0.35))
    assert set(spread) == {"quantiles"}
    assert spread["quantiles"]["min"] == 0.0 and spread["quantiles"]["max"] == pytest.approx(0.35)
    assert spread["quantiles"]["median"] == pytest.approx(0.175, abs=0.01)


def test_spearman_uncertainty_vs_size():
    counts = np.array([2, 5, 9, 40])
    assert spearman_uncertainty_vs_size(torch.tensor([0.4, 0.3, 0.2, 0.1]), counts) == pytest.approx(-1.0)
    assert spearman_uncertainty_vs_size(np.array([0.1, 0.2, 0.3, 0.4]), counts) == pytest.approx(1.0)
    assert math.isnan(spearman_uncertainty_vs_size(np.zeros(4), counts))


@pytest.mark.parametrize("settings", [{"margin_map": "max_scaled", "views": "augmented"}, {}])
def test_uncertainty_config_takes_margin_map_and_views(tmp_path, settings):
    config = umm_config(tmp_path, tmp_path / "run", uncertainty={"passes": 4, **settings})
    expected = {"margin_map": "rank", "views": "clean", **settings}
    assert (config.train.uncertainty.margin_map, config.train.uncertainty.views) == (
        expected["margin_map"], expected["views"])


@pytest.mark.parametrize("key, value, choices", [("margin_map", "percentile", "'rank' or 'max_scaled'"),
                                                 ("views", "noisy", "'clean' or 'augmented'")])
def test_uncertainty_config_rejects_unknown_margin_map_and_views(key, value, choices):
    with pytest.raises(ConfigError, match=f"train.uncertainty.{key}: Input should be {choices}"):
        config_from_dict({"train": {"uncertainty": {key: value}}})


def augmenting_dataset(root, **augment):
    from facepipe.config import AugmentConfig
    from facepipe.data.dataset import IdentityFolderDataset
    from facepipe.data.transforms import build_train_transform

    return IdentityFolderDataset(root, build_train_transform((32, 32), AugmentConfig(**augment)))


def view_images(view):
    return torch.stack([view[i][0] for i in range(len(view))])


def test_augmented_views_go_through_the_training_transform(tiny_dataset):
    indices = [0, 5, 9, 20]
    seeds = [11, 12, 13, 14]
    flipping = augmenting_dataset(tiny_dataset, hflip=1.0)
    clean = view_images(uncertainty_view(flipping, indices, "clean", image_size=(32, 32)))
    flipped = view_images(uncertainty_view(flipping, indices, "augmented", seeds))
    # hflip = 1 and nothing else: the training transform is the clean resize, mirrored.
    torch.testing.assert_close(flipped, clean.flip(-1))
    assert not torch.equal(flipped, clean)

    jitter = augmenting_dataset(tiny_dataset, hflip=0.5, color_jitter=1.0, random_resized_crop=1.0)
    first = view_images(uncertainty_view(jitter, indices, "augmented", seeds))
    again = view_images(uncertainty_view(augmenting_dataset(tiny_dataset, hflip=0.5, color_jitter=1.0,
                                                            random_resized_crop=1.0), indices, "augmented", seeds))
    assert torch.equal(first, again)  # the seed alone decides the view
    other = view_images(uncertainty_view(jitter, indices, "augmented", [21, 22, 23, 24]))
    assert not torch.equal(first, other)
    assert all(not torch.equal(a, b) for a, b in zip(first, clean))
    with pytest.raises(ValueError, match="needs the training dataset's transform"):
        AugmentedView(augmenting_dataset(tiny_dataset).__class__(tiny_dataset, transform=None), indices, seeds)


def test_measure_class_uncertainty_on_augmented_views_is_seeded(tiny_dataset, tmp_path):
    """Without a trainer: the inputs the backbone sees are augmented (not the clean images), the
    same for the same seed, BatchNorm in eval mode throughout."""
    config = umm_config(tiny_dataset, tmp_path / "unused", uncertainty={"passes": 3, "max_per_class": 3,
                                                                        "batch_size": 16})
    model = build_backbone(config.model, (32, 32))
    head = build_head("lsoftmax", 12, 32, m=3)
    dataset = augmenting_dataset(tiny_dataset, hflip=0.5, color_jitter=1.0)
    seen = []
    features = model.features
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def recording(images):
        seen.append((images.clone(), model.training, any(m.training for m in batchnorms)))
        return features(images)

    model.features = recording

    def measure(views, seed):
        seen.clear()
        torch.manual_seed(0)  # the dropout masks
        result = measure_class_uncertainty(model, head, dataset, dataset.labels, 12, torch.device("cpu"),
                                           config.train.uncertainty, seed, views=views, image_size=(32, 32))
        return result, torch.cat([images for images, _, _ in seen]), [flags for _, *flags in seen]

    clean, clean_inputs, _ = measure("clean", seed=3)
    augmented, inputs, flags = measure("augmented", seed=3)
    repeated, repeated_inputs, _ = measure("augmented", seed=3)
    assert clean.views == "clean" and augmented.views == "augmented"
    assert np.array_equal(clean.indices, capped_subsample(dataset.labels, 3, seed=3))
    assert np.array_equal(augmented.indices, clean.indices)
    assert clean_inputs.shape == inputs.shape and not torch.equal(clean_inputs, inputs)
    assert torch.equal(inputs, repeated_inputs) and torch.equal(augmented.class_u, repeated.class_u)
    assert all(flag == [False, False] for flag in flags)  # model and BatchNorm in eval mode
    assert augmented.class_u.shape == (12,) and augmented.sample_u.shape == (len(augmented.indices),)


def test_refresh_logs_and_records_the_margin_histogram(tiny_dataset, tmp_path, caplog):
    config = umm_config(tiny_dataset, tmp_path / "run", max_steps_per_epoch=1,
                        stages=[{"epochs": 1, "head": {"type": "lsoftmax", "m": 3, "margin_source": "uncertainty",
                                                       "lambda_base": 10.0, "lambda_min": 1.0}}],
                        uncertainty={"passes": 4, "max_per_class": 3, "batch_size": 32, "views": "augmented"})
    trainer = Trainer(config, progress=False)
    with caplog.at_level("INFO", logger="facepipe.train.uncertainty_margins"):
        trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (record,) = [r for r in records if r["event"] == "uncertainty"]
    assert record["views"] == "augmented" and record["margin_map"] == "rank"
    margins = trainer.head.margin.long().tolist()
    assert record["margins"] == {str(m): margins.count(m) for m in sorted(set(margins))}
    # Rank map on 12 classes with distinct uncertainties: four classes on each of the three levels.
    assert record["margins"] == {"1": 4, "2": 4, "3": 4}
    assert record["margin_fractions"] == {"1": 0.3333, "2": 0.3333, "3": 0.3333}
    report = json.loads((tmp_path / "run" / "uncertainty.json").read_text())
    assert report["views"] == "augmented" and report["margins"] == record["margins"]
    assert "m=1: 4 (33.3%), m=2: 4 (33.3%), m=3: 4 (33.3%)" in caplog.text and "augmented" in caplog.text


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
