"""One image reader for every stage (issue 25, part 2): the same bytes give the same RGB uint8
pixels, or the same UnreadableImageError status, in align, training (folders and .rec), embed,
search and .bin evaluation; size limits are checked on the header before anything is decoded."""
from __future__ import annotations

import io
import logging
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from torch.utils.data import DataLoader

from conftest import tiny_config
from facepipe.align.decode import decode_for_alignment
from facepipe.data.dataset import IdentityFolderDataset, ImageListDataset
from facepipe.data.dataset import UnreadableImageError as DatasetUnreadableImageError
from facepipe.data.image_io import (
    DECODE_FAILURES,
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_ENV,
    MAX_SIDE_ENV,
    UnreadableImageError,
    image_limits,
    read_image,
    read_image_info,
    set_image_limits,
)
from facepipe.data.recordio import RecordDataset, RecordIOError, pack_identity_folder

# Files that cannot be used and the status every stage gives them; the others decode.
BAD = {"bomb.png": "too_large", "cut.jpg": "truncated", "empty.png": "empty", "notes.jpg": "not_image"}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def header_bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG of a few dozen bytes whose header claims ``width`` x ``height`` RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 100))
            + png_chunk(b"IEND", b""))


def real_grey_png(width: int, height: int) -> bytes:
    """A complete, valid black grey-level PNG of ``width`` x ``height`` (compressed: about 1 KB per 1.3 MB)."""
    compressor = zlib.compressobj(1)
    rows = b"\x00" * (width + 1) * 100
    body = [compressor.compress(rows) for _ in range(height // 100)]
    body.append(compressor.compress(b"\x00" * (width + 1) * (height % 100)) + compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", b"".join(body))
            + png_chunk(b"IEND", b""))


def write_awkward_files(folder: Path) -> dict[str, Path]:
    """The awkward files of the issue's list, written into ``folder``; name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    face = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    Image.fromarray(face[:, :, 0]).save(folder / "grey.png")
    alpha = rng.integers(0, 256, face.shape[:2], dtype=np.uint8)
    Image.fromarray(np.dstack([face, alpha]), "RGBA").save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 65536, face.shape[:2]).astype(np.uint16)).save(folder / "deep.png")
    cv2.imwrite(str(folder / "deep_colour.png"), face[:, :, ::-1].astype(np.uint16) * 257)
    Image.fromarray(face).convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(folder / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise
    Image.fromarray(face).save(folder / "rotated.jpg", exif=exif, quality=95)
    (folder / "bomb.png").write_bytes(header_bomb_png())
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=95)
    (folder / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not a picture\n" * 20)
    return {path.name: path for path in sorted(folder.iterdir())}


def outcome(read, *args):
    """The pixels a stage gives, or the status of the UnreadableImageError it raises."""
    try:
        return read(*args)
    except UnreadableImageError as exc:
        assert exc.status in DECODE_FAILURES
        return exc.status


def assert_same(got, expected, where: str) -> None:
    if isinstance(expected, str):
        assert got == expected, f"{where}: expected status {expected}, got {got if isinstance(got, str) else 'pixels'}"
    else:
        assert isinstance(got, np.ndarray), f"{where}: expected pixels, got status {got}"
        assert got.dtype == np.uint8 and got.shape == expected.shape, where
        np.testing.assert_array_equal(got, expected, err_msg=where)


# ----------------------------------------------------------------------------- the reader
def test_the_reader_on_each_awkward_file(tmp_path):
    files = write_awkward_files(tmp_path)
    rng = np.random.default_rng(0)
    face = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)  # what write_awkward_files drew first
    grey = read_image(files["grey.png"])
    assert grey.shape == (48, 40, 3) and all((grey[:, :, c] == face[:, :, 0]).all() for c in range(3))
    np.testing.assert_array_equal(read_image(files["alpha.png"]), face)  # alpha dropped, not blended
    deep_values = np.asarray(Image.open(files["deep.png"]), dtype=np.float64)
    np.testing.assert_array_equal(read_image(files["deep.png"])[:, :, 2], np.round(deep_values / 257).astype(np.uint8))
    assert np.abs(read_image(files["deep_colour.png"]).astype(int) - face).max() <= 1
    palette = read_image(files["palette.png"])
    assert palette.shape == face.shape and np.abs(palette.astype(int) - face).mean() < 40
    rotated = read_image_info(files["rotated.jpg"])
    stored = read_image_info(files["rotated.jpg"], apply_exif=False)
    assert rotated.exif_rotated and not stored.exif_rotated
    assert rotated.pixels.shape == (40, 48, 3) and stored.pixels.shape == (48, 40, 3)
    np.testing.assert_array_equal(rotated.pixels, np.rot90(stored.pixels, k=-1))  # 90 degrees clockwise
    for name, status in BAD.items():
        with pytest.raises(UnreadableImageError) as caught:
            read_image(files[name])
        error = caught.value
        assert error.status == status and error.source == str(files[name])
        assert str(files[name]) in str(error) and f"({status})" in str(error) and "\n" not in str(error)
        assert isinstance(error, OSError) and DatasetUnreadableImageError is UnreadableImageError
        copy = pickle.loads(pickle.dumps(error))
        assert (type(copy), str(copy), copy.status, copy.detail) == (type(error), str(error), status, error.detail)
    with pytest.raises(UnreadableImageError, match="stat") as caught:
        read_image(tmp_path / "gone.png")
    assert caught.value.status == "unreadable"


def test_limits_are_checked_on_the_header_before_decoding(tmp_path, monkeypatch):
    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    path = tmp_path / "photo.png"
    Image.fromarray(np.zeros((100, 200, 3), np.uint8)).save(path)
    assert image_limits().max_pixels == DEFAULT_MAX_PIXELS
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    monkeypatch.setenv(MAX_PIXELS_ENV, "19999")
    with pytest.raises(UnreadableImageError, match=f"200x100 = 20,000 pixels exceeds .*{MAX_PIXELS_ENV}") as caught:
        read_image(path)
    assert caught.value.status == "too_large"
    monkeypatch.setenv(MAX_PIXELS_ENV, "20000")
    monkeypatch.setenv(MAX_SIDE_ENV, "199")
    with pytest.raises(UnreadableImageError, match=f"a side above the limit of 199 .*{MAX_SIDE_ENV}"):
        read_image(path)
    assert decode_for_alignment(path).status == "too_large"  # align refuses by the same limits
    monkeypatch.setenv(MAX_SIDE_ENV, "200")
    with pytest.raises(UnreadableImageError, match="pixels were decoded"):  # within both limits: decoding starts
        read_image(path)
    monkeypatch.setenv(MAX_SIDE_ENV, "lots")
    with pytest.raises(ValueError, match=MAX_SIDE_ENV):
        read_image(path)


def test_a_real_png_beyond_the_default_limit_is_refused_undecoded(tmp_path, monkeypatch):
    # A complete 13500 x 13300 grey PNG (780 KB on disk, 180 Mpx: 540 MB once decoded to RGB), the
    # smaller cousin of the campaign's 30000 x 30000 file.
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    monkeypatch.delenv(MAX_SIDE_ENV, raising=False)
    path = tmp_path / "huge.png"
    path.write_bytes(real_grey_png(13_500, 13_300))

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    with pytest.raises(UnreadableImageError, match="179550000 pixels") as caught:
        read_image(path)
    assert caught.value.status == "too_large" and 13_500 * 13_300 > DEFAULT_MAX_PIXELS


def test_set_image_limits_reaches_the_environment_of_child_processes(monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    monkeypatch.delenv(MAX_SIDE_ENV, raising=False)
    previous = set_image_limits(max_pixels=1234, max_side=56)
    try:
        import os

        assert (os.environ[MAX_PIXELS_ENV], os.environ[MAX_SIDE_ENV]) == ("1234", "56")
        assert (image_limits().max_pixels, image_limits().max_side) == (1234, 56)
        with pytest.raises(ValueError, match=MAX_PIXELS_ENV):
            set_image_limits(max_pixels=0)
    finally:
        set_image_limits(previous.max_pixels, previous.max_side)
        monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
        monkeypatch.delenv(MAX_SIDE_ENV, raising=False)


# ----------------------------------------------------------------------------- every stage
def test_every_stage_reads_the_same_pixels_or_the_same_error(tmp_path):
    root = tmp_path / "faces"
    files = write_awkward_files(root / "ann")
    bob = root / "bob"
    bob.mkdir()
    Image.fromarray(np.full((32, 32, 3), 77, np.uint8)).save(bob / "0.png")
    names = list(files)
    expected = {name: outcome(read_image, path) for name, path in files.items()}
    assert {name: status for name, status in expected.items() if isinstance(status, str)} == BAD

    # align: the pixels it detects on and warps, or its manifest status.
    for name, path in files.items():
        decoded = decode_for_alignment(path)
        assert_same(decoded.pixels if decoded.status == "ok" else decoded.status, expected[name], f"align {name}")
    # embed, index build, search crops and eval pairs read files through ImageListDataset.
    listed = ImageListDataset([str(path) for path in files.values()], transform=lambda image: image)
    for position, name in enumerate(names):
        assert_same(outcome(lambda: listed[position][0]), expected[name], f"embed {name}")
    # .rec records and .bin sets hold the file's bytes.
    for name, path in files.items():
        assert_same(outcome(read_image, path.read_bytes(), name), expected[name], f"bytes {name}")

    # Training on the identity folders: same pixels, or a substitute of the same identity.
    training = IdentityFolderDataset(root)
    substitutes = [expected[name] for name in names if name not in BAD]
    for index, sample in enumerate(training.samples):
        image, label, _ = training[index]
        name = Path(sample.path).name
        if sample.path.startswith(str(bob)):
            continue
        if name in BAD:
            assert sample.path in training.bad_files
            assert any(np.array_equal(image.numpy(), s) for s in substitutes if s.shape == tuple(image.shape))
        else:
            assert_same(image.numpy(), expected[name], f"training {name}")
    assert training.bad_files == {str(files[name]) for name in BAD}

    # .rec training: pack stores these JPEG/PNG bytes (and the undecodable files) as they are.
    packed = pack_identity_folder(root, tmp_path / "packed", quality=None, progress=False)
    records = RecordDataset(tmp_path / "packed")
    for index, sample in enumerate(training.samples[: len(names)]):
        key = int(records.keys[index])
        name = Path(sample.path).name
        got = outcome(records.records.read_image, key)
        assert_same(got, expected[name], f".rec {name}")
        if name in BAD:
            with pytest.raises(RecordIOError, match=f"undecodable image in {packed['rec']} at offset"):
                records.records.read_image(key)
            image, label, _ = records[index]  # substituted in training, as a bad file is
            assert label == 0 and key in records.bad_keys
    assert len(records.bad_keys) == len(BAD)


def test_an_error_in_a_loader_worker_keeps_the_readers_message(tmp_path):
    files = write_awkward_files(tmp_path)
    listed = ImageListDataset([str(files["bomb.png"])], transform=lambda image: torch.from_numpy(image))
    with pytest.raises(UnreadableImageError) as caught:
        next(iter(DataLoader(listed, batch_size=1, num_workers=1)))
    error = caught.value
    assert error.status == "too_large" and error.source == str(files["bomb.png"])
    assert str(error).startswith(f"cannot read image {files['bomb.png']} (too_large): ") and "\n" not in str(error)


# ----------------------------------------------------------------------------- the stages end to end
def test_training_substitutes_a_header_bomb_and_a_truncated_jpeg(tiny_dataset, tmp_path, caplog):
    from facepipe.train import Trainer

    root = tmp_path / "train"
    shutil.copytree(tiny_dataset, root)
    first = sorted(p for p in root.iterdir() if p.is_dir())[0]
    files = write_awkward_files(tmp_path / "awkward")
    shutil.copy(files["bomb.png"], first / "bomb.png")
    shutil.copy(files["cut.jpg"], first / "cut.jpg")
    config = tiny_config(root, tmp_path / "run", train={"stages": [{"epochs": 1, "head": {"type": "softmax"}}]})
    trainer = Trainer(config, progress=False)
    with caplog.at_level(logging.WARNING, logger="facepipe.data.dataset"):
        trainer.fit()
    assert (tmp_path / "run" / "latest.pt").is_file()
    assert trainer.dataset.bad_files == {str(first / "bomb.png"), str(first / "cut.jpg")}
    skipped = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(skipped) == 2  # logged once per file
    assert any("bomb.png (too_large)" in m for m in skipped) and any("cut.jpg (truncated)" in m for m in skipped)


# The three feature-extraction passes inside training: UMM's uncertainty refresh, CLMLE's
# clustering and ARConvL's class-mean centres; each reads every training image once more.
EXTRACTION_PASSES = {
    "umm": {"stages": [{"epochs": 1, "head": {"type": "lsoftmax", "m": 2, "margin_source": "uncertainty",
                                              "lambda_base": 1.0, "lambda_min": 1.0}}],
            "uncertainty": {"passes": 2, "max_per_class": 8}},
    "clmle": {"stages": [{"epochs": 1, "head": {"type": "cosface", "s": 16.0, "m": 0.2},
                          "loss": {"type": "clmle", "inter_margin": 0.3, "intra_margin": 0.1}}],
              "clusters": {"cluster_size": 3, "refresh_every_steps": 3, "clusters_per_batch": 4,
                           "images_per_cluster": 3, "batch_size": 16}},
    "arconvl": {"stages": [{"epochs": 1, "head": {"type": "arconvl", "init_centers": "class_means"}}]},
}


@pytest.mark.parametrize("method", sorted(EXTRACTION_PASSES))
def test_feature_extraction_inside_training_substitutes_like_training(method, tiny_dataset, tmp_path, caplog):
    from facepipe.train import Trainer

    root = tmp_path / "train"
    shutil.copytree(tiny_dataset, root)
    first = sorted(p for p in root.iterdir() if p.is_dir())[0]
    bomb = first / "bomb.png"
    bomb.write_bytes(header_bomb_png())
    extracted = []
    original = IdentityFolderDataset.eval_view

    def recording_eval_view(self, indices, image_size):
        view = original(self, indices, image_size)
        extracted.append([self.samples[i].path for i in indices])
        return view

    config = tiny_config(root, tmp_path / "run", model={"dropout": 0.2},
                         train={**EXTRACTION_PASSES[method], "log_every_steps": 2})
    with pytest.MonkeyPatch.context() as patch, caplog.at_level(logging.WARNING, logger="facepipe.data.dataset"):
        patch.setattr(IdentityFolderDataset, "eval_view", recording_eval_view)
        trainer = Trainer(config, progress=False)  # ARConvL's class means are taken here
        trainer.fit()
    assert (tmp_path / "run" / "latest.pt").is_file()
    # The pass did read the bad file, and it was substituted rather than stopping the run.
    assert any(str(bomb) in paths for paths in extracted), method
    assert str(bomb) in trainer.dataset.bad_files
    skipped = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(skipped) == 1 and "bomb.png (too_large)" in skipped[0]


def test_embed_reports_an_unreadable_file_in_one_line(tmp_path, capsys):
    from facepipe.cli import main
    from facepipe.embed import embed_folder
    from test_eval_lfw import random_init_checkpoint

    checkpoint = random_init_checkpoint(tmp_path / "model" / "random.pt")
    images = tmp_path / "images"
    images.mkdir()
    for n in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * n, np.uint8)).save(images / f"{n}.png")
    (images / "1_bomb.png").write_bytes(header_bomb_png())
    # Two decoding workers (the default): the error crosses a process boundary.
    assert main(["embed", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"facepipe embed: error: cannot read image {images / '1_bomb.png'} (too_large): ")
    assert "\n" not in err and "Traceback" not in err and "OpenCV" not in err
    with pytest.raises(UnreadableImageError) as caught:
        embed_folder(checkpoint, images, tmp_path / "out", device="cpu", num_workers=0, progress=False)
    assert caught.value.status == "too_large" and caught.value.source == str(images / "1_bomb.png")


def test_eval_bin_names_the_unreadable_image_of_the_set(tmp_path):
    from facepipe.eval.insightface_bin import evaluate_bin
    from test_eval_bin import jpeg, write_bin
    from test_eval_lfw import random_init_checkpoint

    checkpoint = random_init_checkpoint(tmp_path / "model" / "random.pt")
    bins = [jpeg(0, 32), jpeg(1, 32), header_bomb_png(), jpeg(3, 32)]
    write_bin(tmp_path / "set.bin", bins, [True, False])
    with pytest.raises(UnreadableImageError) as caught:
        evaluate_bin(tmp_path / "set.bin", tmp_path / "out", checkpoint=checkpoint, device="cpu", progress=False)
    error = caught.value
    assert error.status == "too_large"
    assert str(error).startswith(f"cannot read image 2 (pair 1) of {tmp_path / 'set.bin'} (too_large): ")


def test_search_gives_each_unreadable_query_the_readers_status(tmp_path):
    from facepipe.index.jobs import search_images
    from facepipe.index.store import ClusterIndex
    from facepipe.models.loaded import load_model
    from test_eval_lfw import random_init_checkpoint

    checkpoint = random_init_checkpoint(tmp_path / "model" / "random.pt")
    vectors = np.random.default_rng(0).normal(size=(4, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ClusterIndex.build(tmp_path / "g", vectors, [0, 0, 1, 1], ["p", "q"], fingerprint=load_model(checkpoint).fingerprint,
                       config={"flip": "sum"})
    files = write_awkward_files(tmp_path / "queries")
    for align in (False, "auto"):
        inputs = [files[name] for name in BAD] + ([files["grey.png"]] if align is False else [])
        results = search_images(tmp_path / "g", checkpoint, inputs, align=align, device="cpu", progress=False)
        by_name = {Path(r["input"]).name: r for r in results}
        for name, status in BAD.items():
            assert by_name[name]["status"] == status and by_name[name]["matches"] == []
            assert str(files[name]) in by_name[name]["error"]
        if align is False:
            assert by_name["grey.png"]["status"] == "ok" and by_name["grey.png"]["matches"]
