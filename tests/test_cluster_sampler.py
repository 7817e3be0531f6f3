import io

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from facepipe.data.cluster_sampler import ClusterBatchSampler, LossCache

M, K_IMAGES = 4, 6


def make_assignment(seed=0):
    """10 identities: 0-4 have 3 clusters, 5-9 one; clusters of 5..30 samples, random unit centroids."""
    rng = np.random.default_rng(seed)
    cluster_identity = np.concatenate([np.repeat(np.arange(5), 3), np.arange(5, 10)])
    sizes = rng.integers(5, 31, size=len(cluster_identity))
    sizes[0] = 5  # smaller than K_IMAGES: its batches hold a further cluster
    sample_cluster = np.repeat(np.arange(len(sizes)), sizes)
    centroids = rng.normal(size=(len(sizes), 16)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return sample_cluster, centroids, cluster_identity


def make_sampler(**kwargs):
    sample_cluster, centroids, cluster_identity = make_assignment()
    options = dict(clusters_per_batch=M, images_per_cluster=K_IMAGES, num_batches=40, seed=1)
    options.update(kwargs)
    return ClusterBatchSampler(sample_cluster, centroids, cluster_identity, **options)


def batches(sampler):
    pairs = list(sampler)
    return [pairs[i: i + sampler.batch_size] for i in range(0, len(pairs), sampler.batch_size)]


def seen_cache(sampler, loss=1.0):
    cache = LossCache(sampler.num_samples)
    cache.update(np.arange(sampler.num_samples), np.full(sampler.num_samples, loss))
    return cache


def runs(values):
    """Values of consecutive runs, in order: each cluster's images must be contiguous."""
    values = np.asarray(values)
    return values[np.r_[True, values[1:] != values[:-1]]]


def test_every_batch_has_m_clusters_of_k_images_with_identity_constraints():
    # Updated for distinct draws: a batch holding a cluster of fewer than k images (cluster 0 has
    # 5) takes all of them and fills the batch from further clusters instead of repeating images.
    sampler = make_sampler()
    multi_cluster_queries = 0
    small_batches = 0
    for batch in batches(sampler):
        clusters = sampler.sample_cluster[[i for i, _ in batch]]
        order = runs(clusters)
        assert len(set(order)) == len(order)  # contiguous
        counts = np.array([(clusters == c).sum() for c in order])
        assert counts.sum() == M * K_IMAGES
        expected = np.minimum(sampler.cluster_sizes[order], K_IMAGES)
        assert (counts[:-1] == expected[:-1]).all() and 1 <= counts[-1] <= expected[-1]
        if (sampler.cluster_sizes[order[:M]] < K_IMAGES).any():
            small_batches += 1
            assert len(order) > M
        else:
            assert len(order) == M
        ids = order[:M]
        query = clusters[0]  # the query cluster's images come first
        identity = sampler.cluster_identity[query]
        batch_identities = sampler.cluster_identity[ids]
        assert (batch_identities != identity).any()
        if (sampler.cluster_identity == identity).sum() > 1:
            multi_cluster_queries += 1
            assert ((batch_identities == identity) & (ids != query)).any()
    assert multi_cluster_queries > 0 and small_batches > 0


def test_remaining_clusters_are_the_query_nearest_neighbours():
    sampler = make_sampler(clusters_per_batch=5)
    for epoch in range(5):
        batch = sampler.make_batch(epoch, 0)
        query = batch.clusters[0]
        similarity = sampler.centroids @ sampler.centroids[query]
        similarity[query] = -np.inf
        # At most two slots are forced (same and other identity); the rest follow similarity.
        top = np.argsort(-similarity)[: 5 - 3]
        assert set(top) <= set(batch.clusters)


def test_other_identity_is_found_beyond_the_neighbour_table():
    rng = np.random.default_rng(2)
    base = rng.normal(size=8)
    # Identity 0: 20 near-identical clusters, so its table rows (width 4 * M = 12) hold no other identity.
    centroids = np.vstack([base + 0.01 * rng.normal(size=(20, 8)), -base[None]]).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    cluster_identity = np.array([0] * 20 + [1])
    sampler = ClusterBatchSampler(np.repeat(np.arange(21), 3), centroids, cluster_identity,
                                  clusters_per_batch=3, images_per_cluster=2, num_batches=20)
    for epoch in range(10):
        batch = sampler.make_batch(epoch, 0)
        if cluster_identity[batch.clusters[0]] == 0:
            assert 20 in batch.clusters and (cluster_identity[batch.clusters[1:]] == 0).any()


def test_hardest_query_is_the_highest_loss_cluster_of_its_identity():
    sampler = make_sampler()
    cache = seen_cache(sampler)
    hard = 1  # identity 0 has clusters 0, 1, 2
    cache.update(np.flatnonzero(sampler.sample_cluster == hard), np.full((sampler.sample_cluster == hard).sum(), 100.0))
    sampler.loss_cache = cache
    queried = 0
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for batch in batches(sampler):
            query = sampler.sample_cluster[batch[0][0]]
            if sampler.cluster_identity[query] == 0:
                queried += 1
                assert query == hard
    assert queried > 0


def test_never_seen_clusters_are_queried_first():
    sampler = make_sampler()
    cache = seen_cache(sampler)
    cache.update(np.flatnonzero(sampler.sample_cluster == 1), np.full((sampler.sample_cluster == 1).sum(), 100.0))
    cache.losses[np.flatnonzero(sampler.sample_cluster == 2)[0]] = np.nan  # one unseen sample suffices
    sampler.loss_cache = cache
    queries = [sampler.make_batch(0, b).clusters[0] for b in range(200)]
    own = [q for q in queries if sampler.cluster_identity[q] == 0]
    assert own and all(q == 2 for q in own)


def test_uniform_query_ignores_the_cache():
    sampler = make_sampler(query="uniform")
    cache = seen_cache(sampler)
    cache.update(np.flatnonzero(sampler.sample_cluster == 1), np.full((sampler.sample_cluster == 1).sum(), 100.0))
    sampler.loss_cache = cache
    queries = [sampler.make_batch(0, b).clusters[0] for b in range(300)]
    assert {q for q in queries if sampler.cluster_identity[q] == 0} == {0, 1, 2}


def small_cluster_assignment(num_identities=60, seed=0):
    """LFW-like: every identity is one cluster of 2..5 images, random unit centroids."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 6, size=num_identities)
    centroids = rng.normal(size=(num_identities, 16)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return np.repeat(np.arange(num_identities), sizes), centroids, np.arange(num_identities)


def test_small_clusters_give_distinct_images_and_more_clusters():
    # Old code: k = 10 draws with replacement from 2..5-image clusters, about a third distinct.
    sample_cluster, centroids, cluster_identity = small_cluster_assignment()
    sampler = ClusterBatchSampler(sample_cluster, centroids, cluster_identity, clusters_per_batch=12,
                                  images_per_cluster=10, num_batches=30, seed=3)
    sizes = np.bincount(sample_cluster)
    for batch_index in range(30):
        batch = sampler.make_batch(2, batch_index)
        assert len(batch.indices) == sampler.batch_size == 120
        assert len(set(batch.indices.tolist())) == 120  # no image repeats
        clusters = sample_cluster[batch.indices]
        assert runs(clusters).tolist() == batch.clusters.tolist()  # query first, each contiguous
        counts = np.array([(clusters == c).sum() for c in batch.clusters])
        assert (counts[:-1] == sizes[batch.clusters[:-1]]).all() and counts[-1] <= sizes[batch.clusters[-1]]
        # Beyond the M chosen clusters, the fill follows the query's nearest neighbours.
        query, chosen = batch.clusters[0], set(batch.clusters[:12].tolist())
        order = [c for c in np.argsort(-(centroids @ centroids[query])) if c not in chosen]
        assert batch.clusters[12:].tolist() == order[: len(batch.clusters) - 12]
    # Still a function of (seed, epoch, batch index).
    again = ClusterBatchSampler(sample_cluster, centroids, cluster_identity, clusters_per_batch=12,
                                images_per_cluster=10, num_batches=30, seed=3)
    for batch_index in range(5):
        a, b = sampler.make_batch(2, batch_index), again.make_batch(2, batch_index)
        assert a.indices.tolist() == b.indices.tolist() and a.sample_seeds.tolist() == b.sample_seeds.tolist()
    assert sampler.make_batch(2, 0).indices.tolist() != sampler.make_batch(3, 0).indices.tolist()


def test_fill_goes_beyond_the_neighbour_table_when_its_row_runs_out():
    # 30 one-image clusters around e1 and 10 ten-image clusters elsewhere: the table's rows are
    # sized for the mean cluster, too short for a batch of one-image clusters.
    rng = np.random.default_rng(4)
    direction = np.eye(8)[0]
    tiny = direction + 0.05 * rng.normal(size=(30, 8))
    large = -direction + 0.3 * rng.normal(size=(10, 8))
    centroids = np.vstack([tiny, large]).astype(np.float32)
    sample_cluster = np.repeat(np.arange(40), [1] * 30 + [10] * 10)
    sampler = ClusterBatchSampler(sample_cluster, centroids, np.arange(40), clusters_per_batch=2,
                                  images_per_cluster=10, num_batches=40)
    assert sampler.neighbours.shape[1] < 20
    tiny_queries = 0
    for batch_index in range(40):
        batch = sampler.make_batch(0, batch_index)
        assert len(set(batch.indices.tolist())) == len(batch.indices) == 20
        if batch.clusters[0] < 30:
            tiny_queries += 1
            assert len(batch.clusters) > sampler.neighbours.shape[1]
    assert tiny_queries > 0


def test_large_clusters_give_k_distinct_images():
    sampler = make_sampler()
    for epoch in range(10):
        batch = sampler.make_batch(epoch, 0)
        for cluster in batch.clusters[:-1]:
            drawn = batch.indices[sampler.sample_cluster[batch.indices] == cluster]
            assert len(drawn) == len(set(drawn)) == min(K_IMAGES, sampler.cluster_sizes[cluster])


def test_fewer_clusters_than_m_uses_all_and_fills_the_batch():
    # Updated for distinct draws (the old split was 6/7/7 images, repeats included): the three
    # clusters hold 16 images, all of them are taken once and only the 4 missing slots repeat.
    centroids = np.eye(3, dtype=np.float32)
    sizes = np.array([2, 10, 4])
    sampler = ClusterBatchSampler(np.repeat(np.arange(3), sizes), centroids, np.array([0, 0, 1]),
                                  clusters_per_batch=4, images_per_cluster=5, num_batches=3)
    for batch in batches(sampler):
        indices = [i for i, _ in batch]
        assert len(batch) == 20 and set(indices) == set(range(16))
        counts = np.bincount(sampler.sample_cluster[indices], minlength=3)
        assert sorted(counts - sizes) == [1, 1, 2]


def test_clusters_holding_enough_images_fill_without_repeats():
    # Three clusters, min(k, size) = 2 + 5 + 4 < 20, but 36 images: cluster 1 gives more than k
    # distinct images rather than any image repeating.
    centroids = np.eye(3, dtype=np.float32)
    sampler = ClusterBatchSampler(np.repeat(np.arange(3), [2, 30, 4]), centroids, np.array([0, 0, 1]),
                                  clusters_per_batch=4, images_per_cluster=5, num_batches=3)
    for batch in batches(sampler):
        indices = [i for i, _ in batch]
        assert len(indices) == len(set(indices)) == 20
        assert np.bincount(sampler.sample_cluster[indices], minlength=3).tolist() == [2, 14, 4]


def test_order_is_a_function_of_seed_and_epoch_and_start_skips():
    a, b = make_sampler(), make_sampler()
    for sampler in (a, b):
        sampler.loss_cache = seen_cache(sampler)
    a.set_epoch(3)
    b.set_epoch(3)
    full = list(a)
    assert list(b) == full and len(full) == 40 * M * K_IMAGES == len(a)
    a.set_epoch(4)
    assert list(a) != full
    for start in (2 * a.batch_size, 2 * a.batch_size + 7):
        b.set_epoch(3, start=start)
        assert len(b) == len(full) - start and list(b) == full[start:]
    assert make_sampler(seed=2).make_batch(3, 0).indices.tolist() != a.make_batch(3, 0).indices.tolist()


def test_default_num_batches_and_batch_size():
    sample_cluster, centroids, cluster_identity = make_assignment()
    sampler = ClusterBatchSampler(sample_cluster, centroids, cluster_identity,
                                  clusters_per_batch=3, images_per_cluster=4)
    assert sampler.batch_size == 12 and sampler.num_batches == len(sample_cluster) // 12


class SeededDataset(Dataset):
    def __len__(self):
        return 10_000

    def __getitem__(self, item):
        index, seed = item
        return index, seed


@pytest.mark.parametrize("workers", [0, 2])
def test_works_in_a_dataloader(workers):
    sampler = make_sampler(num_batches=6)
    sampler.set_epoch(1)
    expected = list(sampler)
    loader = DataLoader(SeededDataset(), batch_size=sampler.batch_size, sampler=sampler, drop_last=True,
                        num_workers=workers)
    got = [(int(i), int(s)) for indices, seeds in loader for i, s in zip(indices, seeds)]
    assert got == expected


def test_loss_cache_update_mean_and_state_round_trip():
    cache = LossCache(5)
    assert np.isnan(cache.losses).all()
    cache.update(torch.tensor([0, 1, 2]), torch.tensor([1.0, 3.0, float("inf")]))
    cache.update([1], [5.0])  # last value wins
    assert cache.losses[1] == 5.0 and np.isnan(cache.losses[2])  # the non-finite loss was skipped
    means = cache.cluster_mean_loss(np.array([0, 0, 1, 1, 1]), 3)
    assert means[0] == 3.0 and means[1] == np.inf and means[2] == -np.inf
    cache.update([2, 3, 4], [2.0, 4.0, 6.0])
    assert cache.cluster_mean_loss(np.array([0, 0, 1, 1, 1]), 2).tolist() == [3.0, 4.0]

    buffer = io.BytesIO()
    torch.save(cache.state_dict(), buffer)
    buffer.seek(0)
    restored = LossCache(5)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.losses.tolist() == cache.losses.tolist()
    with pytest.raises(ValueError, match="saved cache"):
        LossCache(4).load_state_dict(cache.state_dict())
    with pytest.raises(ValueError, match="indices"):
        cache.update([0, 1], [1.0])
    with pytest.raises(ValueError, match="lie in"):
        cache.update([5], [1.0])


def test_update_clusters_rebuilds_the_neighbour_table():
    sampler = make_sampler()
    merged = np.minimum(sampler.sample_cluster, 9)  # re-clustering merged clusters 9.. into cluster 9
    sampler.update_clusters(merged, sampler.centroids[:10], sampler.cluster_identity[:10])
    assert sampler.neighbours.shape == (10, 10)
    assert set(sampler.sample_cluster[sampler.make_batch(0, 0).indices]) <= set(range(10))


def test_invalid_inputs_raise_clear_errors():
    sample_cluster, centroids, cluster_identity = make_assignment()
    with pytest.raises(ValueError, match="clusters_per_batch"):
        ClusterBatchSampler(sample_cluster, centroids, cluster_identity, clusters_per_batch=1)
    with pytest.raises(ValueError, match="images_per_cluster"):
        ClusterBatchSampler(sample_cluster, centroids, cluster_identity, images_per_cluster=0)
    with pytest.raises(ValueError, match="cluster_identity"):
        ClusterBatchSampler(sample_cluster, centroids, cluster_identity[:-1])
    with pytest.raises(ValueError, match=r"\[0, 20\)"):
        ClusterBatchSampler(np.append(sample_cluster, 20), centroids, cluster_identity)
    with pytest.raises(ValueError, match="empty"):
        ClusterBatchSampler(sample_cluster[sample_cluster != 3], centroids, cluster_identity)
    with pytest.raises(ValueError, match="query"):
        ClusterBatchSampler(sample_cluster, centroids, cluster_identity, query="random")
    with pytest.raises(ValueError, match="loss cache"):
        ClusterBatchSampler(sample_cluster, centroids, cluster_identity, loss_cache=LossCache(3))
    with pytest.raises(ValueError, match="non-zero"):
        ClusterBatchSampler(sample_cluster, np.zeros_like(centroids), cluster_identity)
