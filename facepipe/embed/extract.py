"""Batched embedding extraction with flip fusion, and the ``facepipe embed`` job."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from facepipe.config import Config
from facepipe.data.dataset import IMAGE_EXTENSIONS, DatasetError, ImageListDataset
from facepipe.data.transforms import build_eval_transform
from facepipe.models import build_backbone
from facepipe.train.checkpoint import (
    CheckpointError,
    checkpoint_config,
    load_checkpoint,
    load_weights,
    model_fingerprint,
)
from facepipe.embed.folder import EMBED_RECORD, EMBEDDINGS_FILE, MANIFEST_FILE, MANIFEST_HEADER
from facepipe.train.distributed import barrier, gather_rows, init_distributed, rank_slice
from facepipe.utils.device import autocast, resolve_amp_dtype, resolve_device
from facepipe.utils.io import (
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

FLIP_MODES = ("sum", "concat", "none")


def extract_embeddings(
    model: nn.Module,
    paths: Sequence[str],
    image_size: tuple[int, int],
    device: torch.device,
    batch_size: int = 128,
    flip: str = "sum",
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> np.ndarray:
    """L2-normalised float32 embeddings of the image files ``paths``, in order (see
    :func:`embed_dataset`)."""
    return embed_dataset(model, ImageListDataset(paths, build_eval_transform(image_size)), device, batch_size,
                         flip, num_workers, amp_dtype, progress)


@torch.no_grad()
def embed_dataset(
    model: nn.Module,
    images: Dataset,
    device: torch.device,
    batch_size: int = 128,
    flip: str = "sum",
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    normalize: bool = True,
) -> np.ndarray:
    """L2-normalised (``normalize=False``: raw) float32 embeddings of a dataset of ``(image,
    position)`` items, in order.

    Flip fusion: ``sum`` adds the embeddings of the image and its mirror, ``concat`` stacks them
    (twice the dimension), ``none`` uses the image alone. The model is put in eval mode and
    every module is restored to its previous mode afterwards.
    """
    if flip not in FLIP_MODES:
        raise ValueError(f"unknown flip mode '{flip}'; choose one of {FLIP_MODES}")
    # Per module, not model.train(was_training): a mid-epoch call (CLMLE re-clustering) must not
    # switch a stage's frozen BatchNorm layers back to batch statistics.
    modes = {module: module.training for module in model.modules()}
    model.eval()
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    chunks: list[torch.Tensor] = []
    try:
        for images, _ in tqdm(loader, desc="embed", unit="batch", disable=not progress, leave=False):
            images = images.to(device, non_blocking=True)
            if flip != "none":
                # One forward over image and mirror together halves the number of launches.
                both = torch.cat([images, images.flip(-1)])
                with autocast(device, amp_dtype):
                    out = model(both).float()
                plain, mirrored = out.chunk(2)
                feats = plain + mirrored if flip == "sum" else torch.cat([plain, mirrored], dim=1)
            else:
                with autocast(device, amp_dtype):
                    feats = model(images).float()
            chunks.append((nn.functional.normalize(feats, dim=1) if normalize else feats).cpu())
    finally:
        for module, training in modes.items():
            module.train(training)
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(chunks).numpy().astype(np.float32)


@dataclass
class LoadedModel:
    model: nn.Module
    config: Config
    identities: list[str]
    fingerprint: str
    checkpoint_path: str
    device: torch.device = torch.device("cpu")


def _check_finite_weights(weights: dict, checkpoint: str | Path) -> None:
    # One NaN weight makes every embedding NaN: each later stage would write, index and score
    # NaN vectors (cosine NaN ranks as neither match nor mismatch) with exit status 0.
    bad = [(name, int((~torch.isfinite(tensor)).sum())) for name, tensor in weights.items()
           if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        shown = ", ".join(f"{name} ({count})" for name, count in bad[:3])
        raise CheckpointError(f"checkpoint {checkpoint}: {len(bad)} weight tensor(s) hold NaN or infinite values "
                              f"({shown}{' ...' if len(bad) > 3 else ''}); the run diverged before it was saved: "
                              "use an earlier checkpoint")


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Backbone from a training checkpoint (the head is not needed for embeddings)."""
    state = load_checkpoint(checkpoint)
    config = checkpoint_config(state, checkpoint)
    model = build_backbone(config.model, config.data.image_size)
    load_weights(model, state["model"], checkpoint)
    _check_finite_weights(state["model"], checkpoint)
    model.to(device).eval()
    return LoadedModel(model, config, list(state["identities"]), model_fingerprint(state["model"]), str(checkpoint),
                       torch.device(device))


def embed_paths(
    model: str | Path | LoadedModel,
    paths: Sequence[str],
    flip: str | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, dict]:
    """Embeddings of the image files ``paths``, in order, with a checkpoint's model: the one
    way every job (embed, eval, index, search) turns a checkpoint and images into embeddings.

    ``model``: a checkpoint (loaded on ``device`` with :func:`load_model`'s checks) or a
    :class:`LoadedModel` (already on its device; ``device`` is then not used). The images are
    read at the checkpoint's input size; flip fusion is ``flip`` or else the config's
    ``embed.flip``, the batch size ``batch_size`` or else ``embed.batch_size``, and the forward
    runs under the config's mixed precision (``train.amp``, CUDA only).

    Returns ``(embeddings, info)``: L2-normalised float32 rows (see :func:`extract_embeddings`)
    and ``{"checkpoint", "model_fingerprint", "flip"}``.
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(
        model, device if isinstance(device, torch.device) else resolve_device(device))
    config = loaded.config
    flip = flip or config.embed.flip
    embeddings = extract_embeddings(
        loaded.model, list(paths), config.data.image_size, loaded.device,
        batch_size=batch_size or config.embed.batch_size, flip=flip, num_workers=num_workers,
        amp_dtype=resolve_amp_dtype(config.train.amp, loaded.device), progress=progress,
    )
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
