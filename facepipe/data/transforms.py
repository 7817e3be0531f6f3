"""Image transforms: albumentations augmentations from the config, then (x - 127.5) / 128."""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch

from facepipe.config import AugmentConfig

# (x - 127.5) / 128, the input scaling of the ArcFace / SphereFace family.
PIXEL_MEAN = 127.5
PIXEL_SCALE = 128.0


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 3xHxW float32 scaled as (x - 127.5) / 128."""
    array = (image.astype(np.float32) - PIXEL_MEAN) / PIXEL_SCALE
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class FaceTransform:
    """Callable ``(image, seed=None) -> tensor``; a seed makes the random augmentation repeatable."""

    def __init__(self, pipeline: A.Compose) -> None:
        self.pipeline = pipeline

    def __call__(self, image: np.ndarray, seed: int | None = None) -> torch.Tensor:
        return to_tensor(self.pixels(image, seed))

    def pixels(self, image: np.ndarray, seed: int | None = None) -> np.ndarray:
        """The transformed HxWx3 uint8 image before the scaling of :func:`to_tensor`: what images
        decoded once and kept (a quarter of the float size) are stored as."""
        if seed is not None:
            self.pipeline.set_random_seed(seed)
        return self.pipeline(image=image)["image"]


def _resize(image_size: tuple[int, int]) -> A.BasicTransform:
    # INTER_AREA: the crops are usually downscaled (112 -> 64 for small models).
    return A.Resize(image_size[0], image_size[1], interpolation=cv2.INTER_AREA, p=1.0)


def build_train_transform(image_size: tuple[int, int], augment: AugmentConfig) -> FaceTransform:
    height, width = image_size
    steps: list[A.BasicTransform] = []
    if augment.random_resized_crop > 0:
        steps.append(
            A.RandomResizedCrop(size=(height, width), scale=tuple(augment.random_resized_crop_scale),
                                ratio=(0.9, 1.1), p=augment.random_resized_crop)
        )
    steps.append(_resize(image_size))
    if augment.hflip > 0:
        steps.append(A.HorizontalFlip(p=augment.hflip))
    if augment.color_jitter > 0:
        steps.append(A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=augment.color_jitter))
    if augment.blur > 0:
        steps.append(A.GaussianBlur(blur_limit=(3, 5), p=augment.blur))
    if augment.coarse_dropout > 0:
        steps.append(A.CoarseDropout(num_holes_range=(1, 2), hole_height_range=(0.1, 0.25),
                                     hole_width_range=(0.1, 0.25), fill=0, p=augment.coarse_dropout))
    return FaceTransform(A.Compose(steps))


def build_eval_transform(image_size: tuple[int, int]) -> FaceTransform:
    return FaceTransform(A.Compose([_resize(image_size)]))
