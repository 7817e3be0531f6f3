"""Decoding arbitrary image files for alignment, with a status instead of an exception.

The pixels come from :func:`facepipe.data.image_io.read_image_info`, the reader of every stage,
so an image is aligned exactly as training, ``embed`` and ``search`` see it (Pillow's RGB decode,
EXIF orientation applied, the same size limits). Every failure becomes a status string that goes
into the alignment manifest; nothing raises past ``decode_for_alignment``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facepipe.data.image_io import DECODE_FAILURES, UnreadableImageError, read_image_info

__all__ = ["DECODE_FAILURES", "MISSING", "DecodedImage", "decode_for_alignment"]

# An input that is listed (a list file's line, a link in the tree) but holds no file.
MISSING = "missing"


@dataclass
class DecodedImage:
    """An RGB uint8 image (``pixels``), or the reason there is none (``status`` != "ok")."""

    status: str
    pixels: np.ndarray | None = None
    detail: str = ""
    mode: str = ""  # Pillow mode of the file, e.g. RGB, L, CMYK, P, RGBA, I;16
    exif_rotated: bool = False
    warnings: list[str] = field(default_factory=list)


def decode_for_alignment(path: str | Path, apply_exif: bool = True) -> DecodedImage:
    """Decode ``path`` to RGB uint8, applying the EXIF orientation when ``apply_exif``.

    Statuses: ok, missing (no file there, e.g. a link whose target is gone), empty (zero
    bytes), not_image (no decoder recognises it), truncated, too_large (beyond the size limits
    of :mod:`facepipe.data.image_io`), unreadable (any other decode error).
    """
    try:
        os.stat(path)  # follows links: a broken one is missing too
    except FileNotFoundError:
        detail = f"broken link to {os.readlink(path)}" if os.path.islink(path) else "no such file"
        return DecodedImage(MISSING, detail=detail)
    except OSError:  # there but not reachable (permissions, a link loop): the reader says why
        pass
    try:
        decoded = read_image_info(path, apply_exif=apply_exif)
    except UnreadableImageError as exc:
        return DecodedImage(exc.status, detail=exc.detail)
    return DecodedImage("ok", decoded.pixels, mode=decoded.mode, exif_rotated=decoded.exif_rotated,
                        warnings=decoded.warnings)
