"""Cluster-based Large Margin Local Embedding loss (CLMLE), seed 002 Eq. 8-9 and Sec. 3.3.

A mini-batch holds samples of a few clusters (of several identities). For a sample i of cluster
m, with unit-norm features f_i, batch centroids mu_k and s_k = scale * f_i^T mu_k:

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
- A term whose sum would be empty is 0: inter when the batch has no other identity, intra when
  the sample's identity has a single cluster in the batch.
- Cost-sensitivity (Sec. 3.3): each sample's loss is scaled by the inverse frequency of its
  identity in the batch, the weights normalised to mean 1; the loss is their weighted mean,
  which keeps Eq. 9's 1 / (M l) normalisation.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facepipe.losses.margin_heads import _float32_only

__all__ = ["ClusterLossOutput", "ClusterMarginLoss", "cost_sensitive_weights"]


class ClusterLossOutput(NamedTuple):
    loss: Tensor  # scalar, weighted mean of the per-sample losses
    per_sample: Tensor  # [B] unweighted inter + intra, detached
    weights: Tensor  # [B] cost-sensitive weights (mean 1), or ones
    # [B] bool: the most similar batch centroid belongs to the sample's identity (the batch
    # version of the nearest-cluster rule; the trainer reports its mean as training accuracy).
    identity_correct: Tensor


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
    """CLMLE loss, seed 002 Eq. 9 (Eq. 8 with class-aware margins) on a cluster mini-batch.

    Args:
        scale: multiplies every cosine similarity (and the margins with it); 1 is the paper's
            literal form, see the module docstring for why the default is 16.
        inter_margin: a1, margin against clusters of other identities.
        intra_margin: a2, margin against other clusters of the same identity; a1 > a2 >= 0.
        cost_sensitive: weight samples by inverse identity frequency in the batch (Sec. 3.3).
    """

    def __init__(
        self,
        scale: float = 16.0,
        inter_margin: float = 0.3,
        intra_margin: float = 0.1,
        cost_sensitive: bool = True,
    ) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if intra_margin < 0:
            raise ValueError(f"intra_margin (a2) must be >= 0, got {intra_margin}")
        if inter_margin <= intra_margin:
            raise ValueError(
                f"inter_margin (a1 = {inter_margin}) must exceed intra_margin (a2 = {intra_margin}): "
                "seed 002 enforces a larger margin between identities than within one"
            )
        self.scale = float(scale)
        self.inter_margin = float(inter_margin)
        self.intra_margin = float(intra_margin)
        self.cost_sensitive = bool(cost_sensitive)

    def forward(self, features: Tensor, cluster_ids: Tensor, identity_ids: Tensor) -> ClusterLossOutput:
        """Eq. 9 for features [B, D] of samples of clusters ``cluster_ids`` [B] belonging to
        identities ``identity_ids`` [B]; a cluster must belong to one identity."""
        _check_batch(features, cluster_ids, identity_ids)
        with _float32_only(features.device.type):
            f = F.normalize(features.float(), dim=1)
            clusters, own = torch.unique(cluster_ids, return_inverse=True)
            members = F.one_hot(own, len(clusters)).to(f.dtype)  # [B, M]
            centroids = F.normalize(members.t() @ f, dim=1)  # Eq. 7 on the batch samples
            cluster_identity = torch.zeros_like(clusters).scatter_(0, own, identity_ids.to(clusters.dtype))
            if not torch.equal(cluster_identity[own], identity_ids):
                raise ValueError("every cluster id must map to a single identity id within the batch")

            scores = self.scale * (f @ centroids.t())  # [B, M]
            own_score = scores.gather(1, own.unsqueeze(1)).squeeze(1)
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
            identity_correct = cluster_identity[scores.detach().argmax(1)] == identity_ids
        return ClusterLossOutput(loss, per_sample.detach(), weights, identity_correct)

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale}, inter_margin={self.inter_margin}, intra_margin={self.intra_margin}, "
            f"cost_sensitive={self.cost_sensitive}"
        )


def _check_batch(features: Tensor, cluster_ids: Tensor, identity_ids: Tensor) -> None:
    if features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be a non-empty [B, D] tensor, got shape {list(features.shape)}")
    for name, ids in (("cluster_ids", cluster_ids), ("identity_ids", identity_ids)):
        if ids.shape != (features.shape[0],):
            raise ValueError(f"{name} must have shape [{features.shape[0]}] (one per feature), got {list(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
