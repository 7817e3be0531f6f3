"""``facepipe classify``: Li et al.'s imbalanced-image classification protocol (Sec. 4.1).

MNIST-q (a random 1/q of each even class, all odd ones), a stratified 10 % of it held out for
validation, the same trainer as the face models (any head and stage loss, the ARConvL head
included), the epoch of best validation G-mean kept, then G-mean and per-class accuracy on the
official test set through :func:`facepipe.eval.imbalance.imbalance_metrics`.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facepipe.config import Config, ConfigError
from facepipe.data.mnist import TensorImageDataset, imbalanced_subset, load_mnist, stratified_split
from facepipe.eval.imbalance import imbalance_metrics
from facepipe.runtime.checkpoint import BEST, load_checkpoint
from facepipe.runtime.device import autocast
from facepipe.runtime.io import write_json_atomic
from facepipe.train.trainer import Trainer

log = logging.getLogger(__name__)

RESULTS = "results.json"


def predict(trainer: Trainer, images: torch.Tensor, batch_size: int) -> np.ndarray:
    """The head's predicted class of every image (eval mode, no margins)."""
    trainer.model.eval()
    trainer.head.eval()
    predictions = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(trainer.device)
            with autocast(trainer.device, trainer.amp_dtype):
                embeddings = trainer.model(batch)
            predictions.append(trainer.class_scores(embeddings.float()).argmax(1).cpu())
    return torch.cat(predictions).numpy()


class GMeanValidator:
    """Validation G-mean (Li et al. select the epoch by it), with balanced and plain accuracy."""

    metric = "val_gmean"
    every_epochs = 1

    def __init__(self, dataset: TensorImageDataset, batch_size: int) -> None:
        self.dataset = dataset
        self.batch_size = batch_size

    def __call__(self, trainer: Trainer) -> dict[str, Any]:
        predicted = predict(trainer, self.dataset.images, self.batch_size)
        metrics = imbalance_metrics(self.dataset.labels, predicted, labels=range(self.dataset.num_classes))
        return {"val_gmean": metrics.gmean, "val_balanced_accuracy": metrics.balanced_accuracy,
                "val_accuracy": metrics.accuracy}


def classification_data(config: Config) -> tuple[TensorImageDataset, TensorImageDataset, TensorImageDataset]:
    """(train, validation, test) datasets of the configured protocol; the subset and the split are
    drawn from ``config.seed``."""
    spec = config.classify
    images, labels = load_mnist(spec.root, "train")
    test_images, test_labels = load_mnist(spec.root, "test")
    names = [str(c) for c in range(int(labels.max()) + 1)]
    kept = imbalanced_subset(labels, spec.imbalance_ratio, spec.minority_classes, seed=config.seed)
    train_pos, val_pos = stratified_split(labels[kept], spec.val_fraction, seed=config.seed)
    return (TensorImageDataset(images[kept[train_pos]], labels[kept[train_pos]], names),
            TensorImageDataset(images[kept[val_pos]], labels[kept[val_pos]], names),
            TensorImageDataset(test_images, test_labels, names))


def run_classification(config: Config, resume: bool = False, progress: bool = True,
                       overwrite: bool = False) -> dict[str, Any]:
    """Python API of ``facepipe classify``: train, keep the best-validation epoch, test it.

    Writes the trainer's run folder plus ``results.json`` (test G-mean, per-class accuracy, best
    epoch, wall time). ``resume`` continues an interrupted run from its ``latest.pt`` (and starts
    one when there is none); ``overwrite`` replaces a run already in the folder.
    """
    if config.classify is None:
        raise ConfigError("the config has no 'classify' section (dataset root, imbalance ratio q)")
    if config.model.arch != "mnist_cnn":
        log.warning("model.arch is %s; Li et al. use mnist_cnn for MNIST", config.model.arch)
    train_set, val_set, test_set = classification_data(config)
    if tuple(config.data.image_size) != train_set.image_size:
        raise ConfigError(f"data.image_size {list(config.data.image_size)} does not match the images "
                          f"({list(train_set.image_size)})")
    started = time.perf_counter()
    trainer = Trainer(config, resume=resume and (Path(config.output_dir) / "latest.pt").is_file(),
                      progress=progress, dataset=train_set, overwrite=overwrite,
                      validator=GMeanValidator(val_set, config.classify.eval_batch_size))
    trainer.fit()
    train_seconds = time.perf_counter() - started
    best_path = Path(config.output_dir) / BEST
    best_epoch = int(load_checkpoint(best_path)["epoch"])
    trainer.resume(best_path)
    predicted = predict(trainer, test_set.images, config.classify.eval_batch_size)
    metrics = imbalance_metrics(test_set.labels, predicted, labels=range(test_set.num_classes))
    results = {
        "imbalance_ratio": config.classify.imbalance_ratio,
        "train_class_counts": np.bincount(train_set.labels, minlength=train_set.num_classes).tolist(),
        "best_epoch": best_epoch,
        "best_val_gmean": trainer.best_metric,
        "test_gmean": metrics.gmean,
        "test_balanced_accuracy": metrics.balanced_accuracy,
        "test_accuracy": metrics.accuracy,
        "test_class_accuracy": {str(c): float(r) for c, r in zip(metrics.labels, metrics.recall)},
        "train_seconds": train_seconds,
        "resumed": resume,
    }
    write_json_atomic(Path(config.output_dir) / RESULTS, results)
    log.info("test G-mean %.4f (best epoch %d, val G-mean %.4f)", metrics.gmean, best_epoch, trainer.best_metric)
    return results
