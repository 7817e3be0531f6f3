"""Synthetic, face-like identity datasets: facepipe's embedded default data and its test data.

Real face datasets are large, licensed and not always at hand, yet every stage of facepipe
(alignment-free training, imbalance-aware losses, cluster search, verification metrics) needs
*some* identity-labelled images to run end to end. This module renders stylised faces whose
identity is carried by geometry (face outline, eye layout, nose, mouth, hairline), colours and an
identity-specific skin texture, while every image of an identity is perturbed by strong nuisance
variation (pose, lighting, colour cast, occluders, background, blur, sensor noise).

The nuisance is deliberately strong enough that raw pixel similarity is close to chance for
verification, so a model has to learn identity rather than match pixels; the identity signal is
still fully present (render with ``nuisance=0`` to see the canonical face of an identity).

Layout written by :func:`generate_dataset`::

    out_dir/synth.json               arguments, renderer version and per-identity counts
    out_dir/id_00000/0.png ...       one folder per identity, named by the GLOBAL identity index

Every image is a pure function of ``(seed, global identity index, image index)``, so datasets
are byte-identical across runs, independent of rendering order, and a held-out set is just the
same seed with a different ``first_identity``.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from facepipe.errors import UsageError
from facepipe.runtime.io import OutputError, write_bytes_atomic, write_json_atomic

__all__ = [
    "DISTRIBUTIONS",
    "IdentityParams",
    "generate_dataset",
    "identity_counts",
    "identity_name",
    "render_face",
    "sample_identity",
]

DISTRIBUTIONS = ("power", "zipf", "uniform")

# Bumped whenever the pixels produced for given arguments change, so a resumed run never mixes
# images from two renderer versions inside one dataset.
RENDER_VERSION = 2

META_NAME = "synth.json"

# Distinguishes the identity-parameter stream from the per-image streams
# default_rng([seed, identity, n]): a spawn key is hashed separately from the entropy, so no
# (seed, identity, n) triple can ever reproduce an identity's parameter stream.
_IDENTITY_STREAM = 0x1D5EED

# Drawing happens on fixed-point coordinates (cv2 "shift") so sub-pixel feature positions
# survive the 2x supersampling instead of snapping to the 2x grid.
_SHIFT = 3
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA


# --------------------------------------------------------------------------------------------
# Long-tailed identity sizes
# --------------------------------------------------------------------------------------------
def _round_half_up(x: np.ndarray) -> np.ndarray:
    """Round half away from zero for positive values (hand computations expect 2.5 -> 3)."""
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5)


def identity_counts(num_identities: int, distribution: str = "power", max_images: int = 60,
                    min_images: int = 2, gamma: float = 1.0) -> np.ndarray:
    """Images per identity for a long-tailed synthetic dataset, largest class first.

    Identity ``c`` (1-based rank) gets ``n_c`` images:

    * ``"power"``: the power law of the CLMLE paper (Huang et al., "Deep Imbalanced Learning
      for Face Recognition and Attribute Prediction", TPAMI 2019, Sec. 5.5),
      ``f(c) = L_max / (c**gamma + L_min)`` with ``L_max``/``L_min`` the largest/smallest class
      sizes. The printed formula leaves the normalisation open (taken literally, class 1 would
      get ``L_max / (1 + L_min)`` images, not ``L_max``). Our reading multiplies by
      ``(1 + L_min)`` so that ``f(1) = L_max`` exactly:
      ``n_c = max(min_images, round(max_images * (1 + min_images) / (c**gamma + min_images)))``.
    * ``"zipf"``: ``n_c = max(min_images, round(max_images * c**(-gamma)))``.
    * ``"uniform"``: every identity gets ``max_images``.

    ``round`` is round-half-up (``25.5 -> 26``). The result is non-increasing in ``c``, starts
    at ``max_images`` and never drops below ``min_images``.

    Returns an ``int64`` array of length ``num_identities``. Raises ``ValueError`` for an
    unknown distribution, non-positive counts, ``min_images > max_images`` or a negative
    (or non-finite) ``gamma``.
    """
    if distribution not in DISTRIBUTIONS:
        raise UsageError(f"unknown distribution {distribution!r}; valid: {', '.join(DISTRIBUTIONS)}")
    for name, value in (("num_identities", num_identities), ("max_images", max_images),
                        ("min_images", min_images)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise UsageError(f"{name} must be an integer, got {value!r}")
        if value <= 0:
            raise UsageError(f"{name} must be positive, got {value}")
    if min_images > max_images:
        raise UsageError(f"min_images ({min_images}) must not exceed max_images ({max_images})")
    gamma = float(gamma)
    if not math.isfinite(gamma) or gamma < 0:
        # A negative exponent would make the tail *larger* than the head.
        raise UsageError(f"gamma must be a finite number >= 0, got {gamma}")

    c = np.arange(1, int(num_identities) + 1, dtype=np.float64)
    if distribution == "uniform":
        return np.full(int(num_identities), int(max_images), dtype=np.int64)
    if distribution == "power":
        raw = max_images * (1.0 + min_images) / (c ** gamma + min_images)
    else:  # zipf
        raw = max_images * c ** (-gamma)
    counts = np.maximum(int(min_images), _round_half_up(raw)).astype(np.int64)
    return counts


# --------------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IdentityParams:
    """Everything that makes one synthetic identity recognisable, fixed across its images.

    Lengths are relative: ``face_w``/``face_h`` are half-axes as fractions of the shorter image
    side; feature sizes and offsets are fractions of the face half-width (``*_w``, spacing) or
    half-height (vertical offsets), so an identity keeps its proportions at any image size.
    Colours are RGB floats in 0..255. The dataclass is hashable, which lets the renderer cache
    per-identity precomputations (texture, face mask).
    """

    index: int
    # Face outline: ellipse on top, superellipse below; jaw < 2 is a pointed chin, > 2 square.
    face_w: float
    face_h: float
    jaw: float
    ear_size: float
    skin: tuple[float, float, float]
    # Eyes: vertical position above the face centre, half-distance between eye centres, half
    # width of the eye opening, height/width ratio, tilt in degrees, iris colour.
    eye_y: float
    eye_spacing: float
    eye_w: float
    eye_h: float
    eye_tilt: float
    iris: tuple[float, float, float]
    # Eyebrows: gap above the eye (fraction of face_h), thickness (fraction of face_w), angle in
    # degrees (positive lifts the outer end), length relative to the eye width.
    brow_gap: float
    brow_thickness: float
    brow_angle: float
    brow_len: float
    # Nose: length from eye level (fraction of face_h), half-width of the tip (of face_w).
    nose_len: float
    nose_w: float
    # Mouth: position below the face centre (of face_h), half-width (of face_w), curvature
    # (positive smiles), lip thickness (of face_h), lip colour.
    mouth_y: float
    mouth_w: float
    mouth_curve: float
    lip_thickness: float
    lip: tuple[float, float, float]
    # Hair: colour, style (0 bald, 1 plain, 2 widow's peak, 3 receding, 4 side fringe,
    # 5 straight bangs), hairline height above the centre (of face_h), temple/sideburn height,
    # volume around the head, long hair falling to the shoulders, fringe direction.
    hair: tuple[float, float, float]
    hair_style: int
    hairline: float
    temple: float
    hair_volume: float
    hair_long: bool
    fringe_dir: int
    # Optional attributes: beard (0 none, 1 full, 2 goatee, 3 moustache), glasses (0 none,
    # 1 round, 2 rectangular), frame colour, tinted lenses, moles/freckles at fixed positions
    # as (u, v, r) in face half-axis units.
    beard: int
    glasses: int
    glasses_color: tuple[float, float, float]
    sunglasses: bool
    moles: tuple[tuple[float, float, float], ...]
    mole_color: tuple[float, float, float]
    # Low-frequency skin texture: seed of the noise field and its relative amplitude.
    texture_seed: int
    texture_strength: float

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (for logging or inspecting an identity)."""
        return asdict(self)


_SKIN_DARK = np.array([58.0, 38.0, 27.0])
_SKIN_LIGHT = np.array([250.0, 220.0, 196.0])
_HAIR_PALETTE = np.array([
    [22, 18, 16],      # black
    [55, 38, 26],      # dark brown
    [105, 72, 44],     # brown
    [150, 72, 34],     # auburn / red
    [212, 178, 118],   # blonde
    [168, 166, 162],   # grey
    [235, 232, 225],   # white
    [70, 60, 140],     # dyed blue/purple
    [190, 70, 120],    # dyed pink
], dtype=np.float64)
_HAIR_PROBS = np.array([0.24, 0.22, 0.16, 0.08, 0.12, 0.08, 0.04, 0.03, 0.03])
_IRIS_PALETTE = np.array([
    [38, 26, 18], [92, 56, 30], [130, 98, 52], [66, 110, 172], [78, 122, 72], [120, 130, 142],
], dtype=np.float64)


def _color(base: np.ndarray, rng: np.random.Generator, jitter: float) -> tuple[float, float, float]:
    """``base`` plus Gaussian jitter, clipped to 0..255, as a cv2-ready colour tuple."""
    value = np.clip(base + rng.normal(0.0, jitter, 3), 0.0, 255.0)
    return (float(value[0]), float(value[1]), float(value[2]))


def sample_identity(seed: int, identity_index: int) -> IdentityParams:
    """Draw the parameters of identity ``identity_index`` of the synthetic population ``seed``.

    Deterministic in ``(seed, identity_index)`` and independent of every other identity, so any
    subset of identities can be rendered in any order. Parameter ranges are wide on purpose:
    identities must stay separable by geometry alone once colours are disturbed by lighting.
    """
    for name, value in (("seed", seed), ("identity_index", identity_index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    ss = np.random.SeedSequence([int(seed), int(identity_index)], spawn_key=(_IDENTITY_STREAM,))
    rng = np.random.default_rng(ss)
    u = rng.uniform

    tone = u(0.0, 1.0)
    skin_base = _SKIN_DARK + (_SKIN_LIGHT - _SKIN_DARK) * tone
    # Undertone: some skins redder, some more yellow/olive.
    skin_base = skin_base + np.array([1.0, 0.0, -1.0]) * u(-12.0, 12.0) + np.array([0.0, 1.0, 0.0]) * u(-8.0, 8.0)
    skin = _color(skin_base, rng, 4.0)

    hair_idx = int(rng.choice(len(_HAIR_PALETTE), p=_HAIR_PROBS))
    hair = _color(_HAIR_PALETTE[hair_idx], rng, 12.0)
    iris = _color(_IRIS_PALETTE[int(rng.integers(len(_IRIS_PALETTE)))], rng, 10.0)
    lip = _color(np.asarray(skin) * np.array([0.86, 0.58, 0.58]) + np.array([18.0, 0.0, 4.0]), rng, 8.0)

    eye_y = u(0.04, 0.28)
    nose_len = u(0.24, 0.50)
    # Keep the mouth below the nose tip whatever the nose length and eye height.
    mouth_y = min(0.74, (nose_len - eye_y) + u(0.12, 0.28))
    brow_gap = u(0.10, 0.22)
    # The hairline must clear the eyebrows or the hair cap would cover them.
    hairline = max(eye_y + brow_gap + u(0.16, 0.26), u(0.45, 0.82))

    style_draw = rng.choice(6, p=[0.08, 0.30, 0.14, 0.14, 0.20, 0.14])
    hair_long = bool(u() < 0.35) and style_draw != 0
    beard = int(rng.choice(4, p=[0.58, 0.16, 0.11, 0.15]))
    glasses = int(rng.choice(3, p=[0.72, 0.14, 0.14]))
    sunglasses = bool(glasses and u() < 0.2)
    glasses_color = _color(np.array([u(0, 200), u(0, 160), u(0, 160)]), rng, 0.0)

    n_moles = int(rng.choice(4, p=[0.35, 0.3, 0.2, 0.15]))
    moles = [(u(-0.65, 0.65), u(-0.45, 0.75), u(0.018, 0.045)) for _ in range(n_moles)]
    if u() < 0.2:
        # Freckles: a fixed spray over the cheeks and nose.
        for _ in range(int(rng.integers(12, 30))):
            moles.append((u(-0.6, 0.6), u(-0.05, 0.35), u(0.008, 0.016)))
    mole_color = _color(np.asarray(skin) * 0.55, rng, 6.0)

    return IdentityParams(
        index=int(identity_index),
        face_w=u(0.24, 0.33),
        face_h=u(0.32, 0.41),
        jaw=u(1.45, 3.4),
        ear_size=u(0.10, 0.20),
        skin=skin,
        eye_y=eye_y,
        eye_spacing=u(0.30, 0.52),
        eye_w=u(0.13, 0.23),
        eye_h=u(0.38, 0.72),
        eye_tilt=u(-12.0, 12.0),
        iris=iris,
        brow_gap=brow_gap,
        brow_thickness=u(0.03, 0.10),
        brow_angle=u(-18.0, 24.0),
        brow_len=u(0.9, 1.5),
        nose_len=nose_len,
        nose_w=u(0.10, 0.26),
        mouth_y=mouth_y,
        mouth_w=u(0.26, 0.52),
        mouth_curve=u(-0.35, 0.45),
        lip_thickness=u(0.03, 0.09),
        lip=lip,
        hair=hair,
        hair_style=int(style_draw),
        hairline=hairline,
        temple=u(0.0, 0.35),
        hair_volume=u(0.0, 0.25),
        hair_long=hair_long,
        fringe_dir=int(rng.choice([-1, 1])),
        beard=beard,
        glasses=glasses,
        glasses_color=glasses_color,
        sunglasses=sunglasses,
        moles=tuple(moles),
        mole_color=mole_color,
        texture_seed=int(rng.integers(0, 2**31 - 1)),
        texture_strength=u(0.08, 0.22),
    )


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _fx(v: float) -> int:
    """A length in pixels as a cv2 fixed-point integer (``_SHIFT`` fractional bits)."""
    return int(round(v * _ONE))


def _pt(x: float, y: float) -> tuple[int, int]:
    """A point in pixels as a cv2 fixed-point integer pair."""
    return (_fx(x), _fx(y))


def _poly(points: np.ndarray) -> np.ndarray:
    """An ``(N, 2)`` float polygon as the fixed-point int32 array cv2.fillPoly expects."""
    return np.round(np.asarray(points, dtype=np.float64) * _ONE).astype(np.int32).reshape(-1, 1, 2)


def _ellipse(img: np.ndarray, c: tuple[float, float], axes: tuple[float, float], angle: float,
             color: Any, thickness: int = -1, start: float = 0.0, end: float = 360.0) -> None:
    """cv2.ellipse with float centre/half-axes (sub-pixel) and anti-aliasing."""
    cv2.ellipse(img, _pt(*c), (max(1, _fx(axes[0])), max(1, _fx(axes[1]))), angle, start, end,
                color, thickness, _AA, _SHIFT)


def _face_outline(cx: float, cy: float, fw: float, fh: float, jaw: float, n: int = 72) -> np.ndarray:
    """Closed face contour: elliptic cranium, superelliptic lower face (the jaw shape)."""
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    x = fw * c
    y = fh * s
    lower = s > 0  # image y grows downwards, so sin > 0 is the lower half
    e = 2.0 / jaw
    x[lower] = fw * np.sign(c[lower]) * np.abs(c[lower]) ** e
    y[lower] = fh * np.abs(s[lower]) ** e
    return np.stack([cx + x, cy + y], axis=1)


def _canvas_geometry(identity: IdentityParams, h2: int, w2: int) -> tuple[float, float, float, float]:
    """Face centre and half-axes in canvas pixels: ``(cx, cy, fw, fh)``."""
    unit = float(min(h2, w2))
    return w2 / 2.0, h2 * 0.53, identity.face_w * unit, identity.face_h * unit


@functools.lru_cache(maxsize=128)
def _identity_gain(identity: IdentityParams, h2: int, w2: int) -> np.ndarray:
    """Per-identity multiplicative skin texture on the 2x canvas, uint8 with 128 = gain 1.

    Cached because it depends on nothing per image; the face outline never moves in the
    canonical frame (pose is applied afterwards by one affine warp).
    """
    rng = np.random.default_rng(identity.texture_seed)
    cx, cy, fw, fh = _canvas_geometry(identity, h2, w2)
    # Two octaves of smooth noise: blotches at face scale plus finer mottling. Mostly
    # luminance with a little chroma, like uneven skin.
    coarse = rng.standard_normal((5, 5, 1)).astype(np.float32)
    fine = rng.standard_normal((11, 11, 1)).astype(np.float32) * 0.45
    chroma = rng.standard_normal((5, 5, 3)).astype(np.float32) * 0.12
    field = (cv2.resize(coarse, (w2, h2), interpolation=cv2.INTER_CUBIC)[..., None]
             + cv2.resize(fine, (w2, h2), interpolation=cv2.INTER_CUBIC)[..., None]
             + cv2.resize(chroma, (w2, h2), interpolation=cv2.INTER_CUBIC))
    mask = np.zeros((h2, w2), np.uint8)
    cv2.fillPoly(mask, [_poly(_face_outline(cx, cy, fw, fh, identity.jaw))], 255, _AA, _SHIFT)
    mask = cv2.GaussianBlur(mask, (0, 0), 2.0).astype(np.float32) / 255.0
    gain = 1.0 + identity.texture_strength * np.clip(field, -2.5, 2.5) * mask[..., None]
    # Stored as uint8 with 128 = 1.0 so that applying it is one saturating cv2.multiply.
    gain = np.round(np.clip(gain, 0.3, 1.7) * 128.0).astype(np.uint8)
    gain.setflags(write=False)
    return gain


@functools.lru_cache(maxsize=16)
def _unit_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates normalised to [-1, 1], for lighting gradients."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x = x * (2.0 / max(w - 1, 1)) - 1.0
    y = y * (2.0 / max(h - 1, 1)) - 1.0
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


_NOISE_MARGIN = 64


@functools.lru_cache(maxsize=16)
def _noise_tile(h: int, w: int) -> np.ndarray:
    """Fixed unit Gaussian noise, cropped at a random offset per image.

    Drawing fresh normals costs more than the rest of the lighting stage together; a random
    crop of one fixed field is just as useless to a model as fresh noise, and deterministic.
    """
    tile = np.random.default_rng(0x5E75).standard_normal((h + _NOISE_MARGIN, w + _NOISE_MARGIN, 3))
    tile = tile.astype(np.float32)
    tile.setflags(write=False)
    return tile


def _random_color(rng: np.random.Generator) -> tuple[float, float, float]:
    """A uniformly random RGB colour."""
    c = rng.uniform(0.0, 255.0, 3)
    return (float(c[0]), float(c[1]), float(c[2]))


def _scaled(color: tuple[float, float, float], f: float) -> tuple[float, float, float]:
    """``color`` darkened (``f < 1``) or brightened, clipped to 0..255."""
    return tuple(float(min(255.0, max(0.0, v * f))) for v in color)  # type: ignore[return-value]


def _toward_grey(color: tuple[float, float, float], k: float) -> tuple[float, float, float]:
    """Blend a random colour toward mid-grey as the nuisance strength ``k`` drops below 1."""
    t = min(1.0, k)
    return tuple(128.0 + (c - 128.0) * t for c in color)  # type: ignore[return-value]


def _draw_background(img: np.ndarray, rng: np.random.Generator, k: float) -> None:
    """Random flat colour plus clutter shapes: the background must not identify anyone."""
    h, w = img.shape[:2]
    # cv2 fill: numpy broadcasting of a 3-tuple into a uint8 image is ~20x slower.
    cv2.rectangle(img, (0, 0), (w, h), _toward_grey(_random_color(rng), k), -1)
    n_clutter = int(rng.integers(1, 8))
    for _ in range(n_clutter):
        kind = int(rng.integers(4))
        color = _random_color(rng)
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        a, b = rng.uniform(0.05, 0.45) * w, rng.uniform(0.05, 0.45) * h
        if rng.uniform() >= k:  # weaker nuisance: fewer clutter shapes
            continue
        if kind == 0:
            cv2.rectangle(img, _pt(x - a, y - b), _pt(x + a, y + b), color, -1, _AA, _SHIFT)
        elif kind == 1:
            _ellipse(img, (x, y), (a, b), rng.uniform(0, 180), color)
        elif kind == 2:
            cv2.line(img, _pt(x - a, y - b), _pt(x + a, y + b), color, max(1, int(rng.uniform(0.01, 0.08) * w)), _AA, _SHIFT)
        else:
            pts = np.stack([rng.uniform(0, w, 4), rng.uniform(0, h, 4)], axis=1)
            cv2.fillPoly(img, [_poly(pts)], color, _AA, _SHIFT)


def _yaw_map(x: float, cx: float, fw: float, yaw: float, depth: float = 1.0) -> tuple[float, float]:
    """Move a feature as if the head (a vertical cylinder) turned by ``yaw`` radians.

    Returns the new x and the foreshortening factor for horizontal sizes at that point.
    """
    u = max(-0.97, min(0.97, (x - cx) / fw))
    phi = math.asin(u)
    turned = max(-1.45, min(1.45, phi + yaw * depth))
    return cx + math.sin(turned) * fw, max(0.25, math.cos(turned) / max(math.cos(phi), 1e-3))


def _yaw_map_x(x: np.ndarray, cx: float, fw: float, yaw: float) -> np.ndarray:
    """Vectorised x part of :func:`_yaw_map` for contours."""
    phi = np.arcsin(np.clip((x - cx) / fw, -0.97, 0.97))
    return cx + np.sin(np.clip(phi + yaw, -1.45, 1.45)) * fw


def _draw_face(img: np.ndarray, p: IdentityParams, rng: np.random.Generator, k: float) -> None:
    """Draw head, features, hair and accessories of ``p`` in the canonical frame of ``img``.

    Per-image expression/pose variation (yaw, gaze, smile, blink, open mouth) is drawn from
    ``rng`` and scaled by ``k``; identity geometry never changes.
    """
    h2, w2 = img.shape[:2]
    unit = float(min(h2, w2))
    cx, cy, fw, fh = _canvas_geometry(p, h2, w2)

    yaw = rng.uniform(-0.5, 0.5) * k
    pitch = rng.normal(0.0, 0.035) * k * fh
    smile = rng.normal(0.0, 0.14) * k
    mouth_open = rng.uniform() < 0.15 * k
    blink = rng.uniform() < 0.05 * k
    gaze = rng.uniform(-0.35, 0.35, 2) * k
    clothes = _random_color(rng)

    skin = p.skin
    shade = _scaled(skin, 0.82)
    # Neck and shoulders: a torso in random clothing.
    _ellipse(img, (cx, cy + fh + 0.55 * unit), (fw * 2.1, 0.42 * unit), 0.0, _toward_grey(clothes, k))
    cv2.rectangle(img, _pt(cx - 0.55 * fw, cy), _pt(cx + 0.55 * fw, cy + fh + 0.3 * unit), shade, -1, _AA, _SHIFT)

    hair = p.hair
    vol = p.hair_volume
    if p.hair_style != 0:
        head_ax = (fw * (1.06 + vol), fh * (1.05 + vol * 0.8))
        # Short hair covers only the cranium; a full ellipse would read as a hood.
        _ellipse(img, (cx, cy - 0.04 * fh), head_ax, 0.0, hair, -1, 0.0 if p.hair_long else 180.0, 360.0)
        if p.hair_long:
            top = cy - 0.1 * fh
            bottom = cy + fh * 1.25
            half = head_ax[0]
            pts = np.array([[cx - half, top], [cx + half, top], [cx + half * 1.05, bottom],
                            [cx - half * 1.05, bottom]])
            cv2.fillPoly(img, [_poly(pts)], hair, _AA, _SHIFT)

    # Ears: the far ear hides as the head turns.
    for side in (-1, 1):
        vis = max(0.0, 1.0 + 1.6 * side * yaw)
        if vis > 0.05:
            ear_x = cx + side * (fw * 0.97 + p.ear_size * fw * 0.4 * vis)
            _ellipse(img, (ear_x, cy - 0.05 * fh), (p.ear_size * fw * vis, p.ear_size * fw * 1.9), 0.0, shade)

    outline = _face_outline(cx, cy, fw, fh, p.jaw)
    cv2.fillPoly(img, [_poly(outline)], skin, _AA, _SHIFT)

    # Moles and freckles: fixed to the face, shifted by yaw like every inner feature.
    for mu, mv, mr in p.moles:
        mx, _ = _yaw_map(cx + mu * fw, cx, fw, yaw)
        cv2.circle(img, _pt(mx, cy + mv * fh + pitch), max(1, _fx(mr * fw)), p.mole_color, -1, _AA, _SHIFT)

    # Beard before the mouth so the lips stay visible.
    mouth_x, mouth_fs = _yaw_map(cx, cx, fw, yaw)
    mouth_cy = cy + p.mouth_y * fh + pitch
    mw = p.mouth_w * fw * mouth_fs
    beard_col = _scaled(hair, 0.9)
    if p.beard == 1:
        top = cy + max(0.05, p.mouth_y - 0.22) * fh
        lower = outline[outline[:, 1] > top]
        lower = lower[np.argsort(np.arctan2(lower[:, 1] - cy, lower[:, 0] - cx))]
        cv2.fillPoly(img, [_poly(lower)], beard_col, _AA, _SHIFT)
    elif p.beard == 2:
        _ellipse(img, (mouth_x, (mouth_cy + cy + fh) / 2.0 + 0.02 * fh),
                 (mw * 0.55, (cy + fh - mouth_cy) * 0.55), 0.0, beard_col)
    if p.beard in (1, 3):
        cv2.line(img, _pt(mouth_x - mw * 1.05, mouth_cy - 0.05 * fh), _pt(mouth_x + mw * 1.05, mouth_cy - 0.05 * fh),
                 beard_col, max(2, int(0.07 * fh)), _AA, _SHIFT)

    # Nose: a shaded ridge plus nostrils; it sticks out, so yaw moves it more.
    eye_cy = cy - p.eye_y * fh + pitch
    nose_top_x, _ = _yaw_map(cx, cx, fw, yaw, depth=0.9)
    nose_tip_x, nose_fs = _yaw_map(cx, cx, fw, yaw, depth=1.35)
    nose_tip_y = eye_cy + p.nose_len * fh
    nw = p.nose_w * fw * nose_fs
    ridge = np.array([[nose_top_x - 0.05 * fw, eye_cy], [nose_top_x + 0.05 * fw, eye_cy],
                      [nose_tip_x + nw * 0.7, nose_tip_y], [nose_tip_x - nw * 0.7, nose_tip_y]])
    cv2.fillPoly(img, [_poly(ridge)], _scaled(skin, 0.9), _AA, _SHIFT)
    _ellipse(img, (nose_tip_x, nose_tip_y), (nw, nw * 0.55), 0.0, _scaled(skin, 0.78))
    for side in (-1, 1):
        _ellipse(img, (nose_tip_x + side * nw * 0.5, nose_tip_y + nw * 0.2), (nw * 0.25, nw * 0.16), 0.0,
                 _scaled(skin, 0.35))

    # Mouth: lips around a parabolic centre line; smile and opening vary per image.
    curve = p.mouth_curve + smile
    xs = np.linspace(-1.0, 1.0, 15)
    # Image y grows downwards: a lower centre (corners up) is a smile.
    centre_y = mouth_cy + curve * mw * 0.35 * (1.0 - xs**2)
    bulge = np.sqrt(np.clip(1.0 - xs**2, 0.0, 1.0))
    lt = p.lip_thickness * fh
    gap = lt * 0.9 * bulge if mouth_open else 0.0 * bulge
    upper = np.stack([mouth_x + xs * mw, centre_y - gap / 2 - lt * bulge], axis=1)
    lower = np.stack([mouth_x + xs * mw, centre_y + gap / 2 + lt * 1.3 * bulge], axis=1)
    cv2.fillPoly(img, [_poly(np.concatenate([upper, lower[::-1]]))], p.lip, _AA, _SHIFT)
    if mouth_open:
        inner = np.concatenate([np.stack([mouth_x + xs * mw * 0.85, centre_y - gap / 2], 1),
                                np.stack([mouth_x + xs[::-1] * mw * 0.85, centre_y[::-1] + gap[::-1] / 2], 1)])
        cv2.fillPoly(img, [_poly(inner)], (40.0, 15.0, 15.0), _AA, _SHIFT)
    cv2.polylines(img, [_poly(np.stack([mouth_x + xs * mw, centre_y], 1))], False, _scaled(p.lip, 0.45),
                  max(1, int(0.012 * unit)), _AA, _SHIFT)

    # Eyes and eyebrows.
    eyes = []
    for side in (-1, 1):
        ex, fs = _yaw_map(cx + side * p.eye_spacing * fw, cx, fw, yaw)
        ew = p.eye_w * fw * fs
        eh = p.eye_w * fw * p.eye_h
        eyes.append((ex, ew, eh))
        tilt = -side * p.eye_tilt
        if blink:
            _ellipse(img, (ex, eye_cy), (ew, eh * 0.12), tilt, _scaled(skin, 0.45))
        else:
            _ellipse(img, (ex, eye_cy), (ew, eh), tilt, (238.0, 236.0, 230.0))
            ir = min(eh * 0.92, ew * 0.55)
            ix = ex + gaze[0] * (ew - ir)
            iy = eye_cy + gaze[1] * eh * 0.25
            cv2.circle(img, _pt(ix, iy), max(1, _fx(ir)), p.iris, -1, _AA, _SHIFT)
            cv2.circle(img, _pt(ix, iy), max(1, _fx(ir * 0.45)), (12.0, 10.0, 10.0), -1, _AA, _SHIFT)
            # Upper lid line gives the eye its shape even at low resolution.
            _ellipse(img, (ex, eye_cy), (ew, eh), tilt, (30.0, 22.0, 20.0), max(1, int(0.012 * unit)), 180.0, 360.0)
        by = eye_cy - p.brow_gap * fh
        bl = p.eye_w * fw * p.brow_len * fs
        rise = math.tan(math.radians(p.brow_angle)) * bl
        inner = (ex - side * bl * 0.9, by)
        outer = (ex + side * bl * 1.1, by - rise)
        cv2.line(img, _pt(*inner), _pt(*outer), _scaled(hair, 0.8) if p.hair_style else (60.0, 45.0, 35.0),
                 max(2, int(p.brow_thickness * fw)), _AA, _SHIFT)

    # Hair cap over the forehead, bounded below by the identity's hairline shape.
    if p.hair_style != 0:
        ax_x, ax_y = fw * (1.05 + vol), fh * (1.06 + vol * 0.8)
        y_side = cy - p.temple * fh
        s = min(0.99, p.temple * fh / ax_y)
        t = np.linspace(np.pi + math.asin(s), 2.0 * np.pi - math.asin(s), 28)
        outer = np.stack([cx + ax_x * np.cos(t), cy - 0.04 * fh + ax_y * np.sin(t)], axis=1)
        xs = np.linspace(0.95, -0.95, 31)
        y_top = cy - p.hairline * fh
        power = 8.0 if p.hair_style == 5 else 4.0
        hy = y_top + (y_side - y_top) * np.abs(xs / 0.95) ** power
        if p.hair_style == 2:
            hy = hy + 0.13 * fh * np.exp(-((xs / 0.13) ** 2))
        elif p.hair_style == 3:
            hy = hy - 0.2 * fh * np.exp(-(((np.abs(xs) - 0.45) / 0.18) ** 2))
        elif p.hair_style == 4:
            hy = hy + 0.32 * fh * np.clip(0.5 + 0.5 * p.fringe_dir * xs, 0.0, 1.0) * (1.0 - np.abs(xs) ** 4)
        elif p.hair_style == 5:
            hy = hy + 0.16 * fh * (1.0 - np.abs(xs) ** 8)
        # Hair follows the head when it turns, a little less than the inner features.
        hx = _yaw_map_x(cx + xs * fw, cx, fw, yaw * 0.5)
        pts = np.concatenate([outer, np.stack([hx, hy], axis=1)])
        cv2.fillPoly(img, [_poly(pts)], hair, _AA, _SHIFT)

    if p.glasses:
        th = max(2, int(0.018 * unit))
        inner_edges = []
        for side, (ex, ew, eh) in zip((-1, 1), eyes):
            r = p.eye_w * fw * 1.45
            rx = r * ew / (p.eye_w * fw)
            if p.sunglasses:
                _ellipse(img, (ex, eye_cy), (rx, r * 0.85), 0.0, _scaled(p.glasses_color, 0.25))
            if p.glasses == 1:
                _ellipse(img, (ex, eye_cy), (rx, r * 0.85), 0.0, p.glasses_color, th)
            else:
                cv2.rectangle(img, _pt(ex - rx, eye_cy - r * 0.7), _pt(ex + rx, eye_cy + r * 0.7),
                              p.glasses_color, th, _AA, _SHIFT)
            inner_edges.append(ex - side * rx)
            cv2.line(img, _pt(ex + side * rx, eye_cy - r * 0.3), _pt(cx + side * fw * 0.98, eye_cy - r * 0.1),
                     p.glasses_color, th, _AA, _SHIFT)
        cv2.line(img, _pt(inner_edges[0], eye_cy - 0.2 * fw * p.eye_w),
                 _pt(inner_edges[1], eye_cy - 0.2 * fw * p.eye_w), p.glasses_color, th, _AA, _SHIFT)


def _draw_occluders(img: np.ndarray, rng: np.random.Generator, k: float) -> None:
    """Random rectangles, ellipses and bars over the face (hands, microphones, hats, text)."""
    h, w = img.shape[:2]
    unit = float(min(h, w))
    count = int(rng.choice(4, p=[0.4, 0.35, 0.17, 0.08]))
    for _ in range(count):
        kind = int(rng.integers(3))
        color = _random_color(rng)
        x, y = rng.uniform(0.15, 0.85) * w, rng.uniform(0.2, 0.95) * h
        a, b = rng.uniform(0.05, 0.24) * unit, rng.uniform(0.05, 0.24) * unit
        angle = rng.uniform(0.0, 180.0)
        if rng.uniform() >= k:  # weaker nuisance: fewer occluders
            continue
        if kind == 0:
            cv2.rectangle(img, _pt(x - a, y - b), _pt(x + a, y + b), color, -1, _AA, _SHIFT)
        elif kind == 1:
            _ellipse(img, (x, y), (a, b), angle, color)
        else:
            dx, dy = math.cos(math.radians(angle)) * unit, math.sin(math.radians(angle)) * unit
            cv2.line(img, _pt(x - dx, y - dy), _pt(x + dx, y + dy), color, max(2, int(b * 0.45)), _AA, _SHIFT)


def render_face(identity: IdentityParams, rng: np.random.Generator, size: tuple[int, int] = (112, 112),
                *, nuisance: float = 1.0) -> np.ndarray:
    """Render one image of ``identity`` as an ``(H, W, 3)`` uint8 RGB array, ``size = (H, W)``.

    All per-image variation comes from ``rng``: in-plane rotation, scale and translation,
    yaw-like turning of the inner features, expression, background colour and clutter, clothes,
    occluders, directional and global lighting, contrast, gamma, colour cast, blur and sensor
    noise. The same identity with identically seeded generators renders identical pixels.

    ``nuisance`` scales that variation (1 = the dataset setting, 0 = the canonical, frontal,
    evenly lit face on a grey background, handy for inspecting identities; in between, pose and
    lighting amplitudes shrink linearly and clutter, occluders and expressions get rarer;
    ``generate_dataset`` always uses 1). The canvas is drawn
    at twice the target resolution and reduced with area averaging, which anti-aliases edges.
    """
    if len(size) != 2:
        raise ValueError(f"size must be (height, width), got {size!r}")
    h, w = int(size[0]), int(size[1])
    if h < 16 or w < 16:
        raise ValueError(f"size must be at least 16x16, got {size!r}")
    k = float(nuisance)
    if not 0.0 <= k <= 2.0:
        raise ValueError(f"nuisance must lie in [0, 2], got {nuisance}")
    h2, w2 = 2 * h, 2 * w

    canvas = np.empty((h2, w2, 3), np.uint8)
    _draw_background(canvas, rng, k)
    _draw_face(canvas, identity, rng, k)
    # Skin texture is multiplicative and lives in the face's own frame, so it is applied before
    # the pose warp, which then moves texture and features together.
    canvas = cv2.multiply(canvas, _identity_gain(identity, h2, w2), scale=1.0 / 128.0)
    img = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA)

    # Pose: one in-plane similarity warp at the target resolution (a 2x warp costs 4x as much
    # and its extra sharpness is lost to the blur/noise that follow anyway).
    angle = float(np.clip(rng.normal(0.0, 9.0), -22.0, 22.0)) * k
    scale = math.exp(float(np.clip(rng.normal(0.0, 0.11), -0.25, 0.25)) * k)
    shift = rng.normal(0.0, 0.065, 2) * k * min(h, w)
    if k > 0:
        m = cv2.getRotationMatrix2D((w / 2.0, h * 0.53), angle, scale)
        m[0, 2] += shift[0]
        m[1, 2] += shift[1]
        img = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    _draw_occluders(img, rng, k)

    # Lighting: directional gradient x global brightness x per-channel colour cast, then
    # contrast about mid-grey, folded into a single gain map and offset.
    xg, yg = _unit_grid(h, w)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    strength = rng.uniform(0.0, 0.75) * k
    bright = math.exp(rng.normal(0.0, 0.25) * k)
    cast = np.exp(rng.normal(0.0, 0.2, 3) * k).astype(np.float32)
    contrast = math.exp(rng.normal(0.0, 0.22) * k)
    gamma = math.exp(rng.normal(0.0, 0.3) * k)
    light = (1.0 + strength * (math.cos(theta) * xg + math.sin(theta) * yg)) * np.float32(bright * contrast)
    f = img.astype(np.float32)
    f *= light[..., None]
    f *= cast
    f += np.float32(128.0 * (1.0 - contrast))
    np.clip(f, 0.0, 255.0, out=f)
    out = f.astype(np.uint8)
    if abs(gamma - 1.0) > 1e-6:
        lut = np.clip(np.round(255.0 * (np.arange(256) / 255.0) ** gamma), 0, 255).astype(np.uint8)
        out = cv2.LUT(out, lut)

    blur = rng.uniform(0.3, 1.4) * k if rng.uniform() < 0.5 else 0.0
    if blur > 0.05:
        out = cv2.GaussianBlur(out, (0, 0), blur)
    noise_sigma = rng.uniform(0.0, 9.0) * k
    oy, ox = int(rng.integers(0, _NOISE_MARGIN)), int(rng.integers(0, _NOISE_MARGIN))
    if noise_sigma > 0.05:
        f = out.astype(np.float32)
        f += _noise_tile(h, w)[oy:oy + h, ox:ox + w] * np.float32(noise_sigma)
        np.clip(f, 0.0, 255.0, out=f)
        out = f.astype(np.uint8)
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------------------------
# Datasets on disk
# --------------------------------------------------------------------------------------------
def identity_name(global_index: int) -> str:
    """Folder name of a global identity index (``id_00042``)."""
    return f"id_{int(global_index):05d}"


def _encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB image (cv2 encodes BGR, hence the swap)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("cv2.imencode failed to encode a PNG")
    return buf.tobytes()


def _check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int, or a ValueError naming ``name`` if it is not an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def generate_dataset(out_dir, num_identities: int, seed: int = 0, distribution: str = "power",
                     max_images: int = 60, min_images: int = 2, gamma: float = 1.0,
                     size: tuple[int, int] = (112, 112), first_identity: int = 0,
                     images_per_identity: int | None = None, progress: bool = True) -> dict:
    """Render a synthetic identity dataset to ``out_dir/<identity>/<n>.png``; resumable.

    Identity ``i`` (0-based) of the dataset is the global identity ``first_identity + i`` and is
    stored under ``identity_name(first_identity + i)``; it gets ``identity_counts(...)[i]``
    images, or ``images_per_identity`` each when that is given (for balanced held-out sets).
    Image ``n`` of global identity ``g`` is rendered from ``np.random.default_rng([seed, g, n])``,
    so the bytes depend only on the arguments, not on order or parallelism. A held-out set is
    the same ``seed`` with a ``first_identity`` past the training range.

    ``out_dir/synth.json`` records the arguments, the renderer version and the counts. An
    existing non-empty ``out_dir`` is accepted only when its ``synth.json`` has identical
    arguments: then only missing images are rendered (nothing at all when complete) and
    existing files are left untouched. Anything else raises ``ValueError`` rather than mixing
    datasets. Every file is written atomically.

    Returns ``{"root": absolute path, "identities": [names], "counts": [ints],
    "num_images": int}``.
    """
    num_identities = _check_int("num_identities", num_identities, 1)
    seed = _check_int("seed", seed, 0)
    first_identity = _check_int("first_identity", first_identity, 0)
    if distribution not in DISTRIBUTIONS:
        raise UsageError(f"unknown distribution {distribution!r}; valid: {', '.join(DISTRIBUTIONS)}")
    if len(size) != 2:
        raise UsageError(f"size must be (height, width), got {size!r}")
    size_hw = (_check_int("size[0] (height)", size[0], 16), _check_int("size[1] (width)", size[1], 16))
    if images_per_identity is None:
        counts = identity_counts(num_identities, distribution, max_images, min_images, gamma).tolist()
    else:
        per = _check_int("images_per_identity", images_per_identity, 1)
        counts = [per] * num_identities
    counts = [int(c) for c in counts]

    arguments = {
        "num_identities": num_identities,
        "seed": seed,
        "distribution": distribution,
        "max_images": int(max_images),
        "min_images": int(min_images),
        "gamma": float(gamma),
        "size": [size_hw[0], size_hw[1]],
        "first_identity": first_identity,
        "images_per_identity": None if images_per_identity is None else int(images_per_identity),
    }
    global_ids = [first_identity + i for i in range(num_identities)]
    names = [identity_name(g) for g in global_ids]
    meta = {
        "generator": "facepipe.data.synth",
        "render_version": RENDER_VERSION,
        "arguments": arguments,
        "identity_name_format": "id_%05d of the global identity index",
        "num_images": int(sum(counts)),
        "counts": counts,
    }

    root = Path(out_dir).expanduser().resolve()
    meta_path = root / META_NAME
    if root.exists() and not root.is_dir():
        raise OutputError(f"out_dir {str(root)!r} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        try:
            existing = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise OutputError(
                f"out_dir {str(root)!r} is not empty and has no {META_NAME}: refusing to write a "
                "synthetic dataset into a foreign folder; pick an empty or new folder") from None
        except (OSError, ValueError) as exc:
            raise OutputError(f"out_dir {str(root)!r} has an unreadable {META_NAME} ({exc}); refusing to "
                             "overwrite it") from None
        # Compare as JSON would store them (tuples become lists, ints stay ints).
        wanted = json.loads(json.dumps({"render_version": RENDER_VERSION, "arguments": arguments}))
        found = {"render_version": existing.get("render_version"), "arguments": existing.get("arguments")}
        if found["render_version"] != RENDER_VERSION and found["arguments"] == wanted["arguments"]:
            raise OutputError(
                f"out_dir {str(root)!r} was rendered by synth renderer version {found['render_version']}, "
                f"this is version {RENDER_VERSION}; its images would not match, so use a new folder "
                "(or delete this one)")
        if found != wanted:
            raise OutputError(
                f"out_dir {str(root)!r} holds a synthetic dataset made with different arguments "
                f"(found {found}, wanted {wanted}); use another folder or the same arguments")
    else:
        root.mkdir(parents=True, exist_ok=True)
        # Written first: if rendering is interrupted, the next call recognises the folder as
        # ours and only fills in what is missing.
        write_json_atomic(meta_path, meta)

    todo = [(i, n) for i, (name, count) in enumerate(zip(names, counts))
            for n in range(count) if not (root / name / f"{n}.png").is_file()]
    if todo:
        identities: dict[int, IdentityParams] = {}
        with tqdm(total=len(todo), desc=f"synth {root.name}", unit="img", disable=not progress) as bar:
            for i, n in todo:
                g = global_ids[i]
                if i not in identities:
                    identities = {i: sample_identity(seed, g)}  # todo is grouped by identity
                img = render_face(identities[i], np.random.default_rng([seed, g, n]), size_hw)
                write_bytes_atomic(root / names[i] / f"{n}.png", _encode_png(img))
                bar.update(1)

    return {"root": str(root), "identities": names, "counts": counts, "num_images": int(sum(counts))}
