"""Class margins from MC-dropout uncertainty during training (seed 000 UMM, Sec. 3-4).

At the start of the epochs of a stage whose head has ``margin_source: uncertainty`` the trainer
calls :func:`refresh_margins`: the backbone runs once over a per-class capped subsample of the
training set (no augmentation), the dropout-carrying output stage and the classifier run N times
on those feature maps, class uncertainties become class margins, and a report of uncertainty
against class frequency (the paper's central observation: rarer classes are more uncertain) is
written next to the run.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch.utils.data import DataLoader, Dataset

from facepipe.losses.margin_heads import MarginHead
from facepipe.losses.uncertainty import (
    class_uncertainty,
    mc_embeddings,
    predictive_uncertainty,
    uncertainty_additive_margins,
    umm_integer_margins,
)
from facepipe.train.distributed import gather_rows, rank_slice
from facepipe.utils.device import autocast
from facepipe.utils.io import write_json_atomic

log = logging.getLogger(__name__)


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


@torch.no_grad()
def estimate_class_uncertainty(model: torch.nn.Module, head: MarginHead, images: Dataset,
                               labels: Sequence[int], num_classes: int, device: torch.device, passes: int,
                               batch_size: int = 128,
                               amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(class uncertainty [C], sample uncertainty [n]) of ``images``, a dataset of ``(image,
    position)`` items without augmentation (``dataset.eval_view``) (seed 000 Eq. 6-7).

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


def margins_from_uncertainty(head_type: str, margin: float, class_u: torch.Tensor) -> torch.Tensor:
    """UMM integer margins for L-Softmax / SphereFace (``margin`` = m_max), additive
    m u_c / max u for CosFace / ArcFace."""
    if head_type in ("lsoftmax", "sphereface"):
        return umm_integer_margins(class_u, int(margin))
    return uncertainty_additive_margins(class_u, float(margin))


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def refresh_margins(trainer) -> dict:
    """Estimate class uncertainty with the trainer's model and head, set the head's margins, and
    write ``uncertainty.json`` and ``uncertainty.png`` into the run folder. Returns the log record."""
    cfg = trainer.config
    stage = cfg.train.stages[trainer.stage_index]
    settings = cfg.train.uncertainty
    start = time.perf_counter()
    dataset = trainer.dataset
    labels = np.asarray(dataset.labels)
    subset = capped_subsample(labels, settings.max_per_class, cfg.seed + trainer.epoch)
    # Under torchrun each rank estimates its share of the subsample; the per-sample uncertainties
    # of all ranks (in subset order) then give every rank the same class uncertainties.
    share = subset[rank_slice(len(subset), trainer.dist)]
    _, sample_u = estimate_class_uncertainty(
        trainer.model, trainer.head, dataset.eval_view(share, cfg.data.image_size), labels[share],
        dataset.num_classes, trainer.device, settings.passes, settings.batch_size, trainer.amp_dtype,
    )
    sample_u = torch.from_numpy(gather_rows(trainer.dist, sample_u.numpy()))
    class_u = class_uncertainty(sample_u, torch.as_tensor(labels[subset], dtype=torch.long), dataset.num_classes)
    margins = margins_from_uncertainty(stage.head.type, stage.head.m, class_u)
    trainer.head.set_margins(margins)
    seconds = time.perf_counter() - start
    counts = np.bincount(labels, minlength=dataset.num_classes)
    u = class_u.numpy()
    rho = float(spearmanr(counts, u).statistic) if np.ptp(u) > 0 and np.ptp(counts) > 0 else float("nan")
    values, frequency = np.unique(margins.numpy(), return_counts=True)
    histogram = {f"{v:g}": int(n) for v, n in zip(values, frequency)} if len(values) <= 20 else {
        "min": float(values.min()), "median": float(np.median(margins.numpy())), "max": float(values.max())}
    record = {"epoch": trainer.epoch, "stage": trainer.stage_index, "images": int(len(subset)),
              "seconds": seconds, "spearman_uncertainty_vs_count": rho, "margins": histogram}
    if trainer.dist.is_main:
        write_json_atomic(trainer.run_dir / "uncertainty.json", {
            **record, "identities": list(dataset.identities), "class_images": counts.tolist(),
            "class_uncertainty": [round(float(x), 8) for x in u], "class_margin": margins.tolist()})
        plot_uncertainty_vs_frequency(u, counts, rho, trainer.run_dir / "uncertainty.png")
    log.info("uncertainty margins (epoch %d, %d images, %.1f s): Spearman(uncertainty, class size) %+.3f; "
             "margins %s", trainer.epoch + 1, len(subset), seconds, rho, histogram)
    return record
