"""Face-verification metrics: pair scores, threshold accuracy, k-fold (LFW) accuracy, ROC.

Conventions used throughout:

* A *pair* is two samples; ``is_same`` is 1/True for a matched (genuine) pair and 0/False for a
  mismatched (impostor) pair.
* Higher score means more similar; a pair is declared "same" when ``score >= threshold``.
* TAR (true accept rate) = TPR, FAR (false accept rate) = FPR.

Pure numpy / scikit-learn: nothing here imports torch, so evaluation runs on any machine that
has the saved embeddings.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from facepipe.errors import EvalInputError
from facepipe.runtime.io import atomic_write

__all__ = [
    "EvalInputError",
    "VerificationResult",
    "accuracy_at_threshold",
    "best_threshold",
    "correct_at_threshold",
    "cosine_scores",
    "evaluate_verification",
    "format_far",
    "kfold_accuracy",
    "make_pairs",
    "mcnemar_exact",
    "read_pairs_csv",
    "roc_metrics",
    "score_missing_as_wrong",
    "tail_roc",
    "write_pairs_csv",
]

PAIRS_CSV_HEADER = ("path_a", "path_b", "is_same")

# fold_scheme of a result whose threshold came from a separate set of pairs.
SEPARATE_THRESHOLD = "separate"

# Pairs are scored in chunks so that scoring millions of pairs (MegaFace-style distractor
# protocols) never materialises two (num_pairs, dim) float64 copies at once.
_SCORE_CHUNK = 65536


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------
def _as_is_same(is_same: Any, name: str = "is_same") -> np.ndarray:
    arr = np.asarray(is_same)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.number) and arr.size:
        raise ValueError(f"{name} must contain only 0/1 or booleans, got dtype {arr.dtype}")
    n_bad = int((~np.isin(arr, (0, 1))).sum()) if arr.size else 0
    if n_bad:
        raise ValueError(f"{name} must contain only 0/1 or booleans; {n_bad} value(s) are not")
    return arr.astype(bool)


def _check_scores(scores: Any, is_same: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise ValueError(f"scores must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64, copy=False)
    y = _as_is_same(is_same)
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"scores and is_same differ in length: {s.shape[0]} != {y.shape[0]}")
    if s.shape[0] == 0:
        raise ValueError("scores and is_same are empty")
    n_bad = int((~np.isfinite(s)).sum())
    if n_bad:
        raise ValueError(f"scores contain {n_bad} non-finite value(s) (NaN or inf) out of {s.shape[0]}")
    return s, y


def _check_both_classes(y: np.ndarray) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.shape[0]:
        raise ValueError(
            f"ROC metrics need both matched and mismatched pairs; got {n_pos} matched and "
            f"{y.shape[0] - n_pos} mismatched"
        )


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------
def cosine_scores(embeddings: np.ndarray, idx_a: np.ndarray, idx_b: np.ndarray) -> np.ndarray:
    """Cosine similarity of the embedding rows ``idx_a[i]`` and ``idx_b[i]`` for every pair i.

    Rows are L2-normalised here (inputs need not be normalised); computation is in float64 and
    the result is clipped to [-1, 1]. Rows with zero norm or non-finite values have no defined
    direction and raise :class:`EvalInputError` (a ValueError) instead of producing NaN scores.
    """
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (num_samples, dim), got shape {emb.shape}")
    ia = np.asarray(idx_a)
    ib = np.asarray(idx_b)
    for name, idx in (("idx_a", ia), ("idx_b", ib)):
        if idx.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {idx.shape}")
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"{name} must hold integer indices, got dtype {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= emb.shape[0]):
            raise ValueError(
                f"{name} has indices outside [0, {emb.shape[0]}): min {idx.min()}, max {idx.max()}"
            )
    if ia.shape[0] != ib.shape[0]:
        raise ValueError(f"idx_a and idx_b differ in length: {ia.shape[0]} != {ib.shape[0]}")

    out = np.empty(ia.shape[0], dtype=np.float64)
    for start in range(0, ia.shape[0], _SCORE_CHUNK):
        stop = start + _SCORE_CHUNK
        ea = emb[ia[start:stop]].astype(np.float64)
        eb = emb[ib[start:stop]].astype(np.float64)
        na = np.sqrt(np.einsum("ij,ij->i", ea, ea))
        nb = np.sqrt(np.einsum("ij,ij->i", eb, eb))
        bad = ~(np.isfinite(na) & np.isfinite(nb) & (na > 0) & (nb > 0))
        if bad.any():
            # The embeddings' fault (a damaged .npy, a diverged checkpoint), not the caller's.
            raise EvalInputError(
                f"{int(bad.sum())} pair(s) reference embedding rows with zero norm or non-finite "
                "values; cosine similarity is undefined for them"
            )
        out[start:stop] = np.einsum("ij,ij->i", ea, eb) / (na * nb)
    # Rounding can push |cos| a few ulps past 1 for (near-)identical rows.
    np.clip(out, -1.0, 1.0, out=out)
    return out


# --------------------------------------------------------------------------------------------
# Threshold accuracy
# --------------------------------------------------------------------------------------------
def _cut_thresholds(values: np.ndarray) -> np.ndarray:
    """Thresholds for the m + 1 cuts of m sorted distinct values.

    Cut k (k = 0..m) declares "same" exactly the values ``values[k:]``. Interior cuts sit at the
    midpoint of the neighbours; the outer ones half a mean gap beyond min / max (1.0 when there
    is a single distinct value). Each threshold is nudged when rounding would put it on a
    neighbour and so change which values it separates.
    """
    m = values.shape[0]
    margin = 0.5 * (values[-1] - values[0]) / (m - 1) if m > 1 else 1.0
    thr = np.empty(m + 1, dtype=np.float64)
    thr[0] = values[0] - margin
    thr[-1] = values[-1] + margin
    if m > 1:
        lo, hi = values[:-1], values[1:]
        mid = lo + 0.5 * (hi - lo)
        # Adjacent floats have no representable midpoint; hi itself still cuts between them.
        thr[1:-1] = np.where(mid > lo, mid, hi)
    if not thr[0] < values[0]:
        thr[0] = np.nextafter(values[0], -np.inf)
    if not (thr[-1] > values[-1] and np.isfinite(thr[-1])):
        thr[-1] = np.nextafter(values[-1], np.inf)
    return thr


def _best_threshold(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    values, inverse = np.unique(s, return_inverse=True)
    inverse = inverse.ravel()
    m = values.shape[0]
    pos_per_value = np.bincount(inverse, weights=y.astype(np.float64), minlength=m)
    neg_per_value = np.bincount(inverse, weights=(~y).astype(np.float64), minlength=m)
    # Cut k: values[:k] are declared "different" (correct for the negatives among them),
    # values[k:] "same" (correct for the positives among them).
    neg_below = np.concatenate(([0.0], np.cumsum(neg_per_value)))
    pos_below = np.concatenate(([0.0], np.cumsum(pos_per_value)))
    correct = neg_below + (pos_below[-1] - pos_below)
    k = int(np.argmax(correct))  # first maximum = smallest threshold among equally good cuts
    return float(_cut_thresholds(values)[k]), float(correct[k] / s.shape[0])


def best_threshold(scores: Any, is_same: Any) -> tuple[float, float]:
    """Threshold maximising the accuracy of the rule ``score >= threshold -> same``.

    Exact search over every distinct decision: with the m distinct scores sorted, the m + 1
    candidate cuts are below the minimum (everything "same"), the midpoints between consecutive
    distinct scores, and above the maximum (everything "different"). Accuracies of all cuts
    come from cumulative sums of per-value class counts, so the search is O(n log n) (one sort)
    and equal scores always fall on the same side. Among cuts with equal accuracy the smallest
    threshold wins.

    Returns ``(threshold, accuracy)`` with accuracy as a fraction in [0, 1].
    """
    s, y = _check_scores(scores, is_same)
    return _best_threshold(s, y)


def correct_at_threshold(scores: Any, is_same: Any, threshold: float) -> np.ndarray:
    """Per pair, whether the rule ``score >= threshold -> same`` decides it right (bool array)."""
    s, y = _check_scores(scores, is_same)
    threshold = float(threshold)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    return (s >= threshold) == y


def accuracy_at_threshold(scores: Any, is_same: Any, threshold: float) -> float:
    """Accuracy (fraction in [0, 1]) of the rule ``score >= threshold -> same``."""
    return float(np.mean(correct_at_threshold(scores, is_same, threshold)))


def mcnemar_exact(correct_a: Any, correct_b: Any) -> dict:
    """Exact (binomial) McNemar test of two classifiers decided on the same pairs.

    Only the discordant pairs carry information: ``b`` = pairs rule A gets right and rule B
    wrong, ``c`` = the reverse. Under the null hypothesis of equal accuracy each discordant pair
    is a fair coin, so the two-sided p-value is that of ``b`` successes in ``b + c`` Bernoulli(1/2)
    trials (McNemar 1947; the exact form, since ``b + c`` is small for 1,000 LFW pairs).
    Returns ``{"a_only": b, "b_only": c, "p_value": p}``; p is 1.0 when there is no discordant pair.
    """
    from scipy.stats import binomtest

    a = _as_is_same(correct_a, "correct_a")
    b = _as_is_same(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"correct_a and correct_b differ in shape: {a.shape} vs {b.shape}")
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = a_only + b_only
    p = 1.0 if discordant == 0 else float(binomtest(a_only, discordant, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p_value": p}


def score_missing_as_wrong(scores: Any, is_same: Any, missing: Any) -> np.ndarray:
    """Scores in which every ``missing`` pair is wrong at every threshold inside the score range.

    Used when pairs whose image is missing (or had no face) must be counted as errors rather
    than dropped: a missing matched pair gets a score 1 below the lowest real score and a
    missing mismatched pair 1 above the highest, so it is rejected / accepted by every
    threshold between the real scores and counts as an error in accuracy, ROC, EER and TAR
    alike. The entries of ``scores`` at missing pairs are ignored (pass anything finite).
    """
    s = np.asarray(scores, dtype=np.float64).copy()
    y = _as_is_same(is_same)
    gone = _as_is_same(missing, "missing")
    if not s.shape == y.shape == gone.shape:
        raise ValueError(f"scores, is_same and missing differ in shape: {s.shape}, {y.shape}, {gone.shape}")
    present = s[~gone]
    if present.size and not np.all(np.isfinite(present)):
        raise ValueError("scores of present pairs must be finite")
    low, high = (float(present.min()), float(present.max())) if present.size else (0.0, 0.0)
    s[gone & y] = low - 1.0
    s[gone & ~y] = high + 1.0
    return s


def _fold_ids(n: int, n_folds: int, folds: Any) -> tuple[np.ndarray, str]:
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    if folds is None:
        if n < n_folds:
            raise ValueError(f"cannot split {n} pairs into {n_folds} non-empty folds")
        ids = np.empty(n, dtype=np.int64)
        for k, part in enumerate(np.array_split(np.arange(n), n_folds)):
            ids[part] = k
        return ids, "contiguous"
    ids = np.asarray(folds)
    if ids.shape != (n,):
        raise ValueError(f"folds must have one fold id per pair: shape {ids.shape}, expected ({n},)")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"folds must hold integer fold ids, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= n_folds:
        raise ValueError(
            f"fold ids must lie in [0, n_folds={n_folds}); got min {ids.min()}, max {ids.max()} "
            "(pass n_folds matching the given folds)"
        )
    counts = np.bincount(ids, minlength=n_folds)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(f"fold(s) {empty.tolist()} are empty (n_folds={n_folds})")
    return ids.astype(np.int64), "given"


def kfold_accuracy(
    scores: Any, is_same: Any, n_folds: int = 10, folds: np.ndarray | None = None
) -> dict:
    """Verification accuracy under the LFW k-fold protocol.

    For each fold the threshold is the :func:`best_threshold` of the pairs in all *other*
    folds, and the accuracy of ``score >= threshold -> same`` is measured on the fold itself,
    so no fold's accuracy benefits from a threshold tuned on it. Reported mean and std are over
    the per-fold accuracies (std with ddof=0, as in the usual LFW tooling).

    ``folds`` gives the fold id (0 .. n_folds - 1) of every pair, e.g. the ten LFW/YTF splits;
    without it the pairs are cut into ``n_folds`` contiguous blocks in order
    (``np.array_split``), which only makes sense if the pair order is already shuffled or
    follows the official splits. Raises ValueError if n_folds < 2 or any fold is empty.

    Returns ``{"mean", "std", "fold_accuracies", "fold_thresholds", "n_folds", "fold_scheme"}``
    with ``fold_scheme`` = ``"given"`` or ``"contiguous"``.
    """
    s, y = _check_scores(scores, is_same)
    ids, scheme = _fold_ids(s.shape[0], n_folds, folds)
    accs = np.empty(n_folds, dtype=np.float64)
    thrs = np.empty(n_folds, dtype=np.float64)
    for k in range(n_folds):
        test = ids == k
        thr, _ = _best_threshold(s[~test], y[~test])
        thrs[k] = thr
        accs[k] = float(np.mean((s[test] >= thr) == y[test]))
    return {
        "mean": float(accs.mean()),
        "std": float(accs.std()),
        "fold_accuracies": accs,
        "fold_thresholds": thrs,
        "n_folds": int(n_folds),
        "fold_scheme": scheme,
    }


# --------------------------------------------------------------------------------------------
# ROC
# --------------------------------------------------------------------------------------------
def _tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, far: float) -> float:
    # Linear interpolation on the ROC polyline, as np.interp(far, fpr, tpr) would be if fpr were
    # strictly increasing. fpr repeats along vertical segments; the ROC point for an
    # operating FAR is the top of such a segment, so take the last point with fpr <= far.
    j = int(np.searchsorted(fpr, far, side="right")) - 1
    if j < 0:
        return float(tpr[0])
    if j == fpr.shape[0] - 1 or fpr[j] == far:
        return float(tpr[j])
    w = (far - fpr[j]) / (fpr[j + 1] - fpr[j])
    return float(tpr[j] + w * (tpr[j + 1] - tpr[j]))


def tail_roc(
    genuine_scores: Any,
    impostor_tail: Any,
    num_impostors: int,
    complete_above: float = -np.inf,
    fars: Sequence[float] = (1e-6,),
) -> dict:
    """ROC of a verification set with far more impostor pairs than can be stored.

    MegaFace-style protocols compare every probe with up to a million distractors, so only the
    highest impostor scores are kept (the top k of each probe). The caller guarantees that
    ``impostor_tail`` holds *every* impostor score above ``complete_above`` (for per-probe top-k
    lists: the largest k-th score of any probe); scores at or below it are ignored. FAR is
    counted against all ``num_impostors`` impostor pairs, so the curve is exact from FAR 0 up
    to ``max_exact_far`` = (#tail scores above ``complete_above``) / ``num_impostors``.

    Returns ``{"fpr", "tpr", "thresholds", "tar_at_far", "max_exact_far", "num_genuine",
    "num_impostors"}``: the curve starts at (0, 0) with threshold +inf, one point per distinct
    score; ``tar_at_far`` is interpolated on the curve exactly as in :func:`roc_metrics`, and
    ``None`` for a FAR beyond ``max_exact_far``.
    """
    genuine = np.asarray(genuine_scores, dtype=np.float64).ravel()
    tail = np.asarray(impostor_tail, dtype=np.float64).ravel()
    if genuine.size == 0:
        raise ValueError("tail_roc needs at least one genuine score")
    if isinstance(num_impostors, bool) or not isinstance(num_impostors, (int, np.integer)) or num_impostors < 1:
        raise ValueError(f"num_impostors must be a positive integer, got {num_impostors!r}")
    if not (np.all(np.isfinite(genuine)) and np.all(np.isfinite(tail))):
        raise ValueError("tail_roc scores must be finite")
    complete_above = float(complete_above)
    tail = tail[tail > complete_above]
    if tail.size > num_impostors:
        raise ValueError(f"{tail.size} impostor tail scores exceed num_impostors={num_impostors}")
    kept_genuine = genuine[genuine > complete_above]
    values = np.concatenate((kept_genuine, tail))
    labels = np.concatenate((np.ones(kept_genuine.size, dtype=bool), np.zeros(tail.size, dtype=bool)))
    order = np.argsort(-values, kind="stable")
    values, labels = values[order], labels[order]
    # One ROC point per distinct score: accepted = scores >= that value.
    last_of_value = np.flatnonzero(np.diff(values, append=-np.inf) != 0) if values.size else np.zeros(0, int)
    tps = np.cumsum(labels)[last_of_value] if values.size else np.zeros(0)
    fps = np.cumsum(~labels)[last_of_value] if values.size else np.zeros(0)
    fpr = np.concatenate(([0.0], fps / num_impostors))
    tpr = np.concatenate(([0.0], tps / genuine.size))
    thresholds = np.concatenate(([np.inf], values[last_of_value]))
    max_exact_far = tail.size / num_impostors
    tar = {}
    for far in fars:
        far = float(far)
        if not 0.0 <= far <= 1.0:
            raise ValueError(f"FAR values must lie in [0, 1], got {far}")
        # At FAR == max_exact_far a lower threshold could still add genuine pairs without
        # unseen impostors, so that point is exact only when the whole impostor set is known.
        exact = far < max_exact_far or (far == max_exact_far and complete_above == -np.inf)
        tar[far] = _tpr_at_fpr(fpr, tpr, far) if exact else None
    return {"fpr": fpr, "tpr": tpr, "thresholds": thresholds, "tar_at_far": tar,
            "max_exact_far": float(max_exact_far), "num_genuine": int(genuine.size),
            "num_impostors": int(num_impostors)}


def _eer(fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray) -> tuple[float, float]:
    # fpr + tpr - 1 is non-decreasing along the ROC, from -1 at (0, 0) to +1 at (1, 1), so the
    # crossing of fpr and 1 - tpr lies on the segment ending at its first non-negative value.
    d = fpr + tpr - 1.0
    i = int(np.argmax(d >= 0))
    if d[i] == 0 or i == 0:
        return float(fpr[i]), float(thresholds[i])
    w = -d[i - 1] / (d[i] - d[i - 1])
    eer = fpr[i - 1] + w * (fpr[i] - fpr[i - 1])
    t0, t1 = thresholds[i - 1], thresholds[i]
    # thresholds[0] is +inf (no pair accepted); interpolating towards it is meaningless.
    thr = t0 + w * (t1 - t0) if np.isfinite(t0) else t1
    return float(eer), float(thr)


def roc_metrics(scores: Any, is_same: Any, fars: Sequence[float] = (1e-3, 1e-4)) -> dict:
    """ROC analysis of verification scores (``score >= threshold -> same``).

    * ``auc``: area under the ROC curve (``sklearn.metrics.roc_auc_score``).
    * ``eer``: equal error rate, the point where FAR (fpr) equals FRR (1 - tpr), found by linear
      interpolation on the segment of the ROC curve where the two cross; ``eer_threshold`` is
      the score threshold interpolated the same way.
    * ``tar_at_far``: ``{far: tar}``, TAR at each requested FAR, *interpolated* linearly on the
      ROC curve (np.interp of tpr over fpr; on vertical segments the upper point is used).
      When ``far`` is below 1 / num_negative the value is an interpolation between the ROC
      points around it, not a measured operating point.
    * ``fpr``, ``tpr``, ``thresholds``: the curve from ``sklearn.metrics.roc_curve`` (collinear
      points dropped, which leaves interpolated values unchanged); ``thresholds[0]`` is +inf.

    Raises ValueError unless both matched and mismatched pairs are present.
    """
    s, y = _check_scores(scores, is_same)
    _check_both_classes(y)
    far_values = [float(f) for f in fars]
    for f in far_values:
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"FAR values must lie in [0, 1], got {f}")
    fpr, tpr, thresholds = roc_curve(y, s)
    eer, eer_thr = _eer(fpr, tpr, thresholds)
    return {
        "auc": float(roc_auc_score(y, s)),
        "eer": eer,
        "eer_threshold": eer_thr,
        "tar_at_far": {f: _tpr_at_fpr(fpr, tpr, f) for f in far_values},
        "fpr": fpr,
        "tpr": tpr,
        "thresholds": thresholds,
    }


# --------------------------------------------------------------------------------------------
# Combined result
# --------------------------------------------------------------------------------------------
def format_far(far: float, short: bool = False) -> str:
    """FAR as a key/label: ``1e-03`` (JSON keys) or, with ``short``, ``1e-3`` (summaries)."""
    text = f"{far:.0e}" if far > 0 else "0"
    if short:
        mantissa, _, exponent = text.partition("e")
        if exponent:
            text = f"{mantissa}e{int(exponent)}"
    return text


@dataclass(eq=False)
class VerificationResult:
    """All verification numbers for one set of scored pairs (see :func:`evaluate_verification`)."""

    accuracy_mean: float
    accuracy_std: float
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray
    fold_scheme: str
    best_threshold: float
    best_threshold_accuracy: float
    auc: float
    eer: float
    eer_threshold: float
    tar_at_far: dict
    num_pairs: int
    num_positive: int
    num_negative: int
    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)
    # The operating threshold of the protocol: the mean of the fold thresholds under k-fold
    # cross-validation, or the best threshold of the separate threshold pairs.
    threshold: float = float("nan")
    threshold_source: str = "k-fold"

    def to_dict(self, include_curve: bool = False) -> dict:
        """Plain-Python (JSON-ready) view; FAR keys are strings such as ``"1e-03"``.

        The ROC curve (``fpr``/``tpr`` lists) is included only on request, as it can hold one
        point per distinct score.
        """
        out = {
            "accuracy_mean": float(self.accuracy_mean),
            "accuracy_std": float(self.accuracy_std),
            "fold_accuracies": [float(a) for a in self.fold_accuracies],
            "fold_thresholds": [float(t) for t in self.fold_thresholds],
            "fold_scheme": self.fold_scheme,
            "best_threshold": float(self.best_threshold),
            "best_threshold_accuracy": float(self.best_threshold_accuracy),
            "auc": float(self.auc),
            "eer": float(self.eer),
            "eer_threshold": float(self.eer_threshold),
            "tar_at_far": {format_far(f): float(t) for f, t in self.tar_at_far.items()},
            "tar_at_far_interpolated": True,
            "threshold": float(self.threshold),
            "threshold_source": self.threshold_source,
            "num_pairs": int(self.num_pairs),
            "num_positive": int(self.num_positive),
            "num_negative": int(self.num_negative),
        }
        if include_curve:
            out["fpr"] = [float(v) for v in self.fpr]
            out["tpr"] = [float(v) for v in self.tpr]
        return out

    def summary(self) -> str:
        """One line, e.g. ``acc 97.52 +- 0.61 %  AUC 0.9961  EER 2.90 %  TAR@FAR=1e-3 91.20 %``."""
        accuracy = f"acc {100 * self.accuracy_mean:.2f} +- {100 * self.accuracy_std:.2f} %"
        if self.fold_scheme == SEPARATE_THRESHOLD:
            accuracy = f"acc {100 * self.accuracy_mean:.2f} % (threshold from separate pairs)"
        parts = [
            accuracy,
            f"AUC {self.auc:.4f}",
            f"EER {100 * self.eer:.2f} %",
        ]
        parts += [f"TAR@FAR={format_far(f, short=True)} {100 * t:.2f} %" for f, t in self.tar_at_far.items()]
        return "  ".join(parts)


def evaluate_verification(
    scores: Any,
    is_same: Any,
    n_folds: int = 10,
    folds: np.ndarray | None = None,
    fars: Sequence[float] = (1e-3, 1e-4),
    threshold_scores: Any = None,
    threshold_is_same: Any = None,
) -> VerificationResult:
    """Full verification report: k-fold (LFW protocol) accuracy, ROC metrics, and the single
    best threshold over all pairs (an optimistic, in-sample number, useful as an operating
    point but not as the reported accuracy).

    See :func:`kfold_accuracy` for ``n_folds``/``folds`` and :func:`roc_metrics` for ``fars``.

    With ``threshold_scores``/``threshold_is_same`` (the scored pairs of a separate file, e.g.
    LFW View 1 ``pairsDevTrain.txt`` for the single-fold ``pairsDevTest.txt``), no
    cross-validation is run: the threshold is the best one on those pairs and the accuracy is
    that of all test pairs at it (``fold_scheme`` ``"separate"``, one "fold", std 0).
    """
    s, y = _check_scores(scores, is_same)
    _check_both_classes(y)
    if (threshold_scores is None) != (threshold_is_same is None):
        raise ValueError("pass both threshold_scores and threshold_is_same, or neither")
    if threshold_scores is not None:
        ts, ty = _check_scores(threshold_scores, threshold_is_same)
        sep_thr, _ = _best_threshold(ts, ty)
        sep_acc = accuracy_at_threshold(s, y, sep_thr)
        kf = {"mean": sep_acc, "std": 0.0, "fold_accuracies": np.array([sep_acc]),
              "fold_thresholds": np.array([sep_thr]), "fold_scheme": SEPARATE_THRESHOLD}
        protocol_threshold, threshold_source = sep_thr, "separate threshold pairs"
    else:
        kf = kfold_accuracy(s, y, n_folds=n_folds, folds=folds)
        protocol_threshold = float(np.mean(kf["fold_thresholds"]))
        threshold_source = f"{kf['n_folds']}-fold cross-validation, mean of the fold thresholds"
    thr, thr_acc = _best_threshold(s, y)
    roc = roc_metrics(s, y, fars=fars)
    n_pos = int(y.sum())
    return VerificationResult(
        accuracy_mean=kf["mean"],
        accuracy_std=kf["std"],
        fold_accuracies=kf["fold_accuracies"],
        fold_thresholds=kf["fold_thresholds"],
        fold_scheme=kf["fold_scheme"],
        best_threshold=thr,
        best_threshold_accuracy=thr_acc,
        auc=roc["auc"],
        eer=roc["eer"],
        eer_threshold=roc["eer_threshold"],
        tar_at_far=roc["tar_at_far"],
        num_pairs=int(s.shape[0]),
        num_positive=n_pos,
        num_negative=int(s.shape[0]) - n_pos,
        fpr=roc["fpr"],
        tpr=roc["tpr"],
        threshold=protocol_threshold,
        threshold_source=threshold_source,
    )


# --------------------------------------------------------------------------------------------
# Pair generation and pair files
# --------------------------------------------------------------------------------------------
def _decode_pairs(cum: np.ndarray, linear: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # cum[b] = number of pairs whose larger (sorted) position is < b. Returns (b, offset of the
    # pair among those with larger position b).
    b = np.searchsorted(cum, linear, side="right") - 1
    return b, linear - cum[b]


def make_pairs(
    labels: np.ndarray, num_pairs: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample a balanced verification pair list from identity labels.

    Draws ``num_pairs // 2`` matched pairs (two distinct samples of one identity; only
    identities with at least 2 samples contribute) and as many mismatched pairs (samples of
    two different identities), each uniformly without replacement from all possible distinct
    pairs, so no pair occurs twice (in either order) and no sample is paired with itself.
    When fewer distinct matched (or mismatched) pairs exist than requested, all that exist are
    used and the other kind is cut to the same number, so the result stays exactly balanced
    and may be shorter than ``num_pairs`` (an odd ``num_pairs`` also yields one pair fewer).

    The pairs are returned in shuffled order, so contiguous k-fold splits of the result mix
    both kinds; each pair has ``idx_a < idx_b``. Deterministic for a given ``seed``.

    Returns ``(idx_a, idx_b, is_same)`` as int64, int64, bool arrays. Raises ValueError when no
    identity has 2 samples, when there is only one identity, or when ``num_pairs < 2``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, (int, np.integer)) or num_pairs < 2:
        raise ValueError(f"num_pairs must be an integer >= 2, got {num_pairs!r}")
    _, ident = np.unique(labels, return_inverse=True)
    ident = ident.ravel()
    counts = np.bincount(ident)
    if counts.size == 0 or counts.max() < 2:
        raise ValueError(
            "cannot make matched pairs: no identity has at least 2 samples "
            f"({labels.shape[0]} samples, {counts.size} identities)"
        )
    if counts.size < 2:
        raise ValueError("cannot make mismatched pairs: all samples belong to one identity")

    # Sort samples by identity; in that order, the sample at position b forms a matched pair
    # with each of the (b - group_start) earlier positions of its identity, and a mismatched
    # pair with each of the group_start positions of earlier identities. Enumerating pairs by
    # their larger position gives a bijection from [0, total) to pairs, so sampling distinct
    # integers samples distinct pairs exactly, without rejection loops.
    order = np.argsort(ident, kind="stable")
    group_start_of_id = np.concatenate(([0], np.cumsum(counts)[:-1]))
    group_start = group_start_of_id[ident[order]]
    positions = np.arange(order.shape[0], dtype=np.int64)
    n_same_with_larger = positions - group_start
    n_diff_with_larger = group_start.astype(np.int64)
    cum_same = np.concatenate(([0], np.cumsum(n_same_with_larger)))
    cum_diff = np.concatenate(([0], np.cumsum(n_diff_with_larger)))
    total_same, total_diff = int(cum_same[-1]), int(cum_diff[-1])

    n = min(num_pairs // 2, total_same, total_diff)
    rng = np.random.default_rng(seed)
    lin_same = rng.choice(total_same, size=n, replace=False)
    lin_diff = rng.choice(total_diff, size=n, replace=False)

    b_same, off_same = _decode_pairs(cum_same, lin_same)
    a_same = group_start[b_same] + off_same
    b_diff, a_diff = _decode_pairs(cum_diff, lin_diff)

    first = order[np.concatenate((a_same, a_diff))]
    second = order[np.concatenate((b_same, b_diff))]
    is_same = np.concatenate((np.ones(n, dtype=bool), np.zeros(n, dtype=bool)))
    perm = rng.permutation(2 * n)
    idx_a = np.minimum(first, second)[perm].astype(np.int64)
    idx_b = np.maximum(first, second)[perm].astype(np.int64)
    return idx_a, idx_b, is_same[perm]


def write_pairs_csv(
    path: str | os.PathLike, paths_a: Sequence[str], paths_b: Sequence[str], is_same: Any
) -> None:
    """Write a pair list as CSV with header ``path_a,path_b,is_same`` (is_same as 0/1).

    Standard CSV quoting applies, so paths containing commas or quotes survive a round trip
    through :func:`read_pairs_csv`. Written atomically.
    """
    paths_a = [str(p) for p in paths_a]
    paths_b = [str(p) for p in paths_b]
    y = _as_is_same(is_same)
    if not len(paths_a) == len(paths_b) == y.shape[0]:
        raise ValueError(
            f"paths_a, paths_b and is_same differ in length: {len(paths_a)}, {len(paths_b)}, {y.shape[0]}"
        )
    for i, (pa, pb) in enumerate(zip(paths_a, paths_b)):
        if not pa or not pb:
            raise ValueError(f"pair {i} has an empty path")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PAIRS_CSV_HEADER)
    writer.writerows(zip(paths_a, paths_b, y.astype(int).tolist()))
    with atomic_write(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(buffer.getvalue())


def read_pairs_csv(path: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray]:
    """Read a pair list written by :func:`write_pairs_csv` (header ``path_a,path_b,is_same``).

    Strict: a missing/different header, a row without exactly 3 columns, an empty path, an
    ``is_same`` other than 0/1, a blank line between rows or text that is not UTF-8 raises
    :class:`EvalInputError` (a ValueError) naming the file and the line number. CRLF line
    endings, a UTF-8 BOM and trailing blank lines are accepted.

    Returns ``(paths_a, paths_b, is_same)`` with is_same as a bool array.
    """
    paths_a: list[str] = []
    paths_b: list[str] = []
    flags: list[bool] = []
    with open(path, "r", encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, strict=True)
        header_seen = False
        blank_line: int | None = None
        try:
            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    if blank_line is None:
                        blank_line = line
                    continue
                if blank_line is not None:
                    raise EvalInputError(f"{path}: line {blank_line}: blank line before more rows")
                if not header_seen:
                    if tuple(c.strip() for c in row) != PAIRS_CSV_HEADER:
                        raise EvalInputError(
                            f"{path}: line {line}: expected header {','.join(PAIRS_CSV_HEADER)!r}, "
                            f"got {','.join(row)!r}"
                        )
                    header_seen = True
                    continue
                if len(row) != 3:
                    raise EvalInputError(f"{path}: line {line}: expected 3 columns, got {len(row)}: {row!r}")
                pa, pb, flag = row
                if not pa or not pb:
                    raise EvalInputError(f"{path}: line {line}: empty path")
                flag = flag.strip()
                if flag not in ("0", "1"):
                    raise EvalInputError(f"{path}: line {line}: is_same must be 0 or 1, got {flag!r}")
                paths_a.append(pa)
                paths_b.append(pb)
                flags.append(flag == "1")
        except csv.Error as exc:
            raise EvalInputError(f"{path}: line {reader.line_num}: malformed CSV: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise EvalInputError(f"{path}: not UTF-8 text ({exc})") from None
    if not header_seen:
        raise EvalInputError(f"{path}: empty file, expected header {','.join(PAIRS_CSV_HEADER)!r}")
    return paths_a, paths_b, np.asarray(flags, dtype=bool)
