"""Imbalance-aware classification metrics for closed-set identification and attribute-style tasks.

Plain accuracy is dominated by the head classes of a long-tailed label distribution, so these
are reported beside it (all from scikit-learn and imbalanced-learn, not re-derived here):

* per-class recall, precision, F1, specificity and support;
* balanced accuracy: the mean per-class recall (Huang et al. Sec. 5.1;
  ``sklearn.metrics.balanced_accuracy_score``);
* G-mean: the geometric mean of the per-class recalls (``imblearn.metrics.geometric_mean_score``,
  ``average="multiclass"``), zero as soon as one class is never recognised;
* IBA, the index of balanced accuracy (García, Mollineda and Sánchez 2009):
  ``(1 + alpha * (macro recall - macro specificity)) * G-mean^2`` with ``alpha = 0.1``
  (``imblearn.metrics.make_index_balanced_accuracy``), and per class one-vs-rest;
* macro / weighted F1 and macro precision (Khan et al. Table 5; Li et al.).

:func:`closed_set_predictions` turns embeddings into predictions for closed-set identification:
each probe takes the identity of its nearest gallery embedding (cosine similarity).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from imblearn.metrics import (
    classification_report_imbalanced,
    geometric_mean_score,
    make_index_balanced_accuracy,
)
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
)

from facepipe.eval.verification import EvalInputError

__all__ = ["ImbalanceMetrics", "closed_set_predictions", "imbalance_metrics"]

_CHUNK = 4096


@dataclass(eq=False)
class ImbalanceMetrics:
    """Per-class and aggregate metrics of one set of predictions (see :func:`imbalance_metrics`)."""

    labels: list[Any]
    support: np.ndarray
    recall: np.ndarray
    precision: np.ndarray
    f1: np.ndarray
    specificity: np.ndarray
    gmean_per_class: np.ndarray  # one-vs-rest sqrt(recall * specificity)
    iba_per_class: np.ndarray  # one-vs-rest IBA
    accuracy: float
    balanced_accuracy: float
    gmean: float
    iba: float
    macro_f1: float
    weighted_f1: float
    macro_precision: float
    alpha: float
    extras: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        per_class = {
            str(label): {"support": int(self.support[i]), "recall": float(self.recall[i]),
                         "precision": float(self.precision[i]), "f1": float(self.f1[i]),
                         "specificity": float(self.specificity[i]), "gmean": float(self.gmean_per_class[i]),
                         "iba": float(self.iba_per_class[i])}
            for i, label in enumerate(self.labels)
        }
        return {"accuracy": self.accuracy, "balanced_accuracy": self.balanced_accuracy, "gmean": self.gmean,
                "iba": self.iba, "iba_alpha": self.alpha, "macro_f1": self.macro_f1, "weighted_f1": self.weighted_f1,
                "macro_precision": self.macro_precision, "per_class": per_class}

    def summary(self) -> str:
        return (f"acc {100 * self.accuracy:.2f} %  balanced acc {100 * self.balanced_accuracy:.2f} %  "
                f"G-mean {self.gmean:.4f}  IBA {self.iba:.4f}  macro F1 {self.macro_f1:.4f}  "
                f"macro precision {self.macro_precision:.4f}")


def imbalance_metrics(
    y_true: Sequence[Any], y_pred: Sequence[Any], labels: Sequence[Any] | None = None, alpha: float = 0.1
) -> ImbalanceMetrics:
    """Imbalance metrics of predictions ``y_pred`` for true classes ``y_true``.

    ``labels``: the classes to report, in order (default: every class in ``y_true`` or
    ``y_pred``, sorted). A class that is never predicted has precision 0 (scikit-learn's
    ``zero_division=0``), which also makes its F1 0, rather than a warning and NaN.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape:
        raise EvalInputError(f"y_true and y_pred must be 1-D and of equal length, got {y_true.shape} and {y_pred.shape}")
    if y_true.size == 0:
        raise EvalInputError("no predictions to score")
    labels = list(np.unique(np.concatenate((y_true, y_pred)))) if labels is None else list(labels)
    if len(labels) < 2:
        raise EvalInputError("imbalance metrics need at least 2 classes")
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0)
    report = classification_report_imbalanced(y_true, y_pred, labels=labels, output_dict=True, alpha=alpha,
                                              zero_division=0)
    keys = [str(label) for label in labels]
    iba_score = make_index_balanced_accuracy(alpha=alpha, squared=True)(geometric_mean_score)
    return ImbalanceMetrics(
        labels=labels,
        support=np.asarray(support, dtype=np.int64),
        recall=np.asarray(recall, dtype=np.float64),
        precision=np.asarray(precision, dtype=np.float64),
        f1=np.asarray(f1, dtype=np.float64),
        specificity=np.array([report[k]["spe"] for k in keys], dtype=np.float64),
        gmean_per_class=np.array([report[k]["geo"] for k in keys], dtype=np.float64),
        iba_per_class=np.array([report[k]["iba"] for k in keys], dtype=np.float64),
        accuracy=float(accuracy_score(y_true, y_pred)),
        balanced_accuracy=float(balanced_accuracy_score(y_true, y_pred)),
        gmean=float(geometric_mean_score(y_true, y_pred, labels=labels, average="multiclass")),
        iba=float(iba_score(y_true, y_pred, labels=labels, average="multiclass")),
        macro_f1=float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        weighted_f1=float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        macro_precision=float(precision_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        alpha=float(alpha),
    )


def closed_set_predictions(
    gallery: np.ndarray, gallery_labels: Sequence[Any], probes: np.ndarray
) -> np.ndarray:
    """Closed-set identification: the label of each probe's most similar gallery embedding
    (cosine similarity; ties go to the first gallery row)."""
    gallery = np.asarray(gallery, dtype=np.float64)
    probes = np.asarray(probes, dtype=np.float64)
    gallery_labels = np.asarray(gallery_labels)
    if gallery.ndim != 2 or probes.ndim != 2 or gallery.shape[1] != probes.shape[1]:
        raise EvalInputError(f"gallery {gallery.shape} and probes {probes.shape} must be 2-D with one dimension")
    if gallery_labels.shape != (gallery.shape[0],):
        raise EvalInputError(f"{gallery_labels.shape[0]} gallery labels for {gallery.shape[0]} gallery rows")
    if gallery.shape[0] == 0:
        raise EvalInputError("the gallery is empty")

    def unit(x: np.ndarray, what: str) -> np.ndarray:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if np.any(norms == 0) or not np.all(np.isfinite(norms)):
            raise EvalInputError(f"{what} embeddings contain zero-norm or non-finite rows")
        return x / norms

    gallery = unit(gallery, "gallery")
    probes = unit(probes, "probe")
    nearest = np.empty(probes.shape[0], dtype=np.int64)
    for start in range(0, probes.shape[0], _CHUNK):
        nearest[start:start + _CHUNK] = np.argmax(probes[start:start + _CHUNK] @ gallery.T, axis=1)
    return gallery_labels[nearest]
