"""The cluster index folder: build/open/search, enrolment, removal, crash safety, errors."""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from facepipe.index import store
from facepipe.index.knc import knc_scores
from facepipe.index.store import (
    ClusterIndex,
    ClusterIndexError,
    DimensionMismatchError,
    EmptyGalleryError,
    FingerprintMismatchError,
    UnknownIdentityError,
)
from facepipe.index.jobs import build_index_from_embeddings, tune_num_neighbours_on_holdout

DIM = 16
NAMES = ["ann", "bob", "cyd", "dan", "eve"]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def gallery(seed: int = 0, clusters_per_identity: int = 3, spread: float = 0.3):
    """Well-separated identities: each a random direction with a few centroids around it."""
    rng = np.random.default_rng(seed)
    bases = unit(rng.normal(size=(len(NAMES), DIM)))
    centroids = unit(np.repeat(bases, clusters_per_identity, axis=0)
                     + spread * rng.normal(size=(len(NAMES) * clusters_per_identity, DIM)) / math.sqrt(DIM))
    owner = np.repeat(np.arange(len(NAMES)), clusters_per_identity)
    return centroids, owner, bases


def queries_near(centroids: np.ndarray, seed: int = 1, noise: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return unit(centroids + noise * rng.normal(size=centroids.shape) / math.sqrt(DIM))


def results_of(index: ClusterIndex, queries: np.ndarray, **kwargs):
    return [(r.matches, r.unknown) for r in index.search(queries, top_k=5, **kwargs)]


@pytest.fixture
def built(tmp_path):
    centroids, owner, _ = gallery()
    index = ClusterIndex.build(tmp_path / "gallery", centroids, owner, NAMES, cluster_sizes=np.full(len(owner), 7),
                               fingerprint="fp-model-a", config={"cluster_size": 7})
    return index, centroids, owner


# --------------------------------------------------------------------------------------------
# Build, open, search
# --------------------------------------------------------------------------------------------
def test_search_is_eq10_over_the_exact_nearest_clusters(built):
    index, centroids, owner = built
    queries = queries_near(centroids)
    # By hand, for one query: all 15 clusters retrieved, scores of Eq. 10 with math.exp.
    sims = (centroids @ queries[4]).astype(np.float64)
    scores = {}
    for c, name in enumerate(NAMES):
        own = min(float(s) for s, o in zip(sims, owner) if o == c)
        other = sum(math.exp(float(s)) for s, o in zip(sims, owner) if o != c)
        scores[name] = math.log(math.exp(own) / other)
    expected = sorted(scores.items(), key=lambda kv: -kv[1])[:3]
    (result,) = index.search(queries[4:5], top_k=3, num_neighbours=len(owner))
    assert [name for name, _ in result.matches] == [name for name, _ in expected]
    assert [s for _, s in result.matches] == pytest.approx([s for _, s in expected], abs=1e-5)
    assert result.identity == NAMES[owner[4]] and not result.unknown
    # Vectorised: the index's Eq. 10 over N=6 equals knc_scores on exact inner products.
    exact = queries @ centroids.T
    top = np.argsort(-exact, axis=1)[:, :6]
    reference = knc_scores(np.take_along_axis(exact, top, axis=1), owner[top])
    got = index.knc(queries, num_neighbours=6)
    assert index.identity_names(got.predicted) == [NAMES[i] for i in reference.predicted]
    np.testing.assert_allclose(got.best_log_scores, reference.best_log_scores, atol=1e-5)
    assert [NAMES[owner[i]] for i in range(len(owner))] == [r.identity for r in index.search(queries)]


def test_saved_index_reopens_with_identical_results(built):
    index, centroids, _ = built
    queries = queries_near(centroids, seed=3, noise=0.5)
    before = results_of(index, queries)
    reopened = ClusterIndex.open(index.folder)
    assert results_of(reopened, queries) == before
    info = reopened.info()
    assert info["kind"] == "flat" and info["dim"] == DIM and info["fingerprint"] == "fp-model-a"
    assert info["num_clusters"] == 15 and info["num_embeddings"] == 15 * 7
    assert info["identities"] == {name: 3 for name in NAMES} and reopened.identities() == NAMES
    assert sorted(p.name for p in index.folder.iterdir()) == ["centroids.1.faiss", "meta.sqlite"]


def test_threshold_marks_unknown_queries_and_persists(built):
    index, centroids, _ = built
    queries = queries_near(centroids)
    far_away = unit(np.random.default_rng(9).normal(size=(1, DIM)))
    best = [r.matches[0][1] for r in index.search(queries)]
    threshold = min(best) - 1e-3
    index.set_threshold(threshold)
    reopened = ClusterIndex.open(index.folder)
    assert reopened.unknown_threshold == pytest.approx(threshold)
    assert not any(r.unknown for r in reopened.search(queries))
    reopened.set_threshold(max(best) + 1.0)
    results = reopened.search(np.concatenate([queries[:2], far_away]))
    assert all(r.unknown and r.identity is None and r.matches for r in results)
    reopened.set_threshold(None)
    assert ClusterIndex.open(index.folder).search(far_away)[0].unknown is False


def test_tuning_n_and_calibrating_the_threshold(built):
    index, centroids, owner = built
    queries = queries_near(centroids, seed=5, noise=0.4)
    choice = index.tune_num_neighbours(queries, [NAMES[o] for o in owner], grid=[1, 3, 6, 20, 200])
    assert set(choice.accuracy_by_n) == {1, 3, 6, 15} and choice.accuracy == max(choice.accuracy_by_n.values())
    reopened = ClusterIndex.open(index.folder)
    assert reopened.num_neighbours == choice.num_neighbours
    source = reopened.num_neighbours_source
    assert source["method"] == "calibrated" and source["num_queries"] == 15 and source["num_identities"] == 5
    assert source["accuracy"] == choice.accuracy and source["generation"] == reopened.generation
    impostors = unit(np.random.default_rng(11).normal(size=(50, DIM)))
    calib = index.calibrate_threshold(queries, impostors, target_far=0.1)
    assert calib.far <= 0.1 and calib.num_impostor == 50
    assert ClusterIndex.open(index.folder).unknown_threshold == pytest.approx(calib.threshold)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_kinds_agree_with_flat_on_a_separated_gallery(tmp_path, kind):
    centroids, owner, bases = gallery(seed=2, clusters_per_identity=4)
    queries = queries_near(np.repeat(bases, 3, axis=0), seed=4, noise=0.3)
    flat = ClusterIndex.build(tmp_path / "flat", centroids, owner, NAMES)
    other = ClusterIndex.build(tmp_path / kind, centroids, owner, NAMES, kind=kind, config={"num_neighbours": 8})
    expected = [r.identity for r in flat.search(queries, num_neighbours=8)]
    assert expected == [NAMES[i] for i in np.repeat(np.arange(len(NAMES)), 3)]
    assert [r.identity for r in other.search(queries)] == expected
    reopened = ClusterIndex.open(other.folder)
    assert reopened.kind == kind and [r.identity for r in reopened.search(queries)] == expected
    if kind == "ivf":
        assert reopened.info()["config"]["nlist"] == round(math.sqrt(len(owner)))


# --------------------------------------------------------------------------------------------
# N of Eq. 10: where it comes from
# --------------------------------------------------------------------------------------------
def noisy_gallery(num_identities: int = 30, noise: float = 1.0, seed: int = 0):
    """Embeddings of ``num_identities`` noisy identities (6..29 images each) and their labels."""
    rng = np.random.default_rng(seed)
    bases = unit(rng.normal(size=(num_identities, DIM)))
    counts = rng.integers(6, 30, size=num_identities)
    x = unit(np.concatenate([bases[i] + noise * rng.normal(size=(n, DIM)) / math.sqrt(DIM)
                             for i, n in enumerate(counts)]))
    return x, np.repeat(np.arange(num_identities), counts)


def test_default_n_without_validation_data_is_one_and_is_reported(built):
    index, centroids, owner = built  # built from centroids: nothing to hold out
    assert index.num_neighbours == 1 and index.config["num_neighbours"] == 1
    source = ClusterIndex.open(index.folder).num_neighbours_source
    assert source["method"] == "default" and source["num_neighbours"] == 1 and source["generation"] == 1
    text = index.describe_num_neighbours()
    assert text.startswith("N=1, default: no validation data") and "facepipe index calibrate" in text
    results = index.search(queries_near(centroids), top_k=3)
    # N = 1: one cluster retrieved, so one identity ranked, and the result says so.
    assert all(r.num_neighbours == 1 and r.num_neighbours_source == text and len(r.matches) == 1 for r in results)
    assert [r.identity for r in results] == [NAMES[o] for o in owner]
    given = index.search(queries_near(centroids)[:1], top_k=3, num_neighbours=6)[0]
    assert given.num_neighbours == 6 and given.num_neighbours_source == "N=6, given for this search"
    assert given.to_dict()["num_neighbours"] == 6 and len(given.matches) > 1
    assert index.info()["num_neighbours_description"] == text


@pytest.mark.parametrize("cluster_size", [1, 1000])
def test_holdout_tuning_equals_a_gallery_rebuilt_without_each_query(cluster_size):
    # cluster_size 1: every image is its own cluster; 1000: one cluster per identity, its mean.
    # In both a gallery re-clustered without the held-out image is known exactly, so the
    # leave-one-out shortcut must reproduce its accuracy at every N.
    x, codes = noisy_gallery()
    from facepipe.data.clusters import balanced_spherical_kmeans

    assignment = balanced_spherical_kmeans(x, codes, cluster_size)
    held = np.array([np.flatnonzero(codes == c)[c % 5] for c in range(0, 30, 2)])
    record = tune_num_neighbours_on_holdout(x, codes, assignment, held_out=held)
    expected: dict[str, float] = {}
    for n in record["grid"]:
        right = 0
        for row in held:
            keep = np.arange(len(x)) != row
            if cluster_size == 1:
                gallery, owner = x[keep], codes[keep]
            else:
                owner = np.unique(codes)
                gallery = unit(np.stack([x[keep & (codes == c)].sum(axis=0) for c in owner]))
            sims = gallery @ x[row]
            top = np.argsort(-sims, kind="stable")[:n]
            right += int(knc_scores(sims[top][None], owner[top][None]).predicted[0] == codes[row])
        expected[str(n)] = right / len(held)
    assert record["method"] == "tuned" and record["num_queries"] == 15 and record["num_identities"] == 15
    assert record["accuracy_by_n"] == pytest.approx(expected)
    best = max(expected.values())
    assert record["num_neighbours"] == min(int(n) for n, acc in expected.items() if acc == best)
    if cluster_size == 1:
        assert len(set(expected.values())) > 1  # N matters here: the check has teeth


def test_build_time_tuning_stores_the_chosen_n_and_keeps_a_users_n(tmp_path):
    x, codes = noisy_gallery()
    names = [f"id{c:02d}" for c in codes]  # sorted as the codes are: the same identities drawn
    index = build_index_from_embeddings(tmp_path / "tuned", x, names, cluster_size=2, seed=3)
    from facepipe.data.clusters import balanced_spherical_kmeans

    expected = tune_num_neighbours_on_holdout(x, codes, balanced_spherical_kmeans(x, codes, 2, seed=3), seed=3)
    assert expected["method"] == "tuned" and expected["num_neighbours"] != 1  # not the default by chance
    reopened = ClusterIndex.open(index.folder)
    source = reopened.num_neighbours_source
    assert reopened.num_neighbours == expected["num_neighbours"] == source["num_neighbours"]
    assert source["method"] == "tuned" and source["num_queries"] == 30 and source["seed"] == 3
    assert source["accuracy_by_n"] == expected["accuracy_by_n"] and source["generation"] == reopened.generation
    text = reopened.describe_num_neighbours()
    assert text.startswith(f"N={expected['num_neighbours']}, tuned on 30 held-out images (one each of 30 "
                           "enrolled identities) at build time")
    result = reopened.search(x[:1])[0]
    assert result.num_neighbours == expected["num_neighbours"] and result.num_neighbours_source == text
    # The gallery changes after tuning: the description says the choice may be stale.
    reopened.add(x[:4], ["newcomer"] * 4, cluster_size=2)
    assert "chosen for gallery generation 1, now 2: recalibrate" in ClusterIndex.open(index.folder) \
        .describe_num_neighbours()

    users = build_index_from_embeddings(tmp_path / "user", x, names, cluster_size=2, seed=3,
                                        config={"num_neighbours": 7})
    users.add(x[:4], ["newcomer"] * 4, cluster_size=2)
    reopened = ClusterIndex.open(users.folder)
    assert reopened.num_neighbours == 7 and reopened.num_neighbours_source["method"] == "user"
    assert reopened.describe_num_neighbours() == "N=7, set by the user at build time"
    reopened.set_num_neighbours(4)
    assert ClusterIndex.open(users.folder).describe_num_neighbours() == "N=4, set by the user"
    with pytest.raises(ClusterIndexError, match="contradicts"):
        ClusterIndex.build(tmp_path / "bad", x[:2], [0, 1], ["a", "b"], config={"num_neighbours": 3},
                           num_neighbours_source={"method": "tuned", "num_neighbours": 2})


def test_build_without_enough_identities_to_hold_out_defaults_to_one(tmp_path):
    x, codes = noisy_gallery(num_identities=19)  # one short of the 20 held-out images needed
    index = build_index_from_embeddings(tmp_path / "g", x, codes, cluster_size=2)
    source = ClusterIndex.open(index.folder).num_neighbours_source
    assert index.num_neighbours == 1 and source["method"] == "default"
    assert "19 enrolled identities have 2+ images to hold one out, build-time tuning needs 20" in source["reason"]
    off = build_index_from_embeddings(tmp_path / "off", *noisy_gallery(), cluster_size=2, tune=False)
    assert off.num_neighbours == 1 and off.num_neighbours_source["reason"] == "build-time tuning turned off"


def test_index_written_before_the_source_was_recorded_keeps_its_n(built):
    import json
    import sqlite3

    index, centroids, _ = built
    # What the previous format wrote: no source record, and the old default N = 100 in the config.
    conn = sqlite3.connect(index.folder / "meta.sqlite")
    config = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()[0])
    conn.execute("UPDATE meta SET value = ? WHERE key = 'config'", (json.dumps({**config, "num_neighbours": 100}),))
    conn.execute("DELETE FROM meta WHERE key = 'num_neighbours_source'")
    conn.commit()
    conn.close()
    old = ClusterIndex.open(index.folder)
    assert old.num_neighbours == 100 and old.num_neighbours_source == {"method": "unrecorded", "num_neighbours": 100}
    text = old.describe_num_neighbours()
    assert text.startswith("N=15 (N=100 clipped to the 15 clusters), stored by an older facepipe")
    assert "facepipe index calibrate" in text
    (result,) = old.search(queries_near(centroids)[:1], top_k=20)
    assert result.num_neighbours == 15 and len(result.matches) == 5 and result.num_neighbours_source == text
    # An older calibration report that set the stored N tells where it came from.
    old.calibrate(queries_near(centroids), [NAMES[o] for o in np.repeat(np.arange(5), 3)], grid=[3])
    conn = sqlite3.connect(index.folder / "meta.sqlite")
    conn.execute("DELETE FROM meta WHERE key = 'num_neighbours_source'")
    conn.commit()
    conn.close()
    source = ClusterIndex.open(index.folder).num_neighbours_source
    assert source["method"] == "calibrated" and source["num_neighbours"] == 3 and source["num_queries"] == 15


# --------------------------------------------------------------------------------------------
# Enrolment and removal
# --------------------------------------------------------------------------------------------
def test_enrolled_identity_is_found_and_existing_ones_are_extended(built):
    index, centroids, _ = built
    rng = np.random.default_rng(21)
    newcomer = unit(rng.normal(size=DIM))
    samples = unit(newcomer + 0.2 * rng.normal(size=(30, DIM)) / math.sqrt(DIM))
    more_ann = unit(centroids[0] + 0.1 * rng.normal(size=(12, DIM)) / math.sqrt(DIM))
    summary = index.add(np.concatenate([samples[:25], more_ann]), ["zed"] * 25 + ["ann"] * 12, cluster_size=10,
                        fingerprint="fp-model-a")
    assert summary["new_identities"] == ["zed"] and summary["extended_identities"] == ["ann"]
    assert summary["clusters_added"] == 2 + 1  # floor(25/10) clusters for zed, 1 more for ann
    counts = index.cluster_counts()
    assert counts["zed"] == 2 and counts["ann"] == 4 and index.num_clusters == 18
    reopened = ClusterIndex.open(index.folder)
    assert [r.identity for r in reopened.search(samples[25:])] == ["zed"] * 5
    assert reopened.info()["num_embeddings"] == 15 * 7 + 37
    assert sorted(p.name for p in index.folder.iterdir()) == ["centroids.2.faiss", "meta.sqlite"]


def test_removed_identity_is_never_returned_and_unknown_names_change_nothing(built):
    index, centroids, owner = built
    queries = queries_near(centroids, seed=8, noise=0.3)
    generation = index.generation
    before = results_of(index, queries)
    with pytest.raises(UnknownIdentityError, match="'nobody'") as caught:
        index.remove(["bob", "nobody"])
    assert isinstance(caught.value, KeyError) and "nothing was removed" in str(caught.value)
    again = ClusterIndex.open(index.folder)
    assert again.generation == generation and results_of(again, queries) == before and "bob" in again.identities()

    summary = index.remove(["bob"])
    assert summary["removed_clusters"] == 3 and summary["remaining_clusters"] == 12
    reopened = ClusterIndex.open(index.folder)
    assert "bob" not in reopened.identities()
    for result in reopened.search(queries, num_neighbours=12):
        assert all(name != "bob" for name, _ in result.matches)
    kept = owner != NAMES.index("bob")
    assert [r.identity for r in reopened.search(queries[kept])] == [NAMES[o] for o in owner[kept]]

    reopened.remove(["ann", "cyd", "dan", "eve"])
    with pytest.raises(EmptyGalleryError, match="holds no identity"):
        ClusterIndex.open(index.folder).search(queries)
    reopened.add(queries[:4], ["ann"] * 4, cluster_size=2, fingerprint="fp-model-a")  # an emptied index takes new identities
    assert [r.identity for r in reopened.search(queries[:1])] == ["ann"]


# --------------------------------------------------------------------------------------------
# Crash safety
# --------------------------------------------------------------------------------------------
def test_update_interrupted_before_commit_leaves_the_old_index(built, monkeypatch):
    index, centroids, _ = built
    queries = queries_near(centroids, seed=6, noise=0.4)
    before = results_of(index, queries)
    written = []
    original = store._write_faiss_file

    def crash_after_write(path, data):
        original(path, data)
        written.append(path)
        raise RuntimeError("simulated crash between the FAISS write and the SQLite commit")

    monkeypatch.setattr(store, "_write_faiss_file", crash_after_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        index.remove(["ann"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        index.add(queries[:6], ["new"] * 6, cluster_size=3, fingerprint="fp-model-a")
    assert written and all(path.name == "centroids.2.faiss" for path in written)
    monkeypatch.undo()
    reopened = ClusterIndex.open(index.folder)
    assert reopened.generation == 1 and reopened.identities() == NAMES
    assert results_of(reopened, queries) == before


def test_process_killed_before_commit_leaves_the_old_index(built):
    index, centroids, _ = built
    queries = queries_near(centroids, seed=7, noise=0.4)
    before = results_of(index, queries)
    # A real crash: the process dies (no exception handler, no rollback) after the new FAISS
    # file is on disk and the tables were changed, before COMMIT.
    script = textwrap.dedent(f"""
        import os
        from facepipe.index import store
        original = store._write_faiss_file
        def die(path, data):
            original(path, data)
            os._exit(7)
        store._write_faiss_file = die
        store.ClusterIndex.open({str(index.folder)!r}).remove(["ann", "bob"])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 7, done.stderr
    assert (index.folder / "centroids.2.faiss").is_file()  # the uncommitted file is left behind
    reopened = ClusterIndex.open(index.folder)
    assert reopened.generation == 1 and reopened.identities() == NAMES
    assert results_of(reopened, queries) == before
    # The next update cleans the stray file up and completes normally.
    reopened.remove(["ann"])
    assert sorted(p.name for p in index.folder.iterdir()) == ["centroids.2.faiss", "meta.sqlite"]
    assert "ann" not in ClusterIndex.open(index.folder).identities()


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def test_dimension_mismatch_on_search_and_add(built):
    index, _, _ = built
    with pytest.raises(DimensionMismatchError, match=f"dimension 8 but the index .* holds {DIM}-d"):
        index.search(np.ones((2, 8), dtype=np.float32))
    with pytest.raises(DimensionMismatchError, match="embeddings have dimension 3"):
        index.add(np.ones((4, 3)), ["x"] * 4, fingerprint="fp-model-a")
    assert index.generation == 1


def test_fingerprint_mismatch(built):
    index, _, _ = built
    ClusterIndex.open(index.folder, fingerprint="fp-model-a")
    with pytest.raises(FingerprintMismatchError, match="fp-model-a.*fp-model-b"):
        ClusterIndex.open(index.folder, fingerprint="fp-model-b")
    with pytest.raises(FingerprintMismatchError):
        index.add(np.ones((2, DIM)), ["x", "x"], fingerprint="fp-model-b")
    # The Python API refuses vectors that name no model, as the CLI does, unless the caller vouches.
    with pytest.raises(FingerprintMismatchError, match="record no model fingerprint.*fp-model-a.*allow_unfingerprinted"):
        index.add(np.ones((2, DIM)), ["x", "x"])
    assert "x" not in ClusterIndex.open(index.folder).identities()
    assert index.add(np.ones((2, DIM)), ["x", "x"], allow_unfingerprinted=True)["new_identities"] == ["x"]


def test_missing_and_corrupt_files(built, tmp_path):
    index, _, _ = built
    folder = index.folder
    with pytest.raises(ClusterIndexError, match="does not exist"):
        ClusterIndex.open(tmp_path / "nowhere")
    with pytest.raises(ClusterIndexError, match="meta.sqlite is missing"):
        ClusterIndex.open(tmp_path)
    faiss_file = folder / "centroids.1.faiss"
    original = faiss_file.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte inside the vectors
    faiss_file.write_bytes(bytes(damaged))
    with pytest.raises(ClusterIndexError, match="corrupt"):
        ClusterIndex.open(folder)
    faiss_file.write_bytes(original[:100])
    with pytest.raises(ClusterIndexError, match="corrupt"):
        ClusterIndex.open(folder)
    faiss_file.unlink()
    with pytest.raises(ClusterIndexError, match="centroids.1.faiss is missing"):
        ClusterIndex.open(folder)
    faiss_file.write_bytes(original)
    ClusterIndex.open(folder)
    (folder / "meta.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ClusterIndexError, match="damaged or not an index database"):
        ClusterIndex.open(folder)


def test_empty_gallery_and_existing_folders(built, tmp_path):
    index, centroids, owner = built
    with pytest.raises(EmptyGalleryError, match="empty"):
        ClusterIndex.build(tmp_path / "empty", np.zeros((0, DIM)), np.zeros(0, dtype=int), [])
    with pytest.raises(ClusterIndexError, match="not empty; pass overwrite"):
        ClusterIndex.build(index.folder, centroids, owner, NAMES)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ClusterIndexError, match="not a cluster index"):
        ClusterIndex.build(other, centroids, owner, NAMES, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    # Overwrite replaces the index in place (new dimension, kind, identities).
    replaced = ClusterIndex.build(index.folder, centroids[:2, :8], [0, 1], ["x", "y"], kind="hnsw", overwrite=True)
    reopened = ClusterIndex.open(index.folder)
    assert reopened.identities() == ["x", "y"] and reopened.dim == 8 and reopened.kind == "hnsw"
    assert replaced.fingerprint == "" and sorted(p.name for p in index.folder.iterdir()) == [
        "centroids.2.faiss", "meta.sqlite"]
    with pytest.raises(ClusterIndexError, match="own no cluster"):
        ClusterIndex.build(tmp_path / "bad", centroids[:2], [0, 0], ["x", "y"])
    with pytest.raises(ClusterIndexError, match="unique"):
        ClusterIndex.build(tmp_path / "bad", centroids[:2], [0, 1], ["x", "x"])
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------------------------
# From embeddings (balanced spherical k-means) and from a checkpoint
# --------------------------------------------------------------------------------------------
def test_build_from_embeddings_clusters_each_identity(tmp_path):
    _, _, bases = gallery(seed=12)
    rng = np.random.default_rng(13)
    counts = [45, 20, 9, 30, 12]
    embeddings = np.concatenate([bases[i] + 0.3 * rng.normal(size=(n, DIM)) / math.sqrt(DIM)
                                 for i, n in enumerate(counts)])
    labels = np.repeat(np.arange(len(counts)), counts)
    index = build_index_from_embeddings(tmp_path / "g", embeddings, labels, cluster_size=10, kind="flat")
    assert index.cluster_counts() == {"0": 4, "1": 2, "2": 1, "3": 3, "4": 1}
    assert index.info()["num_embeddings"] == sum(counts) and index.config["cluster_size"] == 10
    assert [r.identity for r in index.search(unit(bases))] == ["0", "1", "2", "3", "4"]


def random_checkpoint(path: Path, seed: int, **sections) -> Path:
    """A loadable checkpoint of an untrained tiny model (32x32 input, 32-d)."""
    import torch

    from conftest import tiny_config
    from facepipe.models import build_backbone
    from facepipe.runtime.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    config = tiny_config(path.parent, path.parent, **sections)
    model = build_backbone(config.model, config.data.image_size)
    save_checkpoint(path, {"model": model.state_dict(), "config": config.to_dict(), "identities": ["a"],
                           "epoch": 0, "step": 0})
    return path


def test_images_from_a_checkpoint_build_and_search(tiny_dataset, tmp_path):
    from facepipe.index.jobs import build_index_from_checkpoint, search_images

    checkpoint = random_checkpoint(tmp_path / "a.pt", seed=0)
    # cluster_size 1: every image is its own cluster, so with N=1 an enrolled image finds itself.
    index = build_index_from_checkpoint(tmp_path / "g", checkpoint, tiny_dataset, cluster_size=1,
                                        device="cpu", progress=False)
    identities = sorted(p.name for p in tiny_dataset.iterdir() if p.is_dir())
    assert sorted(index.identities()) == identities and len(index.fingerprint) == 16
    assert index.config["flip"] == "sum"
    probes = [sorted((tiny_dataset / name).glob("*.png"))[0] for name in identities[:3]]
    results = search_images(tmp_path / "g", checkpoint, [*probes, tiny_dataset / identities[4]], top_k=2,
                            num_neighbours=1, device="cpu", progress=False)
    assert [r["identity"] for r in results[:3]] == identities[:3]
    assert all(r["alignment"] == "crop" and r["status"] == "ok" for r in results)  # 32x32: already crops
    assert {r["identity"] for r in results[3:]} == {identities[4]}
    other = random_checkpoint(tmp_path / "b.pt", seed=1)
    with pytest.raises(FingerprintMismatchError):
        search_images(tmp_path / "g", other, probes[:1], device="cpu", progress=False)


def test_raw_photos_are_aligned_before_search(tmp_path):
    import shutil

    from PIL import Image

    from conftest import SHARED_DATA
    from facepipe.index.jobs import search_images

    lfw = SHARED_DATA / "lfw" / "lfw-deepfunneled"
    assert lfw.is_dir(), f"real test data {lfw} is missing (see ../shared/data/README.md)"
    photos = [lfw / "Abdullah_Gul" / "Abdullah_Gul_0001.jpg", lfw / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg"]
    raw = tmp_path / "raw"
    raw.mkdir()
    for photo in photos:
        shutil.copy(photo, raw / photo.name)
    Image.new("RGB", (250, 250), (128, 128, 128)).save(raw / "grey.jpg", format="JPEG")
    checkpoint = random_checkpoint(tmp_path / "m.pt", seed=0, align={"no_face": "skip"})
    rng = np.random.default_rng(0)
    from facepipe.models.loaded import load_model

    fingerprint = load_model(checkpoint).fingerprint
    # N = 4 retrieves both identities' clusters, so each photo lists two matches (the default N,
    # now 1 rather than 100, would rank only the nearest cluster's identity).
    ClusterIndex.build(tmp_path / "g", unit(rng.normal(size=(4, 32))), [0, 0, 1, 1], ["p", "q"],
                       fingerprint=fingerprint, config={"flip": "sum", "num_neighbours": 4})
    results = search_images(tmp_path / "g", checkpoint, [raw], top_k=2, device="cpu", progress=False)
    by_name = {Path(r["input"]).name: r for r in results}
    for photo in photos:
        result = by_name[photo.name]
        assert result["alignment"] == "aligned" and result["status"] == "ok" and len(result["matches"]) == 2
    assert by_name["grey.jpg"]["status"] == "no_face" and by_name["grey.jpg"]["matches"] == []
