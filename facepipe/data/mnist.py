"""MNIST idx files and Li et al.'s imbalanced protocol (Sec. 4.1).

``read_idx`` parses the idx format (optionally gzip-compressed); ``imbalanced_subset`` keeps a
random 1/q of the training images of the minority (even) classes and all the others;
``stratified_split`` holds out the validation share class by class. ``TensorImageDataset`` serves
in-memory images to the trainer with the same ``(image, label, index)`` items as the identity
folders.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

from facepipe.data.dataset import DatasetError

# idx type codes (third byte of the magic number) -> numpy dtype, big-endian as stored.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
NUM_CLASSES = 10  # the digits 0..9
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (``.gz`` or plain) as a numpy array of its declared type and shape."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(f"cannot read idx file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an idx file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated idx header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: holds {len(raw) - header} data bytes, its header {list(shape)} needs {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{stem}(.gz) not found in {root}")


def load_mnist(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N] int64) of the ``train`` or ``test`` split."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"MNIST folder {root} does not exist")
    images = read_idx(_find(root, SPLIT_FILES[split][0]))
    labels = read_idx(_find(root, SPLIT_FILES[split][1])).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"MNIST {split} files in {root} disagree: images {images.shape}, labels {labels.shape}")
    # The classes are counted from the labels (max + 1): one label of 10 would add an eleventh
    # class with a single image and change every class-averaged metric.
    outside = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if len(outside):
        raise DatasetError(f"{_find(root, SPLIT_FILES[split][1])}: {len(outside)} label(s) outside the MNIST digits "
                           f"0..{NUM_CLASSES - 1} (first: image {int(outside[0])}, label {int(labels[outside[0]])})")
    return images, labels


def minority_keep_count(count: int, imbalance_ratio: int) -> int:
    """Images kept of a minority class of ``count``: floor(count / q), at least one."""
    return max(1, count // imbalance_ratio)


def imbalanced_subset(labels: np.ndarray, imbalance_ratio: int, minority_classes: Sequence[int],
                      seed: int) -> np.ndarray:
    """Sorted indices of Li et al.'s MNIST-q: a random floor(n_c / q) images of every minority
    class c, all images of the other classes. Deterministic for ``seed``."""
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance ratio q must be >= 1, got {imbalance_ratio}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if label in set(minority_classes):
            members = rng.choice(members, minority_keep_count(len(members), imbalance_ratio), replace=False)
        keep.append(members)
    return np.sort(np.concatenate(keep))


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) positions into ``labels``, stratified by class. A class with a single
    image stays in training (it cannot be on both sides)."""
    labels = np.asarray(labels)
    positions = np.arange(len(labels))
    counts = np.bincount(labels)
    single = counts[labels] < 2
    train, val = train_test_split(positions[~single], test_size=val_fraction, random_state=seed,
                                  stratify=labels[~single])
    return np.sort(np.concatenate([train, positions[single]])), np.sort(val)


class TensorImageDataset(Dataset):
    """In-memory grey-level images for the trainer: items ``(image [1, H, W] float in [0, 1],
    label, index)``; accepts the ``(index, sample_seed)`` keys the samplers yield."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> None:
        if len(images) != len(labels):
            raise DatasetError(f"{len(images)} images but {len(labels)} labels")
        self.images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32) / 255.0).unsqueeze(1)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.identities = list(class_names)
        self.image_size = tuple(images.shape[1:3])

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int | tuple[int, int]):
        index = item[0] if isinstance(item, tuple) else item
        return self.images[index], int(self.labels[index]), index

    def eval_view(self, indices: Sequence[int], image_size: tuple[int, int] | None = None) -> Dataset:
        """The images ``indices`` as ``(image, position)`` items (no augmentation to leave out)."""
        return _TensorView(self.images[torch.as_tensor(np.asarray(indices, dtype=np.int64))])


class _TensorView(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int):
        return self.images[position], position
