"""Raw photos are never evaluated as if they were aligned crops (issue 26): ``eval lfw`` without
``--align`` and ``eval pairs`` refuse images not of the model's input size outside any
``facepipe align`` output, before embedding anything, unless ``--no-align-check``."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

import facepipe.eval.pairs_job  # noqa: F401  imported before any patch of facepipe.embed.extract
from facepipe.cli import main
from facepipe.eval.crops import NotAlignedCropsError, check_aligned_crops
from test_eval_lfw import random_init_checkpoint

PEOPLE = [f"P{k}" for k in range(10)]  # 10 pairs per class: enough for 10 folds


def photo_tree(root: Path, size: tuple[int, int], exif_orientation: int | None = None) -> Path:
    """name/name_%04d.jpg images of ``size`` (height, width), two per person."""
    for k, person in enumerate(PEOPLE):
        (root / person).mkdir(parents=True, exist_ok=True)
        for number in (1, 2):
            image = Image.new("RGB", (size[1], size[0]), (20 * k, 30 * number, 90))
            exif = Image.Exif()
            if exif_orientation is not None:
                exif[0x0112] = exif_orientation
            image.save(root / person / f"{person}_{number:04d}.jpg", format="JPEG", exif=exif)
    return root


def view1_pairs(path: Path) -> Path:
    matched = [f"{p}\t1\t2" for p in PEOPLE]
    mismatched = [f"{a}\t1\t{b}\t2" for a, b in zip(PEOPLE, PEOPLE[1:] + PEOPLE[:1])]
    path.write_text("\n".join([str(len(PEOPLE)), *matched, *mismatched]) + "\n")
    return path


@pytest.fixture
def no_embedding(monkeypatch):
    """Fails the test if anything is embedded (the check must come first)."""
    import facepipe.models.loaded as loaded_module

    def refuse(*args, **kwargs):
        raise AssertionError("images were embedded before the raw-photo check")

    monkeypatch.setattr(loaded_module, "extract_embeddings", refuse)


def lfw_command(pairs: Path, images: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "lfw", "--pairs", str(pairs), "--images", str(images), "--checkpoint", str(checkpoint),
            "--out", str(out), "--quiet", "--device", "cpu", *extra]


def test_eval_lfw_refuses_raw_photos_without_align(tmp_path, capsys, no_embedding):
    raw = photo_tree(tmp_path / "raw", (50, 50))
    pairs = view1_pairs(tmp_path / "pairs.txt")
    checkpoint = random_init_checkpoint(tmp_path / "random.pt")  # 32x32 input
    out = tmp_path / "report"
    assert main(lfw_command(pairs, raw, checkpoint, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"images under {raw} are 50x50" in err and "not the model's 32x32 input" in err
    assert "no align manifest" in err and "--align" in err and "--no-align-check" in err
    assert not (out / "metrics.json").exists()


def test_eval_lfw_accepts_crops_an_align_output_and_the_opt_out(tmp_path, capsys, monkeypatch):
    pairs = view1_pairs(tmp_path / "pairs.txt")
    checkpoint = random_init_checkpoint(tmp_path / "random.pt")
    # Crops of the model's input size, made by any tool: evaluated.
    crops = photo_tree(tmp_path / "crops", (32, 32))
    assert main(lfw_command(pairs, crops, checkpoint, tmp_path / "r1")) == 0
    # Another size, but the folder is a 'facepipe align' output (its manifest): evaluated.
    aligned = photo_tree(tmp_path / "aligned", (40, 40))
    (aligned / "manifest.jsonl").write_text("".join(
        json.dumps({"path": f"{p}/{p}_{n:04d}.jpg", "status": "aligned"}) + "\n" for p in PEOPLE for n in (1, 2)))
    assert main(lfw_command(pairs, aligned, checkpoint, tmp_path / "r2")) == 0
    # Raw photos with the explicit opt-out: evaluated as they are.
    raw = photo_tree(tmp_path / "raw", (50, 50))
    assert main(lfw_command(pairs, raw, checkpoint, tmp_path / "r3", "--no-align-check")) == 0
    assert all((tmp_path / r / "metrics.json").is_file() for r in ("r1", "r2", "r3"))


def write_pairs_csv(path: Path, root: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path_a", "path_b", "is_same"])
        for a, b in zip(PEOPLE, PEOPLE[1:] + PEOPLE[:1]):
            writer.writerow([f"{a}/{a}_0001.jpg", f"{a}/{a}_0002.jpg", 1])
            writer.writerow([f"{a}/{a}_0001.jpg", f"{b}/{b}_0002.jpg", 0])
    return path


def test_eval_pairs_refuses_raw_photos_unless_told(tmp_path, capsys, monkeypatch):
    raw = photo_tree(tmp_path / "raw", (48, 64))
    pairs = write_pairs_csv(tmp_path / "pairs.csv", raw)
    checkpoint = random_init_checkpoint(tmp_path / "random.pt")
    command = ["eval", "pairs", "--checkpoint", str(checkpoint), "--pairs", str(pairs), "--root", str(raw),
               "--device", "cpu", "--quiet"]
    with monkeypatch.context() as patch:
        patch.setattr("facepipe.models.loaded.extract_embeddings",
                      lambda *a, **k: pytest.fail("embedded before the raw-photo check"))
        assert main([*command, "--out", str(tmp_path / "stop")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "48x64" in err and "32x32" in err
    assert "facepipe align" in err and "--no-align-check" in err
    assert main([*command, "--out", str(tmp_path / "asis"), "--no-align-check"]) == 0
    # A manifest in the root (an align output whose crops the pairs name) is accepted.
    (raw / "manifest.jsonl").write_text("")
    assert main([*command, "--out", str(tmp_path / "aligned")]) == 0


def test_check_reads_headers_and_finds_a_manifest_above_the_image(tmp_path):
    root = tmp_path / "root"
    tree = photo_tree(root / "aligned", (40, 30))
    paths = [tree / p / f"{p}_0001.jpg" for p in PEOPLE]
    with pytest.raises(NotAlignedCropsError, match="are 40x30"):
        check_aligned_crops(root, paths, (32, 32), "advice")
    check_aligned_crops(root, paths, (40, 30), "advice")
    # A facepipe synth set (synth.json in its root) is aligned by construction, at any size.
    (tree / "synth.json").write_text("{}")
    check_aligned_crops(root, paths, (32, 32), "advice")
    (tree / "synth.json").unlink()
    # A manifest in a folder between the image and the root marks the images as align output.
    (tree / "manifest.shard-0-of-2.jsonl").write_text("")
    check_aligned_crops(root, paths, (32, 32), "advice")
    # EXIF orientation 6 (a quarter turn): a 30x40 file is decoded as 40x30.
    turned = photo_tree(tmp_path / "turned", (30, 40), exif_orientation=6)
    check_aligned_crops(turned, [turned / "P0" / "P0_0001.jpg"], (40, 30), "advice")
    # Missing or unreadable files are left to the embedding, which reports them.
    (turned / "bad.jpg").write_bytes(b"not an image")
    check_aligned_crops(turned, [turned / "gone.jpg", turned / "bad.jpg"], (32, 32), "advice")
