"""Tests for facepipe.data.synth: long-tail counts, deterministic resumable rendering, and the
requirement that raw pixels alone are close to chance for verifying synthetic identities."""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from facepipe.data.synth import (
    generate_dataset,
    identity_counts,
    render_face,
    sample_identity,
)

SMALL = (40, 36)  # (height, width): small images keep the disk tests fast


def _read_rgb(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, path
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# identity_counts
# --------------------------------------------------------------------------------------------
def test_power_counts_hand_computed():
    # n_c = round(60 * 3 / (c + 2)) = 180 / (c + 2): 60, 45, 36, 30, 25.71 -> 26
    assert identity_counts(5, "power", 60, 2, 1.0).tolist() == [60, 45, 36, 30, 26]
    # gamma 2: 180 / (c^2 + 2): 60, 30, 16.36 -> 16, 10, 6.67 -> 7
    assert identity_counts(5, "power", 60, 2, 2.0).tolist() == [60, 30, 16, 10, 7]
    # the default is the power law with max 60, min 2, gamma 1
    assert identity_counts(5).tolist() == [60, 45, 36, 30, 26]


def test_zipf_and_uniform_counts_hand_computed():
    assert identity_counts(5, "zipf", 60, 2, 1.0).tolist() == [60, 30, 20, 15, 12]
    # 60 / c^2: 60, 15, 6.67 -> 7, 3.75 -> 4, 2.4 -> 2
    assert identity_counts(5, "zipf", 60, 2, 2.0).tolist() == [60, 15, 7, 4, 2]
    # half-up rounding: 5 / 2 = 2.5 -> 3
    assert identity_counts(2, "zipf", 5, 1, 1.0).tolist() == [5, 3]
    assert identity_counts(4, "uniform", 7, 2).tolist() == [7, 7, 7, 7]


def test_counts_min_clamp():
    # zipf 10 / c with floor 3: 10, 5, 3.33 -> 3, then 2.5, 2, ... clamped to 3
    assert identity_counts(8, "zipf", 10, 3).tolist() == [10, 5, 3, 3, 3, 3, 3, 3]
    # power with min 5: 60 * 6 / (c + 5); c = 100 gives 3.43, clamped to 5
    counts = identity_counts(100, "power", 60, 5)
    assert counts[0] == 60 and counts[-1] == 5
    assert identity_counts(100, "power", 60, 2)[-1] == 2  # 180 / 102 = 1.76 -> 2


@pytest.mark.parametrize("distribution", ["power", "zipf", "uniform"])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.5])
def test_counts_monotone_bounded_int64(distribution, gamma):
    counts = identity_counts(500, distribution, 80, 3, gamma)
    assert counts.dtype == np.int64 and counts.shape == (500,)
    assert counts[0] == 80
    assert np.all(np.diff(counts) <= 0)
    assert counts.min() >= 3 and counts.max() <= 80


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_identities=5, distribution="pareto"), "power, zipf, uniform"),
        (dict(num_identities=0), "num_identities"),
        (dict(num_identities=-3), "num_identities"),
        (dict(num_identities=5, max_images=0), "max_images"),
        (dict(num_identities=5, min_images=0), "min_images"),
        (dict(num_identities=5, max_images=3, min_images=4), "must not exceed"),
        (dict(num_identities=5, gamma=-1.0), "gamma"),
        (dict(num_identities=2.5), "integer"),
    ],
)
def test_counts_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        identity_counts(**kwargs)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(112, 112), (112, 96)])
def test_render_shape_and_dtype(size):
    img = render_face(sample_identity(0, 7), np.random.default_rng(1), size)
    assert img.shape == (size[0], size[1], 3)
    assert img.dtype == np.uint8
    assert img.std() > 10  # something was drawn


def test_render_is_a_function_of_the_identity():
    a, b = sample_identity(0, 3), sample_identity(0, 4)
    assert sample_identity(0, 3) == a  # parameters are deterministic in (seed, index)
    assert sample_identity(1, 3) != a  # and depend on the seed
    img_a = render_face(a, np.random.default_rng(11), (64, 64))
    np.testing.assert_array_equal(img_a, render_face(a, np.random.default_rng(11), (64, 64)))
    img_b = render_face(b, np.random.default_rng(11), (64, 64))
    assert np.abs(img_a.astype(int) - img_b.astype(int)).mean() > 5
    # Same identity, other nuisance draw: the image changes too.
    assert not np.array_equal(img_a, render_face(a, np.random.default_rng(12), (64, 64)))


def test_render_rejects_bad_size():
    with pytest.raises(ValueError):
        render_face(sample_identity(0, 0), np.random.default_rng(0), (8, 8))


# --------------------------------------------------------------------------------------------
# generate_dataset
# --------------------------------------------------------------------------------------------
def _small_dataset(out, **kwargs):
    args = dict(num_identities=3, seed=5, max_images=4, min_images=2, size=SMALL, progress=False)
    args.update(kwargs)
    return generate_dataset(out, **args)


def test_generate_layout_and_metadata(tmp_path):
    info = _small_dataset(tmp_path / "ds")
    root = Path(info["root"])
    assert root == (tmp_path / "ds").resolve()
    assert info["identities"] == ["id_00000", "id_00001", "id_00002"]
    assert info["counts"] == identity_counts(3, "power", 4, 2).tolist() == [4, 3, 2]
    assert info["num_images"] == 9
    for name, count in zip(info["identities"], info["counts"]):
        assert sorted(p.name for p in (root / name).iterdir()) == sorted(f"{n}.png" for n in range(count))
    meta = json.loads((root / "synth.json").read_text())
    assert meta["arguments"]["seed"] == 5 and meta["arguments"]["size"] == list(SMALL)
    assert meta["counts"] == [4, 3, 2]


def test_generate_is_deterministic_and_matches_render_face(tmp_path):
    a = _small_dataset(tmp_path / "a")
    b = _small_dataset(tmp_path / "b")
    files_a, files_b = _files(Path(a["root"])), _files(Path(b["root"]))
    assert files_a.keys() == files_b.keys() and len(files_a) == 10  # 9 images + synth.json
    assert files_a == files_b
    # The PNG holds exactly the RGB image of rng [seed, global index, n] (channel order included).
    img = _read_rgb(Path(a["root"]) / "id_00001" / "2.png")
    expected = render_face(sample_identity(5, 1), np.random.default_rng([5, 1, 2]), SMALL)
    np.testing.assert_array_equal(img, expected)


@pytest.mark.parametrize("size", [(112, 112), (112, 96)])
def test_generate_image_size(tmp_path, size):
    info = generate_dataset(tmp_path / "ds", 1, images_per_identity=1, size=size, progress=False)
    assert _read_rgb(Path(info["root"]) / "id_00000" / "0.png").shape == (size[0], size[1], 3)


def test_first_identity_gives_disjoint_names_and_same_global_identities(tmp_path):
    train = _small_dataset(tmp_path / "train", num_identities=4, images_per_identity=2)
    held = _small_dataset(tmp_path / "held", num_identities=3, first_identity=4, images_per_identity=2)
    assert held["identities"] == ["id_00004", "id_00005", "id_00006"]
    assert not set(train["identities"]) & set(held["identities"])
    # A global identity renders the same wherever it appears: id_00004 of a wider dataset
    # matches the held-out copy byte for byte.
    wide = _small_dataset(tmp_path / "wide", num_identities=5, images_per_identity=2)
    for n in range(2):
        rel = Path("id_00004") / f"{n}.png"
        assert (Path(wide["root"]) / rel).read_bytes() == (Path(held["root"]) / rel).read_bytes()


def test_images_per_identity_overrides_counts(tmp_path):
    info = _small_dataset(tmp_path / "ds", images_per_identity=2)
    assert info["counts"] == [2, 2, 2] and info["num_images"] == 6


def test_rerun_is_idempotent_and_resumes(tmp_path):
    first = _small_dataset(tmp_path / "ds")
    root = Path(first["root"])
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    # Push mtimes into the past so a rewrite would be visible whatever the clock resolution.
    for p in paths:
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    before = {p: p.stat().st_mtime_ns for p in paths}
    content = _files(root)

    assert _small_dataset(tmp_path / "ds") == first
    assert {p: p.stat().st_mtime_ns for p in paths} == before

    victim = root / "id_00001" / "1.png"
    victim.unlink()
    assert _small_dataset(tmp_path / "ds") == first
    assert victim.read_bytes() == content[str(victim.relative_to(root))]
    assert {p: p.stat().st_mtime_ns for p in paths if p != victim} == {
        p: t for p, t in before.items() if p != victim}


def test_refuses_foreign_or_mismatched_dir(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a dataset")
    with pytest.raises(ValueError, match="not empty"):
        _small_dataset(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # untouched

    ours = tmp_path / "ours"
    _small_dataset(ours)
    with pytest.raises(ValueError, match="different arguments"):
        _small_dataset(ours, seed=6)
    with pytest.raises(ValueError, match="different arguments"):
        _small_dataset(ours, images_per_identity=3)
    # Same arguments from another renderer version: refused too, with its own message.
    meta = json.loads((ours / "synth.json").read_text())
    meta["render_version"] = -1
    (ours / "synth.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="renderer version"):
        _small_dataset(ours)
    # An existing but empty folder is fine.
    (tmp_path / "empty").mkdir()
    assert _small_dataset(tmp_path / "empty")["num_images"] == 9


def test_generate_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="power, zipf, uniform"):
        _small_dataset(tmp_path / "a", distribution="lognormal")
    with pytest.raises(ValueError, match="first_identity"):
        _small_dataset(tmp_path / "b", first_identity=-1)
    with pytest.raises(ValueError, match="images_per_identity"):
        _small_dataset(tmp_path / "c", images_per_identity=0)


# --------------------------------------------------------------------------------------------
# Learnable, but not by raw pixels
# --------------------------------------------------------------------------------------------
def _pixel_descriptors(images: np.ndarray) -> np.ndarray:
    small = np.stack([cv2.resize(im, (28, 28), interpolation=cv2.INTER_AREA) for im in images])
    feats = small.reshape(len(images), -1).astype(np.float64)
    feats -= feats.mean(axis=1, keepdims=True)
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)


def _best_threshold_accuracy(feats: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """All positive pairs plus as many random negative pairs; accuracy at the best threshold."""
    sim = feats @ feats.T
    pos = [sim[a, b] for a, b in itertools.combinations(range(len(labels)), 2) if labels[a] == labels[b]]
    rng = np.random.default_rng(seed)
    neg = []
    while len(neg) < len(pos):
        a, b = rng.integers(len(labels), size=2)
        if labels[a] != labels[b]:
            neg.append(sim[a, b])
    scores = np.concatenate([pos, neg])
    truth = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])[np.argsort(-scores)]
    # Threshold just below the k-th best score: k positives-or-not accepted, the rest rejected.
    tp = np.concatenate([[0], np.cumsum(truth)])
    fp = np.concatenate([[0], np.cumsum(1 - truth)])
    return float(((tp + (len(neg) - fp)) / len(scores)).max())


def test_raw_pixels_are_near_chance_on_held_out_identities(tmp_path):
    info = generate_dataset(tmp_path / "held", 40, seed=0, first_identity=1000, images_per_identity=6,
                            size=(112, 112), progress=False)
    root = Path(info["root"])
    images, labels = [], []
    for label, name in enumerate(info["identities"]):
        for n in range(6):
            images.append(_read_rgb(root / name / f"{n}.png"))
            labels.append(label)
    acc = _best_threshold_accuracy(_pixel_descriptors(np.stack(images)), np.array(labels))
    print(f"raw-pixel verification accuracy: {acc:.3f}")
    assert acc < 0.65

    # The identity signal is in the pixels all the same: with the nuisance turned down to 10 %
    # the same descriptor verifies the same identities almost perfectly, so it is the nuisance
    # (not a lack of identity structure) that defeats raw pixels above.
    mild = [render_face(sample_identity(0, 1000 + i), np.random.default_rng([0, 1000 + i, n]), (112, 112),
                        nuisance=0.1) for i in range(40) for n in range(2)]
    mild_acc = _best_threshold_accuracy(_pixel_descriptors(np.stack(mild)), np.repeat(np.arange(40), 2))
    print(f"raw-pixel verification accuracy at nuisance 0.1: {mild_acc:.3f}")
    assert mild_acc > 0.9
