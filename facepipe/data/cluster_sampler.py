"""Cluster-based mini-batches for CLMLE (Huang et al., TPAMI 2019, Sec. 3.3).

Each identity's samples are split into clusters (spherical k-means, done elsewhere). A batch is
built around a *query cluster*: pick an identity uniformly at random (so minority identities are
queried as often as majority ones), take its cluster with the highest cached loss ("hardest", the
paper's choice) or a random one ("uniform", the Table 7 ablation), then retrieve the M - 1
clusters whose centroids are nearest to the query's by cosine similarity, making sure the batch
holds another cluster of the query's identity and a cluster of another identity. k images are
drawn from each of the M clusters (the paper uses M = 12, k = 20: batch size 240).

Small clusters. The paper draws 20 *distinct* images from clusters of l = 200 ("we randomly sample
20 examples out of l = 200"); its batch is M * k distinct images spread over M clusters. With
clusters smaller than k (e.g. LFW, where a cluster is a whole identity of 1-5 images) drawing k
with replacement filled a 120-image batch with about 40 distinct images, each repeated, which
adds no information and inflates every repeated sample's weight in its batch centroid. The reading
kept here: a cluster contributes min(k, its size) distinct images (drawn without replacement), and
the batch keeps its fixed size M * k -- the DataLoader, the rank split and mid-epoch resume count
in whole batches of that size -- by taking further clusters in the same nearest-neighbour order
after the M chosen ones, each again with min(k, size) distinct images, the last one possibly
fewer. Small clusters thus give more clusters per batch, never repeated images; with clusters of
at least k images the batch is exactly the paper's M clusters of k. The neighbour table is sized
for the clusters a batch typically needs; when a query's row runs out, the rest of the order comes
from a search over all clusters. Only when all clusters together hold fewer than M * k images
(tiny datasets) do images repeat: every image is then taken once and the remaining slots are
spread evenly over the clusters as repeats.

Conventions shared with :class:`facepipe.data.samplers.EpochSampler`: the sampler yields
``(index, sample_seed)`` pairs, ``set_epoch(epoch, start)`` skips the first ``start`` samples of
the epoch (mid-epoch resume) and ``len()`` counts the samples left. Batch ``b`` of epoch ``e`` is
drawn from a generator seeded by ``(seed, e, b)``, so it does not depend on earlier batches.

The one input besides ``(seed, epoch)`` is the loss cache read by the "hardest" query: a resumed
run reproduces the uninterrupted one exactly only when the cache is saved in the checkpoint
(:meth:`LossCache.state_dict`) and restored before the epoch resumes.

Where the cache lives: a DataLoader iterates its sampler in the *main* process, also with
``num_workers > 0`` (workers only receive the indices), so the :class:`LossCache` is an ordinary
main-process object that the trainer updates after each step. Batches are built lazily, one at a
time, so a batch sees the losses of the steps before it -- up to the DataLoader's prefetch: with
workers the sampler runs ``prefetch_factor * num_workers`` batches ahead of training, so a batch
sees losses a few steps old. That is harmless, since the query choice only needs a recent
estimate of each cluster's difficulty.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import faiss
import numpy as np
import torch
from torch.utils.data import Sampler

from facepipe.runtime.faiss_device import search_uses_gpu, to_device

QUERY_MODES = ("hardest", "uniform")
# The neighbour table keeps (NEIGHBOUR_FACTOR - 1) * M nearest clusters per cluster beyond those a
# batch typically needs (M, or more when clusters hold fewer than k images), so that the
# same/other-identity constraints and the fill usually need no search over all clusters.
NEIGHBOUR_FACTOR = 4
NEIGHBOUR_PURPOSE = "cluster sampler neighbours"


def _as_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


class LossCache:
    """Last observed loss of every training sample, NaN for samples never seen (Huang et al., Sec. 3.3).

    The paper scores a cluster by "averaging the losses of cluster members that are cached
    online". We keep each sample's *last* loss rather than a moving average: a sample is revisited
    only every few epochs, so its last loss already reflects the current model, and an average
    would mostly carry stale values. Pass per-sample losses before any cost-sensitive weighting,
    so that the cache measures difficulty rather than class frequency.
    """

    def __init__(self, num_samples: int) -> None:
        if num_samples < 1:
            raise ValueError("a loss cache needs at least one sample")
        self.losses = np.full(int(num_samples), np.nan, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.losses)

    def update(self, indices, losses) -> None:
        """Store ``losses[i]`` as the loss of sample ``indices[i]`` (tensors or arrays)."""
        indices = _as_numpy(indices).astype(np.int64).reshape(-1)
        losses = _as_numpy(losses).astype(np.float64).reshape(-1)
        if indices.shape != losses.shape:
            raise ValueError(f"got {len(indices)} indices but {len(losses)} losses")
        if indices.size and (indices.min() < 0 or indices.max() >= len(self.losses)):
            raise ValueError(f"sample indices must lie in [0, {len(self.losses)})")
        # A non-finite loss (e.g. an AMP overflow step) says nothing about difficulty, and storing
        # it would pin its cluster as the hardest (inf) or mark it unseen again (NaN): skip it.
        finite = np.isfinite(losses)
        # A sample drawn twice in one batch (only on tiny datasets, see the module docstring) keeps
        # one of its losses.
        self.losses[indices[finite]] = losses[finite]

    def mean_loss(self, indices: np.ndarray) -> float:
        """Mean cached loss of ``indices``; +inf if any is unseen, so unseen clusters come first."""
        values = self.losses[indices]
        if values.size == 0:
            return float("-inf")
        if np.isnan(values).any():
            return float("inf")
        return float(values.mean())

    def cluster_mean_loss(self, sample_cluster: np.ndarray, num_clusters: int) -> np.ndarray:
        """[K] mean cached loss per cluster: +inf when a member is unseen, -inf for empty clusters."""
        sample_cluster = np.asarray(sample_cluster, dtype=np.int64)
        if sample_cluster.shape != self.losses.shape:
            raise ValueError(f"sample_cluster has {len(sample_cluster)} entries, the cache {len(self.losses)}")
        unseen = np.isnan(self.losses)
        sums = np.bincount(sample_cluster, weights=np.where(unseen, 0.0, self.losses), minlength=num_clusters)
        counts = np.bincount(sample_cluster, minlength=num_clusters)
        unseen_counts = np.bincount(sample_cluster, weights=unseen, minlength=num_clusters)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = sums / counts
        means[unseen_counts > 0] = np.inf
        means[counts == 0] = -np.inf
        return means

    def state_dict(self) -> dict[str, torch.Tensor]:
        # A tensor, not a numpy array: checkpoints are read with torch.load(weights_only=True),
        # which refuses numpy arrays.
        return {"losses": torch.from_numpy(self.losses.copy())}

    def load_state_dict(self, state: dict) -> None:
        losses = _as_numpy(state["losses"]).astype(np.float64).reshape(-1)
        if losses.shape != self.losses.shape:
            raise ValueError(f"the saved cache has {len(losses)} samples, this one {len(self.losses)}")
        self.losses = losses.copy()


class ClusterBatch(NamedTuple):
    """One batch: its clusters (query first; M, or more when clusters hold fewer than k images) and,
    grouped in that order, its samples and seeds."""

    clusters: np.ndarray
    indices: np.ndarray
    sample_seeds: np.ndarray


class ClusterBatchSampler(Sampler):
    """Cluster-based mini-batch sampler of CLMLE (Huang et al., Sec. 3.3); see the module docstring.

    Use with ``DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler,
    drop_last=True)``. Each batch holds M * k images: the query cluster's first, then the other
    clusters' in nearest-neighbour order, each cluster's images contiguous. A cluster contributes
    min(k, its size) distinct images; when the M chosen clusters hold fewer than M * k between
    them, further clusters fill the batch (the last one possibly with fewer images). Images repeat
    only when all clusters together hold fewer than M * k images (see the module docstring).
    """

    def __init__(self, sample_cluster: np.ndarray, centroids: np.ndarray, cluster_identity: np.ndarray,
                 clusters_per_batch: int = 12, images_per_cluster: int = 20, num_batches: int | None = None,
                 seed: int = 0, query: str = "hardest", loss_cache: LossCache | None = None) -> None:
        if clusters_per_batch < 2:
            raise ValueError(f"clusters_per_batch must be at least 2 (query plus neighbours), got {clusters_per_batch}")
        if images_per_cluster < 1:
            raise ValueError(f"images_per_cluster must be at least 1, got {images_per_cluster}")
        if query not in QUERY_MODES:
            raise ValueError(f"unknown query mode '{query}'; choose one of {list(QUERY_MODES)}")
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be at least 1, got {num_batches}")
        self.clusters_per_batch = int(clusters_per_batch)
        self.images_per_cluster = int(images_per_cluster)
        self.seed = int(seed)
        self.query = query
        self.loss_cache = loss_cache
        self.epoch = 0
        self.start = 0
        self.update_clusters(sample_cluster, centroids, cluster_identity)
        # Default: about one pass over the data per epoch, at least one batch on tiny datasets.
        self.num_batches = int(num_batches) if num_batches is not None else max(1, self.num_samples // self.batch_size)

    @property
    def batch_size(self) -> int:
        return self.clusters_per_batch * self.images_per_cluster

    def update_clusters(self, sample_cluster: np.ndarray, centroids: np.ndarray, cluster_identity: np.ndarray) -> None:
        """Swap in a new cluster assignment (after re-clustering) and rebuild the neighbour table."""
        sample_cluster = np.asarray(sample_cluster, dtype=np.int64)
        centroids = np.asarray(centroids, dtype=np.float32)
        cluster_identity = np.asarray(cluster_identity, dtype=np.int64)
        if sample_cluster.ndim != 1 or sample_cluster.size == 0:
            raise ValueError("sample_cluster must be a non-empty 1-D array (one cluster per sample)")
        if centroids.ndim != 2 or centroids.shape[0] == 0:
            raise ValueError(f"centroids must be a non-empty [K, D] array, got shape {centroids.shape}")
        num_clusters = centroids.shape[0]
        if cluster_identity.shape != (num_clusters,):
            raise ValueError(f"cluster_identity has shape {cluster_identity.shape}, expected ({num_clusters},) "
                             "to match the centroids")
        if sample_cluster.min() < 0 or sample_cluster.max() >= num_clusters:
            raise ValueError(f"sample_cluster values must lie in [0, {num_clusters})")
        sizes = np.bincount(sample_cluster, minlength=num_clusters)
        if (sizes == 0).any():
            raise ValueError(f"{int((sizes == 0).sum())} clusters are empty (e.g. cluster {int(np.argmin(sizes))}); "
                             "drop them before sampling")
        if self.loss_cache is not None and len(self.loss_cache) != len(sample_cluster):
            raise ValueError(f"the loss cache has {len(self.loss_cache)} samples, sample_cluster {len(sample_cluster)}")
        norms = np.linalg.norm(centroids, axis=1, keepdims=True)
        if not np.isfinite(centroids).all() or (norms == 0).any():
            raise ValueError("centroids must be finite and non-zero")

        self.num_samples = len(sample_cluster)
        self.sample_cluster = sample_cluster
        self.cluster_sizes = sizes
        self.draw_sizes = np.minimum(sizes, self.images_per_cluster)  # distinct images a cluster gives
        # Re-normalised so that inner product is cosine similarity even for slightly off inputs.
        self.centroids = np.ascontiguousarray(centroids / norms, dtype=np.float32)
        self.cluster_identity = cluster_identity
        # CSR layouts: members of cluster c are members[member_offsets[c]:member_offsets[c + 1]],
        # clusters of the i-th identity likewise; they keep per-batch work independent of N and K.
        self.members = np.argsort(sample_cluster, kind="stable")
        self.member_offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.identities, identity_sizes = np.unique(cluster_identity, return_counts=True)
        self.identity_clusters = np.argsort(cluster_identity, kind="stable")
        self.identity_offsets = np.concatenate([[0], np.cumsum(identity_sizes)])
        self.neighbours = self._neighbour_table()

    def _neighbour_table(self) -> np.ndarray:
        """[K, W] nearest clusters of every cluster by centroid cosine, in one batched FAISS search
        (on the GPUs faiss sees, replicated: each GPU answers a share of the queries)."""
        # Clusters smaller than k fill a batch with more clusters: widen the rows by that many.
        needed = int(np.ceil(self.batch_size / self.draw_sizes.mean()))
        width = min(len(self.centroids), (NEIGHBOUR_FACTOR - 1) * self.clusters_per_batch + needed)
        index = faiss.IndexFlatIP(self.centroids.shape[1])
        if search_uses_gpu(None, width, NEIGHBOUR_PURPOSE):
            index = to_device(index, purpose=NEIGHBOUR_PURPOSE, use_gpu=True)
        index.add(self.centroids)
        _, neighbours = index.search(self.centroids, width)
        return neighbours.astype(np.int64)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; skip its first ``start`` samples (mid-epoch resume)."""
        if start < 0:
            raise ValueError(f"start must be non-negative, got {start}")
        self.epoch, self.start = int(epoch), int(start)

    def __len__(self) -> int:
        return max(0, self.num_batches * self.batch_size - self.start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # Read epoch and start now, not at the first next(): a later set_epoch must not change an
        # iteration already handed to a DataLoader.
        return self._iterate(self.epoch, self.start)

    def _iterate(self, epoch: int, start: int) -> Iterator[tuple[int, int]]:
        first_batch, skip = divmod(start, self.batch_size)
        for batch_index in range(first_batch, self.num_batches):
            # Built only when reached, so the "hardest" query sees the latest cached losses.
            batch = self.make_batch(epoch, batch_index)
            for position in range(skip if batch_index == first_batch else 0, self.batch_size):
                yield int(batch.indices[position]), int(batch.sample_seeds[position])

    def make_batch(self, epoch: int, batch_index: int) -> ClusterBatch:
        """Batch ``batch_index`` of ``epoch``; a function of (seed, epoch, batch_index, loss cache)."""
        rng = np.random.default_rng([self.seed % 2**63, int(epoch) % 2**63, int(batch_index)])
        clusters, counts = self._fill(self._choose_clusters(rng))
        indices = np.concatenate([self._draw_from_cluster(cluster, count, rng)
                                  for cluster, count in zip(clusters, counts)])
        seeds = rng.integers(0, 2**31 - 1, size=self.batch_size)
        return ClusterBatch(clusters, indices, seeds)

    def _fill(self, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Clusters and image counts of a batch: the chosen clusters with min(k, size) images each,
        then further clusters in the query's neighbour order until the batch holds M * k."""
        clusters = [int(c) for c in chosen]
        counts = [int(n) for n in self.draw_sizes[chosen]]
        total = sum(counts)
        if total < self.batch_size:
            taken = set(clusters)
            for cluster in self._neighbour_order(clusters[0]):
                if cluster in taken:
                    continue
                taken.add(cluster)
                clusters.append(cluster)
                counts.append(min(int(self.draw_sizes[cluster]), self.batch_size - total))
                total += counts[-1]
                if total == self.batch_size:
                    break
        clusters = np.asarray(clusters, dtype=np.int64)
        if total < self.batch_size:  # every cluster is in the batch and still too few: tiny dataset
            return clusters, self._spread(self.cluster_sizes[clusters])
        return clusters, np.asarray(counts, dtype=np.int64)

    def _neighbour_order(self, query: int) -> Iterator[int]:
        """Clusters by decreasing centroid similarity to the query: its table row, then (only if
        the row runs out) every cluster; the caller skips those already taken."""
        yield from (int(c) for c in self.neighbours[query])
        similarity = self.centroids @ self.centroids[query]
        yield from (int(c) for c in np.argsort(-similarity, kind="stable"))

    def _spread(self, sizes: np.ndarray) -> np.ndarray:
        """Counts summing to M * k with as many distinct images as the clusters hold: as even as
        possible under count <= size when they hold enough, else all of them plus even repeats."""
        target = self.batch_size
        if sizes.sum() < target:
            extra = np.full(len(sizes), (target - sizes.sum()) // len(sizes))
            extra[: (target - sizes.sum()) % len(sizes)] += 1
            return sizes + extra
        # Water-filling: the lowest level t with sum(min(size, t)) >= target, then one more image
        # for the first (in batch order) clusters that reach t until the total is exact.
        level = 1
        while np.minimum(sizes, level).sum() < target:
            level += 1
        counts = np.minimum(sizes, level - 1)
        short = target - counts.sum()
        counts[np.flatnonzero(sizes >= level)[:short]] += 1
        return counts

    def _draw_from_cluster(self, cluster: int, count: int, rng: np.random.Generator) -> np.ndarray:
        members = self.members[self.member_offsets[cluster]: self.member_offsets[cluster + 1]]
        if count <= len(members):
            return rng.choice(members, size=count, replace=False)
        # Tiny datasets only: every member once, then the repeats.
        return np.concatenate([rng.permutation(members), rng.choice(members, size=count - len(members))])

    def _clusters_of(self, identity_position: int) -> np.ndarray:
        offsets = self.identity_offsets
        return self.identity_clusters[offsets[identity_position]: offsets[identity_position + 1]]

    def _choose_query(self, candidates: np.ndarray, rng: np.random.Generator) -> int:
        if self.query == "uniform" or self.loss_cache is None or len(candidates) == 1:
            # Without a cache every cluster counts as unseen, so "hardest" is a random pick too.
            return int(rng.choice(candidates))
        offsets = self.member_offsets
        scores = np.array([self.loss_cache.mean_loss(self.members[offsets[c]: offsets[c + 1]]) for c in candidates])
        return int(rng.choice(candidates[scores == scores.max()]))  # ties (e.g. all unseen) at random

    def _choose_clusters(self, rng: np.random.Generator) -> np.ndarray:
        """Query cluster first, then its M - 1 nearest clusters under the identity constraints."""
        own = self._clusters_of(int(rng.integers(len(self.identities))))
        query = self._choose_query(own, rng)
        identity = self.cluster_identity[query]
        if len(self.centroids) <= self.clusters_per_batch:
            order = np.argsort(-(self.centroids @ self.centroids[query]), kind="stable")
            return np.concatenate([[query], order[order != query]])

        row = self.neighbours[query]
        row = row[row != query]  # duplicated centroids may not list the query at position 0
        # Huang et al. Sec. 3.3: "make sure the retrieved clusters would come from both the same and
        # different classes" -- the nearest one of each kind is forced in, the rest by similarity.
        forced = []
        same = own[own != query]
        if len(same):
            listed = row[self.cluster_identity[row] == identity]
            nearest = listed[0] if len(listed) else same[np.argmax(self.centroids[same] @ self.centroids[query])]
            forced.append(int(nearest))
        if len(self.identities) > 1:
            listed = row[self.cluster_identity[row] != identity]
            if len(listed):
                forced.append(int(listed[0]))
            else:  # the table holds only the query's own identity: search all clusters (rare)
                similarity = self.centroids @ self.centroids[query]
                similarity[self.cluster_identity == identity] = -np.inf
                forced.append(int(np.argmax(similarity)))
        if len(forced) > self.clusters_per_batch - 1:  # M = 2: only one fits, keep the nearer
            forced = [max(forced, key=lambda c: float(self.centroids[c] @ self.centroids[query]))]
        chosen = [query, *forced]
        for cluster in row:
            if len(chosen) == self.clusters_per_batch:
                break
            if cluster not in chosen:
                chosen.append(int(cluster))
        return np.asarray(chosen, dtype=np.int64)
