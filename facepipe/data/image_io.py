"""The one image reader of every stage: align, training (identity folders and ``.rec`` records),
``embed``, ``search``, ``index build`` and ``eval`` (image files and ``.bin`` sets).

"The same image" means the same bytes give the same HxWx3 uint8 RGB array in every stage: the
EXIF orientation is applied, grey and palette images become three channels, alpha is dropped,
16-bit grey is scaled by 1/257 (rounded), 16-bit colour keeps the high byte (Pillow reads it so;
at most 1 level from x/257), float grey is stretched to 0..255, CMYK is converted.

Pillow decodes, not OpenCV: ``Image.open`` reads only the header, so the size is checked against
the limits before a single pixel is allocated (OpenCV allocates first, or raises its own error
type on a header it refuses), and Pillow reads EXIF orientation, CMYK and palettes. Every error
of any decoder becomes an :class:`UnreadableImageError` whose ``status`` is one of
:data:`DECODE_FAILURES` and whose message names the file and the reason.

Limits (:class:`ImageLimits`): at most ``FACEPIPE_MAX_IMAGE_PIXELS`` pixels (default 178,956,970,
the size Pillow refused for align before, about 540 MB as RGB) and ``FACEPIPE_MAX_IMAGE_SIDE``
pixels on either side (default 65,535, the largest side a JPEG can have). The environment is
the one place they are set, so that every command and every worker process (DataLoader workers,
align's spawned pool) applies the same ones; :func:`set_image_limits` sets them from Python.
"""
from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from facepipe.errors import FacepipeUserError, UsageError

__all__ = [
    "DECODE_FAILURES", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_SIDE", "MAX_PIXELS_ENV", "MAX_SIDE_ENV",
    "DecodedPixels", "ImageLimits", "UnreadableImageError", "image_limits", "read_image", "read_image_info",
    "set_image_limits",
]

# Why an image could not be used, in the order align's summary lists them.
DECODE_FAILURES = ("empty", "not_image", "truncated", "too_large", "unreadable")

DEFAULT_MAX_PIXELS = 178_956_970
DEFAULT_MAX_SIDE = 65_535
MAX_PIXELS_ENV = "FACEPIPE_MAX_IMAGE_PIXELS"
MAX_SIDE_ENV = "FACEPIPE_MAX_IMAGE_SIDE"

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_EXIF_ORIENTATION = 0x0112
_MESSAGE = re.compile(r"cannot read image (?P<source>.*) \((?P<status>%s)\): (?P<detail>.*)"
                      % "|".join(DECODE_FAILURES))


class UnreadableImageError(OSError, FacepipeUserError):
    """An image that cannot be used: ``status`` (one of :data:`DECODE_FAILURES`), ``source``
    (the file, or what holds the bytes) and ``detail`` (the reason)."""

    def __init__(self, message: str, status: str | None = None, source: str | None = None,
                 detail: str | None = None) -> None:
        if status is None:
            message = str(message)
            if message.startswith("Caught ") and "\n" in message:
                # A DataLoader re-raises a worker's error as type(message) with the worker's
                # traceback in the message; its last line is "module.Class: original message".
                last = next(line for line in reversed(message.splitlines()) if line.strip())
                message = re.sub(r"^[\w.]+: ", "", last.strip(), count=1)
            found = _MESSAGE.search(message)
            if found:
                status, source, detail = found.group("status"), found.group("source"), found.group("detail")
        super().__init__(message)
        self.status = status or "unreadable"
        self.source = source or ""
        self.detail = detail if detail is not None else str(message)

    def __reduce__(self):
        return type(self), (str(self), self.status, self.source, self.detail)


def _failure(source: str, status: str, detail: str) -> UnreadableImageError:
    detail = " ".join(str(detail).split())  # one line: the CLI prints it as one
    return UnreadableImageError(f"cannot read image {source} ({status}): {detail}", status, source, detail)


# ----------------------------------------------------------------------------- limits
@dataclass(frozen=True)
class ImageLimits:
    """Images beyond either limit are refused (status ``too_large``) before being decoded."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = DEFAULT_MAX_SIDE


_parsed: dict[tuple[str | None, str | None], ImageLimits] = {}


def _positive(name: str, text: str | None, default: int) -> int:
    if text is None or not text.strip():
        return default
    try:
        value = int(text.strip().replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"environment variable {name}={text!r} must be a positive whole number of pixels")
    return value


def image_limits() -> ImageLimits:
    """The limits in force: ``FACEPIPE_MAX_IMAGE_PIXELS`` / ``FACEPIPE_MAX_IMAGE_SIDE``, else the
    defaults."""
    key = (os.environ.get(MAX_PIXELS_ENV), os.environ.get(MAX_SIDE_ENV))
    limits = _parsed.get(key)
    if limits is None:
        limits = ImageLimits(_positive(MAX_PIXELS_ENV, key[0], DEFAULT_MAX_PIXELS),
                             _positive(MAX_SIDE_ENV, key[1], DEFAULT_MAX_SIDE))
        pillow = Image.MAX_IMAGE_PIXELS
        if key[0] is not None and pillow is not None and limits.max_pixels > 2 * pillow:
            # Image.open refuses above twice Pillow's own limit, before facepipe's check: a limit
            # raised on purpose must not be capped by it. The defaults leave Pillow untouched.
            Image.MAX_IMAGE_PIXELS = limits.max_pixels
        _parsed[key] = limits
    return limits


def set_image_limits(max_pixels: int | None = None, max_side: int | None = None) -> ImageLimits:
    """Set the limits for this process and the processes it starts (None: the default); returns
    the previous ones."""
    previous = image_limits()
    for name, value in ((MAX_PIXELS_ENV, max_pixels), (MAX_SIDE_ENV, max_side)):
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = str(_positive(name, str(value), 0))
    image_limits()
    return previous


# ----------------------------------------------------------------------------- decoding
@dataclass
class DecodedPixels:
    """RGB uint8 ``pixels`` and what align records about them."""

    pixels: np.ndarray
    mode: str  # Pillow mode of the file, e.g. RGB, L, CMYK, P, RGBA, I;16
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
    # np.array, not np.asarray: Pillow's buffer is read-only, and augmentations write in place.
    return np.array(image if image.mode == "RGB" else image.convert("RGB"))


def _check_size(image: Image.Image, limits: ImageLimits) -> str | None:
    width, height = image.size
    if max(width, height) > limits.max_side:
        return (f"{width}x{height} pixels: a side above the limit of {limits.max_side:,} pixels "
                f"(set {MAX_SIDE_ENV} to change it)")
    if width * height > limits.max_pixels:
        return (f"{width}x{height} = {width * height:,} pixels exceeds the limit of {limits.max_pixels:,} pixels "
                f"(set {MAX_PIXELS_ENV} to change it)")
    return None


def read_image_info(source: str | os.PathLike | bytes | bytearray | memoryview | np.ndarray,
                    name: str | None = None, *, apply_exif: bool = True,
                    limits: ImageLimits | None = None) -> DecodedPixels:
    """Decode a file (a path) or encoded bytes to RGB uint8, the EXIF orientation applied when
    ``apply_exif``; ``name`` names bytes in errors. Raises :class:`UnreadableImageError`."""
    limits = limits or image_limits()
    if isinstance(source, (str, os.PathLike)):
        where = name or str(source)
        try:
            size = os.stat(source).st_size
        except OSError as exc:
            raise _failure(where, "unreadable", f"cannot stat file: {exc}") from None
        if size == 0:
            raise _failure(where, "empty", "file has zero bytes")
        opened: str | os.PathLike | io.BytesIO = source
    else:
        where = name or "<image bytes>"
        data = source.tobytes() if isinstance(source, np.ndarray) else bytes(source)
        if not data:
            raise _failure(where, "empty", "zero bytes")
        opened = io.BytesIO(data)
    try:
        with warnings.catch_warnings(record=True) as recorded:
            warnings.simplefilter("always")
            with Image.open(opened) as image:
                mode = image.mode
                too_large = _check_size(image, limits)
                if too_large:
                    raise _failure(where, "too_large", too_large)
                image.load()
                orientation = image.getexif().get(_EXIF_ORIENTATION, 1) if apply_exif else 1
                rotated = orientation in range(2, 9)
                if rotated:
                    image = ImageOps.exif_transpose(image)
                pixels = _to_rgb(image)
        # facepipe's limits decide; Pillow's bomb warning below them is noise.
        caught = [str(w.message) for w in recorded if not issubclass(w.category, Image.DecompressionBombWarning)]
    except UnreadableImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise _failure(where, "too_large", f"{exc} (set {MAX_PIXELS_ENV} to change the limit)") from None
    except UnidentifiedImageError:
        raise _failure(where, "not_image", "not an image format Pillow can read") from None
    except OSError as exc:
        status = "truncated" if "truncated" in str(exc).lower() else "unreadable"
        raise _failure(where, status, str(exc) or type(exc).__name__) from None
    except Exception as exc:  # corrupt files reach many code paths of the decoders
        raise _failure(where, "unreadable", f"{type(exc).__name__}: {exc}") from None
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.size == 0:
        raise _failure(where, "unreadable", f"decoded to an unusable array of shape {pixels.shape}")
    return DecodedPixels(np.ascontiguousarray(pixels), mode, rotated, caught)


def read_image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(height, width) of an image file as :func:`read_image` decodes it (EXIF orientation
    applied), from its header alone: no pixel is decoded. None when the file cannot be opened as
    an image (the reader reports why when it is read)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                width, height = image.size
                if image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # a quarter turn
                    width, height = height, width
    except Exception:  # missing, not an image, a damaged header or a decompression bomb
        return None
    return height, width


def read_image(source: str | os.PathLike | bytes | bytearray | memoryview | np.ndarray,
               name: str | None = None, *, limits: ImageLimits | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB pixels of a file or of encoded bytes (see :func:`read_image_info`)."""
    return read_image_info(source, name, limits=limits).pixels
