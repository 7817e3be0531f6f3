"""MTCNN detector: parity with the reference detections, NMS, crop resampling, weights lookup."""
from __future__ import annotations

import importlib.metadata
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from facepipe.align.detector import (
    MTCNN,
    batched_nms,
    crop_windows,
    nms,
    resample_crops,
    summed_area_table,
)
from facepipe.align.networks import MissingWeightsError, load_networks, locate_weights

from conftest import SHARED_DATA

REFERENCE = SHARED_DATA.parent / "fixtures" / "mtcnn_reference.json"


@pytest.fixture(scope="module")
def detector() -> MTCNN:
    return MTCNN(device="cpu")


def box_iou(a, b) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def load_reference() -> dict:
    assert REFERENCE.is_file(), f"reference detections missing: {REFERENCE} (see ../shared/data/README.md)"
    return json.loads(REFERENCE.read_text())


def test_parity_with_reference_on_every_fixture_image(detector):
    """Same face count; each reference face matched by a box with IoU >= 0.95 and landmarks within 1.5 px."""
    reference = load_reference()
    images = reference["images"]
    assert len(images) == 137
    # The reference decoded with Pillow's convert("RGB") and no EXIF transpose: do the same.
    decoded = []
    for item in images:
        path = SHARED_DATA / item["image"]
        assert path.is_file(), f"fixture image missing: {path}"
        decoded.append(np.asarray(Image.open(path).convert("RGB")))
    found_all = detector.detect(decoded)
    problems = []
    matched = 0
    for item, found in zip(images, found_all):
        faces = item["faces"]
        if len(found) != len(faces):
            problems.append(f"{item['image']}: {len(found)} faces, reference {len(faces)}")
            continue
        used = set()
        for face in faces:
            ious = [box_iou(face["box"], box) if j not in used else -1 for j, box in enumerate(found.boxes)]
            best = int(np.argmax(ious))
            used.add(best)
            landmark_error = float(np.abs(found.landmarks[best] - np.array(face["landmarks"])).max())
            if ious[best] < 0.95 or landmark_error > 1.5:
                problems.append(f"{item['image']}: IoU {ious[best]:.3f}, landmarks off by {landmark_error:.2f} px")
            matched += 1
            assert abs(found.scores[best] - face["prob"]) < 1e-3
    assert not problems, problems
    assert matched == sum(len(item["faces"]) for item in images)


def test_batched_images_match_one_at_a_time(detector):
    reference = load_reference()
    lfw = [SHARED_DATA / item["image"] for item in reference["images"] if item["image"].startswith("lfw/")][:6]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in lfw]
    together = detector.detect(images)
    for image, batched in zip(images, together):
        alone = detector.detect_one(image)
        np.testing.assert_allclose(batched.boxes, alone.boxes, atol=1e-3)
        np.testing.assert_allclose(batched.landmarks, alone.landmarks, atol=1e-3)


def test_blank_and_tiny_images_have_no_faces(detector):
    assert len(detector.detect_one(np.zeros((200, 300, 3), np.uint8))) == 0
    assert len(detector.detect_one(np.full((10, 10, 3), 128, np.uint8))) == 0  # below one P-Net cell
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        detector.detect([np.zeros((20, 20), np.uint8)])


def test_pyramid_scales_closed_form(detector):
    # Start at 12/20 = 0.6 and shrink by 0.709 while the short side stays >= 12 px:
    # 100 px -> 60, 42.5, 30.2, 21.4, 15.2 (next 10.7 stops): five scales.
    scales = detector.pyramid_scales(100, 150)
    np.testing.assert_allclose(scales, [0.6 * 0.709 ** k for k in range(5)])


def test_nms_union_hand_computed():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [5, 0, 15, 10], [20, 20, 30, 30]], float)
    scores = np.array([0.9, 0.8, 0.95, 0.5])
    # IoU(2, 0) = 50/150 = 1/3; IoU(2, 1) = 60/140 = 0.43; IoU(0, 1) = 90/110 = 0.82.
    assert nms(boxes, scores, 0.5).tolist() == [2, 0, 3]
    assert nms(boxes, scores, 0.4).tolist() == [2, 0, 3]
    assert nms(boxes, scores, 0.3).tolist() == [2, 3]
    assert nms(boxes, scores, 0.9).tolist() == [2, 0, 1, 3]


def test_nms_min_mode_uses_inclusive_pixels_and_smaller_area():
    boxes = np.array([[0, 0, 9, 9], [2, 2, 5, 5]], float)  # inclusive areas 100 and 16, inner box inside
    scores = np.array([0.9, 0.8])
    assert nms(boxes, scores, 0.7, mode="min").tolist() == [0]  # overlap 16/16 = 1
    assert nms(boxes, scores, 0.7, mode="union").tolist() == [0, 1]  # IoU 9/81 = 0.11


def test_nms_matches_greedy_definition_on_random_boxes():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(1, 200))
        corner = rng.uniform(0, 100, (n, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(2, 40, (n, 2))], axis=1)
        scores = rng.permutation(n).astype(np.float64)  # distinct scores: one greedy answer
        x1, y1, x2, y2 = boxes.T
        areas = (x2 - x1) * (y2 - y1)
        order, expected = list(np.argsort(-scores)), []
        while order:
            best = order.pop(0)
            expected.append(best)
            inter = [max(0, min(x2[best], x2[j]) - max(x1[best], x1[j])) * max(0, min(y2[best], y2[j]) - max(y1[best], y1[j]))
                     for j in order]
            order = [j for j, i in zip(order, inter) if i / (areas[best] + areas[j] - i) <= 0.5]
        assert nms(boxes, scores, 0.5).tolist() == expected


def test_batched_nms_keeps_groups_apart():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], float)
    scores = np.array([0.9, 0.8, 0.7])
    assert sorted(batched_nms(boxes, scores, np.array([0, 0, 1]), 0.5).tolist()) == [0, 2]


def test_resample_crops_equals_area_interpolation_of_each_crop():
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, (2, 37, 53, 3), dtype=np.uint8))
    boxes = np.array([[-5.5, 3.2, 20.9, 30.1], [10, 10, 52.7, 36.9], [0, 0, 3, 2], [30.3, 1.0, 61.0, 50.0]])
    index = np.array([0, 1, 0, 1])
    windows = crop_windows(boxes, 53, 37)
    for size in (24, 48):
        crops = resample_crops(summed_area_table(images), torch.from_numpy(index), torch.from_numpy(windows), size)
        for k, (r0, r1, c0, c1) in enumerate(windows):
            patch = images[index[k], r0:r1, c0:c1].permute(2, 0, 1)[None].float()
            expected = F.interpolate(patch, size=(size, size), mode="area")[0]
            torch.testing.assert_close(crops[k], expected, atol=1e-4, rtol=0)


def test_weights_found_through_distribution_metadata():
    paths = locate_weights()
    assert sorted(paths) == ["onet", "pnet", "rnet"]
    assert all(p.is_file() and p.parent.name == "data" for p in paths.values())
    pnet, _, _ = load_networks()
    assert not pnet.training


def test_missing_weights_name_the_package(tmp_path, monkeypatch):
    with pytest.raises(MissingWeightsError, match="not found"):
        locate_weights(tmp_path)

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(MissingWeightsError, match="'facenet-pytorch' package, which is not installed"):
        locate_weights()
