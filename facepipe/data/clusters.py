"""Per-identity balanced spherical k-means clusters (Huang et al., Sec. 3.2, Eq. 6-7).

Huang et al., "Deep Imbalanced Learning for Face Recognition and Attribute
Prediction" (CLMLE). Every identity c with L_c samples is split into K_c = max(1, floor(L_c / l))
clusters of (almost) equal size l: spherical k-means finds the modes (Eq. 6), a greedy balanced
assignment makes the sizes differ by at most one (the paper asks for equal sizes |I_ck| = l,
which L_c is rarely a multiple of), and each centroid is the normalised mean of its members
(Eq. 7). Embeddings are compared by inner product on the unit hypersphere.

Shared by the CLMLE training stage (:mod:`facepipe.train.cluster_stage`), the identity index
(:mod:`facepipe.index`) and the closed-set evaluation, so it sits in data, below all of them. The
paper's margin bounds and the suggested CLMLE margins are next to the loss, in
:mod:`facepipe.losses.clmle`.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np

from facepipe.runtime.io import atomic_write

__all__ = [
    "ClusterAssignment",
    "balanced_assignment",
    "balanced_spherical_kmeans",
    "clusters_per_identity",
]

_NPZ_KEYS = ("sample_cluster", "centroids", "cluster_identity")


@dataclass
class ClusterAssignment:
    """Clusters of a labelled embedding set.

    Attributes:
        sample_cluster: [N] int64, cluster id of every sample.
        centroids: [K, D] float32, unit-norm cluster centroids.
        cluster_identity: [K] int64, identity label of every cluster.
    """

    sample_cluster: np.ndarray
    centroids: np.ndarray
    cluster_identity: np.ndarray

    def __post_init__(self) -> None:
        self.sample_cluster = np.asarray(self.sample_cluster)
        self.centroids = np.asarray(self.centroids)
        self.cluster_identity = np.asarray(self.cluster_identity)
        if self.sample_cluster.ndim != 1 or not np.issubdtype(self.sample_cluster.dtype, np.integer):
            raise ValueError(f"sample_cluster must be a 1-D integer array [N], got {self._describe(self.sample_cluster)}")
        if self.centroids.ndim != 2 or not np.issubdtype(self.centroids.dtype, np.floating):
            raise ValueError(f"centroids must be a 2-D float array [K, D], got {self._describe(self.centroids)}")
        k = self.centroids.shape[0]
        if self.cluster_identity.shape != (k,) or not np.issubdtype(self.cluster_identity.dtype, np.integer):
            raise ValueError(
                f"cluster_identity must be an integer array [K={k}] (one label per centroid), "
                f"got {self._describe(self.cluster_identity)}"
            )
        if self.sample_cluster.size and (self.sample_cluster.min() < 0 or self.sample_cluster.max() >= k):
            raise ValueError(f"sample_cluster holds ids outside [0, {k}) (K = number of centroids)")
        self.sample_cluster = self.sample_cluster.astype(np.int64, copy=False)
        self.centroids = self.centroids.astype(np.float32, copy=False)
        self.cluster_identity = self.cluster_identity.astype(np.int64, copy=False)

    @staticmethod
    def _describe(array: np.ndarray) -> str:
        return f"shape {list(array.shape)} dtype {array.dtype}"

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])

    def cluster_sizes(self) -> np.ndarray:
        """[K] number of samples in every cluster."""
        return np.bincount(self.sample_cluster, minlength=self.num_clusters)

    def clusters_of_identity(self, identity: int) -> np.ndarray:
        """Ids of the clusters of ``identity`` (empty if it has none)."""
        return np.flatnonzero(self.cluster_identity == identity)

    def to_npz(self, path: str | os.PathLike) -> None:
        with atomic_write(path, "wb") as handle:
            np.savez(handle, **{key: getattr(self, key) for key in _NPZ_KEYS})

    @classmethod
    def from_npz(cls, path: str | os.PathLike) -> "ClusterAssignment":
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            with data:
                arrays = {key: data[key] for key in _NPZ_KEYS if key in data.files}
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read cluster assignment ({exc})") from exc
        missing = [key for key in _NPZ_KEYS if key not in arrays]
        if missing:
            raise ValueError(f"{path}: not a cluster assignment file, missing array(s) {missing}")
        try:
            return cls(**arrays)
        except ValueError as exc:
            raise ValueError(f"{path}: corrupt cluster assignment: {exc}") from exc


def clusters_per_identity(count: int, cluster_size: int) -> int:
    """K_c = max(1, floor(L_c / l)) (Huang et al. Sec. 3.2, below Eq. 7); an identity with fewer
    than l samples still forms one cluster."""
    if cluster_size < 1:
        raise ValueError(f"cluster_size must be >= 1, got {cluster_size}")
    if count < 0:
        raise ValueError(f"sample count must be >= 0, got {count}")
    return max(1, count // cluster_size)


def balanced_assignment(similarity: np.ndarray) -> np.ndarray:
    """Greedy balanced assignment of L samples to K clusters from similarities [L, K].

    Pairs are taken in order of decreasing similarity; a sample goes to its best cluster that
    still has room. Every cluster may hold floor(L/K) samples and exactly L mod K of them one
    more, so sizes differ by at most one and every sample finds a place.
    """
    n, k = similarity.shape
    base, extra = divmod(n, k)
    order = np.argsort(-similarity, axis=None, kind="stable")
    samples, clusters = np.divmod(order, k)
    assignment = [-1] * n
    fill = [0] * k
    left = n
    for i, j in zip(samples.tolist(), clusters.tolist()):
        if assignment[i] >= 0:
            continue
        if fill[j] >= base:
            if fill[j] > base or extra == 0:  # full: its base share and no "+1" slot left
                continue
            extra -= 1  # this cluster takes one of the L mod K larger sizes
        assignment[i] = j
        fill[j] += 1
        left -= 1
        if left == 0:
            break
    return np.asarray(assignment, dtype=np.int64)


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _spherical_kmeans_centroids(x: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    import faiss

    from facepipe.runtime.faiss_device import kmeans_uses_gpu

    # Identities hold few points per centroid (l of them); FAISS would warn on every call. On the
    # CPU (gpu=False) this is the plain FAISS k-means; large identities go to the GPU.
    kmeans = faiss.Kmeans(
        x.shape[1], k, niter=niter, spherical=True, seed=seed, verbose=False,
        min_points_per_centroid=1, max_points_per_centroid=1 << 30,
        gpu=kmeans_uses_gpu(len(x), k),
    )
    kmeans.train(np.ascontiguousarray(x, dtype=np.float32))
    return kmeans.centroids


def _member_centroids(x: np.ndarray, assignment: np.ndarray, k: int) -> np.ndarray:
    """Eq. 7: normalised mean of the members; a mean of (near) zero length (antipodal members)
    falls back to the cluster's first member so that every centroid stays a unit vector."""
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(sums, assignment, x)
    norms = np.linalg.norm(sums, axis=1)
    degenerate = norms < 1e-6
    if degenerate.any():
        first = np.array([np.flatnonzero(assignment == j)[0] for j in np.flatnonzero(degenerate)])
        sums[degenerate] = x[first]
        norms[degenerate] = 1.0
    return (sums / norms[:, None]).astype(np.float32)


def _check_inputs(embeddings: np.ndarray, labels: np.ndarray, cluster_size: int) -> None:
    if cluster_size < 1:
        raise ValueError(f"cluster_size must be >= 1, got {cluster_size}")
    if embeddings.ndim != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise ValueError(f"embeddings must be a non-empty 2-D array [N, D], got shape {list(embeddings.shape)}")
    if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must be a vector with one label per embedding: got labels shape {list(labels.shape)} "
            f"for {embeddings.shape[0]} embeddings"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings contain non-finite values (NaN or inf)")
    if (np.linalg.norm(embeddings, axis=1) == 0).any():
        raise ValueError("embeddings contain zero vectors, which have no direction on the hypersphere")


def balanced_spherical_kmeans(
    embeddings: np.ndarray,
    labels: np.ndarray,
    cluster_size: int,
    seed: int = 0,
    niter: int = 20,
    progress: bool = False,
) -> ClusterAssignment:
    """Cluster every identity separately into K_c balanced clusters (Huang et al. Eq. 6-7).

    Args:
        embeddings: [N, D] features; L2-normalised here.
        labels: [N] integer identity labels.
        cluster_size: target cluster size l; identity c gets ``clusters_per_identity(L_c, l)``
            clusters whose sizes are floor(L_c / K_c) or ceil(L_c / K_c).
        seed: FAISS k-means seed; the result is deterministic for a seed. Identities large
            enough for the GPU (:func:`facepipe.runtime.faiss_device.kmeans_uses_gpu`) are
            clustered there when faiss sees one; GPU float arithmetic may give slightly
            different modes than the CPU.
        niter: k-means iterations.
        progress: tqdm bar over identities.

    Cluster ids are contiguous: the clusters of the smallest label first, and so on.
    """
    from tqdm import tqdm

    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels)
    _check_inputs(embeddings, labels, cluster_size)
    x = _normalise_rows(embeddings.astype(np.float32))

    identities, inverse = np.unique(labels, return_inverse=True)
    members_of = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    sample_cluster = np.empty(len(x), dtype=np.int64)
    centroids, cluster_identity = [], []
    offset = 0
    for identity, members in tqdm(
        zip(identities.tolist(), members_of), total=len(identities), desc="clusters", unit="id",
        disable=not progress, dynamic_ncols=True,
    ):
        k = clusters_per_identity(len(members), cluster_size)
        xc = x[members]
        if k == 1:
            assignment = np.zeros(len(members), dtype=np.int64)
        else:
            modes = _spherical_kmeans_centroids(xc, k, seed, niter)
            assignment = balanced_assignment(xc @ modes.T)
        sample_cluster[members] = assignment + offset
        centroids.append(_member_centroids(xc, assignment, k))
        cluster_identity.append(np.full(k, identity, dtype=np.int64))
        offset += k
    return ClusterAssignment(sample_cluster, np.concatenate(centroids), np.concatenate(cluster_identity))
