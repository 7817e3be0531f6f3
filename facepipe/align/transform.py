"""5-point similarity alignment: fit landmarks to a template, warp the face crop.

The template is the ArcFace/insightface 112x112 one; 112x96 (SphereFace, CLMLE) is the same
points moved 8 px left, and every other size is the 112-high template scaled to the crop height
and centred horizontally, which reproduces both published templates exactly.
"""
from __future__ import annotations

import cv2
import numpy as np

# Left eye, right eye, nose tip, left mouth corner, right mouth corner in a 112x112 crop.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)

BORDER_MODES = {
    "constant": cv2.BORDER_CONSTANT,
    "replicate": cv2.BORDER_REPLICATE,
    "reflect": cv2.BORDER_REFLECT_101,
}


def landmark_template(height: int, width: int) -> np.ndarray:
    """The 5 template points for a ``height`` x ``width`` crop: [5, 2] (x, y)."""
    scale = height / 112.0
    template = ARCFACE_TEMPLATE_112.copy()
    template[:, 0] += (width / scale - 112.0) / 2.0
    return template * scale


def umeyama_similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``source`` onto
    ``target`` points, as a 2x3 matrix [sR | t]; no reflections.

    Umeyama (1991), Eq. 40-42: with Sigma = cov(target, source) = U D V^T and S = diag(1, det(UV)),
    R = U S V^T, s = tr(D S) / var(source), t = mu_target - s R mu_source.
    """
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2 or len(source) < 2:
        raise ValueError(f"need matching [n, 2] point sets with n >= 2, got {source.shape} and {target.shape}")
    mean_source, mean_target = source.mean(axis=0), target.mean(axis=0)
    centred_source, centred_target = source - mean_source, target - mean_target
    variance = (centred_source ** 2).sum() / len(source)
    if variance <= 1e-12:
        raise ValueError("source points are all the same point; no similarity transform fits them")
    covariance = centred_target.T @ centred_source / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    scale = float((singular * sign).sum() / variance)
    translation = mean_target - scale * rotation @ mean_source
    return np.concatenate([scale * rotation, translation[:, None]], axis=1)


def alignment_matrix(landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """2x3 matrix taking image coordinates to the aligned ``height`` x ``width`` crop."""
    return umeyama_similarity(np.asarray(landmarks).reshape(5, 2), landmark_template(height, width))


def center_crop_matrix(image_height: int, image_width: int, height: int, width: int, fraction: float) -> np.ndarray:
    """2x3 matrix of the no-face fallback: a centred region ``fraction`` of the short image side
    tall (and of the crop's aspect ratio), scaled to ``height`` x ``width``."""
    scale = height / (fraction * min(image_height, image_width))
    return np.array([[scale, 0.0, width / 2.0 - scale * image_width / 2.0],
                     [0.0, scale, height / 2.0 - scale * image_height / 2.0]])


def warp_face(image: np.ndarray, matrix: np.ndarray, height: int, width: int, border_mode: str = "constant") -> np.ndarray:
    """Apply a 2x3 alignment matrix (bilinear), giving a ``height`` x ``width`` crop."""
    if border_mode not in BORDER_MODES:
        raise ValueError(f"border_mode '{border_mode}' is not one of {sorted(BORDER_MODES)}")
    return cv2.warpAffine(image, np.asarray(matrix, dtype=np.float64), (width, height), flags=cv2.INTER_LINEAR,
                          borderMode=BORDER_MODES[border_mode], borderValue=0)


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 2x3 matrix to [n, 2] points."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return points @ matrix[:, :2].T + matrix[:, 2]
