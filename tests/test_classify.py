"""facepipe classify: MNIST idx reading, Li et al.'s MNIST-q protocol, the prototype head, the
ARConvL head inside the shared trainer, and the runner end to end on tiny idx files."""
from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facepipe.cli import main
from facepipe.config import ConfigError, config_from_dict
from facepipe.data.dataset import DatasetError
from facepipe.data.mnist import (
    TensorImageDataset,
    imbalanced_subset,
    load_mnist,
    minority_keep_count,
    read_idx,
    stratified_split,
)
from facepipe.losses import PrototypeHead
from facepipe.models import MnistCNN, build_backbone
from facepipe.train.classify import run_classification
from facepipe.train.run_log import NullRunLog
from facepipe.train.trainer import Trainer

from conftest import SHARED_DATA


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_mnist(folder, train_per_class: int = 40, test_per_class: int = 12, seed: int = 0) -> None:
    """Ten learnable classes: class c lights a 4x28 band at rows 2c..2c+3, on noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.repeat(np.arange(10), per_class)
        images = rng.integers(0, 60, size=(len(labels), 28, 28))
        for row, label in enumerate(labels):
            images[row, 2 * label + 2: 2 * label + 6, :] = 255
        images_name = f"{split}-images-idx3-ubyte.gz"
        (folder / images_name).write_bytes(gzip.compress(idx_bytes(images)))
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))  # one file left plain


# ----------------------------------------------------------------------------- idx files
def test_read_idx_round_trip_plain_and_gzip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    (tmp_path / "b.gz").write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "b.gz"), array)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DatasetError, match="bad magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(idx_bytes(np.zeros((2, 3), np.uint8))[:-1])
    with pytest.raises(DatasetError, match="needs 6"):
        read_idx(tmp_path / "short")
    (tmp_path / "notgz.gz").write_bytes(b"not gzip")
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(tmp_path / "notgz.gz")


def test_real_mnist_files_load():
    images, labels = load_mnist(SHARED_DATA / "mnist", "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_missing_mnist_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_mnist(tmp_path / "absent", "train")
    tmp_path.joinpath("m").mkdir()
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path / "m", "train")


# ----------------------------------------------------------------------------- MNIST-q
def test_imbalanced_subset_keeps_exactly_one_in_q_of_even_classes():
    labels = np.repeat(np.arange(10), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
    kept = imbalanced_subset(labels, 100, [0, 2, 4, 6, 8], seed=3)
    counts = np.bincount(labels[kept], minlength=10)
    assert counts.tolist() == [59, 6742, 59, 6131, 58, 5421, 59, 6265, 58, 5949]
    assert len(np.unique(kept)) == len(kept)
    np.testing.assert_array_equal(kept, imbalanced_subset(labels, 100, [0, 2, 4, 6, 8], seed=3))
    assert not np.array_equal(kept, imbalanced_subset(labels, 100, [0, 2, 4, 6, 8], seed=4))
    assert len(imbalanced_subset(labels, 1, [0, 2, 4, 6, 8], seed=0)) == len(labels)
    assert minority_keep_count(30, 100) == 1  # never an empty class


def test_stratified_split_holds_out_the_fraction_of_every_class():
    labels = np.repeat(np.arange(3), [100, 50, 1])
    train, val = stratified_split(labels, 0.1, seed=0)
    assert np.intersect1d(train, val).size == 0 and len(train) + len(val) == len(labels)
    assert np.bincount(labels[val], minlength=3).tolist() == [10, 5, 0]
    assert 150 in train  # the single image of class 2 stays in training


# ----------------------------------------------------------------------------- model and head
def test_prototype_head_logits_are_negative_squared_distances():
    head = PrototypeHead(3, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]))
    features = torch.tensor([[1.0, 1.0]])
    expected = torch.tensor([[-2.0, -1.0, -2.0]])  # hand-computed ||f - C_j||^2
    torch.testing.assert_close(head(features, torch.tensor([1])), expected)
    torch.testing.assert_close(head.inference_logits(features), expected)
    loss = F.cross_entropy(head(features, torch.tensor([1])), torch.tensor([1]))
    assert loss.item() == pytest.approx(-math.log(math.exp(-1) / (2 * math.exp(-2) + math.exp(-1))))


def test_mnist_cnn_shapes_and_input_check():
    model = MnistCNN(embedding_size=64)
    x = torch.rand(4, 1, 28, 28)
    maps = model.features(x)
    assert maps.shape == (4, 64, 7, 7)
    torch.testing.assert_close(model(x), model.output_stage(maps))
    with pytest.raises(ValueError, match="expects images"):
        model(torch.rand(4, 3, 28, 28))
    with pytest.raises(ValueError, match="multiple of 4"):
        MnistCNN(input_size=(30, 30))


def test_config_checks_image_size_per_backbone_and_arconvl_losses():
    assert build_backbone(config_from_dict({"model": {"arch": "mnist_cnn"}, "data": {"image_size": [28, 28]}}).model,
                          (28, 28)).embedding_size == 512
    with pytest.raises(ConfigError, match="multiples of 16"):
        config_from_dict({"data": {"image_size": [28, 28]}})
    with pytest.raises(ConfigError, match="computes its own loss"):
        config_from_dict({"train": {"stages": [{"epochs": 1, "head": {"type": "arconvl"},
                                                "loss": {"type": "logit_adjusted"}}]}})
    with pytest.raises(ConfigError, match="prototype head has none"):
        config_from_dict({"train": {"stages": [{"epochs": 1, "head": {"type": "prototype"},
                                                "sample_uncertainty": True}]}})


# ----------------------------------------------------------------------------- trainer
def mnist_config(tmp_path, mnist_root, **overrides):
    data = {
        "seed": 0, "output_dir": str(tmp_path / "run"),
        "classify": {"root": str(mnist_root), "imbalance_ratio": 4, "val_fraction": 0.25},
        "data": {"image_size": [28, 28], "batch_size": 16, "num_workers": 0},
        "model": {"arch": "mnist_cnn", "embedding_size": 16},
        "optim": {"lr": 0.05, "weight_decay": 0.0},
        "scheduler": {"name": "step", "milestones": [2], "gamma": 0.1},
        "train": {"stages": [{"epochs": 3, "head": {"type": "prototype"}}], "amp": "off"},
    }
    data.update(overrides)
    return config_from_dict(data)


def test_arconvl_radii_follow_their_own_rate_not_the_main_schedule(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(64, 28, 28)).astype(np.uint8)
    dataset = TensorImageDataset(images, np.repeat(np.arange(4), 16), list("abcd"))
    config = mnist_config(tmp_path, tmp_path, train={"stages": [{"epochs": 5, "head": {
        "type": "arconvl", "radius_warmup_epochs": 3, "radius_warmup_lr": 0.001, "radius_lr": 0.01}}], "amp": "off"})
    trainer = Trainer(config, progress=False, dataset=dataset)
    radius_group = next(g for g in trainer.optimizer.param_groups if g["lr_rule"] == "radius")
    main_group = trainer.optimizer.param_groups[0]
    seen = []
    for epoch in range(5):
        trainer.fit(max_epochs=epoch + 1)
        seen.append((round(main_group["lr"], 6), round(radius_group["lr"], 6)))
    # main: 0.05 until the milestone (epoch 2), then x0.1; radii: 0.001 for 3 epochs, then 0.01.
    assert seen == [(0.05, 0.001), (0.005, 0.001), (0.005, 0.01), (0.005, 0.01), (0.005, 0.01)]
    assert radius_group["params"][0] is trainer.head.radii and len(radius_group["params"]) == 1
    resumed = Trainer(config, resume=True, progress=False, dataset=dataset)
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [g["lr"] for g in trainer.optimizer.param_groups]


def test_switching_to_arconvl_mid_run_registers_centres_and_radii(tmp_path):
    rng = np.random.default_rng(1)
    dataset = TensorImageDataset(rng.integers(0, 255, size=(48, 28, 28)).astype(np.uint8),
                                 np.repeat(np.arange(3), 16), list("abc"))
    config = mnist_config(tmp_path, tmp_path, train={"stages": [
        {"epochs": 1, "head": {"type": "prototype"}},
        {"epochs": 2, "head": {"type": "arconvl", "radius_warmup_epochs": 1}}], "amp": "off"})
    trainer = Trainer(config, progress=False, dataset=dataset)
    trainer.fit()
    radius_group = next(g for g in trainer.optimizer.param_groups if g.get("lr_rule") == "radius")
    # Stage 2 starts at epoch 1: its first epoch is the radius warm-up, its second uses 0.01.
    assert radius_group["lr"] == pytest.approx(0.01)
    assert any(p is trainer.head.centers for g in trainer.optimizer.param_groups for p in g["params"])
    assert trainer.head.radii.grad is None or torch.isfinite(trainer.head.radii).all()
    assert not torch.allclose(trainer.head.radii, torch.full_like(trainer.head.radii, 0.1))  # it trained


def three_class_images(seed: int) -> TensorImageDataset:
    rng = np.random.default_rng(seed)
    return TensorImageDataset(rng.integers(0, 255, size=(36, 28, 28)).astype(np.uint8),
                              np.repeat(np.arange(3), 12), list("abc"))


def class_means_by_hand(trainer: Trainer, dataset: TensorImageDataset) -> torch.Tensor:
    """Mean raw feature of each class under the trainer's backbone in eval mode, every image once."""
    view = dataset.eval_view(range(len(dataset)))
    images = torch.stack([view[i][0] for i in range(len(view))])
    trainer.model.eval()
    with torch.no_grad():
        feats = trainer.model(images)
    trainer.model.train()
    labels = torch.as_tensor(np.asarray(dataset.labels))
    return torch.stack([feats[labels == c].mean(0) for c in range(dataset.num_classes)])


def test_arconvl_centres_start_at_class_means_when_asked_and_resume_keeps_trained_ones(tmp_path):
    dataset = three_class_images(2)
    stage = {"epochs": 2, "head": {"type": "arconvl", "init_centers": "class_means"}}
    config = mnist_config(tmp_path, tmp_path, train={"stages": [stage], "amp": "off"})
    trainer = Trainer(config, progress=False, dataset=dataset)
    expected = class_means_by_hand(trainer, dataset)
    assert torch.allclose(trainer.head.centers, expected, atol=1e-5)
    # the default keeps Li et al.'s random start, which is nowhere near the class means
    default = Trainer(mnist_config(tmp_path / "d", tmp_path, train={"stages": [
        {"epochs": 2, "head": {"type": "arconvl"}}], "amp": "off"}), progress=False, dataset=dataset)
    assert not torch.allclose(default.head.centers, expected, atol=1e-2)
    trainer.fit(max_epochs=1)
    trained = trainer.head.centers.detach().clone()
    assert not torch.allclose(trained, expected, atol=1e-5)  # the centres moved
    resumed = Trainer(config, resume=True, progress=False, dataset=dataset)
    assert torch.equal(resumed.head.centers, trained)  # a resume never re-initialises them


def test_switching_to_arconvl_with_class_means_uses_the_current_backbone(tmp_path):
    dataset = three_class_images(3)
    config = mnist_config(tmp_path, tmp_path, train={"stages": [
        {"epochs": 1, "head": {"type": "prototype"}},
        {"epochs": 1, "head": {"type": "arconvl", "init_centers": "class_means"}}], "amp": "off"})
    trainer = Trainer(config, progress=False, dataset=dataset)
    trainer.fit(max_epochs=1)
    expected = class_means_by_hand(trainer, dataset)
    trainer.run_log = NullRunLog()  # fit() closed its log; the switch below happens outside fit()
    trainer._switch_stage(1)
    assert torch.allclose(trainer.head.centers, expected, atol=1e-5)


# ----------------------------------------------------------------------------- runner
@pytest.mark.parametrize("head", ["prototype", "arconvl"])
def test_classify_runner_end_to_end(tmp_path, head):
    write_fake_mnist(tmp_path / "mnist")
    config = mnist_config(tmp_path, tmp_path / "mnist",
                          train={"stages": [{"epochs": 3, "head": {"type": head}}], "amp": "off"})
    results = run_classification(config, progress=False)
    # MNIST-4 of 40 per class: 10 per even class, 40 per odd; 25% held out, stratified (62.5 -> 63).
    counts = np.array(results["train_class_counts"])
    assert counts.sum() == 250 - 63
    assert np.all(np.abs(counts - 0.75 * np.array([10, 40] * 5)) <= 1)
    assert 1 <= results["best_epoch"] <= 3
    assert results["test_gmean"] > 0.5  # the bands are easy; chance would be ~0
    assert set(results["test_class_accuracy"]) == {str(c) for c in range(10)}
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test_gmean"] == pytest.approx(results["test_gmean"])
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [e["val_gmean"] for e in epochs if e["event"] == "epoch"]
    assert results["best_val_gmean"] == pytest.approx(max(val))
    assert results["best_epoch"] == 1 + int(np.argmax(val))


COSINE_HEAD = "train.stages.0.head={type: cosface, s: 1.0, m: 0.0}"
METHODS = {
    "focal": ["train.stages.0.loss.type=focal"],
    "cb": ["train.stages.0.loss.type=class_balanced"],
    "la": ["train.stages.0.loss.type=logit_adjusted"],
    "mm_drw": ["train.stages.0.loss.type=mm", "train.stages.0.drw={start_epoch: 0}"],
    "ldam_drw": [COSINE_HEAD, "train.stages.0.loss.type=ldam", "train.stages.0.drw={start_epoch: 0}"],
    "mm_ldam_drw": [COSINE_HEAD, "train.stages.0.loss={type: mm, ldam: true}", "train.stages.0.drw={start_epoch: 0}"],
    "umm": ["model.dropout=0.5", "train.uncertainty={passes: 3, max_per_class: 8}",
            "train.stages.0.head={type: lsoftmax, m: 3, margin_source: uncertainty, lambda_base: 10.0, lambda_min: 1.0}"],
}


def test_classify_cli_trains_every_stage_loss(tmp_path, capsys):
    write_fake_mnist(tmp_path / "mnist", train_per_class=16, test_per_class=4)
    for name, overrides in METHODS.items():
        code = main(["classify", "--config", "mnist_imbalanced", "--quiet", f"output_dir={tmp_path / name}",
                     f"classify.root={tmp_path / 'mnist'}", "classify.imbalance_ratio=2", "data.batch_size=16",
                     "train.stages.0.epochs=1", *overrides])
        assert code == 0, (name, capsys.readouterr().err)
        assert (tmp_path / name / "results.json").is_file()
    assert "test G-mean" in capsys.readouterr().out
    # UMM estimated class uncertainty on the in-memory images and set integer margins from it.
    margins = json.loads((tmp_path / "umm" / "uncertainty.json").read_text())["class_margin"]
    assert len(margins) == 10 and all(1 <= m <= 3 for m in margins)


def test_classify_without_its_section_is_a_clear_error(tmp_path, capsys):
    assert main(["classify", "--config", "demo", f"output_dir={tmp_path}"]) == 2
    assert "no 'classify' section" in capsys.readouterr().err
