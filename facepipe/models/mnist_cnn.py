"""Li et al.'s MNIST backbone (Sec. 4.1): two blocks of two 3x3 convolutions (32 then 64 channels,
ReLU, 'same' padding) each followed by 2x2 max-pooling, then flatten, a dense layer to the latent
size (64) and batch normalisation. The latent is what the prototype / ARConvL heads see.

Initialisation follows the Keras model of the paper's authors: He-uniform kernels (bound
sqrt(6 / fan_in)), zero biases, and Keras' batch-norm constants (momentum 0.99, eps 1e-3).
"""
from __future__ import annotations

import torch
from torch import nn

CHANNELS = (32, 64)


class MnistCNN(nn.Module):
    """``forward(x) == output_stage(features(x))``, the interface the trainer uses for every backbone."""

    def __init__(self, embedding_size: int = 64, input_size: tuple[int, int] = (28, 28), in_channels: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        height, width = input_size
        if height % 4 or width % 4:
            raise ValueError(f"input size {input_size} must be a multiple of 4 on both sides (two 2x2 poolings)")
        self.input_size = (height, width)
        self.in_channels = in_channels
        layers: list[nn.Module] = []
        channels = in_channels
        for out_channels in CHANNELS:
            for _ in range(2):
                layers += [nn.Conv2d(channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)]
                channels = out_channels
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        flat = channels * (height // 4) * (width // 4)
        # Dropout is not in the paper's model; it is here (default off) so MC-dropout methods can run.
        self.output_stage = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(flat, embedding_size),
            nn.BatchNorm1d(embedding_size, eps=1e-3, momentum=0.01),
        )
        self.embedding_size = embedding_size
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")  # Keras he_uniform
                nn.init.zeros_(module.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.in_channels or tuple(images.shape[-2:]) != self.input_size:
            raise ValueError(
                f"mnist_cnn expects images [B, {self.in_channels}, {self.input_size[0]}, {self.input_size[1]}], "
                f"got {list(images.shape)}"
            )
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.output_stage(self.features(images))
