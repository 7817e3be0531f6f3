"""Class statistics of an identity dataset: counts, imbalance ratio, head/tail split."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class ClassStatistics:
    num_images: int
    num_classes: int
    min_count: int
    max_count: int
    median_count: float
    imbalance_ratio: float  # largest class / smallest class
    head_classes: int  # the largest classes that together hold `head_share` of the images
    tail_classes: int
    head_share: float
    head_min_count: int  # size of the smallest head class
    singleton_classes: int  # identities with a single image

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.num_images} images, {self.num_classes} identities; images per identity "
            f"{self.min_count}..{self.max_count} (median {self.median_count:g}), imbalance ratio "
            f"{self.imbalance_ratio:.1f}; head {self.head_classes} identities (>= {self.head_min_count} images) "
            f"hold {self.head_share:.0%} of the images, tail {self.tail_classes}; "
            f"{self.singleton_classes} with one image"
        )


def class_counts(labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes or 0)


def head_class_mask(counts: np.ndarray, head_share: float = 0.5) -> np.ndarray:
    """Boolean mask of head classes: the largest classes covering ``head_share`` of the images."""
    order = np.argsort(-counts, kind="stable")
    cumulative = np.cumsum(counts[order])
    num_head = int(np.searchsorted(cumulative, head_share * cumulative[-1]) + 1)
    mask = np.zeros(len(counts), dtype=bool)
    mask[order[:num_head]] = True
    return mask


def class_statistics(labels: np.ndarray, num_classes: int | None = None, head_share: float = 0.5) -> ClassStatistics:
    counts = class_counts(labels, num_classes)
    if counts.size == 0 or counts.sum() == 0:
        raise ValueError("class statistics of an empty dataset")
    present = counts[counts > 0]
    head = head_class_mask(counts, head_share)
    return ClassStatistics(
        num_images=int(counts.sum()),
        num_classes=int(len(counts)),
        min_count=int(present.min()),
        max_count=int(present.max()),
        median_count=float(np.median(present)),
        imbalance_ratio=float(present.max() / present.min()),
        head_classes=int(head.sum()),
        tail_classes=int((~head).sum()),
        head_share=float(counts[head].sum() / counts.sum()),
        head_min_count=int(counts[head].min()),
        singleton_classes=int((counts == 1).sum()),
    )
