"""A checkpoint's backbone loaded for inference (:class:`LoadedModel`, :func:`load_model`) and the
one forward pass that turns images into embeddings (flip fusion, mixed precision, L2
normalisation): what every stage (embed, eval, index, the trainer's validation) runs a model with.

It builds the checkpoint's backbone (:func:`facepipe.models.build_backbone`) and reads images with
the eval transform (:mod:`facepipe.data`), so it sits in models, above data, and not in runtime.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from facepipe.config import Config
from facepipe.models import build_backbone
from facepipe.runtime.checkpoint import (
    CheckpointError,
    checkpoint_config,
    load_checkpoint,
    load_weights,
    model_fingerprint,
)
from facepipe.models.forward import FLIP_MODES, EmbeddingModel, embed_batches, image_dataset
from facepipe.runtime.device import autocast, resolve_amp_dtype

if TYPE_CHECKING:
    from facepipe.models.onnx_backend import OnnxModel



def extract_embeddings(model: nn.Module, paths: Sequence[str], image_size: tuple[int, int], device: torch.device,
                       **options: Any) -> np.ndarray:
    """L2-normalised float32 embeddings of the image files ``paths``, in order; ``options`` are
    :func:`embed_dataset`'s (batch_size, flip, num_workers, amp_dtype, progress)."""
    return embed_dataset(model, image_dataset(paths, image_size), device, **options)


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
    """:func:`embed_batches` with a PyTorch model on ``device`` under ``amp_dtype``. The model is
    put in eval mode and every module is restored to its previous mode afterwards."""
    if flip not in FLIP_MODES:
        raise ValueError(f"unknown flip mode '{flip}'; choose one of {FLIP_MODES}")

    def forward(batch: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp_dtype):
            return model(batch.to(device, non_blocking=True))

    # Per module, not model.train(was_training): a mid-epoch call (CLMLE re-clustering) must not
    # switch a stage's frozen BatchNorm layers back to batch statistics.
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        return embed_batches(forward, images, batch_size, flip, num_workers, progress, normalize,
                             pin_memory=device.type == "cuda")
    finally:
        for module, training in modes.items():
            module.train(training)


@dataclass
class LoadedModel(EmbeddingModel):
    """A checkpoint's backbone on its device, in eval mode, with what it was trained with: its
    config (input size, flip fusion, mixed precision), identity list and weight fingerprint."""

    model: nn.Module
    config: Config
    identities: list[str]
    fingerprint: str
    checkpoint_path: str
    device: torch.device = torch.device("cpu")

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the images are read at: the config's ``data.image_size``."""
        return self.config.data.image_size

    @property
    def flip(self) -> str:
        """Flip fusion by default: the config's ``embed.flip``."""
        return self.config.embed.flip

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """Autocast dtype of the forward: the config's ``train.amp`` on this device (CUDA only)."""
        return resolve_amp_dtype(self.config.train.amp, self.device)

    @property
    def default_batch_size(self) -> int:
        """The config's ``embed.batch_size``."""
        return self.config.embed.batch_size

    def _embed(self, paths_or_array: Sequence[str] | np.ndarray | torch.Tensor, flip: str, batch_size: int,
               num_workers: int, progress: bool) -> np.ndarray:
        # The forward runs under :attr:`amp_dtype`.
        options = dict(batch_size=batch_size, flip=flip, num_workers=num_workers, amp_dtype=self.amp_dtype,
                       progress=progress)
        dataset = image_dataset(paths_or_array, self.input_size)
        if isinstance(dataset, TensorDataset):
            return embed_dataset(self.model, dataset, self.device, **options)
        return extract_embeddings(self.model, list(paths_or_array), self.input_size, self.device, **options)


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


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> "LoadedModel | OnnxModel":
    """Backbone from a training checkpoint (the head is not needed for embeddings), or an ``.onnx``
    embedding network in ONNX Runtime (:mod:`facepipe.models.onnx_backend`; a
    :class:`~facepipe.models.onnx_backend.ModelFile` carries the preprocessing the user stated for
    a foreign one). Both embed with the same ``embed()``."""
    from facepipe.models.onnx_backend import ModelFile, OnnxModelError, is_onnx, load_onnx_model

    contract = checkpoint.contract if isinstance(checkpoint, ModelFile) else None
    if is_onnx(checkpoint):
        return load_onnx_model(checkpoint, device, contract)
    if contract is not None:
        raise OnnxModelError(f"{checkpoint}: the --input-* options describe a foreign .onnx model; a facepipe "
                             "checkpoint carries its own preprocessing (leave them out)")
    if isinstance(checkpoint, ModelFile):
        checkpoint = checkpoint.path
    state = load_checkpoint(checkpoint)
    config = checkpoint_config(state, checkpoint)
    model = build_backbone(config.model, config.data.image_size)
    load_weights(model, state["model"], checkpoint)
    _check_finite_weights(state["model"], checkpoint)
    model.to(device).eval()
    return LoadedModel(model, config, list(state["identities"]), model_fingerprint(state["model"]), str(checkpoint),
                       torch.device(device))
