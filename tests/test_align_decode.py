"""Decoding for alignment: every awkward file gets pixels or a clear status, never an exception."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from facepipe.align.decode import decode_for_alignment

from conftest import SHARED_DATA

LFW_IMAGE = SHARED_DATA / "lfw" / "lfw-deepfunneled" / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg"
ORL_IMAGE = SHARED_DATA / "orl" / "s1" / "1.png"


@pytest.fixture(scope="module")
def face_rgb() -> np.ndarray:
    assert LFW_IMAGE.is_file(), f"LFW missing: {LFW_IMAGE} (see ../shared/data/README.md)"
    return np.asarray(Image.open(LFW_IMAGE).convert("RGB"))


def test_plain_rgb_jpeg_matches_pillow(face_rgb):
    decoded = decode_for_alignment(LFW_IMAGE)
    assert decoded.status == "ok" and decoded.mode == "RGB" and not decoded.exif_rotated
    np.testing.assert_array_equal(decoded.pixels, face_rgb)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    decoded = decode_for_alignment(path)
    assert decoded.status == "empty" and decoded.pixels is None


def test_truncated_jpeg(tmp_path):
    data = LFW_IMAGE.read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    decoded = decode_for_alignment(path)
    assert decoded.status == "truncated", decoded.detail
    assert "truncated" in decoded.detail


def test_non_image_with_image_extension(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n" * 20)
    assert decode_for_alignment(path).status == "not_image"


def test_missing_file_or_broken_link_is_missing(tmp_path):
    # Was "unreadable": an absent file is not a decoding problem, and a rerun looks at it again.
    decoded = decode_for_alignment(tmp_path / "gone.png")
    assert decoded.status == "missing" and decoded.detail == "no such file"
    (tmp_path / "link.png").symlink_to(tmp_path / "gone.png")
    decoded = decode_for_alignment(tmp_path / "link.png")
    assert decoded.status == "missing" and decoded.detail == f"broken link to {tmp_path / 'gone.png'}"


def test_grey_image_becomes_three_equal_channels():
    decoded = decode_for_alignment(ORL_IMAGE)
    assert decoded.status == "ok" and decoded.mode == "L"
    assert decoded.pixels.shape == (112, 92, 3)
    grey = np.asarray(Image.open(ORL_IMAGE))
    for channel in range(3):
        np.testing.assert_array_equal(decoded.pixels[:, :, channel], grey)


def test_cmyk_jpeg(tmp_path, face_rgb):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(face_rgb).convert("CMYK").save(path, quality=98)
    decoded = decode_for_alignment(path)
    assert decoded.status == "ok" and decoded.mode == "CMYK"
    assert np.abs(decoded.pixels.astype(int) - face_rgb).mean() < 4


def test_sixteen_bit_grey_png_is_rescaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64 * 48).reshape(64, 48).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    decoded = decode_for_alignment(path)
    assert decoded.status == "ok" and decoded.mode.startswith("I")
    expected = np.round(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(decoded.pixels[:, :, 1], expected)
    assert decoded.pixels.max() == 255 and decoded.pixels.min() == 0


def test_sixteen_bit_colour_png(tmp_path, face_rgb):
    path = tmp_path / "deep_colour.png"
    cv2.imwrite(str(path), cv2.cvtColor(face_rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    decoded = decode_for_alignment(path)
    assert decoded.status == "ok"
    assert np.abs(decoded.pixels.astype(int) - face_rgb).max() <= 1


def test_rgba_and_palette_png(tmp_path, face_rgb):
    rgba = np.dstack([face_rgb, np.full(face_rgb.shape[:2], 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    decoded = decode_for_alignment(tmp_path / "alpha.png")
    assert decoded.status == "ok" and decoded.mode == "RGBA"
    np.testing.assert_array_equal(decoded.pixels, face_rgb)

    palette = Image.fromarray(face_rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    decoded = decode_for_alignment(tmp_path / "palette.png")
    assert decoded.status == "ok" and decoded.mode == "P" and decoded.pixels.shape == face_rgb.shape
    assert np.abs(decoded.pixels.astype(int) - face_rgb).mean() < 12


def test_exif_orientation_is_applied(tmp_path):
    # A landscape image whose top-left corner is white, stored with orientation 6 ("rotate 90
    # clockwise to display"): shown upright it is portrait with the white corner at the top right.
    pixels = np.zeros((60, 100, 3), np.uint8)
    pixels[:20, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=100)
    decoded = decode_for_alignment(path)
    assert decoded.status == "ok" and decoded.exif_rotated
    assert decoded.pixels.shape == (100, 60, 3)
    assert decoded.pixels[:20, -20:].mean() > 240 and decoded.pixels[-20:, :20].mean() < 15
    raw = decode_for_alignment(path, apply_exif=False)
    assert raw.pixels.shape == (60, 100, 3) and not raw.exif_rotated


def test_decompression_bomb_is_too_large(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 px > 2 x the limit: Pillow refuses
    decoded = decode_for_alignment(path)
    assert decoded.status == "too_large" and "exceeds" in decoded.detail
