"""Similarity alignment: Umeyama fit, templates, recovery of a known transform by warping."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from facepipe.align.transform import (
    ARCFACE_TEMPLATE_112,
    alignment_matrix,
    center_crop_matrix,
    landmark_template,
    transform_points,
    umeyama_similarity,
    warp_face,
)


def similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def test_templates_match_the_published_points():
    np.testing.assert_allclose(landmark_template(112, 112), ARCFACE_TEMPLATE_112)
    expected_96 = ARCFACE_TEMPLATE_112 - [8.0, 0.0]  # SphereFace / CLMLE 112x96
    np.testing.assert_allclose(landmark_template(112, 96), expected_96, atol=1e-12)
    np.testing.assert_allclose(landmark_template(64, 64), ARCFACE_TEMPLATE_112 * 64 / 112)
    np.testing.assert_allclose(landmark_template(224, 192), expected_96 * 2)


def test_umeyama_recovers_an_exact_similarity():
    truth = similarity(2.5, 33.0, -40.0, 17.5)
    source = ARCFACE_TEMPLATE_112
    target = transform_points(truth, source)
    np.testing.assert_allclose(umeyama_similarity(source, target), truth, atol=1e-9)


def test_umeyama_is_the_least_squares_fit_under_noise():
    rng = np.random.default_rng(0)
    source = ARCFACE_TEMPLATE_112
    target = transform_points(similarity(1.3, -12.0, 5.0, 9.0), source) + rng.normal(0, 0.5, (5, 2))
    fitted = umeyama_similarity(source, target)
    best = ((transform_points(fitted, source) - target) ** 2).sum()
    for _ in range(200):  # no nearby similarity fits better
        nudged = fitted + rng.normal(0, 1e-3, (2, 3)) * [[1, 1, 10], [1, 1, 10]]
        nudged[1, :2] = [-nudged[0, 1], nudged[0, 0]]  # keep it a similarity
        assert ((transform_points(nudged, source) - target) ** 2).sum() >= best - 1e-9


def test_umeyama_never_reflects():
    mirrored = ARCFACE_TEMPLATE_112 * [-1.0, 1.0]
    matrix = umeyama_similarity(ARCFACE_TEMPLATE_112, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_umeyama_rejects_degenerate_points():
    with pytest.raises(ValueError, match="same point"):
        umeyama_similarity(np.ones((5, 2)), ARCFACE_TEMPLATE_112)
    with pytest.raises(ValueError, match="matching"):
        umeyama_similarity(np.ones((5, 2)), np.ones((4, 2)))


def blob_image(points: np.ndarray, height: int, width: int, sigma: float) -> np.ndarray:
    """Gaussian blobs at ``points``; their intensity centroids are the points (sub-pixel)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.zeros((height, width))
    for x, y in points:
        image += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def blob_centroids(image: np.ndarray, near: np.ndarray, radius: int) -> np.ndarray:
    values = image.astype(np.float64)
    yy, xx = np.mgrid[0:image.shape[0], 0:image.shape[1]]
    centres = []
    for x, y in near:
        mask = (xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2
        weight = values * mask
        centres.append([(weight * xx).sum() / weight.sum(), (weight * yy).sum() / weight.sum()])
    return np.array(centres)


@pytest.mark.parametrize("size", [(112, 112), (112, 96)])
def test_warp_recovers_a_known_similarity_to_subpixel_accuracy(size):
    height, width = size
    template = landmark_template(height, width)
    # A photo in which the face template sits rotated, scaled and shifted.
    truth = similarity(2.2, -27.0, 120.0, 60.0)
    landmarks = transform_points(truth, template)
    photo = blob_image(landmarks, 420, 460, sigma=2.2 * 2.0)
    photo = np.repeat(photo[:, :, None], 3, axis=2)
    matrix = alignment_matrix(landmarks, height, width)
    np.testing.assert_allclose(matrix, cv2.invertAffineTransform(truth), atol=1e-9)
    crop = warp_face(photo, matrix, height, width)
    assert crop.shape == (height, width, 3)
    recovered = blob_centroids(crop[:, :, 0], template, radius=6)
    assert np.abs(recovered - template).max() < 0.2  # pixels


def test_border_modes_and_unknown_mode():
    image = np.full((50, 50, 3), 200, np.uint8)
    shifted = np.array([[1.0, 0, 30], [0, 1.0, 0]])
    assert warp_face(image, shifted, 50, 50, "constant")[25, 5].tolist() == [0, 0, 0]
    assert warp_face(image, shifted, 50, 50, "replicate")[25, 5].tolist() == [200, 200, 200]
    with pytest.raises(ValueError, match="border_mode"):
        warp_face(image, shifted, 50, 50, "wrap")


def test_center_crop_matrix_maps_the_central_square():
    matrix = center_crop_matrix(250, 250, 112, 112, fraction=0.5)
    corners = transform_points(matrix, np.array([[62.5, 62.5], [187.5, 187.5]]))
    np.testing.assert_allclose(corners, [[0, 0], [112, 112]])
