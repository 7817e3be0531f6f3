"""Decoding arbitrary image files for alignment, with a status instead of an exception.

Pillow decodes here, not OpenCV: the reference MTCNN detections were made on Pillow's RGB
decode, and Pillow reads EXIF orientation, CMYK, palette and 16-bit files. Every failure becomes a
status string that goes into the alignment manifest; nothing raises past ``decode_for_alignment``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Statuses of images that could not be used, in the order the summary lists them.
DECODE_FAILURES = ("empty", "not_image", "truncated", "too_large", "unreadable")

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass
class DecodedImage:
    """An RGB uint8 image (``pixels``), or the reason there is none (``status`` != "ok")."""

    status: str
    pixels: np.ndarray | None = None
    detail: str = ""
    mode: str = ""  # Pillow mode of the file, e.g. RGB, L, CMYK, P, RGBA, I;16
    exif_rotated: bool = False
    warnings: list[str] = field(default_factory=list)


def _to_rgb(image: Image.Image) -> np.ndarray:
    """RGB uint8 pixels of any Pillow mode; 16-bit and float grey are rescaled, not clipped."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            low, high = float(values.min()), float(values.max())
            values = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        else:
            values = values / 257.0  # full 16-bit range onto 0..255
        grey = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow warns when converting transparent palettes directly
    # Alpha is dropped as the reference decode (convert("RGB")) does.
    return np.asarray(image.convert("RGB"))


def decode_for_alignment(path: str | Path, apply_exif: bool = True) -> DecodedImage:
    """Decode ``path`` to RGB uint8, applying the EXIF orientation when ``apply_exif``.

    Statuses: ok, empty (zero bytes), not_image (no decoder recognises it), truncated,
    too_large (beyond Pillow's decompression-bomb limit), unreadable (any other decode error).
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return DecodedImage("empty", detail="file has zero bytes")
    except OSError as exc:
        return DecodedImage("unreadable", detail=f"cannot stat file: {exc}")
    caught: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as recorded:
            warnings.simplefilter("always")
            with Image.open(path) as image:
                mode = image.mode
                image.load()
                rotated = False
                if apply_exif:
                    orientation = image.getexif().get(0x0112, 1)
                    if orientation not in (1, None):
                        image = ImageOps.exif_transpose(image)
                        rotated = True
                pixels = _to_rgb(image)
            caught = [str(w.message) for w in recorded]
    except Image.DecompressionBombError as exc:
        return DecodedImage("too_large", detail=str(exc))
    except UnidentifiedImageError:
        return DecodedImage("not_image", detail="not an image format Pillow can read")
    except OSError as exc:
        status = "truncated" if "truncated" in str(exc).lower() else "unreadable"
        return DecodedImage(status, detail=str(exc))
    except Exception as exc:  # corrupt files reach many code paths of the decoders
        return DecodedImage("unreadable", detail=f"{type(exc).__name__}: {exc}")
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.size == 0:
        return DecodedImage("unreadable", detail=f"decoded to an unusable array of shape {pixels.shape}")
    return DecodedImage("ok", np.ascontiguousarray(pixels), mode=mode, exif_rotated=rotated, warnings=caught)
