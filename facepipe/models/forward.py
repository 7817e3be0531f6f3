"""The one embedding loop: batches of eval-transformed images through a forward function, with
flip fusion and L2 normalisation. A PyTorch model (:func:`facepipe.models.loaded.embed_dataset`)
and an ONNX Runtime session (:mod:`facepipe.models.onnx_backend`) both run through it, so their
embeddings differ only by what their forward computes."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm import tqdm

from facepipe.data.dataset import ImageListDataset
from facepipe.data.transforms import build_eval_transform

__all__ = ["FLIP_MODES", "EmbeddingModel", "embed_batches", "image_dataset"]

FLIP_MODES = ("sum", "concat", "none")


def embed_batches(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: Dataset,
    batch_size: int = 128,
    flip: str = "sum",
    num_workers: int = 0,
    progress: bool = False,
    normalize: bool = True,
    pin_memory: bool = False,
) -> np.ndarray:
    """L2-normalised (``normalize=False``: raw) float32 embeddings of a dataset of ``(image,
    position)`` items, in order, with ``forward`` (a CPU float batch ``[B, C, H, W]`` in the
    eval transform's scaling -> float embeddings ``[B, D]``): a PyTorch model
    (:func:`embed_dataset`) or an ONNX Runtime session (:mod:`facepipe.models.onnx_backend`).

    Flip fusion: ``sum`` adds the embeddings of the image and its mirror, ``concat`` stacks them
    (twice the dimension), ``none`` uses the image alone.
    """
    if flip not in FLIP_MODES:
        raise ValueError(f"unknown flip mode '{flip}'; choose one of {FLIP_MODES}")
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory)
    chunks: list[torch.Tensor] = []
    for batch, _ in tqdm(loader, desc="embed", unit="batch", disable=not progress, leave=False):
        if flip != "none":
            # One forward over image and mirror together halves the number of launches.
            plain, mirrored = forward(torch.cat([batch, batch.flip(-1)])).float().chunk(2)
            feats = plain + mirrored if flip == "sum" else torch.cat([plain, mirrored], dim=1)
        else:
            feats = forward(batch).float()
        chunks.append((nn.functional.normalize(feats, dim=1) if normalize else feats).cpu())
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(chunks).numpy().astype(np.float32)


def image_dataset(paths_or_array: Sequence[str] | np.ndarray | torch.Tensor, input_size: tuple[int, int]) -> Dataset:
    """What a model's ``embed()`` takes, as ``(image, position)`` items: image files read with the
    eval transform at ``input_size``, or a float array ``[N, C, H, W]`` already in its scaling."""
    if isinstance(paths_or_array, torch.Tensor) or (isinstance(paths_or_array, np.ndarray)
                                                     and paths_or_array.dtype.kind not in "USO"):
        images = torch.as_tensor(paths_or_array)
        if not images.is_floating_point() or images.dim() != 4 or tuple(images.shape[2:]) != tuple(input_size):
            raise ValueError(f"images must be a float array [N, C, {input_size[0]}, {input_size[1]}] "
                             f"(the model's input size); got {images.dtype} {list(images.shape)}")
        # float32, as the eval transform gives the image files
        return TensorDataset(images.to(torch.float32), torch.arange(len(images)))
    return ImageListDataset(list(paths_or_array), build_eval_transform(input_size))


class EmbeddingModel:
    """What a loaded model offers every stage, whatever runs it (PyTorch:
    :class:`facepipe.models.loaded.LoadedModel`; ONNX Runtime:
    :class:`facepipe.models.onnx_backend.OnnxModel`): ``input_size``, ``flip``, ``fingerprint``,
    ``checkpoint_path`` and :meth:`embed`. A backend implements :meth:`_embed` and
    :attr:`default_batch_size`."""

    input_size: tuple[int, int]
    flip: str

    @property
    def default_batch_size(self) -> int:
        raise NotImplementedError

    def embed(
        self,
        paths_or_array: Sequence[str] | np.ndarray | torch.Tensor,
        flip: str | None = None,
        batch_size: int | None = None,
        num_workers: int = 0,
        progress: bool = False,
    ) -> np.ndarray:
        """L2-normalised float32 embeddings, one row per image, in order: of image files (read at
        :attr:`input_size`) or of an already-preprocessed float array ``[N, C, H, W]`` (as the
        eval transform makes them). Flip fusion is ``flip`` or else :attr:`flip`, the batch size
        ``batch_size`` or else :attr:`default_batch_size`."""
        return self._embed(paths_or_array, flip or self.flip, batch_size or self.default_batch_size, num_workers,
                           progress)

    def _embed(self, paths_or_array: Sequence[str] | np.ndarray | torch.Tensor, flip: str, batch_size: int,
               num_workers: int, progress: bool) -> np.ndarray:
        raise NotImplementedError
