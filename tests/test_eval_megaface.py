"""MegaFace-style identification with distractors: ranks, CMC, tail ROC, the job, the LFW mini sets."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy.stats import norm

from conftest import SHARED_DATA
from facepipe.cli import main
from facepipe.data.lfw_pairs import parse_lfw_pairs
from facepipe.eval import EvalInputError, roc_metrics, tail_roc
from facepipe.eval.megaface import (
    distractor_levels,
    evaluate_megaface,
    lfw_megaface_sets,
    megaface_identification,
    search_distractors,
)
from test_eval_lfw import require, write_embeddings_folder


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def on_circle(*degrees: float) -> np.ndarray:
    """Unit vectors in the plane at the given angles."""
    radians = np.radians(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def test_distractor_levels():
    assert distractor_levels(1_500_000) == [10, 100, 1_000, 10_000, 100_000, 1_000_000]
    assert distractor_levels(10_492) == [10, 100, 1_000, 10_000, 10_492]
    assert distractor_levels(1_000) == [10, 100, 1_000]
    assert distractor_levels(7) == [7]
    with pytest.raises(EvalInputError, match="empty"):
        distractor_levels(0)


def test_rank1_and_cmc_on_a_hand_made_gallery():
    # Identity A: a1 at 0 degrees, a2 at 40 (genuine cosine 0.766). Identity B: b1 at 180, b2 at
    # 200 (0.940). Distractors at 10, 25, 60 and 300 degrees.
    # a1 -> a2: distractors at 10 (cos 0.985) and 25 (0.906) beat 0.766: rank 3.
    # a2 -> a1: 10 (cos 30 = 0.866), 25 (cos 15 = 0.966) and 60 (cos 20 = 0.940) beat it: rank 4.
    # b1 -> b2 and b2 -> b1: every distractor is more than 100 degrees away: rank 1.
    probes = on_circle(0, 40, 180, 200)
    distractors = on_circle(10, 25, 60, 300).astype(np.float32)
    result = megaface_identification(probes, ["A", "A", "B", "B"], distractors, max_rank=4, impostor_top_k=4,
                                     fars=(0.25,), progress=False)
    assert result.levels == [4] and result.num_trials == 4
    ranks = {(int(p), int(g)): int(r) for p, g, r in zip(result.trial_probe, result.trial_gallery,
                                                          result.trial_rank[4])}
    assert ranks == {(0, 1): 3, (1, 0): 4, (2, 3): 1, (3, 2): 1}
    np.testing.assert_allclose(result.cmc[4], [0.5, 0.5, 0.75, 1.0])
    assert result.rank1[4] == 0.5
    # Ranks beyond max_rank are capped at max_rank + 1 and never counted as found.
    capped = megaface_identification(probes, ["A", "A", "B", "B"], distractors, max_rank=3, impostor_top_k=4,
                                     fars=(0.25,), progress=False)
    assert sorted(capped.trial_rank[4].tolist()) == [1, 1, 3, 4]
    np.testing.assert_allclose(capped.cmc[4], [0.5, 0.5, 0.75])


def brute_force(probes, labels, distractors, order, level):
    p = unit(probes)
    d = unit(distractors[order[:level]])
    scores = p @ d.T
    ranks = []
    for i in range(len(p)):
        for j in range(len(p)):
            if i != j and labels[i] == labels[j]:
                ranks.append(1 + int((scores[i] >= p[i] @ p[j] - 1e-6).sum()))
    return np.array(ranks)


def synthetic_probe_set(seed=0, identities=20, per_identity=4, distractors=1500, dim=16, noise=0.9):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities, dim))
    labels = np.repeat(np.arange(identities), per_identity)
    probes = centres[labels] + noise * rng.normal(size=(labels.size, dim))
    return probes.astype(np.float32), labels, rng.normal(size=(distractors, dim)).astype(np.float32)


def test_cmc_matches_brute_force_at_every_level_and_is_monotone():
    probes, labels, distractors = synthetic_probe_set()
    labels = labels.copy()
    labels[-1] = 999  # a single-image identity is left out of the probes
    result = megaface_identification(probes, labels, distractors, progress=False, chunk_size=256, seed=5)
    assert result.levels == [10, 100, 1000, 1500]
    assert result.num_skipped_probe_images == 1 and result.num_probe_images == probes.shape[0] - 1
    order = np.random.default_rng(5).permutation(distractors.shape[0])
    keep = labels != 999
    for level in result.levels:
        ranks = brute_force(probes[keep], labels[keep], distractors, order, level)
        expected = [np.mean(ranks <= r) for r in range(1, 11)]
        np.testing.assert_allclose(result.cmc[level], expected, atol=1e-12)
        assert np.all(np.diff(result.cmc[level]) >= 0)
    rank1 = [result.rank1[d] for d in result.levels]
    assert rank1 == sorted(rank1, reverse=True)  # more distractors never help


def test_chunked_search_equals_one_pass():
    probes, _, distractors = synthetic_probe_set(seed=1, distractors=700)
    probes = unit(probes).astype(np.float32)
    one = search_distractors(probes, distractors, [700], k=20, snapshot_k=5, chunk_size=10_000, progress=False)
    many = search_distractors(probes, distractors, [10, 100, 700], k=20, snapshot_k=5, chunk_size=64,
                              progress=False)
    np.testing.assert_allclose(many[1], one[1], atol=1e-6)
    np.testing.assert_array_equal(many[2], one[2])
    exact = unit(probes) @ unit(distractors[:100]).T
    np.testing.assert_allclose(many[0][100], -np.sort(-exact, axis=1)[:, :5], atol=1e-5)


def test_tail_verification_equals_the_full_roc_where_it_is_exact():
    probes, labels, distractors = synthetic_probe_set(seed=2, distractors=800)
    fars = (1e-4, 1e-3, 5e-2)
    result = megaface_identification(probes, labels, distractors, impostor_top_k=10, fars=fars, progress=False)
    p, d = unit(probes), unit(distractors)
    genuine = [p[i] @ p[j] for i in range(len(p)) for j in range(i + 1, len(p)) if labels[i] == labels[j]]
    impostor = (p @ d.T).ravel()
    full = roc_metrics(np.r_[genuine, impostor], np.r_[np.ones(len(genuine)), np.zeros(impostor.size)], fars=fars)
    assert result.num_genuine_pairs == len(genuine) and result.num_impostor_pairs == impostor.size
    assert 1e-3 < result.max_exact_far < 5e-2
    for far in (1e-4, 1e-3):
        assert result.tar_at_far[far] == pytest.approx(full["tar_at_far"][far], abs=1e-6)
    assert result.tar_at_far[5e-2] is None  # beyond the kept tail: not measured, not guessed


def test_tail_roc_tar_at_far_matches_gaussian_closed_form():
    rng = np.random.default_rng(3)
    mu0, mu1, n_neg, n_pos, kept = 0.0, 3.5, 4_000_000, 100_000, 4_000
    impostors = rng.normal(mu0, 1, n_neg)
    tail = np.partition(impostors, n_neg - kept)[n_neg - kept:]  # only the top 0.1 % is stored
    complete_above = np.partition(impostors, n_neg - kept - 1)[n_neg - kept - 1]
    genuine = rng.normal(mu1, 1, n_pos)
    out = tail_roc(genuine, tail, n_neg, complete_above=complete_above, fars=(1e-5, 1e-4, 1e-2))
    assert out["max_exact_far"] == pytest.approx(kept / n_neg) and out["tar_at_far"][1e-2] is None
    for far in (1e-5, 1e-4):
        threshold = mu0 + norm.ppf(1 - far)
        expected = 1 - norm.cdf(threshold - mu1)
        # Quantile sd sqrt(far (1 - far) / n_neg) / pdf, moved onto TAR, plus TAR's binomial sd; 5 sd.
        sd_threshold = math.sqrt(far * (1 - far) / n_neg) / norm.pdf(threshold - mu0)
        sd = math.hypot(norm.pdf(threshold - mu1) * sd_threshold, math.sqrt(expected * (1 - expected) / n_pos))
        assert abs(out["tar_at_far"][far] - expected) < 5 * sd, (far, out["tar_at_far"][far], expected)


def test_megaface_job_with_a_memory_mapped_distractor_file(tmp_path):
    probes, labels, distractors = synthetic_probe_set(seed=4, distractors=1200, noise=0.3)
    write_embeddings_folder(tmp_path / "probes", {f"id{l:02d}/img{i}.jpg": v for i, (l, v)
                                                  in enumerate(zip(labels, probes))})
    np.save(tmp_path / "distractors.npy", distractors)
    out = tmp_path / "report"
    assert main(["eval", "megaface", "--probes", str(tmp_path / "probes"), "--distractors",
                 str(tmp_path / "distractors.npy"), "--impostor-top-k", "50", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    ident = metrics["identification"]
    assert ident["levels"] == [10, 100, 1000, 1200] and ident["num_trials"] == 20 * 4 * 3
    assert ident["rank1"]["10"] >= ident["rank1"]["1200"] > 0.5
    assert metrics["model_fingerprint"] == "feedfacecafebeef"
    assert {"cmc.png", "roc.png", "trials.csv", "distractor_top.csv", "verification_scores.csv"} <= set(metrics["files"])
    trials = list(csv.DictReader(open(out / "trials.csv")))
    assert len(trials) == 240
    assert np.mean([int(t["rank_at_1200"]) == 1 for t in trials]) == pytest.approx(ident["rank1"]["1200"])
    assert "CMC" in (out / "report.md").read_text()

    # Probe identities among the distractors are refused.
    write_embeddings_folder(tmp_path / "dis_emb", {"id03/x.jpg": distractors[0], "other/y.jpg": distractors[1]})
    with pytest.raises(EvalInputError, match="also appear among the distractors"):
        evaluate_megaface(tmp_path / "r2", probes=tmp_path / "probes", distractors=tmp_path / "dis_emb",
                          progress=False)


@pytest.fixture(scope="module")
def lfw_mini_sets():
    lfw = require(SHARED_DATA / "lfw")
    return lfw_megaface_sets(require(lfw / "lfw-deepfunneled"), require(lfw / "pairsDevTest.txt"))


def test_lfw_mini_protocol_sets(lfw_mini_sets):
    lfw = SHARED_DATA / "lfw"
    sets = lfw_mini_sets
    dev_people = set(parse_lfw_pairs(lfw / "pairsDevTest.txt").persons())
    probe_people = set(sets.probe_labels)
    assert probe_people <= dev_people and len(probe_people) == 418 and len(sets.probe_keys) == 2196
    counts = {p: sets.probe_labels.count(p) for p in probe_people}
    assert min(counts.values()) >= 2
    distractor_people = {k.split("/")[0] for k in sets.distractor_keys}
    assert not distractor_people & probe_people
    assert len(sets.probe_keys) + len(sets.distractor_keys) == 13233  # every LFW image is used once


def test_lfw_mini_protocol_from_precomputed_lfw_embeddings(lfw_mini_sets, tmp_path):
    lfw = SHARED_DATA / "lfw"
    sets = lfw_mini_sets
    # Stand-in embeddings of every LFW image: a direction per person plus noise.
    rng = np.random.default_rng(0)
    people = sorted({k.split("/")[0] for k in sets.probe_keys + sets.distractor_keys})
    centre = dict(zip(people, rng.normal(size=(len(people), 8))))
    write_embeddings_folder(tmp_path / "lfw_emb", {k: centre[k.split("/")[0]] + 0.5 * rng.normal(size=8)
                                                   for k in sets.probe_keys + sets.distractor_keys})
    result = evaluate_megaface(tmp_path / "out", lfw_images=tmp_path / "lfw_emb", lfw_dev_pairs=lfw / "pairsDevTest.txt",
                               impostor_top_k=10, progress=False)
    counts = result["metrics"]["counts"]
    assert counts["probe_images"] == 2196 and counts["probe_identities"] == 418 and counts["distractors"] == 11037
    ident = result["metrics"]["identification"]
    assert ident["levels"] == [10, 100, 1000, 10000, 11037]
    assert ident["rank1"]["10"] >= ident["rank1"]["11037"]
    assert "LFW mini MegaFace" in (tmp_path / "out" / "report.md").read_text()
