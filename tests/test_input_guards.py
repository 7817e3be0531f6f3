"""Inputs that could silently skew a result (issue 25, part 3): repeated pairs, pair paths
outside the root, linked identity folders, an align destination inside its source, broken
links, settings that cannot work, non-finite weights and labels, unfingerprinted embeddings,
and identity names with control characters."""
from __future__ import annotations

import csv
import json
import logging
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from facepipe.cli import main
from facepipe.config import ConfigError, load_align_config
from facepipe.data.dataset import DatasetError, scan_identity_folders
from facepipe.data.lfw_pairs import parse_lfw_pairs
from facepipe.eval.pairs_job import evaluate_pairs_file, load_pairs
from facepipe.eval.verification import EvalInputError
from facepipe.utils.names import IdentityNameError, check_identity_name
from facepipe.utils.walk import walk_tree
from test_eval_lfw import random_init_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return random_init_checkpoint(tmp_path_factory.mktemp("guards_model") / "random.pt")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# --------------------------------------------------------------------------------------------
# Repeated pairs
# --------------------------------------------------------------------------------------------
def test_lfw_pairs_file_with_repeated_pairs_is_refused_with_the_count(tmp_path):
    path = tmp_path / "pairs.txt"
    matched = [f"A{k}\t1\t2" for k in range(4)]
    mismatched = [f"A{k}\t1\tB{k}\t1" for k in range(4)]
    # Line 3 repeats line 2; line 9 is line 6 with its two images swapped.
    matched[1] = matched[0]
    mismatched[3] = "B0\t1\tA0\t1"
    path.write_text("\n".join(["4", *matched, *mismatched]) + "\n")
    with pytest.raises(EvalInputError) as info:
        parse_lfw_pairs(path)
    message = str(info.value)
    assert str(path) in message and "2 pair(s) repeat an earlier one" in message
    assert "line 3 repeats line 2" in message


def test_lfw_pairs_file_without_repeats_still_parses(tmp_path):
    # The same person pair with other images, and the same images in another pairing, are no repeats.
    path = tmp_path / "pairs.txt"
    path.write_text("2\nA\t1\t2\nA\t1\t3\nA\t1\tB\t1\nA\t2\tB\t1\n")
    assert len(parse_lfw_pairs(path)) == 4


def write_pairs(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path_a", "path_b", "is_same"])
        writer.writerows(rows)
    return path


def pairs_of(root: Path, count: int = 10) -> list[tuple[str, str, int]]:
    """``count`` matched and ``count`` mismatched pairs of a dataset, as relative paths."""
    identities, samples = scan_identity_folders(root)
    by_identity: dict[int, list[str]] = {}
    for sample in samples:
        by_identity.setdefault(sample.label, []).append(Path(sample.path).relative_to(root).as_posix())
    matched = [(images[0], images[k], 1) for images in by_identity.values() for k in (1, 2)][:count]
    mismatched = [(by_identity[i][0], by_identity[(i + 1) % len(identities)][1], 0)
                  for i in range(len(identities))][:count]
    assert len(matched) == len(mismatched) == count
    return matched + mismatched


def test_pairs_csv_repeats_are_dropped_with_a_warning_and_counted(tiny_dataset, tmp_path, caplog):
    rows = pairs_of(tiny_dataset)
    a, b, same = rows[0]
    repeated = rows + [(a, b, same)] * 9 + [(rows[-1][1], rows[-1][0], 0), ("./" + a, b, same)]
    path = write_pairs(tmp_path / "pairs.csv", repeated)
    with caplog.at_level(logging.WARNING, logger="facepipe.eval.pairs_job"):
        loaded = load_pairs(path, tiny_dataset)
    assert loaded.duplicates == 11 and len(loaded.is_same) == len(rows)
    assert list(zip(loaded.names_a, loaded.names_b)) == [(x, y) for x, y, _ in rows]
    assert "dropped 11 repeated pair(s) (first: row 21, a repeat of row 1)" in caplog.text


def test_pairs_csv_listing_one_pair_as_same_and_different_is_refused(tiny_dataset, tmp_path):
    rows = pairs_of(tiny_dataset, 2)
    a, b, _ = rows[0]
    path = write_pairs(tmp_path / "pairs.csv", rows + [(b, a, 0)])
    with pytest.raises(DatasetError, match="rows 1 and 5 .* once as the same person and once as different"):
        load_pairs(path, tiny_dataset)


def test_eval_pairs_scores_each_pair_once_and_reports_the_repeats(tiny_dataset, tmp_path, checkpoint):
    rows = pairs_of(tiny_dataset)
    clean = evaluate_pairs_file(checkpoint, write_pairs(tmp_path / "clean.csv", rows), tiny_dataset,
                                tmp_path / "clean", device="cpu", progress=False)
    # One matched pair ten times would have moved the accuracy toward that pair's outcome.
    repeated = evaluate_pairs_file(checkpoint, write_pairs(tmp_path / "rep.csv", rows + [rows[0]] * 9),
                                   tiny_dataset, tmp_path / "rep", device="cpu", progress=False)
    assert clean["metrics"]["duplicate_pairs_removed"] == 0
    assert repeated["metrics"]["duplicate_pairs_removed"] == 9 and "(9 repeated pair(s) dropped)" in repeated["summary"]
    for key in ("num_pairs", "accuracy_mean", "fold_accuracies", "auc"):
        assert repeated["metrics"][key] == clean["metrics"][key]
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["duplicate_pairs_removed"] == 9
    with open(tmp_path / "rep" / "scores.csv") as handle:
        assert len(list(csv.reader(handle))) == len(rows) + 1


# --------------------------------------------------------------------------------------------
# Pair paths outside the root
# --------------------------------------------------------------------------------------------
def test_pairs_csv_paths_outside_the_root_need_a_flag(tiny_dataset, tmp_path, checkpoint, capsys):
    rows = pairs_of(tiny_dataset)
    root = tmp_path / "root"
    root.mkdir()
    # The root holds links to two identities; the pairs climb out of it, or name absolute paths.
    escaping = [(f"../{Path(tiny_dataset).name}/{a}", str(tiny_dataset / b), same) for a, b, same in rows]
    path = write_pairs(root / "pairs.csv", escaping)
    (tmp_path / Path(tiny_dataset).name).symlink_to(tiny_dataset, target_is_directory=True)
    with pytest.raises(DatasetError, match=r"path\(s\) in .* are absolute or climb out of the root") as info:
        load_pairs(path)
    assert "--allow-outside-root" in str(info.value)
    loaded = load_pairs(path, allow_outside_root=True)
    assert len(loaded.is_same) == 20 and all(Path(p).is_file() for p in loaded.paths)
    # Inside the root, '..' that stays inside is fine.
    inside = write_pairs(tmp_path / "inside.csv", [(f"{a.split('/')[0]}/../{a}", b, s) for a, b, s in rows])
    assert len(load_pairs(inside, tiny_dataset).is_same) == 20

    out = tmp_path / "report"
    assert main(["eval", "pairs", "--checkpoint", str(checkpoint), "--pairs", str(path), "--out", str(out),
                 "--device", "cpu", "--quiet"]) == 2
    assert "--allow-outside-root" in one_line_error(capsys) and not out.exists()
    assert main(["eval", "pairs", "--checkpoint", str(checkpoint), "--pairs", str(path), "--out", str(out),
                 "--device", "cpu", "--quiet", "--allow-outside-root"]) == 0
    assert (out / "metrics.json").is_file()


def test_training_validation_pairs_take_the_same_flag(tmp_path):
    config = tiny_config(tmp_path, tmp_path / "run", train={
        "stages": [{"epochs": 1, "head": {"type": "softmax"}}],
        "validation": {"pairs": "pairs.csv", "allow_outside_root": True}})
    assert config.train.validation.allow_outside_root is True


# --------------------------------------------------------------------------------------------
# LFW-format pairs files (the pairs.txt of 'facepipe merge --val-pairs') as validation pairs
# --------------------------------------------------------------------------------------------
LFW_PAIRS = "2\nAlice\t1\t2\nBob\t1\t2\nAlice\t3\tBob\t1\nCarol\t2\tAlice\t1\n"


def merge_style_tree(folder: Path, extensions: dict[str, str] | None = None) -> Path:
    """``<Name>/<Name>_%04d<ext>`` folders of tiny images and an LFW View 1 ``pairs.txt``, as
    ``facepipe merge`` writes its validation people; ``extensions``: image stem -> extension
    (default ``.jpg``)."""
    extensions = extensions or {}
    rng = np.random.default_rng(0)
    for name, count in (("Alice", 3), ("Bob", 2), ("Carol", 2)):
        (folder / name).mkdir(parents=True)
        for number in range(1, count + 1):
            stem = f"{name}_{number:04d}"
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{stem}{extensions.get(stem, '.jpg')}")
    (folder / "pairs.txt").write_text(LFW_PAIRS)
    return folder / "pairs.txt"


def assert_same_pairs(got, want) -> None:
    assert got.paths == want.paths and got.names_a == want.names_a and got.names_b == want.names_b
    for key in ("idx_a", "idx_b", "is_same"):
        np.testing.assert_array_equal(getattr(got, key), getattr(want, key))
        assert getattr(got, key).dtype == getattr(want, key).dtype
    assert got.duplicates == want.duplicates == 0


def test_lfw_pairs_file_loads_like_the_equivalent_csv(tmp_path):
    pairs = merge_style_tree(tmp_path / "val")
    csv_rows = [("Alice/Alice_0001.jpg", "Alice/Alice_0002.jpg", 1), ("Bob/Bob_0001.jpg", "Bob/Bob_0002.jpg", 1),
                ("Alice/Alice_0003.jpg", "Bob/Bob_0001.jpg", 0), ("Carol/Carol_0002.jpg", "Alice/Alice_0001.jpg", 0)]
    want = load_pairs(write_pairs(tmp_path / "val" / "pairs.csv", csv_rows))
    loaded = load_pairs(pairs)
    assert_same_pairs(loaded, want)
    assert loaded.is_same.tolist() == [True, True, False, False] and len(loaded.paths) == 6
    assert all(Path(path).is_file() for path in loaded.paths)
    # Told apart by content, not by name; the root defaults to the pairs file's folder, or is given.
    (tmp_path / "val" / "pairs.dat").write_text(LFW_PAIRS)
    assert_same_pairs(load_pairs(tmp_path / "val" / "pairs.dat"), want)
    elsewhere = tmp_path / "lists" / "val_pairs.csv"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(LFW_PAIRS.replace("\n", "\r\n").encode())
    assert_same_pairs(load_pairs(elsewhere, tmp_path / "val"), want)
    # A blank line before the header still marks the LFW format, whose parser then names the problem.
    elsewhere.write_text("\n" + LFW_PAIRS)
    with pytest.raises(EvalInputError, match="line 1: expected a header 'N'"):
        load_pairs(elsewhere, tmp_path / "val")
    # The LFW rules stay: a repeated pair is refused, as 'facepipe eval lfw' refuses it.
    (tmp_path / "val" / "repeat.txt").write_text("2\nAlice\t1\t2\nAlice\t2\t1\nAlice\t3\tBob\t1\n"
                                                 "Carol\t2\tAlice\t1\n")
    with pytest.raises(EvalInputError, match="1 pair\\(s\\) repeat an earlier one"):
        load_pairs(tmp_path / "val" / "repeat.txt")


def test_lfw_pairs_file_finds_images_of_another_extension(tmp_path):
    pairs = merge_style_tree(tmp_path / "val", {"Carol_0002": ".png", "Bob_0001": ".jpeg"})
    loaded = load_pairs(pairs)
    assert loaded.names_a[2:] == ["Alice/Alice_0003.jpg", "Carol/Carol_0002.png"]
    assert loaded.names_b[1:3] == ["Bob/Bob_0002.jpg", "Bob/Bob_0001.jpeg"]
    assert str(tmp_path / "val" / "Carol" / "Carol_0002.png") in loaded.paths
    # Bob_0001 is one image: both pairs that name it share its row.
    assert loaded.idx_a[1] == loaded.idx_b[2] == loaded.paths.index(str(tmp_path / "val" / "Bob" / "Bob_0001.jpeg"))
    # .jpg wins where both exist.
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "val" / "Carol" / "Carol_0002.jpg")
    assert load_pairs(pairs).names_a[3] == "Carol/Carol_0002.jpg"


def test_lfw_pairs_file_with_a_missing_image_names_it(tmp_path):
    pairs = merge_style_tree(tmp_path / "val")
    (tmp_path / "val" / "Bob" / "Bob_0002.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 image\(s\) named in .*pairs\.txt are missing under") as info:
        load_pairs(pairs)
    assert "Bob/Bob_0002.jpg" in str(info.value) and ".png" in str(info.value)


def test_merge_validation_pairs_serve_the_validator_and_eval_pairs(tiny_dataset, tmp_path, checkpoint):
    from types import SimpleNamespace

    from facepipe.data.merge import merge_identity_sources
    from facepipe.models import build_backbone
    from facepipe.train.validation import PairsValidator

    merge_identity_sources([tiny_dataset], tmp_path / "merged", val_fraction=0.5, seed=0, val_pairs=6,
                           val_out=tmp_path / "val")
    loaded = load_pairs(tmp_path / "val" / "pairs.txt")
    assert len(loaded.is_same) == 12 and loaded.is_same.sum() == 6
    assert all(Path(path).is_file() for path in loaded.paths)

    config = tiny_config(tiny_dataset, tmp_path / "run", train={
        "stages": [{"epochs": 1, "head": {"type": "softmax"}}],
        "validation": {"pairs": str(tmp_path / "val" / "pairs.txt")}})
    torch.manual_seed(0)
    model = build_backbone(config.model, config.data.image_size).eval()
    trainer = SimpleNamespace(model=model, config=config, device=torch.device("cpu"), amp_dtype=None)
    metrics = PairsValidator(load_pairs(config.train.validation.pairs), 1)(trainer)
    assert set(metrics) == {"val_accuracy", "val_accuracy_10fold", "val_accuracy_10fold_std", "val_auc"}
    assert all(np.isfinite(value) for value in metrics.values())

    out = tmp_path / "report"
    assert main(["eval", "pairs", "--checkpoint", str(checkpoint), "--pairs", str(tmp_path / "val" / "pairs.txt"),
                 "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    assert json.loads((out / "metrics.json").read_text())["num_pairs"] == 12


# --------------------------------------------------------------------------------------------
# Linked folders: every walker sees what training sees
# --------------------------------------------------------------------------------------------
def test_walker_follows_links_cuts_loops_and_reports_broken_links(tmp_path, caplog):
    root = tmp_path / "root"
    (root / "A").mkdir(parents=True)
    (root / "A" / "one.png").write_bytes(b"x")
    (root / "A" / "notes.txt").write_text("not an image")
    (root / "A" / "loop").symlink_to(root, target_is_directory=True)  # back to an ancestor
    (root / "B").symlink_to(root / "A", target_is_directory=True)  # a second name: walked too
    (root / "C").symlink_to(tmp_path / "gone")
    (root / "D").symlink_to(root / "D")  # a link to itself
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "two.PNG").write_bytes(b"x")
    (root / "E").symlink_to(outside, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="facepipe.utils.walk"):
        walk = walk_tree(root, [".png"])
    assert [p.relative_to(root).as_posix() for p in walk.files] == ["A/one.png", "B/one.png", "E/two.PNG"]
    assert [p.relative_to(root).as_posix() for p in walk.loops] == ["A/loop", "B/loop"]
    assert [p.name for p in walk.broken_links] == ["C", "D"]
    assert "links back to" in caplog.text and "2 link(s)" in caplog.text
    assert [p.name for p in walk_tree(root, [".png"], exclude=[outside]).files] == ["one.png", "one.png"]


def test_subset_then_index_build_enrols_every_identity(tiny_dataset, tmp_path, checkpoint, capsys):
    """The README's workflow: `facepipe subset` links identity folders, `index build` enrols them."""
    from facepipe.align.job import list_inputs
    from facepipe.embed.extract import list_images
    from facepipe.index.jobs import _expand_inputs
    from facepipe.index.store import ClusterIndex

    subset = tmp_path / "subset"
    assert main(["subset", str(tiny_dataset), str(subset), "--min-images", "5"]) == 0
    capsys.readouterr()
    identities, samples = scan_identity_folders(subset)  # what training reads
    assert all((subset / name).is_symlink() for name in identities) and 1 < len(identities) < 12
    expected = sorted(Path(s.path).relative_to(subset).as_posix() for s in samples)

    assert sorted(Path(p).relative_to(subset).as_posix() for p, _ in list_images(subset)) == expected  # embed
    assert sorted(p.relative_to(subset).as_posix() for p in _expand_inputs([subset])) == expected  # search
    assert list_inputs(subset)[1] == expected  # align

    index = tmp_path / "gallery"
    assert main(["index", "build", str(index), "--checkpoint", str(checkpoint), "--images", str(subset),
                 "--cluster-size", "5", "--device", "cpu", "--quiet"]) == 0
    built = ClusterIndex.open(index)
    assert sorted(built.identities()) == identities
    assert built.info()["num_embeddings"] == len(samples)


# --------------------------------------------------------------------------------------------
# Align: destination inside the source, broken links
# --------------------------------------------------------------------------------------------
def test_align_refuses_a_destination_inside_its_source(tmp_path, capsys):
    from facepipe.align.job import AlignError, align_images, list_inputs
    from facepipe.config import AlignConfig

    source = tmp_path / "photos"
    (source / "p").mkdir(parents=True)
    Image.new("RGB", (64, 64), (90, 90, 90)).save(source / "p" / "a.png")
    with pytest.raises(AlignError, match="lies inside SRC"):
        align_images(source, source / "aligned", AlignConfig(), workers=0, progress=False)
    assert not (source / "aligned").exists()
    assert main(["align", str(source), str(source / "p" / "out"), "--workers", "0", "--quiet"]) == 2
    assert "lies inside SRC" in one_line_error(capsys)
    # A DST reached from SRC only through a link is left out of the walk.
    out = tmp_path / "aligned"
    (out / "p").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(out / "p" / "a.png")
    (source / "crops").symlink_to(out, target_is_directory=True)
    assert list_inputs(source, destination=out)[1] == ["p/a.png"]


def test_a_broken_link_gets_the_status_missing(tmp_path):
    from facepipe.align.job import align_images, read_manifest
    from facepipe.config import AlignConfig

    source = tmp_path / "photos"
    source.mkdir()
    Image.new("RGB", (200, 160), (90, 90, 90)).save(source / "blank.png")
    (source / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    summary = align_images(source, tmp_path / "out", AlignConfig(), workers=0, progress=False)
    rows = {row["path"]: row for row in read_manifest(tmp_path / "out" / "manifest.jsonl")}
    assert rows["gone.jpg"]["status"] == "missing" and rows["gone.jpg"]["output"] is None
    assert "broken link" in rows["gone.jpg"]["error"]
    assert summary.counts == {"fallback": 1, "missing": 1} and "missing 1" in summary.line()
    # A missing file is looked at again by the next run (it may be back); the rest is kept.
    Image.new("RGB", (200, 160), (60, 60, 60)).save(tmp_path / "deleted.jpg")
    again = align_images(source, tmp_path / "out", AlignConfig(), workers=0, progress=False)
    assert again.skipped == 1 and again.counts == {"fallback": 1}
    # A list file naming an absent file: missing too (it was "unreadable").
    listing = tmp_path / "list.txt"
    listing.write_text("blank.png\nnever.png\n")
    align_images(listing, tmp_path / "out2", AlignConfig(), root=source, workers=0, progress=False)
    rows = {row["path"]: row for row in read_manifest(tmp_path / "out2" / "manifest.jsonl")}
    assert rows["never.png"]["status"] == "missing" and rows["never.png"]["error"] == "no such file"


# --------------------------------------------------------------------------------------------
# Settings that cannot work
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("data.batch_size=0", "data.batch_size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("seed=-1", "seed"),
    ("seed=4294967296", "seed"),
    ("optim.lr=.inf", "optim.lr"),
    ("optim.clip_grad_norm=.nan", "optim.clip_grad_norm"),
    ("scheduler.milestones=[0,3]", "scheduler.milestones.0"),
    ("data.augment.random_resized_crop_scale=[0.9,0.5]", "data.augment.random_resized_crop_scale"),
    ("align.detector.thresholds=[0.6,0.7,1.5]", "align.detector.thresholds.2"),
    ("embed.batch_size=0", "embed.batch_size"),
    ("classify={root: x, minority_classes: [0, 10]}", "classify.minority_classes.1"),
    ("demo={render_size: [8, 112]}", "demo.render_size.0"),
    ("demo={min_images: 9, max_images: 3}", "demo"),
])
def test_config_bounds(tmp_path, override, key):
    from facepipe.config import config_from_dict

    with pytest.raises(ConfigError) as info:
        config_from_dict(tiny_config(tmp_path, tmp_path).to_dict(), [override])
    assert f"  {key}:" in str(info.value)


def test_align_settings_bounds():
    with pytest.raises(ConfigError, match="detector.thresholds.0"):
        load_align_config(None, ["detector.thresholds=[1.2,0.7,0.7]"])
    assert load_align_config(None, ["detector.thresholds=[0,1,1]"]).detector.thresholds == (0, 1, 1)


@pytest.mark.parametrize("argv", [
    ["search", "--index", "i", "--num-neighbours", "0", "q.npy"],
    ["index", "build", "i", "--embeddings", "x.npy", "--num-neighbours", "0"],
    ["index", "calibrate", "i", "--embeddings", "x.npy", "--target-far", "1.5"],
    ["embed", "--checkpoint", "c", "--images", "i", "--out", "o", "--batch-size", "0"],
    ["embed", "--checkpoint", "c", "--images", "i", "--out", "o", "--workers", "-1"],
    ["align", "src", "dst", "--workers", "-2"],
])
def test_cli_refuses_numbers_that_cannot_work(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "argument --" in capsys.readouterr().err


def test_zero_neighbours_and_far_above_one_are_refused_by_the_api(tmp_path):
    from facepipe.index.jobs import calibrate_index
    from facepipe.index.store import ClusterIndex, ClusterIndexError

    vectors = np.eye(4, 8, dtype=np.float32)
    index = ClusterIndex.build(tmp_path / "idx", vectors, [0, 0, 1, 1], ["p", "q"])
    with pytest.raises(ClusterIndexError, match="num_neighbours must be >= 1"):
        index.search(vectors[:1], num_neighbours=0)  # was: silently the index's N
    for far in (1.5, -0.1, float("nan")):
        with pytest.raises(ClusterIndexError, match="must lie in"):
            calibrate_index(tmp_path / "idx", embeddings=vectors, labels=["p", "p", "q", "q"], target_far=far)


# --------------------------------------------------------------------------------------------
# Non-finite weights and embeddings, damaged labels
# --------------------------------------------------------------------------------------------
def test_checkpoint_with_nan_weights_is_refused_for_embedding(tiny_dataset, tmp_path, checkpoint, capsys):
    from facepipe.models.loaded import load_model
    from facepipe.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    state = load_checkpoint(checkpoint)
    name = next(key for key, value in state["model"].items() if value.is_floating_point() and value.numel() > 1)
    state["model"][name].view(-1)[0] = float("nan")
    broken = tmp_path / "nan.pt"
    save_checkpoint(broken, {key: value for key, value in state.items() if key != "format_version"})
    with pytest.raises(CheckpointError, match=f"hold NaN or infinite values \\({name} \\(1\\)"):
        load_model(broken)
    out = tmp_path / "emb"
    assert main(["embed", "--checkpoint", str(broken), "--images", str(tiny_dataset), "--out", str(out),
                 "--device", "cpu", "--workers", "0", "--quiet"]) == 2
    assert "use an earlier checkpoint" in one_line_error(capsys) and not out.exists()


def test_non_finite_embeddings_are_never_written(tiny_dataset, tmp_path, checkpoint, monkeypatch):
    import facepipe.embed.extract as extract
    import facepipe.models.loaded as loaded_module
    from facepipe.runtime.io import OutputError

    def overflowing(model, paths, *args, **kwargs):
        vectors = np.ones((len(paths), 32), dtype=np.float32)
        vectors[3] = np.inf
        return vectors

    monkeypatch.setattr(loaded_module, "extract_embeddings", overflowing)
    with pytest.raises(OutputError, match="1 of .* embeddings hold NaN or infinite values"):
        extract.embed_folder(checkpoint, tiny_dataset, tmp_path / "emb", device="cpu", num_workers=0, progress=False)
    assert not (tmp_path / "emb").exists()


def test_rec_with_a_nan_label_is_refused(tmp_path):
    import cv2

    from facepipe.data.recordio import RecordDataset, pack_record, write_record_file

    image = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    write_record_file(tmp_path / "faces.rec", [(k, pack_record(label, image)) for k, label in
                                               enumerate([1.0, float("nan"), 2.0, 1.0])])
    with pytest.raises(DatasetError, match=r"1 of 4 records .* NaN or infinite identity label \(first: record 1"):
        RecordDataset(tmp_path / "faces.rec")


def test_mnist_label_outside_the_digits_is_refused(tmp_path):
    from facepipe.data.mnist import load_mnist
    from test_classify import idx_bytes, write_fake_mnist

    write_fake_mnist(tmp_path / "mnist", train_per_class=2, test_per_class=1)
    labels = np.repeat(np.arange(10), 2)
    labels[5] = 10  # once an eleventh class with one image
    (tmp_path / "mnist" / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte: 1 label\(s\) outside the MNIST digits 0..9 "
                                           r"\(first: image 5, label 10\)"):
        load_mnist(tmp_path / "mnist", "train")
    assert load_mnist(tmp_path / "mnist", "test")[1].max() == 9


# --------------------------------------------------------------------------------------------
# Embeddings without a model fingerprint
# --------------------------------------------------------------------------------------------
@pytest.fixture
def fingerprinted(tmp_path):
    from facepipe.index.store import ClusterIndex

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(4, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ClusterIndex.build(tmp_path / "idx", vectors, [0, 0, 1, 1], ["p", "q"], fingerprint="feedfacecafebeef")
    np.save(tmp_path / "new.npy", vectors[:2])
    (tmp_path / "new.txt").write_text("r\nr\n")
    return tmp_path


def test_index_add_refuses_unfingerprinted_embeddings_without_the_flag(fingerprinted, capsys):
    from facepipe.embed.extract import write_embeddings_folder
    from facepipe.index.store import ClusterIndex

    tmp_path = fingerprinted
    index = str(tmp_path / "idx")
    add = ["index", "add", index, "--embeddings", str(tmp_path / "new.npy"), "--labels", str(tmp_path / "new.txt"),
           "--quiet"]
    assert main(add) == 2
    err = one_line_error(capsys)
    assert "record no model fingerprint" in err and "feedfacecafebeef" in err and "--allow-unfingerprinted" in err
    assert ClusterIndex.open(index).identities() == ["p", "q"]
    assert main([*add, "--allow-unfingerprinted"]) == 0
    assert sorted(ClusterIndex.open(index).identities()) == ["p", "q", "r"]
    # An embed folder names its model: the right one goes in, another is refused as before.
    vectors = np.load(tmp_path / "new.npy")
    for fingerprint, status in (("feedfacecafebeef", 0), ("0123456789abcdef", 2)):
        folder = tmp_path / f"emb_{fingerprint}"
        write_embeddings_folder(folder, vectors, [("a.png", "s"), ("b.png", "s")],
                                {"model_fingerprint": fingerprint, "flip": "sum", "num_images": 2})
        assert main(["index", "add", index, "--embeddings", str(folder), "--quiet"]) == status
    capsys.readouterr()


def test_search_and_calibrate_refuse_unfingerprinted_queries_without_the_flag(fingerprinted, capsys):
    tmp_path = fingerprinted
    index = str(tmp_path / "idx")
    assert main(["search", "--index", index, str(tmp_path / "new.npy")]) == 2
    assert "--allow-unfingerprinted" in one_line_error(capsys)
    assert main(["search", "--index", index, str(tmp_path / "new.npy"), "--allow-unfingerprinted"]) == 0
    capsys.readouterr()
    (tmp_path / "genuine.txt").write_text("p\nq\n")
    calibrate = ["index", "calibrate", index, "--embeddings", str(tmp_path / "new.npy"), "--labels",
                 str(tmp_path / "genuine.txt"), "--quiet"]
    assert main(calibrate) == 2
    assert "validation embeddings" in one_line_error(capsys)
    assert main([*calibrate, "--allow-unfingerprinted"]) == 0


def test_an_index_without_a_fingerprint_needs_no_flag(tmp_path):
    from facepipe.index.jobs import enrol_images
    from facepipe.index.store import ClusterIndex

    ClusterIndex.build(tmp_path / "idx", np.eye(2, 4, dtype=np.float32), [0, 1], ["p", "q"])
    summary = enrol_images(tmp_path / "idx", embeddings=np.eye(2, 4, dtype=np.float32)[::-1], labels=["r", "r"],
                           progress=False)
    assert summary["new_identities"] == ["r"]


# --------------------------------------------------------------------------------------------
# Identity names with control characters
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bad\nname", "red\x1b[31m", "tab\tbed", "\x7fdel", "csi\x9b", "rtl\u202eevil",
                                  "line\u2028sep"])
def test_identity_names_with_control_characters_are_refused(name):
    with pytest.raises(IdentityNameError) as info:
        check_identity_name(name, "somewhere")
    message = str(info.value)
    assert message.startswith("somewhere: identity name ") and repr(name) in message
    assert not any(ch in message for ch in name if not ch.isprintable())  # shown escaped


@pytest.mark.parametrize("name", ["Aaron_Eckhart", "José María", "李小龍", "n00 1", "a-b.c", "Zoë (2)"])
def test_ordinary_identity_names_pass(name):
    assert check_identity_name(name, "x") == name


def test_every_reader_of_names_refuses_control_characters(tmp_path, capsys):
    from facepipe.data.subset import link_identity_subset
    from facepipe.embed.extract import list_images
    from facepipe.index.jobs import read_labels
    from facepipe.index.store import ClusterIndex

    root = tmp_path / "data"
    for name in ("fine", "evil\x1b]0;pwned\x07"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(root / name / "0.png")
    for read in (scan_identity_folders, list_images, lambda r: link_identity_subset(r, tmp_path / "subset")):
        with pytest.raises(IdentityNameError, match="holds the control character '\\\\x1b'"):
            read(root)
    assert main(["index", "margins", str(root)]) == 2
    err = one_line_error(capsys)
    assert "\x1b" not in err and "\\x1b" in err
    (tmp_path / "labels.txt").write_text("p\np\nq\x1b[2J\n")
    with pytest.raises(IdentityNameError, match=r"labels file .*labels.txt, entry 3"):
        read_labels(tmp_path / "labels.txt")
    np.save(tmp_path / "labels.npy", np.array(["p", "q\r"]))
    with pytest.raises(IdentityNameError, match="entry 2"):
        read_labels(tmp_path / "labels.npy")
    with pytest.raises(IdentityNameError):
        ClusterIndex.build(tmp_path / "idx", np.eye(2, 4, dtype=np.float32), [0, 1], ["p", "q\x1b[0m"])
    assert not os.path.exists(tmp_path / "idx" / "meta.json")

    # An index written before names were checked is refused on opening, its name shown escaped.
    from facepipe.index.store import META_FILE, ClusterIndexError

    ClusterIndex.build(tmp_path / "old", np.eye(2, 4, dtype=np.float32), [0, 1], ["p", "q"])
    with sqlite3.connect(tmp_path / "old" / META_FILE) as conn:
        conn.execute("UPDATE identities SET name = ? WHERE name = 'q'", ("q\x1b[2J",))
    with pytest.raises(ClusterIndexError, match=r"identity name 'q\\x1b\[2J' with a control character"):
        ClusterIndex.open(tmp_path / "old")
    assert main(["index", "info", str(tmp_path / "old")]) == 2
    err = one_line_error(capsys)
    assert "\x1b" not in err and "rebuild the index" in err
