"""Tests for facepipe.eval.verification and facepipe.eval.plots."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import norm

from facepipe.eval import (
    VerificationResult,
    best_threshold,
    cosine_scores,
    evaluate_verification,
    kfold_accuracy,
    make_pairs,
    plot_roc,
    plot_training_curves,
    read_pairs_csv,
    roc_metrics,
    write_pairs_csv,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _accuracy(scores, is_same, thr):
    return float(np.mean((np.asarray(scores) >= thr) == np.asarray(is_same, dtype=bool)))


def _brute_force_best(scores, is_same):
    """Every cut point, each evaluated by direct comparison; first (smallest) best wins."""
    values = np.unique(scores)
    cands = [values[0] - 1.0]
    cands += [(lo + hi) / 2 for lo, hi in zip(values[:-1], values[1:])]
    cands += [values[-1] + 1.0]
    accs = [_accuracy(scores, is_same, t) for t in cands]
    k = int(np.argmax(accs))
    return cands[k], accs[k], k, len(cands)


# --------------------------------------------------------------------------------------------
# cosine_scores
# --------------------------------------------------------------------------------------------
def test_cosine_scores_normalises_rows_and_matches_direct_formula():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(20, 8)).astype(np.float32)
    scaled = emb * rng.uniform(0.1, 50.0, size=(20, 1)).astype(np.float32)
    ia = np.array([0, 1, 2, 3, 5])
    ib = np.array([1, 1, 7, 19, 4])
    got = cosine_scores(scaled, ia, ib)
    e = emb.astype(np.float64)
    expected = np.sum(e[ia] * e[ib], axis=1) / (np.linalg.norm(e[ia], axis=1) * np.linalg.norm(e[ib], axis=1))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got[1] == pytest.approx(1.0)  # a row with itself
    assert np.all(np.abs(got) <= 1.0)


def test_cosine_scores_rejects_bad_input():
    emb = np.ones((4, 3))
    emb[2] = 0.0
    with pytest.raises(ValueError, match="zero norm"):
        cosine_scores(emb, np.array([0, 2]), np.array([1, 3]))
    with pytest.raises(ValueError, match="outside"):
        cosine_scores(emb, np.array([0]), np.array([4]))
    with pytest.raises(ValueError, match="differ in length"):
        cosine_scores(emb, np.array([0, 1]), np.array([1]))
    with pytest.raises(ValueError, match="2-D"):
        cosine_scores(np.ones(3), np.array([0]), np.array([1]))


# --------------------------------------------------------------------------------------------
# best_threshold
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("ties", [False, True])
def test_best_threshold_matches_brute_force(seed, ties):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    if ties:
        scores = rng.integers(0, 5, size=n) / 4.0  # heavy ties
    else:
        scores = rng.normal(size=n)
    is_same = rng.random(n) < 0.5
    thr, acc = best_threshold(scores, is_same)
    bf_thr, bf_acc, k, n_cands = _brute_force_best(scores, is_same)
    assert acc == pytest.approx(bf_acc, abs=1e-12)
    assert acc == pytest.approx(_accuracy(scores, is_same, thr), abs=1e-12)
    # Same cut as the smallest optimal one (i.e. identical decisions on every score) ...
    np.testing.assert_array_equal(scores >= thr, scores >= bf_thr)
    # ... and for interior cuts exactly the midpoint.
    if 0 < k < n_cands - 1:
        assert thr == pytest.approx(bf_thr, abs=1e-12)


def test_best_threshold_ties_prefer_smallest_threshold_and_keep_equal_scores_together():
    # Any threshold gives 50 % here; the smallest cut (below the minimum) must win.
    thr, acc = best_threshold([0.5, 0.5], [1, 0])
    assert acc == 0.5
    assert thr < 0.5
    # Two optimal cuts (between 0.1|0.2 and 0.3|0.4): the lower one wins.
    thr, acc = best_threshold([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1])
    assert acc == 0.75
    assert thr == pytest.approx(0.15)
    # Equal scores with different labels can never be split.
    scores = np.array([0.0, 1.0, 1.0, 1.0, 2.0])
    thr, acc = best_threshold(scores, [0, 1, 1, 0, 1])
    assert acc == pytest.approx(0.8)
    assert thr == pytest.approx(0.5)


def test_best_threshold_perfectly_separable():
    thr, acc = best_threshold([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0])
    assert acc == 1.0
    assert thr == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# k-fold accuracy
# --------------------------------------------------------------------------------------------
def test_perfectly_separable_scores():
    rng = np.random.default_rng(1)
    n = 1000
    is_same = rng.random(n) < 0.5
    scores = np.where(is_same, rng.uniform(0.6, 1.0, n), rng.uniform(-1.0, 0.4, n))
    result = evaluate_verification(scores, is_same)
    assert result.accuracy_mean == 1.0
    assert result.accuracy_std == 0.0
    assert result.best_threshold_accuracy == 1.0
    assert result.auc == 1.0
    assert result.eer == 0.0
    assert all(v == 1.0 for v in result.tar_at_far.values())
    assert 0.4 < result.best_threshold < 0.6


def test_random_scores_are_at_chance():
    rng = np.random.default_rng(12345)
    n = 6000
    scores = rng.normal(size=n)
    is_same = rng.random(n) < 0.5
    result = evaluate_verification(scores, is_same)
    assert 0.46 <= result.accuracy_mean <= 0.54
    assert result.auc == pytest.approx(0.5, abs=0.03)
    assert result.eer == pytest.approx(0.5, abs=0.03)
    assert result.fold_scheme == "contiguous"
    assert len(result.fold_accuracies) == 10


def test_fold_thresholds_are_chosen_without_the_test_fold():
    rng = np.random.default_rng(7)
    per_fold, n_folds = 100, 5
    scores, is_same, folds = [], [], []
    for k in range(n_folds):
        y = np.arange(per_fold) % 2 == 0
        if k == 3:
            # The odd fold out: everything sits high, its own optimum is around 0.85.
            s = np.where(y, rng.uniform(0.9, 0.95, per_fold), rng.uniform(0.75, 0.8, per_fold))
        else:
            s = np.where(y, rng.uniform(0.6, 0.9, per_fold), rng.uniform(0.0, 0.3, per_fold))
        scores.append(s)
        is_same.append(y)
        folds.append(np.full(per_fold, k))
    scores, is_same, folds = map(np.concatenate, (scores, is_same, folds))
    # Interleave the folds so a contiguous split would not reproduce them.
    perm = rng.permutation(scores.size)
    scores, is_same, folds = scores[perm], is_same[perm], folds[perm]

    out = kfold_accuracy(scores, is_same, n_folds=n_folds, folds=folds)
    assert out["fold_scheme"] == "given"
    assert out["n_folds"] == n_folds
    for k in range(n_folds):
        test = folds == k
        expected_thr, _ = best_threshold(scores[~test], is_same[~test])
        assert out["fold_thresholds"][k] == expected_thr
        assert out["fold_accuracies"][k] == _accuracy(scores[test], is_same[test], expected_thr)
    own_thr, own_acc = best_threshold(scores[folds == 3], is_same[folds == 3])
    assert own_acc == 1.0 and 0.8 < own_thr < 0.9
    assert out["fold_thresholds"][3] < 0.5  # tuned on the other folds, not on fold 3
    assert out["fold_accuracies"][3] == 0.5  # all its impostors (0.75..0.8) get accepted
    assert out["mean"] == pytest.approx(np.mean(out["fold_accuracies"]))
    assert out["std"] == pytest.approx(np.std(out["fold_accuracies"]))


def test_contiguous_folds_follow_array_split():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=103)
    is_same = rng.random(103) < 0.5
    out = kfold_accuracy(scores, is_same, n_folds=4)
    parts = np.array_split(np.arange(103), 4)
    for k, part in enumerate(parts):
        test = np.zeros(103, dtype=bool)
        test[part] = True
        thr, _ = best_threshold(scores[~test], is_same[~test])
        assert out["fold_thresholds"][k] == thr
    assert out["fold_scheme"] == "contiguous"


def test_kfold_rejects_bad_folds():
    scores, is_same = np.linspace(0, 1, 20), np.arange(20) % 2
    with pytest.raises(ValueError, match="n_folds"):
        kfold_accuracy(scores, is_same, n_folds=1)
    with pytest.raises(ValueError, match="empty"):
        kfold_accuracy(scores, is_same, n_folds=3, folds=np.arange(20) % 2)
    with pytest.raises(ValueError, match="non-empty"):
        kfold_accuracy(scores[:5], is_same[:5], n_folds=10)
    with pytest.raises(ValueError, match="one fold id per pair"):
        kfold_accuracy(scores, is_same, n_folds=2, folds=np.zeros(5, dtype=int))


# --------------------------------------------------------------------------------------------
# ROC metrics
# --------------------------------------------------------------------------------------------
def test_roc_metrics_on_gaussian_scores_match_closed_form():
    rng = np.random.default_rng(2024)
    n = 200_000
    scores = np.concatenate((rng.normal(2.0, 1.0, n), rng.normal(0.0, 1.0, n)))
    is_same = np.concatenate((np.ones(n, dtype=bool), np.zeros(n, dtype=bool)))
    out = roc_metrics(scores, is_same, fars=(1e-2, 1e-3))
    expected_tar = 1.0 - norm.cdf(norm.ppf(1.0 - 1e-2) - 2.0)
    assert out["tar_at_far"][1e-2] == pytest.approx(expected_tar, abs=0.01)
    assert out["eer"] == pytest.approx(norm.cdf(-1.0), abs=0.005)
    assert out["eer_threshold"] == pytest.approx(1.0, abs=0.02)  # midway between the means
    assert out["auc"] == pytest.approx(norm.cdf(2.0 / math.sqrt(2.0)), abs=0.003)
    assert out["tar_at_far"][1e-3] < out["tar_at_far"][1e-2]


def test_tar_at_far_interpolates_linearly_and_takes_top_of_vertical_segments():
    # Scores 4,3,2,1 with labels 1,0,1,0: ROC points (0,0) (0,.5) (.5,.5) (.5,1) (1,1).
    scores = np.array([4.0, 3.0, 2.0, 1.0])
    is_same = np.array([1, 0, 1, 0])
    out = roc_metrics(scores, is_same, fars=(0.0, 0.25, 0.5, 0.75))
    assert out["tar_at_far"] == pytest.approx({0.0: 0.5, 0.25: 0.5, 0.5: 1.0, 0.75: 1.0})
    # At threshold 3 one impostor is accepted and one genuine rejected: FAR = FRR = 0.5.
    assert out["eer"] == pytest.approx(0.5)
    assert out["auc"] == pytest.approx(0.75)
    assert np.isinf(out["thresholds"][0])


def test_roc_metrics_interpolates_between_roc_points():
    # A genuine and an impostor pair tied at 2.0 make a sloped ROC segment.
    scores = np.array([3.0, 2.0, 2.0, 1.0, 0.0])
    is_same = np.array([1, 1, 0, 1, 0])
    out = roc_metrics(scores, is_same, fars=(0.25,))
    # ROC: (0,0) -> (0,1/3) -> (1/2,2/3) [tie, diagonal step] -> (1/2,1) -> (1,1).
    assert out["tar_at_far"][0.25] == pytest.approx(0.5)


def test_roc_metrics_requires_both_classes():
    with pytest.raises(ValueError, match="both matched and mismatched"):
        roc_metrics([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(ValueError, match="both matched and mismatched"):
        evaluate_verification([0.1, 0.2, 0.3], [0, 0, 0])


# --------------------------------------------------------------------------------------------
# Input validation and result object
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [best_threshold, kfold_accuracy, roc_metrics, evaluate_verification])
def test_input_validation(fn):
    with pytest.raises(ValueError, match="differ in length"):
        fn(np.zeros(20), np.zeros(19))
    with pytest.raises(ValueError, match="empty"):
        fn(np.zeros(0), np.zeros(0))
    bad = np.linspace(0, 1, 20)
    bad[[2, 5, 7]] = np.nan
    with pytest.raises(ValueError, match="3 non-finite"):
        fn(bad, np.arange(20) % 2)
    with pytest.raises(ValueError, match="0/1"):
        fn(np.linspace(0, 1, 20), np.arange(20) % 3)


def test_result_to_dict_and_summary():
    rng = np.random.default_rng(5)
    is_same = rng.random(2000) < 0.5
    scores = rng.normal(size=2000) + 2.5 * is_same
    result = evaluate_verification(scores, is_same, n_folds=5, fars=(1e-2, 1e-3))
    assert isinstance(result, VerificationResult)
    assert result.num_pairs == 2000
    assert result.num_positive + result.num_negative == 2000
    assert result.num_positive == int(is_same.sum())
    d = result.to_dict()
    json.dumps(d)  # plain Python types only
    assert set(d["tar_at_far"]) == {"1e-02", "1e-03"}
    assert "fpr" not in d
    assert len(d["fold_accuracies"]) == 5
    assert d["fold_scheme"] == "contiguous"
    with_curve = result.to_dict(include_curve=True)
    json.dumps(with_curve)
    assert len(with_curve["fpr"]) == len(with_curve["tpr"]) == len(result.fpr)
    line = result.summary()
    assert "\n" not in line
    assert f"acc {100 * result.accuracy_mean:.2f} +- " in line
    assert f"AUC {result.auc:.4f}" in line
    assert "TAR@FAR=1e-2" in line and "TAR@FAR=1e-3" in line


# --------------------------------------------------------------------------------------------
# make_pairs
# --------------------------------------------------------------------------------------------
def _check_pairs(labels, idx_a, idx_b, is_same):
    assert idx_a.shape == idx_b.shape == is_same.shape
    assert is_same.dtype == bool
    assert np.all(idx_a != idx_b)
    np.testing.assert_array_equal(labels[idx_a] == labels[idx_b], is_same)
    keys = set(zip(np.minimum(idx_a, idx_b).tolist(), np.maximum(idx_a, idx_b).tolist()))
    assert len(keys) == idx_a.size  # no pair repeated, in either order
    assert is_same.sum() * 2 == is_same.size


def test_make_pairs_balanced_deterministic_and_valid():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 40, size=500)
    labels[:5] = 1000 + np.arange(5)  # singletons: never in a matched pair
    a1, b1, s1 = make_pairs(labels, 600, seed=3)
    a2, b2, s2 = make_pairs(labels, 600, seed=3)
    a3, _, _ = make_pairs(labels, 600, seed=4)
    assert a1.size == 600
    _check_pairs(labels, a1, b1, s1)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)
    np.testing.assert_array_equal(s1, s2)
    assert not np.array_equal(a1, a3)
    assert not np.isin(np.concatenate((a1[s1], b1[s1])), np.arange(5)).any()
    # Shuffled, so every contiguous fold holds both kinds.
    assert all(0 < part.sum() < part.size for part in np.array_split(s1, 10))


def test_make_pairs_uses_all_matched_pairs_when_few_exist():
    labels = np.array(["a", "a", "a", "b", "b", "c", "d", "e"])  # 3 + 1 = 4 matched pairs
    idx_a, idx_b, is_same = make_pairs(labels, 100, seed=0)
    _check_pairs(labels, idx_a, idx_b, is_same)
    assert is_same.sum() == 4 and is_same.size == 8
    matched = set(zip(idx_a[is_same].tolist(), idx_b[is_same].tolist()))
    assert matched == {(0, 1), (0, 2), (1, 2), (3, 4)}


def test_make_pairs_enumerates_exhaustively_when_asking_for_everything():
    labels = np.array([0, 0, 1, 1, 1, 2])  # 1 + 3 = 4 matched, 15 - 4 = 11 mismatched
    idx_a, idx_b, is_same = make_pairs(labels, 8, seed=11)
    _check_pairs(labels, idx_a, idx_b, is_same)
    assert is_same.size == 8


def test_make_pairs_errors():
    with pytest.raises(ValueError, match="no identity has at least 2 samples"):
        make_pairs(np.arange(10), 10)
    with pytest.raises(ValueError, match="one identity"):
        make_pairs(np.zeros(10, dtype=int), 10)
    with pytest.raises(ValueError, match="num_pairs"):
        make_pairs(np.array([0, 0, 1]), 1)


# --------------------------------------------------------------------------------------------
# pairs CSV
# --------------------------------------------------------------------------------------------
def test_pairs_csv_round_trip(tmp_path):
    path = tmp_path / "pairs.csv"
    paths_a = ["a/1.jpg", "b/with,comma.jpg", "c/3.jpg"]
    paths_b = ["a/2.jpg", "d/4.jpg", 'e/"quoted".jpg']
    write_pairs_csv(path, paths_a, paths_b, np.array([1, 0, 0]))
    assert path.read_text(encoding="utf-8").splitlines()[0] == "path_a,path_b,is_same"
    got_a, got_b, got_same = read_pairs_csv(path)
    assert got_a == paths_a and got_b == paths_b
    np.testing.assert_array_equal(got_same, [True, False, False])
    assert got_same.dtype == bool
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.csv"]


def test_pairs_csv_tolerates_crlf_and_trailing_blank_lines(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"path_a,path_b,is_same\r\nx.jpg,y.jpg,1\r\nu.jpg,v.jpg,0\r\n\r\n\r\n")
    a, b, s = read_pairs_csv(path)
    assert a == ["x.jpg", "u.jpg"] and b == ["y.jpg", "v.jpg"]
    np.testing.assert_array_equal(s, [True, False])


@pytest.mark.parametrize(
    "body, line, what",
    [
        ("path_a,path_b,is_same\nx,y,1\nx,y\n", 3, "3 columns"),
        ("path_a,path_b,is_same\nx,y,1\nu,v,1\nx,y,2\n", 4, "0 or 1"),
        ("path_a,path_b,is_same\nx,y,yes\n", 2, "0 or 1"),
        ("path_a,path_b,is_same\nx,y,1,extra\n", 2, "3 columns"),
        ("a,b,c\nx,y,1\n", 1, "header"),
        ("path_a,path_b,is_same\nx,y,1\n\nu,v,0\n", 3, "blank"),
    ],
)
def test_pairs_csv_malformed_lines_name_file_and_line(tmp_path, body, line, what):
    path = tmp_path / "bad.csv"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ValueError, match=what) as info:
        read_pairs_csv(path)
    assert f"line {line}" in str(info.value)
    assert "bad.csv" in str(info.value)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def test_plot_roc_writes_png_atomically(tmp_path):
    rng = np.random.default_rng(0)
    is_same = rng.random(500) < 0.5
    scores = rng.normal(size=500) + 2 * is_same
    roc = roc_metrics(scores, is_same)
    path = tmp_path / "plots" / "roc.png"
    plot_roc({f"model (AUC {roc['auc']:.3f})": (roc["fpr"], roc["tpr"]),
              "random": (np.array([0.0, 1.0]), np.array([0.0, 1.0]))}, path, title="test ROC")
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == ["roc.png"]


def test_plot_roc_rejects_mismatched_curve(tmp_path):
    with pytest.raises(ValueError, match="equal length"):
        plot_roc({"x": (np.zeros(3), np.zeros(4))}, tmp_path / "roc.png")
    assert not any(tmp_path.iterdir())


def test_plot_training_curves(tmp_path):
    records = [{"step": i * 10, "epoch": i // 5, "loss": 5.0 / (i + 1), "lr": 0.1} for i in range(20)]
    records.append({"event": "epoch_end", "epoch": 3})  # no plotted key: ignored
    path = tmp_path / "train.png"
    plot_training_curves(records, path, keys=("loss", "lr", "missing_key"))
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in tmp_path.iterdir()] == ["train.png"]
    with pytest.raises(ValueError, match="none of the keys"):
        plot_training_curves(records, tmp_path / "x.png", keys=("acc",))
    with pytest.raises(ValueError, match="no 'step'"):
        plot_training_curves([{"loss": 1.0}], tmp_path / "y.png")


def test_mcnemar_exact_against_the_binomial_closed_form():
    from facepipe.eval.verification import mcnemar_exact

    # 8 pairs only A gets right, 2 only B, 5 both right, 3 both wrong.
    a = np.array([1] * 8 + [0] * 2 + [1] * 5 + [0] * 3, dtype=bool)
    b = np.array([0] * 8 + [1] * 2 + [1] * 5 + [0] * 3, dtype=bool)
    result = mcnemar_exact(a, b)
    assert (result["a_only"], result["b_only"]) == (8, 2)
    # two-sided: 2 * P(X <= 2), X ~ Binomial(10, 1/2) = 2 * (1 + 10 + 45) / 1024
    assert result["p_value"] == pytest.approx(2 * 56 / 1024)
    assert mcnemar_exact(b, a)["p_value"] == pytest.approx(result["p_value"])


def test_mcnemar_exact_without_discordant_pairs_and_bad_input():
    from facepipe.eval.verification import mcnemar_exact

    same = np.array([1, 0, 1], dtype=bool)
    assert mcnemar_exact(same, same) == {"a_only": 0, "b_only": 0, "p_value": 1.0}
    with pytest.raises(ValueError, match="differ in shape"):
        mcnemar_exact(same, same[:2])
    with pytest.raises(ValueError, match="correct_b"):
        mcnemar_exact(same, np.array([0, 2, 1]))


def test_correct_at_threshold_marks_each_pair():
    from facepipe.eval.verification import correct_at_threshold

    # same if score >= 0.5: pair 2 (0.5, same) is right by the >=, pair 3 (0.7, different) is wrong
    got = correct_at_threshold([0.9, 0.5, 0.7, 0.1], [1, 1, 0, 0], 0.5)
    np.testing.assert_array_equal(got, [True, True, False, True])
    with pytest.raises(ValueError, match="finite"):
        correct_at_threshold([0.9], [1], float("nan"))
