"""YouTube Faces protocol: splits parsing, set-to-set video embeddings, the 10-split job.

The fixture builds YTF-format data from real LFW identities: a person's images become the
frames of two pseudo-videos.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from facepipe.cli import main
from facepipe.eval import EvalInputError, kfold_accuracy
from facepipe.eval.ytf import evaluate_ytf, evenly_spaced, parse_ytf_splits, video_embeddings
from test_eval_lfw import random_init_checkpoint, require, write_embeddings_folder

HEADER = "split number, first name, second name, first length, second length, is same?"
PEOPLE = 5
FRAMES_PER_VIDEO = 3


def write_splits(path: Path, rows: list[tuple[int, str, str, int]], header: bool = True) -> None:
    lines = [HEADER] if header else []
    lines += [f"{s}, {a}, {b}, 10, 12, {y}" for s, a, b, y in rows]
    path.write_text("\n".join(lines) + "\n")


def ten_splits(people: list[str]) -> list[tuple[int, str, str, int]]:
    """One matched (video 0 vs 1 of one person) and one mismatched pair per split."""
    rows = []
    for split in range(1, 11):
        a, b = people[split % len(people)], people[(split + 1) % len(people)]
        rows.append((split, f"{a}/0", f"{a}/1", 1))
        rows.append((split, f"{a}/0", f"{b}/1", 0))
    return rows


@pytest.fixture(scope="module")
def ytf_fixture(tmp_path_factory):
    """videos/<person>/<0|1>/<frames>: the first LFW people (alphabetically) with 6+ images, their
    images 1-3 as video 0 and 4-6 as video 1."""
    lfw = require(SHARED_DATA / "lfw" / "lfw-deepfunneled")
    root = tmp_path_factory.mktemp("ytf")
    people = []
    for folder in sorted(lfw.iterdir()):
        images = sorted(folder.glob("*.jpg"))
        if len(images) >= 2 * FRAMES_PER_VIDEO:
            people.append(folder.name)
            for video in (0, 1):
                target = root / "videos" / folder.name / str(video)
                target.mkdir(parents=True)
                for n, image in enumerate(images[video * FRAMES_PER_VIDEO:(video + 1) * FRAMES_PER_VIDEO]):
                    shutil.copy(image, target / f"frame_{n + 1}.jpg")
        if len(people) == PEOPLE:
            break
    write_splits(root / "splits.txt", ten_splits(people))
    return root, people


# --------------------------------------------------------------------------------------------
# Parsing and frame selection
# --------------------------------------------------------------------------------------------
def test_parse_splits_file(tmp_path):
    write_splits(tmp_path / "splits.txt", ten_splits(["A", "B"]))
    splits = parse_ytf_splits(tmp_path / "splits.txt")
    assert len(splits) == 20 and splits.num_folds == 10
    assert splits.folds.tolist() == np.repeat(np.arange(10), 2).tolist()
    assert splits.is_same.tolist() == [True, False] * 10
    assert (splits.videos_a[0], splits.videos_b[0]) == ("B/0", "B/1")
    assert splits.line_numbers[0] == 2
    assert splits.videos() == ["A/0", "A/1", "B/0", "B/1"]


@pytest.mark.parametrize("row, message", [
    ("1, A/0, B/1, 10, 12, 2", "'is same' must be 0 or 1"),
    ("0, A/0, B/1, 10, 12, 1", "split must be a positive integer"),
    ("1, A/0, 1", "expected 'split, first video"),
    ("1, ../A/0, B/1, 10, 12, 0", "invalid video name"),
])
def test_malformed_splits_rows_name_the_line(tmp_path, row, message):
    rows = [f"{s}, A/0, A/1, 1, 1, 1" for s in range(1, 11)]
    rows.insert(3, row)
    (tmp_path / "splits.txt").write_text("\n".join([HEADER, *rows]) + "\n")
    with pytest.raises(EvalInputError, match=message) as info:
        parse_ytf_splits(tmp_path / "splits.txt")
    assert "line 5" in str(info.value)


def test_splits_must_be_complete(tmp_path):
    write_splits(tmp_path / "s.txt", [(1, "A/0", "A/1", 1), (3, "A/0", "B/1", 0)])
    with pytest.raises(EvalInputError, match="none empty"):
        parse_ytf_splits(tmp_path / "s.txt")
    (tmp_path / "b.txt").write_text(f"{HEADER}\n1, A/0, A/1, 1\n\n2, A/0, B/0, 0\n")
    with pytest.raises(EvalInputError, match="line 3: blank line"):
        parse_ytf_splits(tmp_path / "b.txt")


def test_evenly_spaced_frames():
    assert evenly_spaced(5, None).tolist() == [0, 1, 2, 3, 4]
    assert evenly_spaced(5, 10).tolist() == [0, 1, 2, 3, 4]
    assert evenly_spaced(5, 3).tolist() == [0, 2, 4]
    assert evenly_spaced(100, 4).tolist() == [0, 33, 66, 99]
    assert evenly_spaced(7, 1).tolist() == [3]


def test_video_embedding_is_the_normalised_mean_of_unit_frames():
    frames = np.array([[3.0, 0.0], [0.0, 0.5], [1.0, 1.0]])
    videos = video_embeddings(frames, [0, 0, 1], 2)
    np.testing.assert_allclose(videos[0], np.array([1.0, 1.0]) / np.sqrt(2), atol=1e-6)
    np.testing.assert_allclose(videos[1], np.array([1.0, 1.0]) / np.sqrt(2), atol=1e-6)
    with pytest.raises(ValueError, match="no frames"):
        video_embeddings(frames, [0, 0, 0], 2)


# --------------------------------------------------------------------------------------------
# Set-to-set verification on the LFW-built fixture
# --------------------------------------------------------------------------------------------
def test_ytf_images_set_to_set_on_the_lfw_fixture(ytf_fixture, tmp_path):
    import torch

    from facepipe.models.loaded import extract_embeddings, load_model

    root, people = ytf_fixture
    checkpoint = random_init_checkpoint(tmp_path / "random.pt")
    result = evaluate_ytf(root / "splits.txt", tmp_path / "out", videos=root / "videos", checkpoint=checkpoint,
                          max_frames=2, device="cpu", progress=False)
    metrics = result["metrics"]
    assert metrics["counts"]["videos"] == 2 * PEOPLE and metrics["counts"]["frames_used"] == 2 * 2 * PEOPLE
    assert metrics["verification"]["fold_scheme"] == "official splits"
    assert len(metrics["verification"]["fold_accuracies"]) == 10

    # Each score is the cosine of two normalised means of per-frame embeddings (frames 1 and 3:
    # the 2 evenly spaced ones of 3).
    loaded = load_model(checkpoint)

    def video(name: str) -> np.ndarray:
        paths = [str(root / "videos" / name / f"frame_{n}.jpg") for n in (1, 3)]
        frames = extract_embeddings(loaded.model, paths, (32, 32), torch.device("cpu"), flip="sum")
        mean = frames.mean(axis=0)
        return mean / np.linalg.norm(mean)

    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert len(rows) == 20
    for row in rows[:2]:
        assert float(row["score"]) == pytest.approx(float(video(row["video_a"]) @ video(row["video_b"])), abs=1e-5)
    scores = np.array([float(r["score"]) for r in rows])
    is_same = np.array([r["is_same"] == "1" for r in rows])
    expected = kfold_accuracy(scores, is_same, n_folds=10, folds=np.array([int(r["split"]) - 1 for r in rows]))
    assert metrics["verification"]["accuracy_mean"] == pytest.approx(expected["mean"])
    assert (tmp_path / "out" / "roc.png").is_file() and "YouTube Faces" in (tmp_path / "out" / "report.md").read_text()


def frame_embeddings(people: list[str], frames: int, seed: int = 0, noise: float = 0.5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = {}
    for person in people:
        direction = rng.normal(size=24)
        for video in (0, 1):
            for n in range(frames):
                vectors[f"{person}/{video}/frame_{n + 1}.jpg"] = direction + noise * rng.normal(size=24)
    return vectors


def test_ytf_precomputed_frames_separable_and_missing_videos(ytf_fixture, tmp_path, capsys):
    root, people = ytf_fixture
    vectors = frame_embeddings(people, frames=4)
    write_embeddings_folder(tmp_path / "emb", vectors)
    out = tmp_path / "out"
    assert main(["eval", "ytf", "--splits", str(root / "splits.txt"), "--embeddings", str(tmp_path / "emb"),
                 "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["verification"]["accuracy_mean"] == 1.0 and metrics["verification"]["auc"] == 1.0
    assert metrics["counts"]["frames_used"] == 2 * PEOPLE * 4
    capsys.readouterr()

    # Every frame of one video had no face: its pairs stop the run, or count as wrong.
    faceless = [f"{people[1]}/0/frame_{n}.jpg" for n in range(1, 5)]
    (tmp_path / "noface.txt").write_text("\n".join(faceless) + "\n")
    assert main(["eval", "ytf", "--splits", str(root / "splits.txt"), "--embeddings", str(tmp_path / "emb"),
                 "--missing-list", str(tmp_path / "noface.txt"), "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    assert f"{people[1]}/0 (no face)" in capsys.readouterr().err
    result = evaluate_ytf(root / "splits.txt", tmp_path / "o3", embeddings=tmp_path / "emb", missing=faceless,
                          allow_missing=True, progress=False)
    affected = sum(1 for s, a, b, _ in ten_splits(people) if f"{people[1]}/0" in (a, b))
    assert result["metrics"]["counts"]["missing_pairs"] == affected > 0
    assert result["metrics"]["verification"]["accuracy_mean"] == pytest.approx(1 - affected / 20)
    # With max_frames, only the evenly spaced frames count.
    limited = evaluate_ytf(root / "splits.txt", tmp_path / "o4", embeddings=tmp_path / "emb", max_frames=2,
                           progress=False)
    assert limited["metrics"]["counts"]["frames_used"] == 2 * PEOPLE * 2
