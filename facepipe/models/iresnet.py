"""IResNet-{18,34,50,100,200}: the backbone of insightface arcface_torch (IResNet, Deng et al.),
with the parameter names of its published ``backbone.pth`` files.

What was read from insightface (``recognition/arcface_torch/backbones/iresnet.py``), for its
structure and parameter names only; this module is written anew:

* blocks per stage: 18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3),
  200: (6, 26, 60, 6); stages ``layer1`` .. ``layer4`` of 64, 128, 256, 512 channels, each
  opening with a stride-2 block;
* a block (``layerS.i``): ``bn1`` (BatchNorm2d of its input), ``conv1`` (3x3, stride 1),
  ``bn2``, ``prelu`` (one slope per channel), ``conv2`` (3x3, the block's stride), ``bn3``, added
  to the input, or, in the first block of a stage, to ``downsample`` = (``downsample.0`` 1x1 conv
  with the stride, ``downsample.1`` BatchNorm2d); convolutions have no bias, and there is no
  activation after the sum;
* the stem: ``conv1`` (3x3, 3 -> 64, stride 1), ``bn1``, ``prelu``;
* the output: ``bn2`` (BatchNorm2d 512), flatten, ``dropout``, ``fc`` (Linear 512*7*7 -> 512 for
  112x112 crops, with bias), ``features`` (BatchNorm1d whose weight stays 1.0: not trained);
* every BatchNorm with eps 1e-05 and PyTorch's default momentum (0.1); initialisation: convs
  N(0, 0.1), BatchNorm2d weight 1 and bias 0, Linear and PReLU as PyTorch makes them.

Deviations, none of which changes a state dict or a forward in eval mode:

* ``fc`` follows the input size: 512 x (H/16) x (W/16) inputs, so 112x112 gives the published
  512*7*7 and 112x96 crops work too; a published state dict loads only at 112x112 (its
  ``fc.weight`` has 25088 columns).
* The published forward runs under CUDA autocast when its ``fp16`` flag is set; facepipe runs
  mixed precision itself (``train.amp``), so there is no such flag. Its dropout is in-place and
  its residual sum ``+=``; here both are out of place. The published ``zero_init_residual`` and
  dilation options (off in arcface_torch) and gradient checkpointing are left out.
* facepipe's interface: ``features(images)`` (feature maps) and ``output_stage(maps)``
  (``bn2`` - flatten - ``dropout`` - ``fc`` - ``features``); see :class:`IResNet` for how the
  published submodule name ``features`` and facepipe's ``features()`` method live together.

facepipe reads images as RGB scaled (x - 127.5) / 128; arcface_torch's inference scales RGB
by (x / 255 - 0.5) / 0.5 = (x - 127.5) / 127.5, 0.4 % larger. :meth:`IResNet.features` rescales
its input by 128 / 127.5 first (:data:`INPUT_RESCALE`), so that imported weights see exactly the
input they were trained on (and an ONNX export carries that factor in its graph).
"""
from __future__ import annotations

import torch
from torch import nn

from facepipe.models.irse import check_input_size, stride16_spatial

# Blocks per stage (arcface_torch iresnet18 .. iresnet200).
BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3),
                    200: (6, 26, 60, 6)}
STAGE_CHANNELS = (64, 128, 256, 512)
# facepipe's (x - 127.5) / 128 -> arcface_torch's (x - 127.5) / 127.5.
INPUT_RESCALE = 128.0 / 127.5
BN_EPS = 1e-05


def _norm2d(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class IResidualBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the (projected) input."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = _norm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.bn2 = _norm2d(channels)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn3 = _norm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                            _norm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return residual + (x if self.downsample is None else self.downsample(x))


class IResNetOutputStage(nn.Module):
    """``bn2`` - flatten - ``dropout`` - ``fc`` - ``features``: feature maps [B, 512, h, w] to
    embeddings [B, D]. It holds the very modules of its :class:`IResNet` (the same parameters),
    so it can run alone, several times on one set of maps (MC dropout)."""

    def __init__(self, bn2: nn.BatchNorm2d, dropout: nn.Dropout, fc: nn.Linear, features: nn.BatchNorm1d) -> None:
        super().__init__()
        self.bn2, self.dropout, self.fc, self.features = bn2, dropout, fc, features

    def forward(self, feature_maps: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(self.dropout(torch.flatten(self.bn2(feature_maps), 1))))


class IResNet(nn.Module):
    """IResNet embedding network whose ``state_dict()`` has exactly the keys and shapes of an
    arcface_torch ``backbone.pth`` of the same depth (at 112x112 and ``embedding_size`` 512).

    ``forward(x) == output_stage(features(x))``, facepipe's interface for every backbone.
    Two names need care to keep the published keys:

    * the published embedding BatchNorm1d is the submodule ``features`` (keys ``features.*``),
      while ``features(images)`` is facepipe's method. The BatchNorm1d is registered in
      ``_modules`` under that name (state dicts, ``.to()``, ``.train()`` see it), and attribute
      lookup finds the method, as a class attribute, before ``nn.Module`` looks in
      ``_modules``; the layer itself is :attr:`embedding_norm`. (So ``get_submodule("features")``
      finds the method, and ``nn.Module`` refuses to have ``features`` assigned a function.)
    * ``output_stage`` (:class:`IResNetOutputStage`) shares ``bn2``, ``dropout``, ``fc`` and the
      BatchNorm1d with this module but is not registered as a submodule, so its parameters do not
      appear a second time under ``output_stage.*``.
    """

    def __init__(self, depth: int = 50, embedding_size: int = 512, dropout: float = 0.0,
                 input_size: tuple[int, int] = (112, 112)) -> None:
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"iresnet depth {depth} is not supported; choose one of {sorted(BLOCKS_PER_STAGE)}")
        self.feature_spatial = stride16_spatial(input_size)
        self.depth = depth
        self.input_size = (input_size[0], input_size[1])
        self.conv1 = nn.Conv2d(3, STAGE_CHANNELS[0], 3, 1, 1, bias=False)
        self.bn1 = _norm2d(STAGE_CHANNELS[0])
        self.prelu = nn.PReLU(STAGE_CHANNELS[0])
        in_channels = STAGE_CHANNELS[0]
        for index, (channels, blocks) in enumerate(zip(STAGE_CHANNELS, BLOCKS_PER_STAGE[depth]), start=1):
            stage = [IResidualBlock(in_channels if i == 0 else channels, channels, 2 if i == 0 else 1)
                     for i in range(blocks)]
            self.add_module(f"layer{index}", nn.Sequential(*stage))
            in_channels = channels
        self.feature_channels = in_channels
        self.bn2 = _norm2d(in_channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels * self.feature_spatial[0] * self.feature_spatial[1], embedding_size)
        embedding_norm = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        embedding_norm.weight.requires_grad_(False)  # stays 1.0, as published
        self._modules["features"] = embedding_norm
        object.__setattr__(self, "output_stage", IResNetOutputStage(self.bn2, self.dropout, self.fc, embedding_norm))
        self.embedding_size = embedding_size
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def embedding_norm(self) -> nn.BatchNorm1d:
        """The last layer, BatchNorm1d of the embedding (state-dict keys ``features.*``)."""
        return self._modules["features"]  # type: ignore[return-value]

    def train(self, mode: bool = True) -> "IResNet":
        super().train(mode)
        self.output_stage.training = mode  # its layers are this module's; its own flag follows
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] (normalised) to feature maps [B, 512, H/16, W/16]."""
        check_input_size(images, self.input_size)
        x = self.prelu(self.bn1(self.conv1(images * INPUT_RESCALE)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.output_stage(self.features(images))
