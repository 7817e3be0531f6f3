"""IR-SE backbone: the improved-residual SE-ResNet of ArcFace (Deng et al. 2019).

Each unit is BN - Conv3x3 - PReLU - Conv3x3(stride) - BN - SE, added to a shortcut (identity,
subsampled by a 1x1 max-pool, or a strided 1x1 conv + BN when the width changes). Four stages
with stride 2 reduce a 112x112 input to 7x7 (112x96 to 7x6). The output stage
BN - Dropout - Flatten - FC - BN is a module of its own and can be called on backbone feature maps
alone, several times per backbone pass with fresh dropout masks (the MC-dropout uncertainty
estimate of Khan et al. Sec. 3 runs it N times on one set of feature maps).
"""
from __future__ import annotations

import torch
from torch import nn

# Units per stage for each depth (insightface / face.evoLVe IR-SE).
UNITS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}
BASE_CHANNELS = (64, 128, 256, 512)


def stride16_spatial(input_size: tuple[int, int]) -> tuple[int, int]:
    """(H/16, W/16): the feature-map size after four stride-2 stages of (H, W) inputs; both sides
    must be multiples of 16 (the IR-SE and IResNet backbones)."""
    height, width = input_size
    if height % 16 or width % 16:
        raise ValueError(f"input size {tuple(input_size)} must be a multiple of 16 on both sides")
    return height // 16, width // 16


def check_input_size(images: torch.Tensor, input_size: tuple[int, int]) -> None:
    """A clear error for images of another size than the backbone (and its fc) was built for."""
    if tuple(images.shape[-2:]) != tuple(input_size):
        raise ValueError(f"the backbone was built for {input_size[0]}x{input_size[1]} inputs, "
                         f"got {images.shape[-2]}x{images.shape[-1]}")


def _scaled(channels: int, width: float) -> int:
    # Keep channel counts multiples of 8 (tensor-core friendly) and at least 8 (SE needs room).
    return max(8, int(round(channels * width / 8)) * 8)


class SqueezeExcite(nn.Module):
    """Channel attention: global average pool, bottleneck 1x1 convs, sigmoid gate."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class IRSEUnit(nn.Module):
    """Improved residual unit with squeeze-and-excitation (bottleneck_IR_SE)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, se_reduction: int = 16) -> None:
        super().__init__()
        if in_channels == out_channels:
            self.shortcut: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.residual = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            SqueezeExcite(out_channels, se_reduction),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.residual(x)


class OutputStage(nn.Module):
    """BN - Dropout - Flatten - FC - BN: feature maps [B, C, h, w] to embeddings [B, D].

    Callable on its own; ``dropout`` is its only stochastic layer, so calling it several times in
    train mode on the same maps draws independent dropout masks (MC dropout).
    """

    def __init__(self, channels: int, spatial: tuple[int, int], embedding_size: int, dropout: float) -> None:
        super().__init__()
        self.bn_maps = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * spatial[0] * spatial[1], embedding_size)
        self.bn_embedding = nn.BatchNorm1d(embedding_size)

    def forward(self, feature_maps: torch.Tensor) -> torch.Tensor:
        return self.bn_embedding(self.fc(self.flatten(self.dropout(self.bn_maps(feature_maps)))))


class IRSEBackbone(nn.Module):
    """IR-SE-{18,34,50,100} embedding network with a width multiplier.

    ``forward(x) == output_stage(features(x))``; the two halves are public so callers can run the
    output stage repeatedly on one ``features`` result.
    """

    def __init__(
        self,
        depth: int = 50,
        width: float = 1.0,
        embedding_size: int = 512,
        dropout: float = 0.0,
        input_size: tuple[int, int] = (112, 112),
        se_reduction: int = 16,
    ) -> None:
        super().__init__()
        if depth not in UNITS_PER_STAGE:
            raise ValueError(f"depth {depth} is not supported; choose one of {sorted(UNITS_PER_STAGE)}")
        self.feature_spatial = stride16_spatial(input_size)
        self.input_size = (input_size[0], input_size[1])
        channels = [_scaled(c, width) for c in BASE_CHANNELS]
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels[0], 3, 1, 1, bias=False), nn.BatchNorm2d(channels[0]), nn.PReLU(channels[0])
        )
        units: list[nn.Module] = []
        in_channels = channels[0]
        for out_channels, count in zip(channels, UNITS_PER_STAGE[depth]):
            for index in range(count):
                units.append(IRSEUnit(in_channels, out_channels, 2 if index == 0 else 1, se_reduction))
                in_channels = out_channels
        self.body = nn.Sequential(*units)
        self.feature_channels = in_channels
        self.output_stage = OutputStage(in_channels, self.feature_spatial, embedding_size, dropout)
        self.embedding_size = embedding_size
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] (normalised (x - 127.5) / 128) to feature maps [B, C, H/16, W/16]."""
        check_input_size(images, self.input_size)
        return self.body(self.stem(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.output_stage(self.features(images))
