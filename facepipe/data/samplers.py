"""Training samplers: plain shuffle, class-balanced and square-root sampling.

All three draw an epoch's order from a generator seeded by (seed, epoch), so the order is a
function of the epoch alone: a run resumed at epoch e (even mid-epoch, via ``start``) sees the
same samples as an uninterrupted one. Each yields ``(index, sample_seed)`` pairs; the dataset
seeds its augmentation with ``sample_seed``.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

# Exponent q of p(class) proportional to n_c ** q.
SAMPLER_CLASS_POWER = {"shuffle": 1.0, "sqrt": 0.5, "class_balanced": 0.0}


class EpochSampler(Sampler):
    """Draws ``num_samples`` indices per epoch with p(class c) proportional to n_c ** class_power.

    class_power = 1 is plain shuffling (a permutation, no replacement); 0.5 is square-root
    sampling and 0 class-balanced sampling (both with replacement, since rare identities must
    appear more often than they have images).
    """

    def __init__(self, labels: np.ndarray, class_power: float = 1.0, num_samples: int | None = None,
                 seed: int = 0) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.size == 0:
            raise ValueError("cannot sample from an empty dataset")
        self.class_power = float(class_power)
        self.num_samples = int(num_samples) if num_samples is not None else len(self.labels)
        self.seed = int(seed)
        self.epoch = 0
        self.start = 0
        counts = np.bincount(self.labels)
        self.sample_weights = torch.from_numpy(counts[self.labels].astype(np.float64) ** (self.class_power - 1.0))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; skip its first ``start`` samples (mid-epoch resume)."""
        self.epoch, self.start = int(epoch), int(start)

    def epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.class_power == 1.0:
            order = torch.randperm(len(self.labels), generator=generator)[: self.num_samples]
        else:
            order = torch.multinomial(self.sample_weights, self.num_samples, replacement=True, generator=generator)
        seeds = torch.randint(0, 2**31 - 1, (len(order),), generator=generator)
        return order, seeds

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = self.epoch_order(self.epoch)
        for position in range(self.start, len(order)):
            yield int(order[position]), int(seeds[position])

    def __len__(self) -> int:
        return self.num_samples - self.start


def build_sampler(name: str, labels: np.ndarray, seed: int) -> EpochSampler:
    if name not in SAMPLER_CLASS_POWER:
        raise ValueError(f"unknown sampler '{name}'; choose one of {sorted(SAMPLER_CLASS_POWER)}")
    return EpochSampler(labels, SAMPLER_CLASS_POWER[name], seed=seed)
