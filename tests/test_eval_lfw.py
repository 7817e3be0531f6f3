"""LFW protocol: pairs-file parsing, the 10-fold protocol, TAR at FAR, missing images, the job."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from conftest import SHARED_DATA, tiny_config
from facepipe.cli import main
from facepipe.data.lfw_pairs import parse_lfw_pairs
from facepipe.eval import EvalInputError, best_threshold, evaluate_verification, kfold_accuracy, roc_metrics
from facepipe.eval.lfw import evaluate_lfw

LFW = SHARED_DATA / "lfw"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def require(path: Path) -> Path:
    assert path.exists(), (f"real test data {path} is missing: the shared data folder ../shared/data "
                           "(see its README.md) must be present next to the repository")
    return path


def random_init_checkpoint(path: Path, **sections) -> Path:
    """A loadable checkpoint of an untrained tiny model (32x32 input, 32-d): no training needed
    to exercise the image path of the evaluation jobs."""
    import torch

    from facepipe.models import build_backbone
    from facepipe.runtime.checkpoint import save_checkpoint

    torch.manual_seed(0)
    config = tiny_config(path.parent, path.parent, **sections)
    model = build_backbone(config.model, config.data.image_size)
    save_checkpoint(path, {"model": model.state_dict(), "config": config.to_dict(), "identities": ["a", "b"],
                           "epoch": 0, "step": 0})
    return path


def write_view2(path: Path, folds: int, per_class: int, newline: str = "\n", trailer: str = "") -> None:
    lines = [f"{folds}\t{per_class}"]
    for f in range(folds):
        lines += [f"P{f}_{k}\t1\t{k + 2}" for k in range(per_class)]
        lines += [f"P{f}_{k}\t1\tQ{f}_{k}\t{k + 1}" for k in range(per_class)]
    path.write_text(newline.join(lines) + newline + trailer, newline="")


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------
def test_parse_view2_pairs_with_crlf_and_trailing_blanks(tmp_path):
    path = tmp_path / "pairs.txt"
    write_view2(path, folds=3, per_class=2, newline="\r\n", trailer="  \r\n\r\n")
    pairs = parse_lfw_pairs(path)
    assert len(pairs) == 12 and pairs.num_folds == 3 and pairs.pairs_per_class == 2
    assert pairs.folds.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert pairs.is_same.tolist() == [True, True, False, False] * 3
    names_a, names_b = pairs.names()
    assert (names_a[0], names_b[0]) == ("P0_0/P0_0_0001.jpg", "P0_0/P0_0_0002.jpg")
    assert (names_a[3], names_b[3]) == ("P0_1/P0_1_0001.jpg", "Q0_1/Q0_1_0002.jpg")
    assert pairs.line_numbers[:2].tolist() == [2, 3]
    assert "View 2" in pairs.view


def test_parse_view1_pairs_and_per_class_contiguous_folds(tmp_path):
    path = tmp_path / "pairsDevTest.txt"
    lines = ["20"] + [f"A{k}\t{k + 1}\t{k + 2}" for k in range(20)] + [f"A{k}\t1\tB{k}\t3" for k in range(20)]
    path.write_text("\n".join(lines) + "\n")
    pairs = parse_lfw_pairs(path)
    assert len(pairs) == 40 and pairs.num_folds == 1 and pairs.is_same.sum() == 20
    folds = pairs.contiguous_folds(10)
    for k in range(10):
        # Every fold holds both kinds: 2 matched and 2 mismatched pairs, contiguous in each block.
        assert pairs.is_same[folds == k].sum() == 2 and (folds == k).sum() == 4
    assert folds[:4].tolist() == [0, 0, 1, 1] and folds[20:24].tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("body, line, message", [
    (["2", "A\t1\t2", "A\t1", "A\t1\tB\t1", "C\t2\tD\t3"], 3, "expected a matched pair"),
    (["2", "A\t1\t2", "A\t2\t3", "A\t1\t2", "C\t2\tD\t3"], 4, "expected a mismatched pair"),
    (["2", "A\t1\t2", "A\tx\t3", "A\t1\tB\t1", "C\t2\tD\t3"], 3, "positive integer"),
    (["2", "A\t1\t2", "A\t0\t3", "A\t1\tB\t1", "C\t2\tD\t3"], 3, "positive integer"),
    (["2", "A\t1\t2", "", "A\t1\tB\t1", "C\t2\tD\t3"], 3, "blank line"),
    (["2", "A\t1\t2", "A\t3\t3", "A\t1\tB\t1", "C\t2\tD\t3"], 3, "one image twice"),
    (["2", "A\t1\t2", "A\t2\t3", "A\t1\tA\t2", "C\t2\tD\t3"], 4, "one person twice"),
    (["2", "A\t1\t2", "A\t2\t3", "A\t1\tB\t1"], None, "file ends after line 4"),
    (["2", "A\t1\t2", "A\t2\t3", "A\t1\tB\t1", "C\t2\tD\t3", "E\t1\t2"], 6, "one more pair line"),
    (["two", "A\t1\t2"], 1, "expected a header"),
    (["1 2 3", "A\t1\t2"], 1, "expected a header"),
])
def test_malformed_pairs_files_name_the_line(tmp_path, body, line, message):
    path = tmp_path / "bad.txt"
    path.write_text("\n".join(body) + "\n")
    with pytest.raises(EvalInputError, match=message) as info:
        parse_lfw_pairs(path)
    assert str(path) in str(info.value)
    if line is not None:
        assert f"line {line}" in str(info.value)


def test_missing_or_empty_pairs_file(tmp_path):
    with pytest.raises(EvalInputError, match="does not exist"):
        parse_lfw_pairs(tmp_path / "absent.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(EvalInputError, match="empty"):
        parse_lfw_pairs(tmp_path / "empty.txt")


def test_real_view1_development_pairs_files():
    test = parse_lfw_pairs(require(LFW / "pairsDevTest.txt"))
    train = parse_lfw_pairs(require(LFW / "pairsDevTrain.txt"))
    assert (int(test.is_same.sum()), int((~test.is_same).sum())) == (500, 500)
    assert (int(train.is_same.sum()), int((~train.is_same).sum())) == (1100, 1100)
    assert len(test.persons()) == 963 and len(train.persons()) == 2132
    assert not set(test.persons()) & set(train.persons())  # View 1 people are disjoint
    names_a, names_b = test.names()
    images = require(LFW / "lfw-deepfunneled")
    assert all((images / n).is_file() for n in names_a[:50] + names_b[-50:])


# --------------------------------------------------------------------------------------------
# The 10-fold protocol and TAR at FAR
# --------------------------------------------------------------------------------------------
def view2_layout(per_class: int = 300, folds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    is_same = np.tile(np.r_[np.ones(per_class, bool), np.zeros(per_class, bool)], folds)
    return is_same, np.repeat(np.arange(folds), 2 * per_class)


def test_separable_scores_give_100_percent_and_random_scores_about_50():
    is_same, folds = view2_layout()
    rng = np.random.default_rng(0)
    separable = np.where(is_same, rng.uniform(0.6, 1.0, is_same.size), rng.uniform(-1.0, 0.4, is_same.size))
    perfect = evaluate_verification(separable, is_same, n_folds=10, folds=folds)
    assert perfect.accuracy_mean == 1.0 and perfect.accuracy_std == 0.0 and perfect.auc == 1.0
    assert all(0.4 < t < 0.6 for t in perfect.fold_thresholds)
    accs = [evaluate_verification(rng.uniform(-1, 1, is_same.size), is_same, n_folds=10, folds=folds).accuracy_mean
            for _ in range(5)]
    # 6,000 pairs: a fold-threshold accuracy has sd ~ sqrt(0.25 / 6000) = 0.65 % around 50 %.
    assert abs(np.mean(accs) - 0.5) < 0.02 and all(abs(a - 0.5) < 0.04 for a in accs)


def test_fold_thresholds_are_chosen_without_the_test_fold():
    is_same, folds = view2_layout(per_class=50)
    rng = np.random.default_rng(1)
    n = is_same.size
    scores = np.where(is_same, rng.uniform(0.5, 1.0, n), rng.uniform(-1.0, -0.5, n))
    # Fold 3 is separable at its own threshold (about -0.5) but sits below the others: its
    # matched pairs score in [-0.4, -0.3]. A threshold chosen without fold 3 lies in the others'
    # gap (-0.5, 0.5) and rejects all of them; one tuned on fold 3 would score 100 %.
    in3 = folds == 3
    scores[in3] = np.where(is_same[in3], rng.uniform(-0.4, -0.3, in3.sum()), rng.uniform(-1.0, -0.6, in3.sum()))
    out = kfold_accuracy(scores, is_same, n_folds=10, folds=folds)
    assert out["fold_thresholds"][3] == best_threshold(scores[~in3], is_same[~in3])[0]
    assert -0.5 < out["fold_thresholds"][3] < 0.5
    assert out["fold_accuracies"][3] == 0.5
    assert best_threshold(scores[in3], is_same[in3])[1] == 1.0
    assert np.all(np.delete(out["fold_accuracies"], 3) == 1.0)
    assert out["mean"] == pytest.approx(0.95)


def test_tar_at_far_matches_gaussian_closed_form():
    rng = np.random.default_rng(2)
    mu0, mu1, n_neg, n_pos = 0.0, 3.0, 1_000_000, 100_000
    scores = np.concatenate((rng.normal(mu1, 1, n_pos), rng.normal(mu0, 1, n_neg)))
    is_same = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
    fars = (1e-2, 1e-3, 1e-4)
    got = roc_metrics(scores, is_same, fars=fars)["tar_at_far"]
    for far in fars:
        threshold = mu0 + norm.ppf(1 - far)
        expected = 1 - norm.cdf(threshold - mu1)
        # Sampling error: the empirical (1 - far) quantile of n_neg normals has sd
        # sqrt(far (1 - far) / n_neg) / pdf(threshold); it moves TAR by pdf(threshold - mu1) per
        # unit, and TAR itself is a binomial proportion over n_pos pairs. Allow 5 sd.
        sd_threshold = math.sqrt(far * (1 - far) / n_neg) / norm.pdf(threshold - mu0)
        sd = math.hypot(norm.pdf(threshold - mu1) * sd_threshold, math.sqrt(expected * (1 - expected) / n_pos))
        assert abs(got[far] - expected) < 5 * sd, (far, got[far], expected, sd)


# --------------------------------------------------------------------------------------------
# The job: precomputed embeddings
# --------------------------------------------------------------------------------------------
def write_embeddings_folder(folder: Path, vectors: dict[str, np.ndarray]) -> None:
    """The layout `facepipe embed` writes: embeddings.npy + manifest.csv (+ embed.json)."""
    folder.mkdir(parents=True)
    keys = sorted(vectors)
    np.save(folder / "embeddings.npy", np.stack([vectors[k] for k in keys]).astype(np.float32))
    with open(folder / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "path", "identity"])
        for row, key in enumerate(keys):
            writer.writerow([row, f"/data/lfw/{key}", key.rpartition("/")[0]])
    (folder / "embed.json").write_text(json.dumps({"model_fingerprint": "feedfacecafebeef", "flip": "sum"}))


def synthetic_lfw(tmp_path: Path, per_class: int, num_sets: int = 1, seed: int = 0, noise: float = 0.3):
    """A pairs file over synthetic people and well-separated embeddings of their images."""
    rng = np.random.default_rng(seed)
    header = str(per_class) if num_sets == 1 else f"{num_sets}\t{per_class}"
    lines, vectors = [header], {}
    direction = {}

    def image(person: str, number: int) -> None:
        if person not in direction:
            direction[person] = rng.normal(size=16)
        vectors[f"{person}/{person}_{number:04d}.jpg"] = direction[person] + noise * rng.normal(size=16)

    for s in range(num_sets):
        for k in range(per_class):
            person = f"S{seed}_{s}_M{k}"
            image(person, 1), image(person, 2)
            lines.append(f"{person}\t1\t2")
        for k in range(per_class):
            a, b = f"S{seed}_{s}_X{k}", f"S{seed}_{s}_Y{k}"
            image(a, 1), image(b, 3)
            lines.append(f"{a}\t1\t{b}\t3")
    return "\n".join(lines) + "\n", vectors


def test_view1_with_threshold_pairs_and_with_cross_validation(tmp_path):
    test_text, test_vectors = synthetic_lfw(tmp_path, per_class=30, seed=0)
    train_text, train_vectors = synthetic_lfw(tmp_path, per_class=40, seed=1)
    (tmp_path / "pairsDevTest.txt").write_text(test_text)
    (tmp_path / "pairsDevTrain.txt").write_text(train_text)
    write_embeddings_folder(tmp_path / "emb", {**test_vectors, **train_vectors})

    separate = evaluate_lfw(tmp_path / "pairsDevTest.txt", tmp_path / "sep", embeddings=tmp_path / "emb",
                            threshold_pairs=tmp_path / "pairsDevTrain.txt", progress=False)["metrics"]
    assert separate["verification"]["fold_scheme"] == "separate"
    assert separate["verification"]["threshold_source"] == "separate threshold pairs"
    assert separate["verification"]["accuracy_mean"] == 1.0
    assert separate["model_fingerprint"] == "feedfacecafebeef" and separate["counts"]["threshold_pairs"] == 80
    assert "separate pairs file" in (tmp_path / "sep" / "report.md").read_text()
    assert len((tmp_path / "sep" / "threshold_scores.csv").read_text().splitlines()) == 81

    crossval = evaluate_lfw(tmp_path / "pairsDevTest.txt", tmp_path / "cv", embeddings=tmp_path / "emb",
                            progress=False)["metrics"]
    assert crossval["verification"]["fold_scheme"] == "contiguous per class"
    assert crossval["verification"]["threshold_source"].startswith("10-fold cross-validation")
    assert len(crossval["verification"]["fold_accuracies"]) == 10
    report = (tmp_path / "cv" / "report.md").read_text()
    assert "10-fold cross-validation on the test pairs" in report and "interpolated" in report
    assert (tmp_path / "cv" / "roc.png").read_bytes()[:8] == PNG_SIGNATURE
    # The scores CSV recomputes the headline numbers.
    rows = list(csv.DictReader(open(tmp_path / "cv" / "scores.csv")))
    assert len(rows) == 60 and rows[0]["line"] == "2"
    scores = np.array([float(r["score"]) for r in rows])
    is_same = np.array([r["is_same"] == "1" for r in rows])
    assert roc_metrics(scores, is_same)["auc"] == pytest.approx(crossval["verification"]["auc"], abs=1e-6)


def test_view2_uses_the_official_folds(tmp_path):
    text, vectors = synthetic_lfw(tmp_path, per_class=5, num_sets=10, seed=3, noise=2.0)
    (tmp_path / "pairs.txt").write_text(text)
    write_embeddings_folder(tmp_path / "emb", vectors)
    metrics = evaluate_lfw(tmp_path / "pairs.txt", tmp_path / "out", embeddings=tmp_path / "emb",
                           progress=False)["metrics"]
    assert metrics["verification"]["fold_scheme"] == "official"
    assert metrics["protocol"]["variant"].startswith("View 2")
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    scores = np.array([float(r["score"]) for r in rows])
    is_same = np.array([r["is_same"] == "1" for r in rows])
    folds = np.array([int(r["set"]) - 1 for r in rows])
    expected = kfold_accuracy(scores, is_same, n_folds=10, folds=folds)
    assert metrics["verification"]["fold_accuracies"] == pytest.approx(expected["fold_accuracies"].tolist())


def test_missing_images_stop_with_the_list_or_count_as_wrong(tmp_path):
    text, vectors = synthetic_lfw(tmp_path, per_class=20, seed=4, noise=0.1)
    (tmp_path / "pairs.txt").write_text(text)
    dropped = ["S4_0_M3/S4_0_M3_0002.jpg", "S4_0_X7/S4_0_X7_0001.jpg"]
    no_face = "S4_0_Y11/S4_0_Y11_0003.jpg"
    write_embeddings_folder(tmp_path / "emb", {k: v for k, v in vectors.items() if k not in dropped})

    with pytest.raises(EvalInputError) as info:
        evaluate_lfw(tmp_path / "pairs.txt", tmp_path / "out", embeddings=tmp_path / "emb", missing=[no_face],
                     progress=False)
    message = str(info.value)
    assert "3 of 40 pairs" in message and "never dropped silently" in message
    for key in dropped:
        assert f"{key} (not in the embeddings manifest)" in message
    assert f"{no_face} (no face)" in message
    assert len((tmp_path / "out" / "missing.txt").read_text().splitlines()) == 3
    assert not (tmp_path / "out" / "metrics.json").exists()

    metrics = evaluate_lfw(tmp_path / "pairs.txt", tmp_path / "out", embeddings=tmp_path / "emb",
                           missing=[no_face], allow_missing=True, progress=False)["metrics"]
    assert metrics["counts"]["missing_pairs"] == 3 and metrics["counts"]["missing_images"] == 3
    # Every other pair is separable, each missing pair is wrong: 37 of 40 right, and the folds
    # are equal in size, so the mean fold accuracy is exactly 37 / 40.
    assert metrics["verification"]["accuracy_mean"] == pytest.approx(37 / 40)
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert sum(r["missing"] == "1" for r in rows) == 3
    assert "counted as wrong" in (tmp_path / "out" / "report.md").read_text()


# --------------------------------------------------------------------------------------------
# The job on real LFW images with a (random-initialisation) checkpoint, through the CLI
# --------------------------------------------------------------------------------------------
def test_lfw_images_through_the_cli(tmp_path, capsys):
    images = require(LFW / "lfw-deepfunneled")
    dev = require(LFW / "pairsDevTest.txt").read_text().splitlines()
    # The first 10 matched and the first 10 mismatched pairs of the real View 1 test file.
    (tmp_path / "pairs.txt").write_text("\n".join(["10", *dev[1:11], *dev[501:511]]) + "\n")
    checkpoint = random_init_checkpoint(tmp_path / "random.pt")
    out = tmp_path / "report"
    # lfw-deepfunneled holds 250x250 photos, not 32x32 crops: evaluated only when asked to, as they are.
    assert main(["eval", "lfw", "--pairs", str(tmp_path / "pairs.txt"), "--images", str(images), "--no-align-check",
                 "--checkpoint", str(checkpoint), "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    assert "LFW pairs.txt: 20 pairs" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["counts"]["pairs"] == 20 and metrics["model"]["flip"] == "sum"
    assert len(metrics["model_fingerprint"]) == 16
    assert set(metrics["files"]) >= {"metrics.json", "report.md", "roc.png", "scores.csv"}

    # The scores are the cosine similarities of the checkpoint's flip-summed embeddings.
    from facepipe.models.loaded import extract_embeddings, load_model

    loaded = load_model(checkpoint)
    row = next(csv.DictReader(open(out / "scores.csv")))
    emb = extract_embeddings(loaded.model, [str(images / row["image_a"]), str(images / row["image_b"])],
                             (32, 32), __import__("torch").device("cpu"), flip="sum")
    assert float(row["score"]) == pytest.approx(float(emb[0] @ emb[1]), abs=1e-5)

    # A pair naming an image that does not exist stops the run with the list (exit status 2).
    lines = (tmp_path / "pairs.txt").read_text().splitlines()
    lines[1] = "Abdullah_Gul\t13\t99"
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    assert main(["eval", "lfw", "--pairs", str(tmp_path / "pairs.txt"), "--images", str(images), "--no-align-check",
                 "--checkpoint", str(checkpoint), "--out", str(tmp_path / "r2"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Abdullah_Gul/Abdullah_Gul_0099.jpg (file missing)" in err and "Traceback" not in err


def test_raw_images_are_aligned_first_and_faceless_ones_never_dropped(tmp_path, capsys):
    import shutil

    import cv2
    from PIL import Image

    images = require(LFW / "lfw-deepfunneled")
    dev = require(LFW / "pairsDevTest.txt").read_text().splitlines()
    (tmp_path / "pairs.txt").write_text("\n".join(["10", *dev[1:11], *dev[501:511]]) + "\n")
    names = sorted({name for side in parse_lfw_pairs(tmp_path / "pairs.txt").names(".jpg") for name in side})
    raw = tmp_path / "raw"
    for name in names:
        (raw / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(images / name, raw / name)
    faceless = names[0]
    Image.new("RGB", (250, 250), (128, 128, 128)).save(raw / faceless, format="JPEG")
    checkpoint = random_init_checkpoint(tmp_path / "random.pt", align={"no_face": "skip"})
    command = ["eval", "lfw", "--pairs", str(tmp_path / "pairs.txt"), "--images", str(raw), "--align",
               "--checkpoint", str(checkpoint), "--quiet", "--device", "cpu"]
    assert main([*command, "--out", str(tmp_path / "stop")]) == 2
    assert f"{faceless} (no face (alignment: no_face))" in capsys.readouterr().err
    out = tmp_path / "report"
    assert main([*command, "--out", str(out), "--allow-missing"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["counts"]["missing_images"] == 1 and metrics["counts"]["missing_pairs"] >= 1
    # Crops at the model's input size (32x32), at the same relative paths as the raw photos.
    assert cv2.imread(str(out / "aligned" / names[1])).shape == (32, 32, 3)
    assert not (out / "aligned" / faceless).exists()
