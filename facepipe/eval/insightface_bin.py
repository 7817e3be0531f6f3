"""``facepipe eval bin``: verification on insightface ``.bin`` sets (``lfw.bin``, ``cfp_fp.bin``,
``agedb_30.bin``, ...), read without MXNet.

Format (insightface ``recognition/.../eval/verification.py``, ``load_bin``): a pickle of
``(bins, issame_list)``; ``bins`` holds 2 N encoded images (JPEG/PNG bytes), pair i being images
2i and 2i+1, and ``issame_list`` N same/different flags. Files written by Python 2 store the
images as ``str``, hence ``pickle.load(..., encoding="bytes")``.

A pickle can run arbitrary code while it is loaded, and these files are downloaded from
third-party mirrors, so they are read by :class:`RestrictedUnpickler`: the only globals it
resolves are the two needed to rebuild ``bytes`` from a protocol-2 pickle written by Python 3
(``_codecs.encode`` with the latin-1 codec, and ``bytes()``/``bytearray()`` with no argument),
each replaced by a checked wrapper. Any other global, or a persistent id, raises
:class:`UnsafePickleError` before anything is called. The unpickler also allocates whatever
size a string, a frame or a memo index announces before reading it, so the opcodes are first
walked once with each announced size checked against the file's (:func:`_check_announced_sizes`):
a file of a few bytes cannot ask for gigabytes.

Protocol: the same 10-fold cross-validation as LFW, over 10 contiguous folds of the pairs in
file order (insightface's ``KFold(n_splits=10, shuffle=False)``; for ``lfw.bin`` these are the
official View 2 folds).
"""
from __future__ import annotations

import os
import pickle
import pickletools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from facepipe.embed.folder import load_npy
from facepipe.eval.report import EvalReport, Table, verification_rows, write_report
from facepipe.eval.verification import EvalInputError, cosine_scores, evaluate_verification

__all__ = ["BinPairs", "RestrictedUnpickler", "UnsafePickleError", "evaluate_bin", "load_bin"]

_JPEG = b"\xff\xd8"
_PNG = b"\x89PNG\r\n\x1a\n"
_BMP = b"BM"


class UnsafePickleError(EvalInputError, pickle.UnpicklingError):
    """The pickle asks for something outside the few harmless types a .bin file needs."""


def _latin1_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(str, "latin1"); only that call is let
    # through, so the codec machinery cannot be steered to anything else.
    # The codec name is compared as text, never looked up: a lookup may import modules.
    codec = encoding.lower().replace("-", "").replace("_", "") if isinstance(encoding, str) else None
    if not isinstance(text, str) or codec not in ("latin1", "iso88591", "l1") or errors != "strict":
        raise UnsafePickleError(f"_codecs.encode is only allowed as encode(str, 'latin1'), got "
                                f"({type(text).__name__}, {encoding!r}, {errors!r})")
    return text.encode("latin-1")


def _empty_bytes(*args: Any) -> bytes:
    # bytes() is how protocol 2 spells b''; bytes(n) would allocate n bytes, so no argument at all.
    if args:
        raise UnsafePickleError("bytes(...) is only allowed without arguments")
    return b""


def _empty_bytearray(*args: Any) -> bytearray:
    if args:
        raise UnsafePickleError("bytearray(...) is only allowed without arguments")
    return bytearray()


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`ALLOWED_GLOBALS`; everything else raises
    :class:`UnsafePickleError` (nothing is imported or called)."""

    ALLOWED_GLOBALS = {
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "bytes"): _empty_bytes,
        ("__builtin__", "bytes"): _empty_bytes,
        ("builtins", "bytearray"): _empty_bytearray,
        ("__builtin__", "bytearray"): _empty_bytearray,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: a .bin file holds only lists of image bytes and "
                "booleans, so this pickle is not one (or it tries to run code)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing to load a persistent id: not a .bin verification file")


# Opcodes whose argument is a memo index: the C unpickler grows its memo table to twice the
# largest index before storing into it, so a few bytes naming index 2**32 make it fill tens of GB.
# A real pickle numbers its objects from 0, each at least one byte of the file.
_MEMO_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


class _SizeCheckedReader:
    """The file as :func:`pickletools.genops` reads it, refusing any read longer than what is left
    of the file: a length a pickle announces is checked before anything of that size exists."""

    def __init__(self, handle: Any, size: int, path: Path) -> None:
        self._handle, self._size, self._path = handle, size, path

    def tell(self) -> int:
        return self._handle.tell()

    def readline(self) -> bytes:
        return self._handle.readline()

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._handle.tell()
        if n is None or n < 0:
            n = left
        if n > left:
            raise EvalInputError(f"{self._path}: not a readable pickle: at byte {self._handle.tell()} it announces {n} "
                                 f"bytes, but only {left} follow (a truncated file, or not a .bin set)")
        return self._handle.read(n)


def _check_announced_sizes(handle: Any, path: Path) -> None:
    """Walk the pickle's opcodes (without building anything) and refuse lengths, frames and memo
    indices larger than the file: unpickling allocates what they announce before reading it."""
    size = os.fstat(handle.fileno()).st_size
    reader = _SizeCheckedReader(handle, size, path)
    try:
        for opcode, arg, position in pickletools.genops(reader):
            if opcode.name == "FRAME" and arg > size - reader.tell():
                raise EvalInputError(f"{path}: not a readable pickle: at byte {position} it announces a frame of {arg} "
                                     f"bytes, but only {size - reader.tell()} follow (a truncated file, or not a .bin "
                                     "set)")
            if opcode.name in _MEMO_OPCODES and arg > size:
                raise EvalInputError(f"{path}: not a readable pickle: at byte {position} it stores object number "
                                     f"{arg} in a file of {size} bytes (not a .bin set)")
    except EvalInputError:
        raise
    except (ValueError, EOFError, UnicodeDecodeError) as exc:
        raise EvalInputError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    handle.seek(0)


@dataclass(eq=False)
class BinPairs:
    """An insightface verification set: encoded images, pair i = images 2i and 2i+1."""

    path: str
    images: list[bytes]
    is_same: np.ndarray  # bool, one per pair

    def __len__(self) -> int:
        return int(self.is_same.shape[0])


def load_bin(path: str | os.PathLike) -> BinPairs:
    """Read a ``.bin`` verification set safely (see the module docstring) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f".bin file {path} does not exist")
    with open(path, "rb") as handle:
        _check_announced_sizes(handle, path)
        try:
            loaded = RestrictedUnpickler(handle, encoding="bytes").load()
        except UnsafePickleError as exc:
            raise UnsafePickleError(f"{path}: {exc}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
                AttributeError, UnicodeDecodeError) as exc:
            raise EvalInputError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(loaded, (tuple, list)) or len(loaded) != 2:
        raise EvalInputError(f"{path}: expected a pickled pair (bins, issame_list), got {type(loaded).__name__}")
    bins, flags = loaded
    if not isinstance(bins, list) or not isinstance(flags, list):
        raise EvalInputError(f"{path}: bins and issame_list must be lists, got "
                             f"{type(bins).__name__} and {type(flags).__name__}")
    for i, item in enumerate(bins):
        if not isinstance(item, (bytes, bytearray)):
            raise EvalInputError(f"{path}: image {i} is a {type(item).__name__}, not encoded image bytes")
        if not bytes(item[:8]).startswith((_JPEG, _PNG, _BMP)):
            raise EvalInputError(f"{path}: image {i} is neither JPEG, PNG nor BMP data")
    for i, flag in enumerate(flags):
        if not (isinstance(flag, bool) or (isinstance(flag, int) and flag in (0, 1))):
            raise EvalInputError(f"{path}: issame_list[{i}] is {flag!r}, not a boolean")
    if len(bins) != 2 * len(flags):
        raise EvalInputError(f"{path}: {len(bins)} images for {len(flags)} pairs; expected exactly 2 per pair")
    if not flags:
        raise EvalInputError(f"{path}: no pairs")
    return BinPairs(path=str(path), images=[bytes(b) for b in bins], is_same=np.asarray(flags, dtype=bool))


def _embed_bin_images(pairs: BinPairs, checkpoint, flip, device, batch_size, progress):
    from facepipe.data.image_io import UnreadableImageError
    from facepipe.eval.lfw import embed_files

    # The extractor reads files (and the reader sniffs the format from the bytes, not the name),
    # so the images are written as they are into a temporary folder instead of re-implementing
    # batching and flip fusion for in-memory images.
    with tempfile.TemporaryDirectory(prefix="facepipe-bin-") as tmp:
        width = len(str(len(pairs.images)))
        keys = []
        for i, data in enumerate(tqdm(pairs.images, desc="unpack .bin", unit="img", disable=not progress,
                                      leave=False)):
            key = f"{i:0{width}d}.img"
            (Path(tmp) / key).write_bytes(data)
            keys.append(key)
        try:
            return embed_files(checkpoint, tmp, keys, flip=flip, device=device, batch_size=batch_size,
                               progress=progress)
        except UnreadableImageError as exc:
            # The temporary file name means nothing to the user: name the image in the .bin.
            name = Path(exc.source).name
            if name not in keys:
                raise
            number = keys.index(name)
            source = f"{number} (pair {number // 2}) of {pairs.path}"
            raise UnreadableImageError(f"cannot read image {source} ({exc.status}): {exc.detail}", exc.status,
                                       source, exc.detail) from None


def evaluate_bin(
    bin_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    embeddings: str | os.PathLike | None = None,
    n_folds: int = 10,
    fars: Sequence[float] = (1e-3, 1e-4),
    flip: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
) -> dict:
    """``facepipe eval bin``: 10-fold verification on an insightface ``.bin`` set.

    Images are embedded with ``checkpoint`` (its flip fusion unless ``flip``), or ``embeddings``
    is a ``.npy`` with one row per image of the file, in file order. Writes ``metrics.json``,
    ``report.md``, ``roc.png`` and ``scores.csv``; returns ``{"metrics", "summary"}``.
    """
    if (checkpoint is None) == (embeddings is None):
        raise EvalInputError("give either a checkpoint or precomputed embeddings (.npy), not both or neither")
    pairs = load_bin(bin_path)
    fingerprint = None
    if embeddings is not None:
        try:
            vectors = load_npy(embeddings, error=EvalInputError)
        except OSError as exc:
            raise EvalInputError(f"cannot read embeddings {embeddings}: {exc}") from None
        if vectors.ndim != 2 or vectors.shape[0] != len(pairs.images):
            raise EvalInputError(f"embeddings {embeddings} have shape {vectors.shape}; {pairs.path} holds "
                                 f"{len(pairs.images)} images")
        flip_used = None
    else:
        table = _embed_bin_images(pairs, checkpoint, flip, device, batch_size, progress)
        vectors, fingerprint, flip_used = table.vectors, table.model_fingerprint, table.flip
    first = np.arange(0, len(pairs.images), 2)
    scores = cosine_scores(vectors, first, first + 1)
    result = evaluate_verification(scores, pairs.is_same, n_folds=n_folds, fars=fars)
    name = Path(pairs.path).name
    metrics = {
        "protocol": {"name": f"insightface verification set {name}",
                     "variant": f"{n_folds}-fold cross-validation over contiguous folds in file order",
                     "threshold_source": result.threshold_source,
                     "tar_at_far": "interpolated linearly on the ROC curve",
                     "score": "cosine similarity of L2-normalised embeddings"},
        "model_fingerprint": fingerprint,
        "data": {"bin": str(bin_path), "embeddings": str(embeddings) if embeddings is not None else None},
        "model": {"checkpoint": str(checkpoint) if checkpoint is not None else None, "flip": flip_used},
        "counts": {"pairs": len(pairs), "matched": int(pairs.is_same.sum()),
                   "mismatched": int((~pairs.is_same).sum()), "images": len(pairs.images)},
        "verification": result.to_dict(),
    }
    folds = np.empty(len(pairs), dtype=np.int64)
    for k, part in enumerate(np.array_split(np.arange(len(pairs)), n_folds)):
        folds[part] = k
    rows = ((i, int(folds[i]) + 1, 2 * i, 2 * i + 1, int(pairs.is_same[i]), f"{scores[i]:.6f}")
            for i in range(len(pairs)))
    label = f"{Path(str(checkpoint or embeddings)).name} (AUC {result.auc:.3f})"
    report = EvalReport(
        title=f"Verification on {name}",
        metrics=metrics,
        summary_rows=verification_rows(result),
        protocol_notes=[
            f"{len(pairs)} pairs from {pairs.path} (read with a restricted unpickler)",
            f"{n_folds}-fold cross-validation over contiguous folds in file order; each fold's threshold is "
            "the best one on the other folds",
            "TAR at FAR is interpolated linearly on the ROC curve",
        ],
        tables=[Table("scores.csv", ("pair", "fold", "image_a", "image_b", "is_same", "score"), rows)],
        roc_curves={label: (result.fpr, result.tpr)},
        roc_title=name,
    )
    metrics = write_report(out, report)
    return {"metrics": metrics, "summary": f"{name}: {len(pairs)} pairs: {result.summary()} -> {out}"}
