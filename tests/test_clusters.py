"""Tests for facepipe.data.clusters: K_c (Huang et al. Eq. 6 reading), balanced sizes, membership,
centroids (Eq. 7), blob recovery, determinism, npz round trip, errors; and the paper's 2-D
margin bounds (facepipe.losses.clmle)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from facepipe.data.clusters import (
    ClusterAssignment,
    balanced_assignment,
    balanced_spherical_kmeans,
    clusters_per_identity,
)
from facepipe.losses.clmle import format_margin_bounds, paper_margin_bounds


def random_data(counts, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)]).astype(np.int64)
    return rng.standard_normal((len(labels), dim)).astype(np.float32), labels


def blob_data(blobs_per_identity, points_per_blob, dim=32, seed=0):
    """Tight blobs around random directions; returns embeddings, labels and the blob of each sample."""
    rng = np.random.default_rng(seed)
    x, labels, blob = [], [], []
    b = 0
    for identity, n_blobs in enumerate(blobs_per_identity):
        for _ in range(n_blobs):
            centre = rng.standard_normal(dim)
            x.append(centre + 0.01 * rng.standard_normal((points_per_blob, dim)))
            labels += [identity] * points_per_blob
            blob += [b] * points_per_blob
            b += 1
    return np.concatenate(x).astype(np.float32), np.array(labels), np.array(blob)


# ---------------------------------------------------------------- K_c
@pytest.mark.parametrize("count, size, expected", [(23, 5, 4), (25, 5, 5), (4, 5, 1), (1, 5, 1), (0, 5, 1), (10, 1, 10)])
def test_clusters_per_identity(count, size, expected):
    assert clusters_per_identity(count, size) == expected


def test_clusters_per_identity_rejects_bad_size():
    with pytest.raises(ValueError, match="cluster_size"):
        clusters_per_identity(10, 0)


# ---------------------------------------------------------------- balanced assignment
def test_uneven_identity_sizes_differ_by_at_most_one():
    x, y = random_data([23, 7, 3])
    result = balanced_spherical_kmeans(x, y, cluster_size=5)
    # 23 -> K=4 sizes {5,6,6,6}; 7 -> K=1; 3 -> K=1 (L_c < l)
    assert result.num_clusters == 6
    assert result.cluster_identity.tolist() == [0, 0, 0, 0, 1, 2]
    assert sorted(result.cluster_sizes()[:4].tolist()) == [5, 6, 6, 6]
    assert result.cluster_sizes()[4:].tolist() == [7, 3]


def test_every_sample_assigned_once_to_own_identity():
    x, y = random_data([40, 17, 9, 31], seed=3)
    result = balanced_spherical_kmeans(x, y, cluster_size=4)
    assert result.sample_cluster.shape == (len(y),)
    assert result.sample_cluster.dtype == np.int64
    assert result.cluster_sizes().sum() == len(y)
    assert (result.cluster_identity[result.sample_cluster] == y).all()
    for c, n in enumerate([40, 17, 9, 31]):
        k = clusters_per_identity(n, 4)
        sizes = result.cluster_sizes()[result.clusters_of_identity(c)]
        assert len(sizes) == k
        assert sorted(sizes.tolist()) == sorted([n // k + 1] * (n % k) + [n // k] * (k - n % k))


def test_balanced_assignment_is_greedy_by_similarity():
    # 3 samples, 2 clusters: capacities 2 and 1 in some order (L mod K = 1 extra slot).
    # Pairs descending: (0,c0)=.9, (1,c0)=.8, (2,c0)=.7 -> c0 is full at 2, sample 2 goes to c1.
    sim = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    assert balanced_assignment(sim).tolist() == [0, 0, 1]
    # 4 samples all preferring cluster 0, sizes exactly 2 and 2: .9 (0,c0), .8 (1,c0) fill c0;
    # .7 (2,c0) is refused, .6 (2,c1) taken, (3,c0) refused, so sample 3 ends in c1 at 0.0.
    sim = np.array([[0.9, 0.1], [0.8, 0.5], [0.7, 0.6], [0.6, 0.0]])
    assert balanced_assignment(sim).tolist() == [0, 0, 1, 1]


def test_identity_without_samples_gets_no_cluster_and_ids_are_contiguous():
    x, y = random_data([6, 6], seed=1)
    y = np.where(y == 1, 5, 2)  # labels 2 and 5; 0,1,3,4 have no samples
    result = balanced_spherical_kmeans(x, y, cluster_size=3)
    assert result.cluster_identity.tolist() == [2, 2, 5, 5]
    assert result.clusters_of_identity(3).size == 0
    assert set(result.sample_cluster[:6].tolist()) == {0, 1}
    assert set(result.sample_cluster[6:].tolist()) == {2, 3}


def test_centroids_are_normalised_member_means():
    x, y = random_data([23, 11], seed=2)
    result = balanced_spherical_kmeans(x, y, cluster_size=5)
    assert result.centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-6)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for k in range(result.num_clusters):
        mean = unit[result.sample_cluster == k].mean(0)
        np.testing.assert_allclose(result.centroids[k], mean / np.linalg.norm(mean), atol=1e-5)


def test_recovers_well_separated_blobs():
    x, y, blob = blob_data([3, 2], points_per_blob=10)
    result = balanced_spherical_kmeans(x, y, cluster_size=10, seed=0)
    assert result.num_clusters == 5
    # each cluster is exactly one blob: a bijection between clusters and blobs
    pairs = set(zip(result.sample_cluster.tolist(), blob.tolist()))
    assert len(pairs) == 5
    assert len({k for k, _ in pairs}) == 5 and len({b for _, b in pairs}) == 5


def test_deterministic_for_a_seed():
    x, y = random_data([60, 33], seed=4)
    a = balanced_spherical_kmeans(x, y, cluster_size=7, seed=11)
    b = balanced_spherical_kmeans(x, y, cluster_size=7, seed=11)
    np.testing.assert_array_equal(a.sample_cluster, b.sample_cluster)
    np.testing.assert_array_equal(a.centroids, b.centroids)


def test_large_identity_is_fast_enough():
    x, y = random_data([2000], dim=32, seed=5)
    result = balanced_spherical_kmeans(x, y, cluster_size=40)
    assert result.num_clusters == 50
    assert set(result.cluster_sizes().tolist()) == {40}


# ---------------------------------------------------------------- npz
def test_npz_round_trip(tmp_path):
    x, y = random_data([12, 5], seed=6)
    result = balanced_spherical_kmeans(x, y, cluster_size=4)
    path = tmp_path / "sub" / "clusters.npz"
    result.to_npz(path)
    loaded = ClusterAssignment.from_npz(path)
    np.testing.assert_array_equal(loaded.sample_cluster, result.sample_cluster)
    np.testing.assert_array_equal(loaded.centroids, result.centroids)
    np.testing.assert_array_equal(loaded.cluster_identity, result.cluster_identity)
    assert loaded.sample_cluster.dtype == np.int64 and loaded.centroids.dtype == np.float32
    assert [p.name for p in path.parent.iterdir()] == ["clusters.npz"]  # no temporary left


def test_npz_rejects_corrupt_and_mismatched_files(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip archive at all")
    with pytest.raises(ValueError, match="cannot read"):
        ClusterAssignment.from_npz(garbage)

    missing = tmp_path / "missing.npz"
    np.savez(missing, sample_cluster=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="missing"):
        ClusterAssignment.from_npz(missing)

    mismatch = tmp_path / "mismatch.npz"
    np.savez(mismatch, sample_cluster=np.zeros(3, np.int64), centroids=np.ones((2, 4), np.float32),
             cluster_identity=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="cluster_identity"):
        ClusterAssignment.from_npz(mismatch)

    out_of_range = tmp_path / "range.npz"
    np.savez(out_of_range, sample_cluster=np.array([0, 2]), centroids=np.ones((2, 4), np.float32),
             cluster_identity=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="outside"):
        ClusterAssignment.from_npz(out_of_range)


# ---------------------------------------------------------------- errors
def test_input_errors():
    x, y = random_data([5, 5])
    with pytest.raises(ValueError, match="non-empty"):
        balanced_spherical_kmeans(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), 2)
    with pytest.raises(ValueError, match="one label per embedding"):
        balanced_spherical_kmeans(x, y[:-1], 2)
    bad = x.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        balanced_spherical_kmeans(bad, y, 2)
    with pytest.raises(ValueError, match="cluster_size"):
        balanced_spherical_kmeans(x, y, 0)


# ---------------------------------------------------------------- paper's margin bounds
def test_paper_margin_bounds_closed_form():
    a1max, a2max = paper_margin_bounds([10, 20, 30, 40])  # C = 4, L = 100
    assert a1max == pytest.approx(1.0)  # 1 - cos(pi / 2)
    expected = [1 - math.cos(2 * math.pi * f) for f in (0.1, 0.2, 0.3, 0.4)]
    np.testing.assert_allclose(a2max, expected, atol=1e-12)
    assert paper_margin_bounds([5, 5, 5])[0] == pytest.approx(1.5)  # 1 - cos(2 pi / 3)
    assert paper_margin_bounds([1, 1])[1].tolist() == pytest.approx([2.0, 2.0])  # half the circle each


def test_format_margin_bounds_and_errors():
    text = format_margin_bounds([10, 20, 30, 40])
    assert "a1max=1" in text and "min=0.191" in text and "median=1" in text and "max=1.809" in text
    with pytest.raises(ValueError):
        paper_margin_bounds([3, 0])
    with pytest.raises(ValueError):
        paper_margin_bounds([])
