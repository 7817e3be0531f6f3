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
from facepipe.train.checkpoint import load_checkpoint, model_fingerprint
from facepipe.train.distributed import barrier, gather_rows, init_distributed, rank_slice
from facepipe.utils.device import autocast, resolve_amp_dtype
from facepipe.utils.io import save_npy_atomic, write_csv_atomic, write_json_atomic

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


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Backbone from a training checkpoint (the head is not needed for embeddings)."""
    state = load_checkpoint(checkpoint)
    config = Config.model_validate(state["config"])
    model = build_backbone(config.model, config.data.image_size)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return LoadedModel(model, config, list(state["identities"]), model_fingerprint(state["model"]), str(checkpoint))


def list_images(root: str | Path) -> list[tuple[str, str]]:
    """``(path, identity)`` for every image under ``root``, sorted; identity = parent folder
    relative to root ('' for images directly in root)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")
    suffixes = set(IMAGE_EXTENSIONS)
    items = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in suffixes:
            parent = path.parent.relative_to(root)
            items.append((str(path), "" if str(parent) == "." else parent.as_posix()))
    if not items:
        raise DatasetError(f"no images under {root} (extensions: {', '.join(sorted(suffixes))})")
    return items


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
    (row, path, identity) and ``embed.json`` (model fingerprint, flip mode, counts).

    Under torchrun each rank embeds a contiguous share of the images and rank 0 writes the one
    output, in the same order as a single process would.
    """
    ctx, torch_device = init_distributed(device)
    loaded = load_model(checkpoint, torch_device)
    flip = flip or loaded.config.embed.flip
    items = list_images(images)
    paths = [path for path, _ in items]
    embeddings = gather_rows(ctx, extract_embeddings(
        loaded.model, paths[rank_slice(len(paths), ctx)], loaded.config.data.image_size, torch_device,
        batch_size=batch_size or loaded.config.embed.batch_size, flip=flip, num_workers=num_workers,
        amp_dtype=resolve_amp_dtype(loaded.config.train.amp, torch_device), progress=progress and ctx.is_main,
    ))
    out = Path(out)
    if ctx.is_main:
        save_npy_atomic(out / "embeddings.npy", embeddings)
        write_csv_atomic(out / "manifest.csv", ["row", "path", "identity"],
                         ((row, path, identity) for row, (path, identity) in enumerate(items)))
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
        write_json_atomic(out / "embed.json", summary)
        log.info("wrote %d embeddings of dimension %d to %s", len(paths), embeddings.shape[1], out)
    barrier(ctx)  # end together: no rank is torn down while rank 0 still writes
    return summary
