"""The k-nearest-cluster rule of Huang et al. (TPAMI 2019) Eq. 10, choosing N, and the open-set threshold."""
from __future__ import annotations

import math

import numpy as np
import pytest

from facepipe.index.knc import (
    DEFAULT_NUM_NEIGHBOURS_GRID,
    EMPTY_LOG_DENOMINATOR,
    PAPER_NUM_NEIGHBOURS_GRID,
    calibrate_unknown_threshold,
    choose_num_neighbours,
    knc_scores,
)


def eq10(similarities, identities, empty=EMPTY_LOG_DENOMINATOR):
    """Eq. 10 written out with math.exp for one query: {identity: score} (not log)."""
    clusters: dict[int, list[float]] = {}
    for s, c in zip(similarities, identities):
        if c >= 0:
            clusters.setdefault(c, []).append(s)
    scores = {}
    for c, own in clusters.items():
        other = sum(math.exp(s) for d, sims in clusters.items() if d != c for s in sims)
        scores[c] = math.exp(min(own)) / (other if other > 0 else math.exp(empty))
    return scores


def test_eq10_by_hand_uses_the_least_similar_cluster_of_each_identity():
    # Identity 1 owns the single nearest cluster (0.95) but also a far one (0.10); identity 2's
    # clusters are all near. Nearest-neighbour would say 1; Eq. 10 takes each identity's *least*
    # similar cluster and says 2.
    sims = [0.95, 0.90, 0.85, 0.10, 0.30]
    ids = [1, 2, 2, 1, 3]
    result = knc_scores(np.array([sims]), np.array([ids]))
    e = math.exp
    expected = {
        1: e(0.10) / (e(0.90) + e(0.85) + e(0.30)),
        2: e(0.85) / (e(0.95) + e(0.10) + e(0.30)),
        3: e(0.30) / (e(0.95) + e(0.90) + e(0.85) + e(0.10)),
    }
    assert expected == pytest.approx(eq10(sims, ids))
    assert expected[2] > expected[1] > expected[3]
    assert result.identities.tolist() == [[2, 1, 3]]  # by decreasing score
    assert np.exp(result.log_scores[0]) == pytest.approx([expected[2], expected[1], expected[3]], rel=1e-12)
    assert result.predicted.tolist() == [2]
    assert result.best_log_scores[0] == pytest.approx(math.log(expected[2]), rel=1e-12)


def test_column_order_padding_and_non_finite_entries_do_not_matter():
    sims = np.array([[0.8, 0.2, 0.5, 0.7, 0.4]])
    ids = np.array([[4, 7, 4, 9, 7]])
    base = knc_scores(sims, ids)
    order = np.array([3, 0, 4, 1, 2])
    shuffled = knc_scores(sims[:, order], ids[:, order])
    padded = knc_scores(np.concatenate([sims, [[0.99, np.nan]]], axis=1), np.concatenate([ids, [[-1, 4]]], axis=1))
    for other in (shuffled, padded):
        assert other.identities.tolist() == base.identities.tolist()
        np.testing.assert_allclose(other.log_scores, base.log_scores, rtol=1e-12)


def test_single_identity_uses_the_documented_empty_denominator():
    # Only identity 5 retrieved: the denominator is empty; log score = min s - (-1).
    result = knc_scores(np.array([[0.6, 0.4], [0.3, 0.2]]), np.array([[5, 5], [-1, 5]]))
    assert result.identities.tolist() == [[5], [5]]
    assert result.log_scores[:, 0] == pytest.approx([0.4 + 1.0, 0.2 + 1.0])
    custom = knc_scores(np.array([[0.6, 0.4]]), np.array([[5, 5]]), empty_log_denominator=0.0)
    assert custom.log_scores[0, 0] == pytest.approx(0.4)


def test_queries_without_results_and_ragged_identity_counts():
    sims = np.array([[0.5, 0.4, 0.3], [0.1, 0.2, 0.3], [0.9, 0.1, 0.0]])
    ids = np.array([[-1, -1, -1], [1, 2, 3], [8, 8, -1]])
    result = knc_scores(sims, ids)
    assert result.identities.shape == (3, 3)
    assert result.identities[0].tolist() == [-1, -1, -1] and np.isneginf(result.log_scores[0]).all()
    assert result.predicted.tolist() == [-1, 3, 8]
    assert result.identities[2].tolist() == [8, -1, -1]


def test_vectorised_scores_match_eq10_written_out_on_random_queries():
    rng = np.random.default_rng(0)
    sims = rng.uniform(-1, 1, size=(300, 25))
    ids = rng.integers(-1, 7, size=(300, 25))
    result = knc_scores(sims, ids, chunk_size=37)  # several blocks
    for q in range(len(sims)):
        expected = eq10(sims[q], ids[q])
        ranked = sorted(expected.items(), key=lambda kv: (-kv[1], kv[0]))
        got = [(int(c), s) for c, s in zip(result.identities[q], result.log_scores[q]) if c >= 0]
        assert [c for c, _ in got] == [c for c, _ in ranked]
        np.testing.assert_allclose([s for _, s in got], [math.log(v) for _, v in ranked], rtol=1e-10, atol=1e-12)


def test_input_errors():
    with pytest.raises(ValueError, match="same shape"):
        knc_scores(np.zeros((2, 3)), np.zeros((2, 4), dtype=int))
    with pytest.raises(ValueError, match="integers"):
        knc_scores(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="below -1"):
        knc_scores(np.zeros((1, 2)), np.array([[0, -2]]))


def test_choose_num_neighbours_maximises_accuracy_and_clips_the_grid():
    # Query 0 (identity 2): N=1 or 2 picks identity 1 (0.95 beats 0.90); from N=3 on, 2 wins.
    # Query 1 (identity 3) is right for every N.
    sims = np.array([[0.95, 0.90, 0.85, 0.10], [0.9, 0.2, 0.1, 0.0]])
    ids = np.array([[1, 2, 2, 1], [3, 4, 5, 6]])
    choice = choose_num_neighbours(sims, ids, [2, 3], grid=[1, 2, 3, 4, 10, 200])
    assert sorted(choice.accuracy_by_n) == [1, 2, 3, 4]  # 10 and 200 clipped to the 4 retrieved
    assert choice.accuracy_by_n[1] == choice.accuracy_by_n[2] == 0.5
    assert choice.accuracy_by_n[3] == choice.accuracy_by_n[4] == 1.0
    assert choice.num_neighbours == 3 and choice.accuracy == 1.0  # ties: the smaller N
    # The default grid starts at 1 (it used to be Huang et al.'s 20:10:200, which could not
    # reach N = 1); N = 1 and 2 tie here, so the smaller wins.
    clipped = choose_num_neighbours(sims, ids, [2, 3], num_clusters=2)
    assert list(clipped.accuracy_by_n) == [1, 2] and clipped.num_neighbours == 1
    paper = choose_num_neighbours(sims, ids, [2, 3], grid=PAPER_NUM_NEIGHBOURS_GRID, num_clusters=2)
    assert list(paper.accuracy_by_n) == [2] and paper.num_neighbours == 2  # 20..200 all clipped to 2
    with pytest.raises(ValueError, match="true identities"):
        choose_num_neighbours(sims, ids, [1])


def test_default_grid_starts_at_one_and_contains_the_papers_grid():
    # The LFW study's closed-set table has N = 1 beating N = 100 for every method: a grid
    # starting at 20 (the paper's) could never choose the best value measured.
    assert DEFAULT_NUM_NEIGHBOURS_GRID[:5] == (1, 2, 3, 5, 10)
    assert PAPER_NUM_NEIGHBOURS_GRID == tuple(range(20, 201, 10))
    assert DEFAULT_NUM_NEIGHBOURS_GRID[5:] == PAPER_NUM_NEIGHBOURS_GRID
    # Identity 0 owns the nearest cluster; from N = 3 on, two clusters of identity 1 outweigh it
    # (N = 3: 0.9 - log(2 e^0.85) < 0.85 - 0.9), and at N = 5 identity 0's far cluster drags
    # its minimum down. The default grid finds N = 1 (tied with 2); the paper's, clipped to
    # the 5 clusters, can only try N = 5 and gets it wrong.
    sims = np.array([[0.9, 0.85, 0.85, 0.84, 0.0]])
    ids = np.array([[0, 1, 1, 1, 0]])
    choice = choose_num_neighbours(sims, ids, [0])
    assert choice.accuracy_by_n == {1: 1.0, 2: 1.0, 3: 0.0, 5: 0.0} and choice.num_neighbours == 1
    assert choose_num_neighbours(sims, ids, [0], grid=PAPER_NUM_NEIGHBOURS_GRID).accuracy == 0.0


def test_calibrate_unknown_threshold_meets_the_target_false_accept_rate():
    impostor = np.arange(1, 11) / 10.0  # 0.1 .. 1.0
    genuine = np.array([0.5, 0.95, 1.2])
    calib = calibrate_unknown_threshold(genuine, impostor, target_far=0.1)
    assert 0.9 < calib.threshold <= 0.9 + 1e-12  # only 1.0 (1 of 10) is accepted
    assert calib.far == pytest.approx(0.1) and calib.genuine_accept_rate == pytest.approx(2 / 3)
    strict = calibrate_unknown_threshold(genuine, impostor, target_far=0.0)
    assert strict.far == 0.0 and strict.threshold > 1.0 and strict.genuine_accept_rate == pytest.approx(1 / 3)
    assert calibrate_unknown_threshold(genuine, impostor, target_far=1.0).threshold == -math.inf
    ties = calibrate_unknown_threshold([0.6], [0.5, 0.5, 0.5, 0.1], target_far=0.25)
    assert ties.far == 0.0 and ties.threshold > 0.5  # never above the target, even with ties
    with pytest.raises(ValueError, match="impostor"):
        calibrate_unknown_threshold(genuine, [], 0.1)
    with pytest.raises(ValueError, match="target_far"):
        calibrate_unknown_threshold(genuine, impostor, 1.5)
