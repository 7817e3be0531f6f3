"""End-of-epoch validation and model selection: a validator's metrics, and which epoch best.pt holds."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Protocol

from facepipe.config import ValidationConfig
from facepipe.eval.pairs_job import PairsOnDisk, load_pairs
from facepipe.eval.verification import cosine_scores, evaluate_verification
from facepipe.models.loaded import extract_embeddings
from facepipe.runtime.checkpoint import BEST

log = logging.getLogger(__name__)


class Validator(Protocol):
    """End-of-epoch evaluation of a trainer (its model in eval mode): returns metrics, among them
    ``metric`` (higher is better), which selects the best checkpoint."""

    metric: str
    every_epochs: int

    def __call__(self, trainer: Any) -> dict[str, Any]: ...


class PairsValidator:
    """Verification on the configured pairs (``train.validation``): ``val_accuracy`` is the accuracy
    at the best threshold (what model selection uses), beside the 10-fold accuracy and the AUC."""

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
        scores = cosine_scores(embeddings, pairs.idx_a, pairs.idx_b)
        result = evaluate_verification(scores, pairs.is_same)
        return {"val_accuracy": result.best_threshold_accuracy, "val_accuracy_10fold": result.accuracy_mean,
                "val_accuracy_10fold_std": result.accuracy_std, "val_auc": result.auc}


def pairs_validator(spec: ValidationConfig | None) -> PairsValidator | None:
    """The validator of ``train.validation`` (None: no validation set)."""
    return None if spec is None else PairsValidator(load_pairs(spec.pairs, spec.root, spec.allow_outside_root),
                                                    spec.every_epochs)


def announce_selection(validator: Validator | None, run_dir: Path, is_main: bool) -> None:
    """Log how this run selects best.pt (and warn of a stale best.pt when it no longer does)."""
    if validator is not None:
        log.info("model selection: best.pt is the epoch of the highest %s", validator.metric)
        return
    log.info("no validation set (train.validation) is configured: only latest.pt is written, no best.pt")
    if is_main and (run_dir / BEST).exists():
        log.warning("%s is left from before this run continued without a validation set; it is no "
                    "longer updated: latest.pt is the model this run trains", run_dir / BEST)


def restored_best(state: dict[str, Any], validator: Validator | None, path: str | Path) -> tuple[float, int | None]:
    """(best_metric, best_epoch) of a checkpoint, kept only when they measure what ``validator``
    measures. Without a validator there is no best (checkpoints written before issue 26 hold the
    negated training loss there, a rule no longer used)."""
    metric = validator.metric if validator is not None else None
    saved_metric = state.get("best_metric_name", metric)  # older checkpoints: assume the same
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
