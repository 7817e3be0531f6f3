import numpy as np
import pytest

from facepipe.data.samplers import EpochSampler, build_sampler
from facepipe.data.stats import class_statistics, head_class_mask

LABELS = np.repeat(np.arange(4), [200, 40, 8, 2])


def drawn_class_counts(name, epochs=30):
    sampler = build_sampler(name, LABELS, seed=3)
    counts = np.zeros(4)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        counts += np.bincount(LABELS[[i for i, _ in sampler]], minlength=4)
    return counts / counts.sum()


def test_shuffle_is_a_permutation_per_epoch():
    sampler = build_sampler("shuffle", LABELS, seed=0)
    sampler.set_epoch(0)
    first = [i for i, _ in sampler]
    assert sorted(first) == list(range(len(LABELS)))
    sampler.set_epoch(1)
    assert [i for i, _ in sampler] != first


def test_class_balanced_draws_classes_equally():
    assert np.allclose(drawn_class_counts("class_balanced"), 0.25, atol=0.02)


def test_sqrt_sampling_follows_square_root_of_counts():
    expected = np.sqrt([200, 40, 8, 2]) / np.sqrt([200, 40, 8, 2]).sum()
    assert np.allclose(drawn_class_counts("sqrt"), expected, atol=0.02)


def test_order_is_a_function_of_seed_and_epoch_and_start_skips():
    a, b = EpochSampler(LABELS, 0.5, seed=5), EpochSampler(LABELS, 0.5, seed=5)
    a.set_epoch(4)
    b.set_epoch(4, start=100)
    full = list(a)
    assert list(b) == full[100:] and len(b) == len(full) - 100


def test_unknown_sampler_and_empty_labels():
    with pytest.raises(ValueError, match="class_balanced"):
        build_sampler("random", LABELS, 0)
    with pytest.raises(ValueError, match="empty"):
        EpochSampler(np.array([], dtype=np.int64))


def test_class_statistics_by_hand():
    stats = class_statistics(LABELS)
    assert (stats.num_images, stats.num_classes, stats.min_count, stats.max_count) == (250, 4, 2, 200)
    assert stats.imbalance_ratio == 100.0 and stats.median_count == 24.0
    # The largest class alone holds 200/250 = 80% >= 50%: it is the only head class.
    assert (stats.head_classes, stats.tail_classes, stats.head_min_count) == (1, 3, 200)
    assert head_class_mask(np.array([5, 5, 5, 5]), 0.5).sum() == 2
