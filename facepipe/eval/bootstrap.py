"""Bootstrap confidence intervals and paired bootstrap tests for evaluation readouts.

A readout (accuracy over pairs, rank-1 over probes, recall over identities) is a statistic of
a set of test items. Its 95 % interval is the percentile interval of the statistic over
``reps`` resamples of the items drawn with replacement (Efron and Tibshirani, ch. 13). Methods
are compared *paired*: every method's statistic is computed on the same resamples, so the
interval of the difference reflects only how the methods differ on the same items; with several
seeds per method, each resample's value of a method is the mean over its seeds (seed spread is
reported beside it, not hidden in the interval). The two-sided p-value of a difference is
``min(1, 2 * min(P(d <= 0), P(d >= 0)))`` over the resamples (with the +1 correction, so it is
never exactly 0), i.e. how often the resampled difference falls on the other side of zero.

Resampling units: verification pairs for pair readouts; probe identities (clusters of trials)
where the trials of one identity are not independent (MegaFace-style identification); probes
for closed-set identification.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = ["bootstrap_weights", "BootstrapSummary", "summarise", "paired_difference", "weighted_tar_at_far"]


def bootstrap_weights(num_items: int, reps: int, seed: int = 0) -> np.ndarray:
    """[reps, num_items] multiplicities of a resample with replacement (how often each item is
    drawn; each row sums to ``num_items``). A statistic with item weights then needs no copied
    data, and the same seed gives the same resamples, which is what pairs two methods'
    bootstraps. For resampling groups (probe identities), draw weights for the groups and give
    each item its group's weight."""
    if num_items < 1 or reps < 1:
        raise ValueError(f"need at least one item and one resample, got {num_items} items, {reps} resamples")
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_items, np.full(num_items, 1.0 / num_items), size=reps).astype(np.int32)


@dataclass
class BootstrapSummary:
    value: float  # the statistic on all items
    low: float  # 2.5th percentile over resamples
    high: float  # 97.5th percentile

    def to_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high]}


def summarise(value: float, replicates: np.ndarray) -> BootstrapSummary:
    """The statistic and its 95 % percentile interval (non-finite replicates left out)."""
    finite = np.asarray(replicates, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        return BootstrapSummary(float(value), float("nan"), float("nan"))
    low, high = np.percentile(finite, [2.5, 97.5])
    return BootstrapSummary(float(value), float(low), float(high))


def paired_difference(value_a: float, replicates_a: np.ndarray, value_b: float,
                      replicates_b: np.ndarray) -> dict:
    """A - B with its percentile interval and two-sided p-value over paired replicates."""
    a = np.asarray(replicates_a, dtype=np.float64)
    b = np.asarray(replicates_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired replicates must have one shape, got {a.shape} and {b.shape}")
    d = a - b
    d = d[np.isfinite(d)]
    if not len(d):
        return {"difference": float(value_a - value_b), "ci95": [float("nan"), float("nan")], "p": float("nan")}
    low, high = np.percentile(d, [2.5, 97.5])
    tail = min((np.sum(d <= 0) + 1) / (len(d) + 1), (np.sum(d >= 0) + 1) / (len(d) + 1))
    return {"difference": float(value_a - value_b), "ci95": [float(low), float(high)], "p": float(min(1.0, 2 * tail))}


def weighted_tar_at_far(genuine: np.ndarray, genuine_weight: np.ndarray, impostor_desc: np.ndarray,
                        impostor_weight: np.ndarray, total_impostors: float, far: float) -> float:
    """TAR at FAR with item weights, on the step ROC: the threshold is the highest impostor
    score at which more than ``far * total_impostors`` (weighted) impostors would be accepted,
    and a genuine pair is accepted when its score is above it. ``impostor_desc``: the highest
    impostor scores, sorted in decreasing order (a tail is enough when it holds more than the
    allowed count); NaN when the tail is too short to reach the allowed count."""
    allowed = far * total_impostors
    cumulative = np.cumsum(impostor_weight, dtype=np.float64)
    over = np.flatnonzero(cumulative > allowed)
    if not len(over):
        return float("nan")
    threshold = impostor_desc[over[0]]
    weights = np.asarray(genuine_weight, dtype=np.float64)
    total = weights.sum()
    return float(weights[genuine > threshold].sum() / total) if total > 0 else float("nan")
