"""CLMLE stages (Huang et al., TPAMI 2019, Sec. 3.2-3.3): clusters, cluster mini-batches, the
loss; run by the clmle plug-in (:mod:`facepipe.train.plugins.clmle`), which gives it the run's
narrow context (:class:`facepipe.train.plugins.base.PluginContext`), not the trainer.

When a stage whose loss is ``clmle`` starts, the current model embeds every training image (no
augmentation), each identity is split into balanced spherical k-means clusters of about
``cluster_size`` images, and training switches to cluster mini-batches (M clusters of k images
around a hardest query cluster). Every ``refresh_every_steps`` steps the features are extracted
again and the clusters rebuilt (the paper alternates every 2k-5k iterations). A stage epoch keeps
the run's number of steps per epoch, so the learning-rate schedule is unchanged; each step then
holds M * k images. BatchNorm is frozen during a clmle stage's steps unless the stage says
``bn: batch`` (:mod:`facepipe.train.batchnorm`).

The assignment and the per-sample loss cache are saved in every checkpoint, so a resumed run
continues with exactly the clusters and cache it had; ``clusters.npz`` in the run folder holds
the latest clusters for inspection.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from facepipe.data.cluster_sampler import ClusterBatchSampler, LossCache
from facepipe.data.clusters import ClusterAssignment, balanced_spherical_kmeans
from facepipe.losses.clmle import ClusterLossOutput, ClusterMarginLoss, format_margin_bounds
from facepipe.runtime.distributed import DistributedContext, broadcast_object, gather_rows

if TYPE_CHECKING:
    from facepipe.train.plugins.base import PluginContext

log = logging.getLogger(__name__)

CLUSTERS_FILE = "clusters.npz"


class ClusterStage:
    """The CLMLE state of one stage: assignment, sampler, loss cache, loss and refresh schedule."""

    def __init__(self, ctx: "PluginContext", stage_index: int, saved: dict[str, Any] | None = None) -> None:
        self.ctx = ctx
        self.stage_index = stage_index
        spec = ctx.config.train.stages[stage_index].loss
        self.settings = ctx.config.train.clusters
        self.loss = ClusterMarginLoss(spec.scale, spec.inter_margin, spec.intra_margin, spec.cost_sensitive,
                                      own_centroid=spec.own_centroid)
        self.classification_weight = spec.classification_weight
        dataset = ctx.dataset
        self.cache = LossCache(len(dataset))
        # The last (micro-)batch's per-sample own-centroid cosines (with / without the sample),
        # lone-sample mask and zero-loss share, detached, for mechanism reports; kept as tensors so
        # that a step does not wait for the device to report them.
        self.diagnostics: dict[str, torch.Tensor] = {}
        self.refresh_seconds = 0.0  # clustering (feature extraction + k-means) so far in this stage
        self.elapsed_seconds = 0.0  # wall time of the stage so far, clustering included
        if saved is not None and saved.get("stage") == stage_index:
            self.assignment = ClusterAssignment(saved["sample_cluster"].numpy(), saved["centroids"].numpy(),
                                                saved["cluster_identity"].numpy())
            self.cache.load_state_dict(saved["cache"])
            self.refreshed_at = int(saved["refreshed_at"])
            self.refresh_seconds = float(saved["refresh_seconds"])
            self.elapsed_seconds = float(saved["elapsed_seconds"])
        else:
            log.info("CLMLE margins: %s", format_margin_bounds(np.bincount(dataset.labels)))
            self.assignment = self._cluster()
            self.refreshed_at = ctx.global_step()
        self.sampler = ClusterBatchSampler(
            self.assignment.sample_cluster, self.assignment.centroids, self.assignment.cluster_identity,
            clusters_per_batch=self.settings.clusters_per_batch, images_per_cluster=self.settings.images_per_cluster,
            num_batches=ctx.steps_per_epoch, seed=ctx.config.seed, query=self.settings.query,
            loss_cache=self.cache,
        )
        self.rank_sampler = RankClusterBatches(self.sampler, ctx.dist, ctx.config.train.micro_batches,
                                               ctx.steps_per_epoch)

    # ------------------------------------------------------------------ clusters
    def _cluster(self) -> ClusterAssignment:
        """Huang et al. Eq. 6-7: features of the current model, balanced spherical k-means per identity."""
        ctx = self.ctx
        started = time.perf_counter()
        # Every rank gets all features in order; rank 0 clusters them and broadcasts the one
        # assignment (k-means need not agree bit for bit across ranks).
        embeddings = ctx.embed_training_images(self.settings.batch_size)
        extracted = time.perf_counter()
        assignment = None
        if ctx.dist.is_main:
            assignment = balanced_spherical_kmeans(
                embeddings, ctx.dataset.labels, self.settings.cluster_size,
                seed=ctx.config.seed + ctx.global_step(), niter=self.settings.kmeans_iterations,
            )
            assignment.to_npz(ctx.run_dir / CLUSTERS_FILE)
        assignment = broadcast_object(ctx.dist, assignment)
        seconds = time.perf_counter() - started
        self.refresh_seconds += seconds
        sizes = assignment.cluster_sizes()
        record = {"seconds": seconds, "extract_seconds": extracted - started, "clusters": assignment.num_clusters,
                  "cluster_size_min": int(sizes.min()), "cluster_size_max": int(sizes.max()),
                  "refresh_seconds_total": self.refresh_seconds}
        log.info("clusters: %d for %d identities (sizes %d..%d) in %.1f s (features %.1f s)",
                 assignment.num_clusters, ctx.dataset.num_classes, sizes.min(), sizes.max(), seconds,
                 record["extract_seconds"])
        ctx.run_log().write("clusters", ctx.global_step(), **record)
        return assignment

    def maybe_refresh(self) -> bool:
        """Re-cluster when ``refresh_every_steps`` steps have passed since the last clustering."""
        if self.ctx.global_step() - self.refreshed_at < self.settings.refresh_every_steps:
            return False
        self.assignment = self._cluster()
        self.refreshed_at = self.ctx.global_step()
        self.sampler.update_clusters(self.assignment.sample_cluster, self.assignment.centroids,
                                     self.assignment.cluster_identity)
        return True

    # ------------------------------------------------------------------ loss
    def loss_for(self, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> ClusterLossOutput:
        """Huang et al. Eq. 8-9 on a cluster mini-batch; the clusters and, for a sample alone in its
        cluster in the batch, the stored centroid come from the current assignment."""
        sample_cluster = self.assignment.sample_cluster[indices.cpu().numpy()]
        clusters = torch.from_numpy(sample_cluster).to(embeddings.device)
        stored = torch.from_numpy(self.assignment.centroids[sample_cluster]).to(embeddings.device)
        out = self.loss(embeddings, clusters, labels, stored_centroids=stored)
        self.diagnostics = {"own_cosine_inclusive": out.own_cosine_inclusive,
                            "own_cosine_leave_one_out": out.own_cosine_leave_one_out,
                            "alone": out.alone, "zero_loss_fraction": out.zero_loss_fraction}
        return out

    def batch_stats(self, indices: torch.Tensor) -> dict[str, float]:
        """The mechanism of the last batch in numbers, for the training log: mean cosine of a sample
        to its own batch centroid with and without itself (samples with cluster mates in the
        batch), the share of samples alone in their cluster, the share at zero loss, the distinct
        images and clusters of the step (``indices``, this rank's share), and the shares of its
        distinct images that have another image of their identity in the batch and that belong to
        single-image people."""
        diagnostics = self.diagnostics
        if not diagnostics:
            return {}
        mates = ~diagnostics["alone"]
        stats = {"clmle_alone_fraction": float((~mates).float().mean()),
                 "clmle_zero_loss_fraction": float(diagnostics["zero_loss_fraction"])}
        if bool(mates.any()):
            stats["clmle_own_cos_with"] = float(diagnostics["own_cosine_inclusive"][mates].mean())
            stats["clmle_own_cos_without"] = float(diagnostics["own_cosine_leave_one_out"][mates].mean())
        chosen = indices.cpu().numpy()
        distinct = np.unique(chosen)
        stats["clmle_distinct_images"] = float(len(distinct))
        stats["clmle_clusters"] = float(len(np.unique(self.assignment.sample_cluster[chosen])))
        # What the batch offers each sample beyond negatives: another image of its own identity (a
        # positive for the intra term or an own-cluster mate). A person with one training image
        # never has one, so the share of such samples says how much of the batch CLMLE can only
        # push away from the others (LFW's tail is mostly single-image people).
        labels = np.asarray(self.ctx.dataset.labels)[distinct]
        _, inverse, per_identity = np.unique(labels, return_inverse=True, return_counts=True)
        stats["clmle_positive_fraction"] = float((per_identity[inverse] >= 2).mean())
        stats["clmle_single_image_fraction"] = float((np.asarray(self.ctx.class_counts)[labels] == 1).mean())
        return stats

    def record_losses(self, indices: torch.Tensor, per_sample: torch.Tensor) -> None:
        """Cache the step's per-sample losses, those of every rank: the caches stay identical, so
        each rank's hardest-cluster queries see the whole run's losses."""
        dist = self.ctx.dist
        self.cache.update(gather_rows(dist, indices.cpu().numpy()), gather_rows(dist, per_sample.detach().cpu().numpy()))

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage_index,
            "sample_cluster": torch.from_numpy(self.assignment.sample_cluster),
            "centroids": torch.from_numpy(self.assignment.centroids),
            "cluster_identity": torch.from_numpy(self.assignment.cluster_identity),
            "cache": self.cache.state_dict(),
            "refreshed_at": self.refreshed_at,
            "refresh_seconds": self.refresh_seconds,
            "elapsed_seconds": self.elapsed_seconds,
        }

    def add_elapsed(self, seconds: float) -> float:
        """Count an epoch's wall time; returns the share of the stage spent clustering."""
        self.elapsed_seconds += seconds
        return self.refresh_seconds / max(self.elapsed_seconds, 1e-9)


class RankClusterBatches:
    """This rank's cluster mini-batches: step s of an epoch consumes G x m cluster batches (G
    ranks, m micro-batches), numbered s*G*m ... s*G*m + G*m - 1; rank r takes the m batches from
    s*G*m + r*m. One process with m = G micro-batches therefore trains exactly the batches of G
    ranks, and each rank draws different query clusters."""

    def __init__(self, sampler: ClusterBatchSampler, ctx: DistributedContext, micro_batches: int,
                 steps_per_epoch: int) -> None:
        self.sampler = sampler
        self.ctx = ctx
        self.micro_batches = micro_batches
        self.steps_per_epoch = steps_per_epoch
        self.items_per_step = micro_batches * sampler.batch_size
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """``start`` in this rank's items (whole steps, as the trainer resumes at step boundaries)."""
        self.epoch, self.start_step = int(epoch), int(start) // self.items_per_step

    def __iter__(self):
        epoch, per_step = self.epoch, self.ctx.world_size * self.micro_batches
        for step in range(self.start_step, self.steps_per_epoch):
            for micro in range(self.micro_batches):
                batch = self.sampler.make_batch(epoch, step * per_step + self.ctx.rank * self.micro_batches + micro)
                yield from zip(batch.indices.tolist(), batch.sample_seeds.tolist())

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.items_per_step
