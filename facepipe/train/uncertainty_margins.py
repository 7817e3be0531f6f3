"""Class margins from MC-dropout uncertainty during training (UMM, Khan et al., CVPR 2019, Sec. 3-4).

At the start of the epochs of a stage whose head has ``margin_source: uncertainty`` the UMM
plug-in (:mod:`facepipe.train.plugins.umm`) calls :func:`refresh_margins`: the backbone runs once
(eval mode) over a per-class capped subsample of the training set, either un-augmented or through
seeded views of the training transform (``train.uncertainty.views``), the dropout-carrying output
stage and the classifier run N times on those feature maps, class uncertainties become class
margins (``train.uncertainty.margin_map``), and a report of uncertainty against class frequency
(the paper's central observation: rarer classes are more uncertain) is written next to the run.

:func:`measure_class_uncertainty` is the same measurement without a trainer, for diagnostics.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence, get_args

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch.utils.data import DataLoader, Dataset

from facepipe.losses.margin_heads import MarginHead
from facepipe.losses.uncertainty import (
    MarginMap,
    class_uncertainty,
    mc_embeddings,
    predictive_uncertainty,
    uncertainty_additive_margins,
    umm_integer_margins,
)
from facepipe.runtime.device import autocast
from facepipe.runtime.distributed import DistributedContext, gather_rows, rank_slice
from facepipe.runtime.io import atomic_write, write_json_atomic

if TYPE_CHECKING:
    from facepipe.train.plugins.base import PluginContext

log = logging.getLogger(__name__)

# What a refresh writes into the run folder.
UNCERTAINTY_REPORT = "uncertainty.json"
UNCERTAINTY_PLOT = "uncertainty.png"

Views = Literal["clean", "augmented"]
VIEWS: tuple[str, ...] = get_args(Views)
# Separates the augmentation seeds from the subsample draw, which uses the same base seed.
_AUGMENT_STREAM = 0x55AD
# Margins with more distinct values than this are summarised by quantiles, not counted per value.
_MAX_HISTOGRAM_LEVELS = 20
_QUANTILES = {"min": 0.0, "p10": 0.1, "p25": 0.25, "median": 0.5, "p75": 0.75, "p90": 0.9, "max": 1.0}


def capped_subsample(labels: Sequence[int], max_per_class: int | None, seed: int) -> np.ndarray:
    """Sorted indices: every image of classes with at most ``max_per_class`` images, a seeded
    random ``max_per_class`` of the larger ones (None: everything)."""
    labels = np.asarray(labels)
    if max_per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen.append(members if len(members) <= max_per_class else rng.choice(members, max_per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def augmentation_seeds(count: int, seed: int) -> np.ndarray:
    """``count`` per-image augmentation seeds drawn from ``seed`` alone: the same refresh (same
    seed) sees the same augmented images, also after a resume or with another number of ranks."""
    return np.random.default_rng([int(seed), _AUGMENT_STREAM]).integers(0, 2**31 - 1, size=count, dtype=np.int64)


class AugmentedView(Dataset):
    """Images ``indices`` of a training dataset as ``(image, position)`` items, each through the
    dataset's own training transform seeded with its entry of ``seeds`` (the datasets accept
    ``(index, seed)`` keys, as from the training samplers). A dataset without augmentation (the
    in-memory MNIST images) gives its plain images."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], seeds: Sequence[int]) -> None:
        if len(indices) != len(seeds):
            raise ValueError(f"{len(indices)} indices but {len(seeds)} seeds")
        if getattr(dataset, "transform", ...) is None:
            # Without its transform an image dataset yields raw HxWx3 uint8 arrays, not model input.
            raise ValueError("views='augmented' needs the training dataset's transform; this dataset has none")
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.seeds = np.asarray(seeds, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        image = self.dataset[(int(self.indices[position]), int(self.seeds[position]))][0]
        return image, position


def uncertainty_view(dataset: Any, indices: Sequence[int], views: Views, seeds: Sequence[int] | None = None,
                     image_size: tuple[int, int] | None = None) -> Dataset:
    """The images ``indices`` as ``(image, position)`` items for the uncertainty estimate:
    ``"clean"`` = ``dataset.eval_view`` (resize only), ``"augmented"`` = :class:`AugmentedView`
    with ``seeds`` (one per index)."""
    if views == "clean":
        return dataset.eval_view(indices, image_size)
    if views == "augmented":
        if seeds is None:
            raise ValueError("augmented views need one seed per image")
        return AugmentedView(dataset, indices, seeds)
    raise ValueError(f"unknown views {views!r}; choose one of {list(VIEWS)}")


@torch.no_grad()
def estimate_class_uncertainty(model: torch.nn.Module, head: MarginHead, images: Dataset,
                               labels: Sequence[int], num_classes: int, device: torch.device, passes: int,
                               batch_size: int = 128,
                               amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(class uncertainty [C], sample uncertainty [n]) of ``images``, a dataset of ``(image,
    position)`` items (:func:`uncertainty_view`) (Khan et al. Eq. 6-7).

    One backbone pass per batch in eval mode; the output stage runs ``passes`` times with dropout
    active (BatchNorm frozen); softmax over the head's margin-free logits.
    """
    was_training = model.training
    model.eval()
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=0)
    per_sample = []
    try:
        for images, _ in loader:
            images = images.to(device)
            with autocast(device, amp_dtype):
                feature_maps = model.features(images)
            samples = mc_embeddings(model.output_stage, feature_maps, passes)  # [N, B, D]
            logits = head.inference_logits(samples.reshape(-1, samples.shape[-1]))
            probabilities = F.softmax(logits.view(passes, samples.shape[1], -1), dim=2)
            per_sample.append(predictive_uncertainty(probabilities).cpu())
    finally:
        model.train(was_training)
    sample_u = torch.cat(per_sample)
    return class_uncertainty(sample_u, torch.as_tensor(np.asarray(labels), dtype=torch.long), num_classes), sample_u


@dataclass
class UncertaintyMeasurement:
    """Result of :func:`measure_class_uncertainty`: class uncertainty [C], the uncertainty of each
    measured image [n] (in ``indices`` order), the measured dataset indices and the views used."""

    class_u: torch.Tensor
    sample_u: torch.Tensor
    indices: np.ndarray
    views: str


def measure_class_uncertainty(model: torch.nn.Module, head: MarginHead, dataset: Any, labels: Sequence[int],
                              num_classes: int, device: torch.device, settings: Any, seed: int,
                              views: Views | None = None, image_size: tuple[int, int] | None = None,
                              amp_dtype: torch.dtype | None = None,
                              dist: DistributedContext | None = None) -> UncertaintyMeasurement:
    """MC-dropout class uncertainty of ``dataset`` (the training set, ``labels`` its labels) as
    :func:`refresh_margins` measures it, without a training run.

    ``settings``: a ``train.uncertainty`` config (``passes``, ``max_per_class``, ``batch_size``,
    ``views``); ``views`` overrides ``settings.views``. ``seed`` draws the capped subsample and, for
    augmented views, the per-image augmentation. ``image_size`` is what ``eval_view`` resizes
    clean images to (the training ``data.image_size``). Under torchrun (``dist``) each rank measures
    its share and all ranks get the same result.
    """
    views = views if views is not None else getattr(settings, "views", "clean")
    if views not in VIEWS:
        raise ValueError(f"unknown views {views!r}; choose one of {list(VIEWS)}")
    dist = dist if dist is not None else DistributedContext()
    labels = np.asarray(labels)
    subset = capped_subsample(labels, settings.max_per_class, seed)
    # Seeds for the whole subset before slicing: an image's view does not depend on the rank count.
    seeds = augmentation_seeds(len(subset), seed) if views == "augmented" else None
    part = rank_slice(len(subset), dist)
    images = uncertainty_view(dataset, subset[part], views, None if seeds is None else seeds[part], image_size)
    _, sample_u = estimate_class_uncertainty(model, head, images, labels[subset[part]], num_classes, device,
                                             settings.passes, settings.batch_size, amp_dtype)
    # Per-sample uncertainties of all ranks in subset order: every rank gets the same class means.
    sample_u = torch.from_numpy(gather_rows(dist, sample_u.numpy()))
    class_u = class_uncertainty(sample_u, torch.as_tensor(labels[subset], dtype=torch.long), num_classes)
    return UncertaintyMeasurement(class_u, sample_u, subset, views)


def spearman_uncertainty_vs_size(class_u: torch.Tensor | np.ndarray, counts: Sequence[int] | np.ndarray) -> float:
    """Spearman correlation of class uncertainty with class size (training images per class);
    Khan et al. (Fig. 3) expect it negative (rarer classes more uncertain). NaN when either is
    constant (no ranking to correlate)."""
    u = np.asarray(class_u.numpy() if isinstance(class_u, torch.Tensor) else class_u, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    if len(u) != len(counts):
        raise ValueError(f"{len(u)} class uncertainties but {len(counts)} class sizes")
    if len(u) < 2 or np.ptp(u) == 0 or np.ptp(counts) == 0:
        return float("nan")
    return float(spearmanr(counts, u).statistic)


def margins_from_uncertainty(head_type: str, margin: float, class_u: torch.Tensor,
                             margin_map: MarginMap = "rank") -> torch.Tensor:
    """UMM integer margins for L-Softmax / SphereFace (``margin`` = m_max), additive margins up to
    ``margin`` for CosFace / ArcFace; ``margin_map`` as in ``umm_integer_margins``."""
    if head_type in ("lsoftmax", "sphereface"):
        return umm_integer_margins(class_u, int(margin), margin_map)
    return uncertainty_additive_margins(class_u, float(margin), margin_map)


def margin_histogram(margins: torch.Tensor | np.ndarray) -> dict[str, dict[str, float]]:
    """How the classes spread over the margins: ``{"counts": {level: classes}, "fractions": {level:
    share of classes}}`` for up to 20 distinct margins (the integer levels of UMM), else
    ``{"quantiles": {min, p10, p25, median, p75, p90, max}}`` (additive margins of many classes)."""
    values = np.asarray(margins.numpy() if isinstance(margins, torch.Tensor) else margins, dtype=np.float64).ravel()
    if values.size == 0:
        return {"counts": {}, "fractions": {}}
    levels, frequency = np.unique(values, return_counts=True)
    if len(levels) <= _MAX_HISTOGRAM_LEVELS:
        return {"counts": {f"{v:g}": int(n) for v, n in zip(levels, frequency)},
                "fractions": {f"{v:g}": round(float(n) / values.size, 4) for v, n in zip(levels, frequency)}}
    return {"quantiles": {name: round(float(np.quantile(values, q)), 6) for name, q in _QUANTILES.items()}}


def format_margin_histogram(histogram: dict[str, dict[str, float]]) -> str:
    if "quantiles" in histogram:
        return ", ".join(f"{name} {value:.4g}" for name, value in histogram["quantiles"].items())
    return ", ".join(f"m={level}: {count} ({100 * histogram['fractions'][level]:.1f}%)"
                     for level, count in histogram["counts"].items())


def plot_uncertainty_vs_frequency(class_u: np.ndarray, counts: np.ndarray, rho: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(counts, class_u, s=10, alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("class uncertainty (mean trace of predictive covariance)")
    ax.set_title(f"MC-dropout class uncertainty vs frequency\n(Spearman rho {rho:+.3f})")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_write(path, "wb") as handle:  # whole or not at all, with the umask's mode
            fig.savefig(handle, format="png", dpi=110)
    finally:
        plt.close(fig)


def refresh_margins(ctx: "PluginContext") -> dict:
    """Estimate class uncertainty with the run's model and head, set the head's margins, and
    write ``uncertainty.json`` and ``uncertainty.png`` into the run folder. Returns the log record
    (with the margin histogram, the views measured on and the margin map)."""
    cfg = ctx.config
    stage = ctx.stage()
    settings = cfg.train.uncertainty
    epoch, stage_index, head = ctx.epoch(), ctx.stage_index(), ctx.head()
    start = time.perf_counter()
    dataset = ctx.dataset
    labels = np.asarray(dataset.labels)
    measured = measure_class_uncertainty(
        ctx.model, head, dataset, labels, dataset.num_classes, ctx.device, settings,
        cfg.seed + epoch, views=settings.views, image_size=cfg.data.image_size,
        amp_dtype=ctx.amp_dtype, dist=ctx.dist,
    )
    class_u = measured.class_u
    margins = margins_from_uncertainty(stage.head.type, stage.head.m, class_u, settings.margin_map)
    head.set_margins(margins)
    seconds = time.perf_counter() - start
    counts = np.bincount(labels, minlength=dataset.num_classes)
    u = class_u.numpy()
    rho = spearman_uncertainty_vs_size(u, counts)
    histogram = margin_histogram(margins)
    record = {"epoch": epoch, "stage": stage_index, "images": int(len(measured.indices)),
              "seconds": seconds, "views": measured.views, "margin_map": settings.margin_map,
              "spearman_uncertainty_vs_count": rho, "margins": histogram.get("counts", histogram.get("quantiles")),
              **({"margin_fractions": histogram["fractions"]} if "fractions" in histogram else {})}
    if ctx.dist.is_main:
        write_json_atomic(ctx.run_dir / UNCERTAINTY_REPORT, {
            **record, "identities": list(dataset.identities), "class_images": counts.tolist(),
            "class_uncertainty": [round(float(x), 8) for x in u], "class_margin": margins.tolist()})
        plot_uncertainty_vs_frequency(u, counts, rho, ctx.run_dir / UNCERTAINTY_PLOT)
    log.info("uncertainty margins (epoch %d, %d %s images, %.1f s): Spearman(uncertainty, class size) %+.3f; "
             "%s margins %s", epoch + 1, len(measured.indices), measured.views, seconds, rho,
             settings.margin_map, format_margin_histogram(histogram))
    return record
