"""``facepipe align``: statuses for every kind of input, resume, shards, policies, workers, CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from facepipe.align.job import AlignError, align_images, in_shard, list_inputs, output_name, read_manifest
from facepipe.cli import main
from facepipe.config import AlignConfig, ConfigError, load_align_config

from conftest import SHARED_DATA

LFW = SHARED_DATA / "lfw" / "lfw-deepfunneled"
PEOPLE = ["Aaron_Eckhart/Aaron_Eckhart_0001.jpg", "Abdullah_Gul/Abdullah_Gul_0001.jpg",
          "Abdullah_Gul/Abdullah_Gul_0002.jpg", "Adrien_Brody/Adrien_Brody_0001.jpg"]
MULTIFACE = SHARED_DATA / "photos" / "facenet_pytorch" / "multiface.jpg"
HUGE_FACTOR = 4


def build_tree(root: Path) -> Path:
    """Identity folders of real faces plus one file of every awkward kind."""
    for relative in PEOPLE:
        source = LFW / relative
        assert source.is_file(), f"LFW image missing: {source} (see ../shared/data/README.md)"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, root / relative)
    odd = root / "odd"
    odd.mkdir()
    face = np.asarray(Image.open(LFW / PEOPLE[0]).convert("RGB"))
    (odd / "empty.jpg").write_bytes(b"")
    (odd / "cut.jpg").write_bytes((LFW / PEOPLE[1]).read_bytes()[:3000])
    (odd / "notes.jpg").write_text("not an image")
    (odd / "readme.txt").write_text("ignored: not an image extension")
    Image.fromarray(face[:8, :8]).save(odd / "tiny.png")
    Image.new("RGB", (200, 160), (90, 90, 90)).save(odd / "blank.png")
    Image.fromarray(face).convert("L").save(odd / "grey.png")
    Image.fromarray(face).convert("CMYK").save(odd / "cmyk.jpg", quality=95)
    Image.fromarray(np.dstack([face, np.full(face.shape[:2], 255, np.uint8)]), "RGBA").save(odd / "alpha.png")
    Image.fromarray(face).convert("P", palette=Image.Palette.ADAPTIVE).save(odd / "palette.png")
    cv2.imwrite(str(odd / "deep.png"), cv2.cvtColor(face, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter counter-clockwise; viewers rotate it back upright
    Image.fromarray(np.rot90(face).copy()).save(odd / "rotated.jpg", exif=exif, quality=95)
    big = cv2.resize(face, None, fx=HUGE_FACTOR, fy=HUGE_FACTOR, interpolation=cv2.INTER_CUBIC)
    Image.fromarray(big).save(odd / "huge.png")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return build_tree(tmp_path_factory.mktemp("align_src") / "src")


@pytest.fixture(scope="module")
def aligned(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("align_out") / "out"
    config = AlignConfig(max_detect_side=400)
    summary = align_images(tree, out, config, workers=0, progress=False)
    rows = {row["path"]: row for row in read_manifest(out / "manifest.jsonl")}
    return out, summary, rows


def test_every_input_gets_a_status(aligned):
    out, summary, rows = aligned
    expected = {
        "odd/empty.jpg": "empty", "odd/cut.jpg": "truncated", "odd/notes.jpg": "not_image",
        "odd/tiny.png": "too_small", "odd/blank.png": "fallback",
    }
    for path, status in expected.items():
        assert rows[path]["status"] == status, rows[path]
    for path in PEOPLE + ["odd/grey.png", "odd/cmyk.jpg", "odd/alpha.png", "odd/palette.png", "odd/deep.png",
                          "odd/rotated.jpg", "odd/huge.png"]:
        assert rows[path]["status"] == "aligned", rows[path]
        assert rows[path]["num_faces"] >= 1
    assert "odd/readme.txt" not in rows
    assert len(rows) == summary.total == len(PEOPLE) + 12
    assert summary.counts == {"aligned": 11, "fallback": 1, "too_small": 1, "empty": 1, "truncated": 1,
                              "not_image": 1}
    for path in ("odd/empty.jpg", "odd/cut.jpg", "odd/notes.jpg"):
        assert rows[path]["error"] and rows[path]["output"] is None


def test_crops_have_the_configured_size_and_manifest_fields(aligned):
    out, _, rows = aligned
    for row in rows.values():
        if row["status"] in ("aligned", "fallback"):
            crop = cv2.imread(str(out / row["output"]))
            assert crop.shape == (112, 112, 3), row["path"]
    face = rows[PEOPLE[0]]["faces"][0]
    assert set(face) == {"index", "output", "score", "box", "landmarks"}
    assert len(face["landmarks"]) == 5 and face["score"] > 0.9
    assert rows["odd/grey.png"]["mode"] == "L" and rows["odd/deep.png"]["status"] == "aligned"


def test_exif_rotated_photo_is_aligned_upright(aligned):
    _, _, rows = aligned
    rotated, upright = rows["odd/rotated.jpg"], rows[PEOPLE[0]]
    assert rotated["exif_rotated"] is True and (rotated["width"], rotated["height"]) == (250, 250)
    np.testing.assert_allclose(rotated["faces"][0]["landmarks"], upright["faces"][0]["landmarks"], atol=3.0)


def test_huge_image_searched_downscaled_and_mapped_back(aligned):
    _, _, rows = aligned
    huge, original = rows["odd/huge.png"], rows[PEOPLE[0]]
    assert (huge["width"], huge["height"]) == (250 * HUGE_FACTOR, 250 * HUGE_FACTOR)
    # Detection ran on a 400 px copy (1.6 x the original); landmarks come back at full resolution.
    np.testing.assert_allclose(np.array(huge["faces"][0]["landmarks"]) / HUGE_FACTOR,
                               original["faces"][0]["landmarks"], atol=2.0)


def test_second_run_skips_everything(tree, aligned):
    out, _, _ = aligned
    again = align_images(tree, out, AlignConfig(max_detect_side=400), workers=0, progress=False)
    assert again.counts == {} and again.skipped == again.total


def test_interrupted_run_resumes_without_loss_or_duplicates(tree, tmp_path):
    out = tmp_path / "out"
    config = AlignConfig(max_detect_side=400)
    align_images(tree, out, config, workers=0, progress=False)
    manifest = out / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    # A crash: the last rows were never written, the final line is torn, and one crop is gone.
    kept = lines[:5]
    lost_crop = json.loads(kept[0])["output"]
    (out / lost_crop).unlink()
    emptied_crop = json.loads(kept[1])["output"]
    (out / emptied_crop).write_bytes(b"")  # an OS crash before the unsynced crop reached the disk
    manifest.write_text("\n".join(kept) + "\n" + lines[5][:17])
    resumed = align_images(tree, out, config, workers=0, progress=False)
    assert resumed.skipped == 3 and sum(resumed.counts.values()) == len(lines) - 3
    rows = read_manifest(manifest)
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)) == len(lines)
    assert (out / lost_crop).is_file() and (out / emptied_crop).stat().st_size > 0


def test_changed_config_refuses_to_mix_alignments(tree, aligned):
    out, _, _ = aligned
    with pytest.raises(AlignError, match=r"different config \(differs in \['image_size'\]\)"):
        align_images(tree, out, AlignConfig(max_detect_side=400, image_size=(112, 96)), workers=0, progress=False)


def test_restart_redoes_everything_with_the_new_config(tree, tmp_path):
    out = tmp_path / "out"
    align_images(tree, out, AlignConfig(), workers=0, progress=False)
    redone = align_images(tree, out, AlignConfig(image_size=(112, 96), no_face="skip"), restart=True, workers=0,
                          progress=False)
    assert redone.skipped == 0 and redone.counts["no_face"] == 1
    rows = {row["path"]: row for row in read_manifest(out / "manifest.jsonl")}
    assert cv2.imread(str(out / rows[PEOPLE[1]]["output"])).shape == (112, 96, 3)
    assert rows["odd/blank.png"]["output"] is None


def test_shards_partition_the_inputs(tree, tmp_path):
    _, relative = list_inputs(tree)
    shards = [set(r for r in relative if in_shard(r, (i, 3))) for i in range(3)]
    assert set().union(*shards) == set(relative) and sum(map(len, shards)) == len(relative)
    out = tmp_path / "out"
    for i in range(3):
        align_images(tree, out, AlignConfig(), shard=(i, 3), workers=0, progress=False)
    done = [{row["path"] for row in read_manifest(out / f"manifest.shard-{i}-of-3.jsonl")} for i in range(3)]
    assert done == shards


def test_list_file_input_and_bad_sources(tree, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two people\n{PEOPLE[0]}\n\n{tree / PEOPLE[1]}\n")
    root, relative = list_inputs(listing, root=tree)
    assert root == tree and relative == sorted(PEOPLE[:2])
    summary = align_images(listing, tmp_path / "out", AlignConfig(), root=tree, workers=0, progress=False)
    assert summary.counts == {"aligned": 2}
    listing.write_text("../outside.jpg\n")
    with pytest.raises(AlignError, match="leaves the root"):
        list_inputs(listing)
    with pytest.raises(AlignError, match="neither a folder nor a list file"):
        list_inputs(tmp_path / "nothing")
    with pytest.raises(AlignError, match="no image files"):
        list_inputs(_empty_dir(tmp_path))
    with pytest.raises(AlignError, match="must differ"):
        align_images(tree, tree, AlignConfig(), workers=0, progress=False)


def _empty_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "empty_dir"
    folder.mkdir()
    return folder


def test_face_selection_policies(tmp_path):
    assert MULTIFACE.is_file(), f"photo missing: {MULTIFACE}"
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(MULTIFACE, src / "group.jpg")
    picked = {}
    for select in ("largest", "central", "score", "all"):
        out = tmp_path / select
        align_images(src, out, AlignConfig(select=select), workers=0, progress=False)
        (row,) = read_manifest(out / "manifest.jsonl")
        assert row["num_faces"] == 6
        picked[select] = row["faces"]
    boxes = {face["index"]: face["box"] for face in picked["all"]}
    areas = {i: (b[2] - b[0]) * (b[3] - b[1]) for i, b in boxes.items()}
    assert picked["largest"][0]["index"] == max(areas, key=areas.get)
    centre = np.array([1200 / 2, 630 / 2])
    distance = {i: np.linalg.norm((np.array(b[:2]) + b[2:]) / 2 - centre) for i, b in boxes.items()}
    assert picked["central"][0]["index"] == min(distance, key=distance.get)
    scores = {face["index"]: face["score"] for face in picked["all"]}
    assert picked["score"][0]["index"] == max(scores, key=scores.get)
    assert [face["output"] for face in picked["all"]] == [f"group.face{k}.jpg" for k in range(6)]
    assert all((tmp_path / "all" / f"group.face{k}.jpg").is_file() for k in range(6))


def test_output_names():
    assert output_name("a/b.JPG", "same") == "a/b.JPG"
    assert output_name("a/b.pgm", "same") == "a/b.png"
    assert output_name("a/b.jpg", "png") == "a/b.png"
    assert output_name("a/b.jpg", "same", face=2) == "a/b.face2.jpg"


def test_worker_processes_give_the_same_manifest(tree, tmp_path, aligned):
    _, _, rows = aligned
    out = tmp_path / "out"
    align_images(tree, out, AlignConfig(max_detect_side=400), workers=2, progress=False)
    parallel = {row["path"]: row for row in read_manifest(out / "manifest.jsonl")}
    assert parallel.keys() == rows.keys()
    for path, row in rows.items():
        assert parallel[path]["status"] == row["status"]
        for a, b in zip(parallel[path]["faces"], row["faces"]):
            np.testing.assert_allclose(a["landmarks"], b["landmarks"], atol=0.05)


def test_align_config_from_yaml_and_training_config(tmp_path):
    settings = tmp_path / "align.yaml"
    settings.write_text("image_size: [112, 96]\nselect: central\n")
    assert load_align_config(settings).image_size == (112, 96)
    training = tmp_path / "train.yaml"
    training.write_text("align:\n  no_face: skip\nmodel:\n  depth: 18\n")
    assert load_align_config(training, ["detector.min_face_size=40"]).no_face == "skip"
    assert load_align_config(training, ["detector.min_face_size=40"]).detector.min_face_size == 40
    with pytest.raises(ConfigError, match="unknown key"):
        load_align_config(settings, ["selct=all"])
    with pytest.raises(ConfigError, match="select"):
        load_align_config(settings, ["select=biggest"])


def test_cli_align(tree, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["align", str(tree), str(out), "--workers", "0", "--quiet", "image_size=[112,96]", "no_face=skip"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "aligned 11" in printed and "no_face 1" in printed and "empty 1" in printed
    rows = {row["path"]: row for row in read_manifest(out / "manifest.jsonl")}
    assert cv2.imread(str(out / rows[PEOPLE[0]]["output"])).shape == (112, 96, 3)
    assert main(["align", str(tree), str(out), "--workers", "0", "--quiet"]) == 2
    assert "different config" in capsys.readouterr().err
    assert main(["align", str(tree), str(tmp_path / "x"), "--shard", "3/2", "--quiet"]) == 2
    assert "shard '3/2'" in capsys.readouterr().err
