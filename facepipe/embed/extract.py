"""Embeddings of image files with a checkpoint's model (:func:`embed_paths`), and the ``facepipe
embed`` job that writes them as an embeddings folder. The model and its forward pass are
:mod:`facepipe.models.loaded`'s."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from facepipe.data.dataset import IMAGE_EXTENSIONS, DatasetError
from facepipe.embed.folder import EMBED_RECORD, EMBEDDINGS_FILE, MANIFEST_FILE, MANIFEST_HEADER
from facepipe.models.loaded import LoadedModel, load_model
from facepipe.models.onnx_backend import OnnxModel
from facepipe.runtime.device import resolve_device
from facepipe.runtime.distributed import barrier, gather_rows, init_distributed, rank_slice
from facepipe.runtime.io import (
    OutputError,
    atomic_folder,
    describe_parts,
    save_npy_atomic,
    write_csv_atomic,
    write_json_atomic,
)
from facepipe.utils.names import check_identity_name
from facepipe.utils.walk import walk_tree

log = logging.getLogger(__name__)


def embed_paths(
    model: str | Path | LoadedModel | OnnxModel,
    paths: Sequence[str],
    flip: str | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, dict]:
    """Embeddings of the image files ``paths``, in order, with a checkpoint's model: the one
    way every job (embed, eval, index, search) turns a checkpoint and images into embeddings.

    ``model``: a checkpoint or ``.onnx`` file (loaded on ``device`` with
    :func:`~facepipe.models.loaded.load_model`'s checks) or a loaded
    :class:`~facepipe.models.loaded.LoadedModel` / :class:`~facepipe.models.onnx_backend.OnnxModel`
    (already on its device; ``device`` is then not used). The images are embedded by :meth:`LoadedModel.embed
    <facepipe.models.loaded.LoadedModel.embed>`: read at the checkpoint's input size; flip fusion
    is ``flip`` or else the config's ``embed.flip``, the batch size ``batch_size`` or else
    ``embed.batch_size``, and the forward runs under the config's mixed precision (``train.amp``,
    CUDA only).

    Returns ``(embeddings, info)``: L2-normalised float32 rows and ``{"checkpoint",
    "model_fingerprint", "flip"}``.
    """
    loaded = load_model(model, device if isinstance(device, torch.device) else resolve_device(device)) \
        if isinstance(model, (str, os.PathLike)) else model
    flip = flip or loaded.flip
    embeddings = loaded.embed(list(paths), flip=flip, batch_size=batch_size, num_workers=num_workers,
                              progress=progress)
    return embeddings, {"checkpoint": loaded.checkpoint_path, "model_fingerprint": loaded.fingerprint, "flip": flip}


def list_images(root: str | Path) -> list[tuple[str, str]]:
    """``(path, identity)`` for every image under ``root``, sorted; identity = parent folder
    relative to root ('' for images directly in root). Linked folders are followed, as training
    follows them (:func:`facepipe.utils.walk.walk_tree`)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")
    suffixes = set(IMAGE_EXTENSIONS)
    items = []
    for path in walk_tree(root, suffixes).files:
        parent = path.parent.relative_to(root)
        identity = "" if str(parent) == "." else parent.as_posix()
        items.append((str(path), check_identity_name(identity, f"image folder {path.parent}")))
    if not items:
        raise DatasetError(f"no images under {root} (extensions: {', '.join(sorted(suffixes))})")
    return items


def check_embeddings_destination(out: str | Path) -> None:
    """Refuse an ``out`` that is a file or a non-empty folder of something other than embeddings:
    replacing it would delete what it holds. An earlier embeddings folder may be replaced."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder; choose a new --out")
    if out.is_dir() and any(out.iterdir()) and not (out / EMBED_RECORD).is_file():
        raise OutputError(f"{out} is not empty and holds no {EMBED_RECORD} (it is not an embeddings folder, which "
                          "would be replaced as a whole); choose a new or empty --out")


def write_embeddings_folder(out: str | Path, embeddings: np.ndarray, items: Sequence[tuple[str, str]],
                            info: dict) -> dict:
    """Write ``out`` as one unit: ``embeddings.npy``, ``manifest.csv`` (row, path, identity of
    ``items``) and ``embed.json`` (``info`` plus ``parts``), all in a temporary folder renamed
    into place; a failure anywhere leaves the previous ``out`` as it was. An earlier embeddings
    folder at ``out`` is replaced; anything else is refused. Returns the record written."""
    check_embeddings_destination(out)
    if len(items) != len(embeddings):
        raise ValueError(f"{len(items)} manifest rows for {len(embeddings)} embeddings")
    with atomic_folder(out, replace=True) as staging:
        save_npy_atomic(staging / EMBEDDINGS_FILE, embeddings)
        write_csv_atomic(staging / MANIFEST_FILE, list(MANIFEST_HEADER),
                         ((row, path, identity) for row, (path, identity) in enumerate(items)))
        record = {**info, "parts": describe_parts(staging, [EMBEDDINGS_FILE, MANIFEST_FILE])}
        write_json_atomic(staging / EMBED_RECORD, record)
    return record


def embed_folder(
    checkpoint: str | Path,
    images: str | Path,
    out: str | Path,
    flip: str | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    num_workers: int = 2,
    progress: bool = True,
) -> dict:
    """``facepipe embed``: embeddings of every image under ``images`` into ``out``.

    Writes ``embeddings.npy`` (float32, L2-normalised, one row per image), ``manifest.csv``
    (row, path, identity) and ``embed.json`` (model fingerprint, flip mode, counts, and the size
    and SHA-256 of the other two) as one unit (:func:`write_embeddings_folder`): an earlier
    embeddings folder at ``out`` is replaced whole or not at all; another non-empty folder is
    refused before any work.

    Under torchrun each rank embeds a contiguous share of the images and rank 0 writes the one
    output, in the same order as a single process would.
    """
    check_embeddings_destination(out)
    ctx, torch_device = init_distributed(device)
    loaded = load_model(checkpoint, torch_device)
    items = list_images(images)
    paths = [path for path, _ in items]
    share, embedded = embed_paths(loaded, paths[rank_slice(len(paths), ctx)], flip=flip, batch_size=batch_size,
                                  num_workers=num_workers, progress=progress and ctx.is_main)
    flip = embedded["flip"]
    embeddings = gather_rows(ctx, share)
    # On every rank (all hold every row), so that no rank waits at the barrier for one that stopped.
    broken = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    if len(broken):
        raise OutputError(f"{len(broken)} of {len(paths)} embeddings hold NaN or infinite values (first: "
                          f"{paths[broken[0]]}); nothing was written to {out}: check the checkpoint and the "
                          "mixed-precision setting (train.amp) of its config")
    out = Path(out)
    summary = {
        "checkpoint": str(checkpoint),
        "model_fingerprint": loaded.fingerprint,
        "images": str(images),
        "num_images": len(paths),
        "num_identities": len({identity for _, identity in items}),
        "dimension": int(embeddings.shape[1]),
        "flip": flip,
    }
    if ctx.is_main:
        write_embeddings_folder(out, embeddings, items, summary)
        log.info("wrote %d embeddings of dimension %d to %s", len(paths), embeddings.shape[1], out)
    barrier(ctx)  # end together: no rank is torn down while rank 0 still writes
    return summary
