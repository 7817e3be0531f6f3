"""Cluster-based Large Margin Local Embedding loss (CLMLE), Huang et al. (TPAMI 2019) Eq. 8-9
and Sec. 3.3.

A mini-batch holds samples of a few clusters (of several identities). For a sample i of cluster
m, with unit-norm features f_i, batch centroids mu_k, s_k = scale * f_i^T mu_k and the own-cluster
similarity s_m = scale * f_i^T mu_m^(i) (see "Own centroid" below):

    inter_i = [ logsumexp_{k: c(k) != c(m)} s_k - (s_m - scale * a1) ]_+
    intra_i = [ logsumexp_{k != m, c(k) = c(m)} s_k - (s_m - scale * a2) ]_+

which is Eq. 9 (-log of exp(s_m - a) over the sum of exp(s_k)) with every similarity scaled.

Readings chosen:

- ``scale``: Eq. 9 has none (scale = 1). Then s_m - s_k <= 2 while the log of the sum over,
  e.g., 11 other clusters of a 12-cluster batch is already about log 11 = 2.4, so the hinge
  never reaches zero and the margins never take effect; scale = 16 lets them.
- Centroids: Sec. 3.3 approximates mu_m with the mean of the cluster's sampled features in the
  batch; the normalised mean (Eq. 7) is used and is *not* detached, so gradients also flow
  through the centroids, as in the paper's end-to-end training.
- Own centroid (``own_centroid``). Sec. 3.3 approximates mu_m by the mean of the cluster's 20
  sampled features, among which f_i itself. With 20 members f_i is a small part of that mean;
  with clusters of 2-5 images (e.g. LFW identities) it is a large part: on such a run the cosine of
  a sample to its own batch centroid was 0.84 with the sample and 0.57 without, and at scale 16
  that gap is nearly the whole margin between identities, so the loss was met without pulling a
  person's different images together. "leave_one_out" (default) measures s_m against
  mu_m^(i) = normalise(sum of the cluster's batch members - f_i), the centroid of the *other*
  members; a sample alone in its cluster in the batch is measured against its cluster's stored
  centroid (the k-means centroid of the current assignment, a constant) when the caller passes
  it, else against its own feature (cosine 1, as "inclusive" would give; a direct call without
  stored centroids). "inclusive" is the paper's literal batch mean, f_i included. Either way the
  similarities to the *other* clusters use the full batch centroids, and gradients flow through
  the batch centroids.
- A term whose sum would be empty is 0: inter when the batch has no other identity, intra when
  the sample's identity has a single cluster in the batch.
- Cost-sensitivity (Sec. 3.3): each sample's loss is scaled by the inverse frequency of its
  identity in the batch, the weights normalised to mean 1; the loss is their weighted mean,
  which keeps Eq. 9's 1 / (M l) normalisation.

Margin advice (end of the module): the paper's 2-D bounds of a1 and a2
(:func:`paper_margin_bounds`, :func:`format_margin_bounds`) and a starting point for the margin
grid search (:func:`suggest_margins`, behind ``facepipe index margins``).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facepipe.runtime.device import float32_region

__all__ = [
    "OWN_CENTROID_MODES",
    "ClusterLossOutput",
    "ClusterMarginLoss",
    "cost_sensitive_weights",
    "format_margin_bounds",
    "paper_margin_bounds",
    "suggest_margins",
]

OWN_CENTROID_MODES = ("leave_one_out", "inclusive")


class ClusterLossOutput(NamedTuple):
    loss: Tensor  # scalar, weighted mean of the per-sample losses
    per_sample: Tensor  # [B] unweighted inter + intra, detached
    weights: Tensor  # [B] cost-sensitive weights (mean 1), or ones
    # [B] bool: the most similar centroid (own cluster: the one the loss uses) belongs to the
    # sample's identity (the batch version of the nearest-cluster rule; the trainer reports its
    # mean as training accuracy).
    identity_correct: Tensor
    # Diagnostics, detached, both computed whichever reading the loss uses. [B] cosine of each
    # sample to its own cluster's batch centroid with the sample included, and without it (the
    # leave-one-out centroid; for a sample alone in the batch, its stored centroid or its own
    # feature, as in the module docstring): their gap is what a sample gets from itself.
    own_cosine_inclusive: Tensor | None = None
    own_cosine_leave_one_out: Tensor | None = None
    alone: Tensor | None = None  # [B] bool: no other member of the sample's cluster in the batch
    zero_loss_fraction: Tensor | None = None  # scalar: share of samples whose hinges are both 0


def cost_sensitive_weights(identity_ids: Tensor) -> Tensor:
    """Inverse frequency of each sample's identity in the batch, normalised to mean 1 [B]."""
    _, inverse, counts = torch.unique(identity_ids, return_inverse=True, return_counts=True)
    weights = 1.0 / counts.to(torch.float32)[inverse]
    return weights / weights.mean()


def _masked_logsumexp(scores: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """logsumexp over the masked entries of each row, and whether the row has any.

    Empty rows are evaluated on unmasked zeros instead of all -inf: logsumexp of only -inf
    has a NaN gradient, which a later ``where`` would not stop from reaching the features.
    """
    has_any = mask.any(dim=1)
    keep = mask | ~has_any.unsqueeze(1)
    fill = torch.where(has_any, float("-inf"), 0.0).unsqueeze(1)
    return torch.logsumexp(torch.where(keep, scores, fill), dim=1), has_any


class ClusterMarginLoss(nn.Module):
    """CLMLE loss, Huang et al. Eq. 9 (Eq. 8 with class-aware margins) on a cluster mini-batch.

    Args:
        scale: multiplies every cosine similarity (and the margins with it); 1 is the paper's
            literal form, see the module docstring for why the default is 16.
        inter_margin: a1, margin against clusters of other identities.
        intra_margin: a2, margin against other clusters of the same identity; a1 > a2 >= 0.
        cost_sensitive: weight samples by inverse identity frequency in the batch (Sec. 3.3).
        own_centroid: "leave_one_out" (default) or "inclusive", the centroid a sample's own-cluster
            similarity is measured against; see the module docstring.
    """

    def __init__(
        self,
        scale: float = 16.0,
        inter_margin: float = 0.3,
        intra_margin: float = 0.1,
        cost_sensitive: bool = True,
        own_centroid: str = "leave_one_out",
    ) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if intra_margin < 0:
            raise ValueError(f"intra_margin (a2) must be >= 0, got {intra_margin}")
        if inter_margin <= intra_margin:
            raise ValueError(
                f"inter_margin (a1 = {inter_margin}) must exceed intra_margin (a2 = {intra_margin}): "
                "Huang et al. enforce a larger margin between identities than within one"
            )
        if own_centroid not in OWN_CENTROID_MODES:
            raise ValueError(f"unknown own_centroid '{own_centroid}'; choose one of {list(OWN_CENTROID_MODES)}")
        self.scale = float(scale)
        self.inter_margin = float(inter_margin)
        self.intra_margin = float(intra_margin)
        self.cost_sensitive = bool(cost_sensitive)
        self.own_centroid = own_centroid

    def forward(self, features: Tensor, cluster_ids: Tensor, identity_ids: Tensor,
                stored_centroids: Tensor | None = None) -> ClusterLossOutput:
        """Eq. 9 for features [B, D] of samples of clusters ``cluster_ids`` [B] belonging to
        identities ``identity_ids`` [B]; a cluster must belong to one identity.

        ``stored_centroids`` [B, D]: row i is the stored (k-means) centroid of sample i's cluster,
        used (leave_one_out only) for a sample alone in its cluster in the batch; without it such
        a sample is measured against its own feature.
        """
        _check_batch(features, cluster_ids, identity_ids)
        if stored_centroids is not None and stored_centroids.shape != features.shape:
            raise ValueError(f"stored_centroids must have the features' shape {list(features.shape)} "
                             f"(one row per sample), got {list(stored_centroids.shape)}")
        with float32_region(features.device.type):
            f = F.normalize(features.float(), dim=1)
            clusters, own = torch.unique(cluster_ids, return_inverse=True)
            members = F.one_hot(own, len(clusters)).to(f.dtype)  # [B, M]
            sums = members.t() @ f
            centroids = F.normalize(sums, dim=1)  # Eq. 7 on the batch samples
            cluster_identity = torch.zeros_like(clusters).scatter_(0, own, identity_ids.to(clusters.dtype))
            if not torch.equal(cluster_identity[own], identity_ids):
                raise ValueError("every cluster id must map to a single identity id within the batch")

            scores = self.scale * (f @ centroids.t())  # [B, M]
            inclusive_cos = scores.gather(1, own.unsqueeze(1)).squeeze(1) / self.scale
            alone = members.sum(0)[own] == 1
            # A lone sample has no other members (a zero row here): it takes the fallback instead.
            others = F.normalize(sums[own] - f, dim=1)
            if stored_centroids is not None:
                fallback = F.normalize(stored_centroids.detach().to(f), dim=1)
            else:
                fallback = f
            others = torch.where(alone.unsqueeze(1), fallback, others)
            loo_cos = (f * others).sum(1)
            own_cos = loo_cos if self.own_centroid == "leave_one_out" else inclusive_cos
            own_score = self.scale * own_cos
            same_identity = cluster_identity.unsqueeze(0) == identity_ids.unsqueeze(1)
            own_cluster = members.bool()

            inter_lse, has_inter = _masked_logsumexp(scores, ~same_identity)
            intra_lse, has_intra = _masked_logsumexp(scores, same_identity & ~own_cluster)
            inter = torch.where(has_inter, F.relu(inter_lse - (own_score - self.scale * self.inter_margin)), 0.0)
            intra = torch.where(has_intra, F.relu(intra_lse - (own_score - self.scale * self.intra_margin)), 0.0)
            per_sample = inter + intra

            if self.cost_sensitive:
                weights = cost_sensitive_weights(identity_ids)
            else:
                weights = torch.ones_like(per_sample)
            loss = (weights * per_sample).mean()
            # The nearest-cluster rule scores the own cluster as the loss does.
            ranked = scores.detach().scatter(1, own.unsqueeze(1), own_score.detach().unsqueeze(1))
            identity_correct = cluster_identity[ranked.argmax(1)] == identity_ids
            per_sample = per_sample.detach()
        return ClusterLossOutput(loss, per_sample, weights, identity_correct,
                                 own_cosine_inclusive=inclusive_cos.detach(),
                                 own_cosine_leave_one_out=loo_cos.detach(), alone=alone,
                                 zero_loss_fraction=(per_sample == 0).float().mean())

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale}, inter_margin={self.inter_margin}, intra_margin={self.intra_margin}, "
            f"cost_sensitive={self.cost_sensitive}, own_centroid={self.own_centroid}"
        )


def _check_batch(features: Tensor, cluster_ids: Tensor, identity_ids: Tensor) -> None:
    if features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be a non-empty [B, D] tensor, got shape {list(features.shape)}")
    for name, ids in (("cluster_ids", cluster_ids), ("identity_ids", identity_ids)):
        if ids.shape != (features.shape[0],):
            raise ValueError(f"{name} must have shape [{features.shape[0]}] (one per feature), got {list(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got dtype {ids.dtype}")


# --------------------------------------------------------------------------------------------
# Margin advice: the paper's 2-D bounds of a1 and a2 and a starting point for the grid search
# --------------------------------------------------------------------------------------------
def _positive_counts(class_counts: Sequence[int] | np.ndarray) -> np.ndarray:
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"class_counts must be a non-empty vector [C], got shape {list(counts.shape)}")
    if not np.isfinite(counts).all() or (counts <= 0).any():
        raise ValueError("class_counts must be finite and > 0 for every identity")
    return counts


def paper_margin_bounds(class_counts: Sequence[int] | np.ndarray) -> tuple[float, np.ndarray]:
    """Upper bounds of the CLMLE margins (Huang et al. Sec. 3.2, "Angular margin derivation").

    a1max = 1 - cos(2 pi / C) and a2max_c = 1 - cos(2 pi L_c / L), with C identities and L
    samples in all. The paper derives them in 2-D, where C collapsed identities share the unit
    circle; on a D-dimensional hypersphere far more directions are mutually distant, so the
    bounds are loose there and only a range for a grid search, not a constraint.

    Returns:
        (a1max, a2max [C] float64).
    """
    counts = _positive_counts(class_counts)
    a1max = 1.0 - math.cos(2.0 * math.pi / counts.size)
    a2max = 1.0 - np.cos(2.0 * np.pi * counts / counts.sum())
    return a1max, a2max


def format_margin_bounds(class_counts: Sequence[int] | np.ndarray) -> str:
    """One-line summary of :func:`paper_margin_bounds`."""
    a1max, a2max = paper_margin_bounds(class_counts)
    return (
        f"paper 2-D margin bounds over {a2max.size} identities: a1max={a1max:.4g}; "
        f"a2max min={a2max.min():.4g} median={np.median(a2max):.4g} max={a2max.max():.4g}"
    )


# Range in which suggest_margins keeps the inter-identity margin a1: the floor is the config
# default (and the middle of bench/clmle_margin_sweep.py's grid), the cap keeps a1 well below
# the cosine distance 1 of orthogonal directions, which CLMLE batches of many identities need.
SUGGESTED_INTER_MARGIN_RANGE = (0.3, 0.5)
# a2 = a1 / 3: clusters of one identity stay closer than identities (Huang et al. need a2 < a1).
SUGGESTED_INTRA_RATIO = 1.0 / 3.0


def suggest_margins(class_counts: Sequence[int] | np.ndarray) -> dict:
    """A starting point for CLMLE's margins (Huang et al. Eq. 8-9) from the 2-D bounds of
    :func:`paper_margin_bounds`, by a simple documented rule:

        inter_margin a1 = min(0.5, max(0.3, a1max)),   intra_margin a2 = a1 / 3.

    Why the clamp: a1max = 1 - cos(2 pi / C) is the 2-D bound (C identities sharing the unit
    circle); it falls below 0.3 from C = 8 identities on and to ~1e-6 for thousands. On the
    D-dimensional hypersphere of real embeddings C directions can stay far apart (up to D + 1 of
    them at cosine -1/(C-1), and exponentially many in D nearly orthogonal), so the bound is loose
    and the rule lets it bind only where it lies inside [0.3, 0.5], i.e. for C = 6 or 7
    identities (fewer are capped at 0.5); otherwise a1 = 0.3, the config default. The result is a grid-search centre
    (``bench/clmle_margin_sweep.py``), not a tuned value.

    Returns a1max, a2max (quantiles), inter_margin, intra_margin, and ``tail_below_intra``: the
    share of identities whose own 2-D bound a2max_c = 1 - cos(2 pi L_c / L) is below a2 (the
    2-D derivation would forbid a2 for them; in high dimension it does not).
    """
    counts = _positive_counts(class_counts)
    a1max, a2max = paper_margin_bounds(counts)
    low, high = SUGGESTED_INTER_MARGIN_RANGE
    inter = round(min(high, max(low, a1max)), 4)
    intra = round(inter * SUGGESTED_INTRA_RATIO, 4)
    return {
        "num_identities": int(counts.size),
        "num_samples": int(counts.sum()),
        "a1max": float(a1max),
        "a2max_min": float(a2max.min()),
        "a2max_median": float(np.median(a2max)),
        "a2max_max": float(a2max.max()),
        "inter_margin": inter,
        "intra_margin": intra,
        "a1max_binds": bool(low <= a1max <= high),
        "tail_below_intra": float(np.mean(a2max < intra)),
    }
