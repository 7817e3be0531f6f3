"""End-of-epoch validation and model selection: a validator's metrics, and which epoch best.pt holds."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from facepipe.config import MEAN_SET_NAME, ValidationConfig, ValidationSetConfig
from facepipe.data.dataset import DecodedImagesDataset, decode_encoded_image, decode_image
from facepipe.data.transforms import build_eval_transform
from facepipe.eval.insightface_bin import load_bin
from facepipe.eval.pairs_job import PairsOnDisk, load_pairs
from facepipe.eval.verification import cosine_scores, evaluate_verification
from facepipe.models.loaded import embed_dataset, extract_embeddings
from facepipe.runtime.checkpoint import BEST

log = logging.getLogger(__name__)

# Each set's verification metrics, named val_<metric> (one pairs file) or val_<set>_<metric>.
# accuracy: at the best threshold over all pairs (what model selection uses); accuracy_10fold:
# 10-fold cross-validation (contiguous folds), the protocol's reported accuracy.
VERIFICATION_METRICS = ("accuracy", "accuracy_10fold", "accuracy_10fold_std", "auc")
# Of those, the ones averaged over the sets (val_mean_<metric>).
MEAN_METRICS = ("accuracy", "accuracy_10fold", "auc")


class Validator(Protocol):
    """End-of-epoch evaluation of a trainer (its model in eval mode): returns metrics, among them
    ``metric`` (higher is better), which selects the best checkpoint. A validator may also have
    ``selection`` (why ``metric``, for the log) and ``selection_id`` (what a checkpoint records
    as the measure of its best; default ``metric``)."""

    metric: str
    every_epochs: int

    def __call__(self, trainer: Any) -> dict[str, Any]: ...


def verification_metrics(embeddings: np.ndarray, idx_a: np.ndarray, idx_b: np.ndarray, is_same: np.ndarray,
                         prefix: str) -> dict[str, Any]:
    """:data:`VERIFICATION_METRICS` of the pairs (rows of ``embeddings``), named ``prefix + metric``."""
    result = evaluate_verification(cosine_scores(embeddings, idx_a, idx_b), is_same)
    values = (result.best_threshold_accuracy, result.accuracy_mean, result.accuracy_std, result.auc)
    return {f"{prefix}{name}": value for name, value in zip(VERIFICATION_METRICS, values)}


class PairsValidator:
    """Verification on the configured pairs (``train.validation.pairs``): ``val_accuracy`` is the
    accuracy at the best threshold (what model selection uses), beside the 10-fold accuracy and
    the AUC. The images are read from their files at each validation."""

    metric = "val_accuracy"

    def __init__(self, pairs: PairsOnDisk, every_epochs: int) -> None:
        self.pairs = pairs
        self.every_epochs = every_epochs

    def __call__(self, trainer: Any) -> dict[str, Any]:
        pairs, config = self.pairs, trainer.config
        embeddings = extract_embeddings(
            trainer.model, pairs.paths, config.data.image_size, trainer.device,
            batch_size=config.embed.batch_size, flip=config.embed.flip, amp_dtype=trainer.amp_dtype,
        )
        return verification_metrics(embeddings, pairs.idx_a, pairs.idx_b, pairs.is_same, "val_")


@dataclass(eq=False)
class ValidationSet:
    """One set of ``train.validation.sets`` read for a run: its images decoded once at the
    model's input size (``pixels``, uint8 ``[N, H, W, 3]``; None on a rank that never
    validates) and its pairs as rows of them (a .bin file: pair i = images 2i and 2i+1)."""

    name: str
    source: str
    pixels: np.ndarray | None
    idx_a: np.ndarray
    idx_b: np.ndarray
    is_same: np.ndarray


def decode_images(count: int, read: Callable[[int], np.ndarray], image_size: tuple[int, int]) -> np.ndarray:
    """Images ``read(0) .. read(count - 1)`` (HxWx3 uint8 RGB) through the eval transform, as
    ``facepipe eval`` reads image files for the same model (:func:`build_eval_transform`), kept
    as uint8 ``[count, H, W, 3]`` before the float scaling."""
    transform = build_eval_transform(image_size)
    pixels = np.empty((count, *image_size, 3), dtype=np.uint8)
    for i in range(count):
        pixels[i] = transform.pixels(read(i))
    return pixels


def read_validation_set(spec: ValidationSetConfig, image_size: tuple[int, int], decode: bool) -> ValidationSet:
    """A set's pairs, checked as ``facepipe eval bin`` / ``eval pairs`` check them; its images
    decoded only when ``decode``."""
    if spec.bin is not None:
        pairs = load_bin(spec.bin)
        first = np.arange(0, len(pairs.images), 2)
        idx_a, idx_b, is_same = first, first + 1, pairs.is_same

        def read(i: int) -> np.ndarray:
            return decode_encoded_image(pairs.images[i], f"image {i} (pair {i // 2}) of {pairs.path}")
        count, source = len(pairs.images), spec.bin
    else:
        on_disk = load_pairs(spec.pairs, spec.root, spec.allow_outside_root)
        idx_a, idx_b, is_same = on_disk.idx_a, on_disk.idx_b, on_disk.is_same

        def read(i: int) -> np.ndarray:
            return decode_image(on_disk.paths[i])
        count, source = len(on_disk.paths), spec.pairs
    pixels = decode_images(count, read, image_size) if decode else None
    if pixels is not None:
        log.info("validation set %s: %d pairs of %d images from %s, decoded once at %dx%d (%.0f MB)", spec.name,
                 len(is_same), count, source, image_size[0], image_size[1], pixels.nbytes / 2**20)
    return ValidationSet(spec.name, source, pixels, idx_a, idx_b, is_same)


class SetsValidator:
    """Verification on each set of ``train.validation.sets``: every set's
    :data:`VERIFICATION_METRICS` as ``val_<name>_<metric>`` and their means as
    ``val_mean_<metric>`` (:data:`MEAN_METRICS`). best.pt follows ``val_mean_accuracy``, or one
    set's ``val_<name>_accuracy`` (``select_by``). The images were decoded once
    (:func:`read_validation_set`); each validation only embeds them."""

    def __init__(self, sets: Sequence[ValidationSet], every_epochs: int, select_by: str = MEAN_SET_NAME) -> None:
        self.sets = list(sets)
        self.every_epochs = every_epochs
        self.metric = f"val_{select_by}_accuracy"
        names = [item.name for item in self.sets]
        if select_by == MEAN_SET_NAME:
            self.selection = (f"train.validation.select_by: {MEAN_SET_NAME} (the default): the mean over the "
                              f"{len(names)} sets {', '.join(names)} of each one's accuracy at its best threshold")
            # A mean over other sets is another measure: a resume with other sets selects afresh.
            self.selection_id = f"{self.metric} over {', '.join(names)}"
        else:
            self.selection = (f"train.validation.select_by: {select_by}: set {select_by}'s accuracy at its best "
                              f"threshold; the other sets ({', '.join(n for n in names if n != select_by) or 'none'}) "
                              "are logged, not used")
            self.selection_id = self.metric

    def __call__(self, trainer: Any) -> dict[str, Any]:
        config = trainer.config
        metrics: dict[str, Any] = {}
        for item in self.sets:
            if item.pixels is None:
                raise RuntimeError(f"validation set {item.name} was not decoded on this process (only rank 0 "
                                   "validates)")
            embeddings = embed_dataset(trainer.model, DecodedImagesDataset(item.pixels), trainer.device,
                                       batch_size=config.embed.batch_size, flip=config.embed.flip,
                                       amp_dtype=trainer.amp_dtype)
            metrics.update(verification_metrics(embeddings, item.idx_a, item.idx_b, item.is_same, f"val_{item.name}_"))
        for name in MEAN_METRICS:
            metrics[f"val_{MEAN_SET_NAME}_{name}"] = float(np.mean([metrics[f"val_{item.name}_{name}"]
                                                                    for item in self.sets]))
        return metrics


def configured_validator(spec: ValidationConfig | None, image_size: tuple[int, int],
                         decode: bool = True) -> Validator | None:
    """The validator of ``train.validation`` (None: no validation set). Every process reads and
    checks the files; only where ``decode`` (rank 0, the one process that validates) are the
    images of ``sets`` decoded."""
    if spec is None:
        return None
    if spec.sets is None:
        return PairsValidator(load_pairs(spec.pairs, spec.root, spec.allow_outside_root), spec.every_epochs)
    return SetsValidator([read_validation_set(item, image_size, decode) for item in spec.sets], spec.every_epochs,
                         spec.selected)


def selection_id(validator: Validator | None) -> str | None:
    """What a checkpoint records as the measure of its best (``best_selection``; None: no
    validator): a resume keeps the best only when it measures the same."""
    return None if validator is None else getattr(validator, "selection_id", validator.metric)


def announce_selection(validator: Validator | None, run_dir: Path, is_main: bool) -> None:
    """Log how this run selects best.pt (and warn of a stale best.pt when it no longer does)."""
    if validator is not None:
        selection = getattr(validator, "selection", None)
        log.info("model selection: best.pt is the epoch of the highest %s%s", validator.metric,
                 f" ({selection})" if selection else "")
        return
    log.info("no validation set (train.validation) is configured: only latest.pt is written, no best.pt")
    if is_main and (run_dir / BEST).exists():
        log.warning("%s is left from before this run continued without a validation set; it is no "
                    "longer updated: latest.pt is the model this run trains", run_dir / BEST)


def restored_best(state: dict[str, Any], validator: Validator | None, path: str | Path) -> tuple[float, int | None]:
    """(best_metric, best_epoch) of a checkpoint, kept only when they measure what ``validator``
    measures. Without a validator there is no best (checkpoints written before issue 26 hold the
    negated training loss there, a rule no longer used)."""
    metric = selection_id(validator)
    # Older checkpoints: best_metric_name alone, or nothing (then assume the same).
    saved_metric = state.get("best_selection", state.get("best_metric_name", metric))
    if metric is None or saved_metric != metric:
        if metric is not None and saved_metric is not None:
            log.info("%s selected best.pt by %s; this run selects by %s and starts its selection afresh",
                     path, saved_metric, metric)
        return -math.inf, None
    best_epoch = state.get("best_epoch")
    return float(state["best_metric"]), None if best_epoch is None else int(best_epoch)


def judge_epoch(metrics: dict[str, Any], validator: Validator | None, best_metric: float,
                best_epoch: int | None) -> tuple[float | None, str]:
    """The score of the epoch just finished if it becomes best.pt (else None), and why. Only the
    validator's metric selects (the training losses of stages with different heads are not
    comparable): no validator, no best.pt."""
    if validator is None:
        return None, "no validation set: only latest.pt is written"
    name = validator.metric
    if name not in metrics:
        return None, f"not validated this epoch (validation every {validator.every_epochs} epochs)"
    score = float(metrics[name])
    if not math.isfinite(score):
        return None, f"{name} is {score}"
    previous = (f"previous best {best_metric:.6g}" if best_epoch is None
                else f"previous best {best_metric:.6g} (epoch {best_epoch})")
    if score > best_metric:
        reason = (f"{name} {score:.6g} > {previous}" if math.isfinite(best_metric)
                  else f"{name} {score:.6g}, the first validated epoch")
        return score, reason
    return None, f"{name} {score:.6g} <= {previous}"
