"""Identity-folder datasets: ``root/<identity>/<image>``, one folder per person."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

# UnreadableImageError is re-exported: it was defined here first and is caught by that name.
from facepipe.data.image_io import UnreadableImageError, read_image  # noqa: F401
from facepipe.errors import FacepipeUserError
from facepipe.utils.names import check_identity_name

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm")


class DatasetError(ValueError, FacepipeUserError):
    """The dataset cannot be used (missing root, empty, identity folders without images)."""


def decode_image(path: str | Path) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB with facepipe's one reader (size limits checked
    before decoding, EXIF orientation applied; see :mod:`facepipe.data.image_io`)."""
    return read_image(path)


def decode_encoded_image(data: np.ndarray | bytes, source: str) -> np.ndarray:
    """Encoded image bytes (``source`` names them in errors) as HxWx3 uint8 RGB, as :func:`decode_image`."""
    return read_image(data, source)


@dataclass(frozen=True)
class Sample:
    path: str
    label: int


def scan_identity_folders(
    root: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> tuple[list[str], list[Sample]]:
    """List identities (sorted folder names) and their images (sorted paths).

    Raises ``DatasetError`` naming the problem when the root is missing, holds no identity
    folders, or some identity folders hold no images.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset root {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(f"dataset root {root} holds no identity folders (expected root/<identity>/<image>)")
    suffixes = {ext.lower() for ext in extensions}
    identities: list[str] = []
    samples: list[Sample] = []
    empty: list[str] = []
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            empty.append(folder.name)
            continue
        label = len(identities)
        identities.append(check_identity_name(folder.name, f"identity folder {folder}"))
        samples.extend(Sample(str(p), label) for p in files)
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise DatasetError(
            f"{len(empty)} identity folder(s) under {root} hold no images ({shown}); "
            f"remove them or add images (extensions: {', '.join(sorted(suffixes))})"
        )
    return identities, samples


class IdentityFolderDataset(Dataset):
    """Images of ``root/<identity>/*`` with integer labels in sorted identity order.

    Items are ``(image_tensor, label, index)``. An index may also be a ``(index, seed)`` pair
    (what facepipe's samplers yield): the transform is then seeded per sample, which makes
    augmentation independent of worker count and lets a resumed run see the same images.

    An unreadable image is logged and replaced by another image of the same identity, so one
    bad file never stops a long run; only an identity without any readable image is an error.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[..., torch.Tensor] | None = None,
        identities: Sequence[str] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        self.root = Path(root)
        found, samples = scan_identity_folders(self.root, extensions)
        if identities is not None:
            # A fixed identity order (from a checkpoint) must map names to the same labels.
            missing = sorted(set(found) - set(identities))
            if missing:
                raise DatasetError(
                    f"{len(missing)} identity folder(s) under {root} are not in the given identity list, "
                    f"e.g. {missing[:5]}"
                )
            position = {name: label for label, name in enumerate(identities)}
            remap = {label: position[name] for label, name in enumerate(found)}
            samples = [Sample(s.path, remap[s.label]) for s in samples]
            self.identities = list(identities)
        else:
            self.identities = found
        self.samples = samples
        self.labels = np.array([s.label for s in samples], dtype=np.int64)
        self.transform = transform
        self._by_label: dict[int, list[int]] = {}
        for index, sample in enumerate(samples):
            self._by_label.setdefault(sample.label, []).append(index)
        self.bad_files: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    def _load(self, index: int) -> np.ndarray:
        sample = self.samples[index]
        try:
            return decode_image(sample.path)
        except (UnreadableImageError, OSError) as exc:
            if sample.path not in self.bad_files:
                self.bad_files.add(sample.path)
                log.warning("skipping unreadable image (%s); using another image of '%s'", exc,
                            self.identities[sample.label])
        candidates = [i for i in self._by_label[sample.label] if self.samples[i].path not in self.bad_files]
        rng = random.Random(index)
        rng.shuffle(candidates)
        for candidate in candidates:
            try:
                return decode_image(self.samples[candidate].path)
            except (UnreadableImageError, OSError):
                self.bad_files.add(self.samples[candidate].path)
        raise DatasetError(f"identity '{self.identities[sample.label]}' has no readable image left")

    def __getitem__(self, item: int | tuple[int, int]):
        index, seed = (item if isinstance(item, tuple) else (item, None))
        image = self._load(index)
        tensor = self.transform(image, seed=seed) if self.transform is not None else torch.from_numpy(image)
        return tensor, int(self.samples[index].label), index

    def eval_view(self, indices: Sequence[int], image_size: tuple[int, int]) -> "TrainingEvalView":
        """The images ``indices`` without augmentation, as ``(image, position)`` items (feature
        extraction during training: uncertainty estimates, clustering, class means)."""
        return TrainingEvalView(self, indices, image_size)


class TrainingEvalView(Dataset):
    """Images ``indices`` of a training dataset without augmentation, as ``(image, position)``
    items: the feature-extraction passes inside training (UMM's uncertainty refresh, CLMLE's
    clustering, ARConvL's class means).

    An unreadable image is substituted exactly as the training loader substitutes it (the
    dataset's own ``_load``: another image of the same identity, logged once), because the
    features are used for training statistics of that identity; one bad file never stops a run.
    Extraction outside training (``embed``, verification pairs) uses ``ImageListDataset``, which
    raises instead: there a substitute would be reported as that file's embedding.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], image_size: tuple[int, int]) -> None:
        from facepipe.data.transforms import build_eval_transform

        self.dataset = dataset
        self.indices = np.asarray(list(indices), dtype=np.int64)
        self.transform = build_eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        return self.transform(self.dataset._load(int(self.indices[position]))), position


class ImageListDataset(Dataset):
    """Images from an explicit list of paths (embedding extraction, verification pairs).

    Unlike training, a file that cannot be read here is an error: a silently substituted image
    would corrupt the embedding of that path.
    """

    def __init__(self, paths: Sequence[str], transform: Callable[..., torch.Tensor]) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(decode_image(self.paths[index])), index


class DecodedImagesDataset(Dataset):
    """Images decoded and transformed once, kept as ``[N, H, W, 3]`` uint8
    (:meth:`facepipe.data.transforms.FaceTransform.pixels`), served as ``(image, position)``
    items scaled by :func:`~facepipe.data.transforms.to_tensor`: the same tensors as an
    :class:`ImageListDataset` with that transform gives, without reading the files again."""

    def __init__(self, pixels: np.ndarray) -> None:
        from facepipe.data.transforms import to_tensor

        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[3] != 3:
            raise ValueError(f"pixels must be uint8 [N, H, W, 3], got {pixels.dtype} {list(pixels.shape)}")
        self.pixels = pixels
        self._to_tensor = to_tensor

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, position: int):
        return self._to_tensor(self.pixels[position]), position
