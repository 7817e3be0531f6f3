"""PNG plots for evaluation and training reports.

Figures are built with ``matplotlib.figure.Figure`` on an explicit Agg canvas rather than
through pyplot: that needs no display, never calls ``matplotlib.use`` (which would change the
backend for whoever else imported matplotlib in the process) and keeps no global figure
registry, so a figure is freed as soon as it goes out of scope and nothing needs closing.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from facepipe.runtime.io import atomic_write

__all__ = ["plot_cmc", "plot_roc", "plot_training_curves"]

# Lower end of the log-scale FAR axis; fpr == 0 has no place on a log axis.
MIN_PLOT_FAR = 1e-5


def _save_png(fig: Figure, path: str | os.PathLike) -> None:
    FigureCanvasAgg(fig)
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png")


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    title: str = "ROC",
    min_far: float = MIN_PLOT_FAR,
) -> None:
    """Plot ROC curves as TAR (tpr) against FAR (fpr) on a log-scale FAR axis; save as PNG.

    ``curves`` maps a legend label to ``(fpr, tpr)``, e.g. from
    :func:`facepipe.eval.verification.roc_metrics`. Nothing is recomputed: put the AUC into the
    label if the legend should show it. fpr is clipped at ``min_far`` (default 1e-5; MegaFace-style
    reports go down to 1e-6) so that the fpr == 0 part of a curve stays visible at the left edge.
    Written atomically.
    """
    if not curves:
        raise ValueError("plot_roc needs at least one curve")
    fig = Figure(figsize=(6.0, 5.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for label, (fpr, tpr) in curves.items():
        fpr = np.asarray(fpr, dtype=np.float64)
        tpr = np.asarray(tpr, dtype=np.float64)
        if fpr.ndim != 1 or fpr.shape != tpr.shape or fpr.size == 0:
            raise ValueError(
                f"curve {label!r}: fpr and tpr must be non-empty 1-D arrays of equal length, "
                f"got shapes {fpr.shape} and {tpr.shape}"
            )
        ax.plot(np.clip(fpr, min_far, 1.0), tpr, label=str(label), linewidth=1.5)
    chance = np.logspace(math.log10(min_far), 0.0, 200)
    ax.plot(chance, chance, linestyle="--", color="0.6", linewidth=1.0, label="chance")
    ax.set_xscale("log")
    ax.set_xlim(min_far, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("FAR (false accept rate)")
    ax.set_ylabel("TAR (true accept rate)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.5)
    ax.grid(True, which="minor", alpha=0.15)
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save_png(fig, path)


def plot_cmc(
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    title: str = "CMC",
) -> None:
    """Plot cumulative match characteristic curves (identification rate at rank 1..R); save as PNG.

    ``curves`` maps a legend label (e.g. ``"10,000 distractors"``) to the identification rates
    at ranks 1, 2, ..., R as fractions in [0, 1]; a CMC curve is non-decreasing, and a curve
    that is not raises ValueError (it would mean ranks were counted wrongly). Written
    atomically.
    """
    if not curves:
        raise ValueError("plot_cmc needs at least one curve")
    fig = Figure(figsize=(6.0, 5.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    max_rank = 1
    for label, rates in curves.items():
        rates = np.asarray(rates, dtype=np.float64)
        if rates.ndim != 1 or rates.size == 0:
            raise ValueError(f"curve {label!r}: rates must be a non-empty 1-D array, got shape {rates.shape}")
        if np.any(np.diff(rates) < 0) or rates.min() < 0 or rates.max() > 1:
            raise ValueError(f"curve {label!r}: a CMC curve must be non-decreasing within [0, 1]")
        ranks = np.arange(1, rates.size + 1)
        max_rank = max(max_rank, rates.size)
        ax.plot(ranks, rates, label=str(label), linewidth=1.5, marker="o", markersize=3)
    ax.set_xlim(0.8, max_rank + 0.2)
    ax.set_ylim(0.0, 1.01)
    ax.set_xticks(np.arange(1, max_rank + 1))
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate")
    ax.set_title(title)
    ax.grid(True, alpha=0.4)
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save_png(fig, path)


def plot_training_curves(
    records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    keys: Sequence[str] = ("loss",),
) -> None:
    """Plot training-log values against ``step``, one subplot per key; save as PNG.

    ``records`` are the parsed lines of a JSON-lines training log, e.g.
    ``{"step": 100, "epoch": 0, "loss": 4.2, "lr": 0.1}``. Keys that occur in no record are
    skipped; records without a key (or with ``None`` for it) contribute no point to that
    subplot. A record that has a plotted key but no ``step``, or no key at all being present,
    raises ValueError. Written atomically.
    """
    present = [k for k in keys if any(k in r and r[k] is not None for r in records)]
    if not present:
        raise ValueError(f"none of the keys {list(keys)} occurs in the {len(records)} training records")
    series: dict[str, tuple[list[float], list[float]]] = {}
    for key in present:
        xs: list[float] = []
        ys: list[float] = []
        for i, record in enumerate(records):
            if record.get(key) is None:
                continue
            if record.get("step") is None:
                raise ValueError(f"training record {i} has {key!r} but no 'step'")
            xs.append(float(record["step"]))
            ys.append(float(record[key]))
        series[key] = (xs, ys)

    fig = Figure(figsize=(7.0, 2.6 * len(present) + 0.6), dpi=100)
    axes = fig.subplots(len(present), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, present):
        xs, ys = series[key]
        ax.plot(xs, ys, linewidth=1.2, marker="." if len(xs) < 50 else None)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.4)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    _save_png(fig, path)
