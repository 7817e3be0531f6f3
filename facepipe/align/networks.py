"""The three MTCNN networks (Zhang et al. 2016) and their pretrained weights.

The layer names match the state dicts that ship inside the facenet-pytorch distribution
(``facenet_pytorch/data/{pnet,rnet,onet}.pt``), which are converted from the original Caffe
release. The files are found through the installed distribution's metadata: importing
``facenet_pytorch`` itself would import torchvision, whose compiled ops do not load with the CPU
build of torch that facepipe pins.
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch
from torch import nn

from facepipe.errors import FacepipeUserError

WEIGHTS_DISTRIBUTION = "facenet-pytorch"
NETWORK_NAMES = ("pnet", "rnet", "onet")


class MissingWeightsError(RuntimeError, FacepipeUserError):
    """The pretrained MTCNN weights are not installed."""


class PNet(nn.Module):
    """Proposal network: fully convolutional, 12x12 receptive field, stride 2.

    Returns (box regression [B,4,h,w], face probability [B,2,h,w]).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    """Refinement network on 24x24 crops. Returns (box regression [N,4], probability [N,2])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # The Caffe weights flatten in (W, H, C) order.
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).flatten(1)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output network on 48x48 crops.

    Returns (box regression [N,4], landmarks [N,10] as x1..x5 then y1..y5 relative to the box,
    probability [N,2]).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).flatten(1)))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


def locate_weights(weights_dir: str | Path | None = None) -> dict[str, Path]:
    """Paths of ``pnet.pt``, ``rnet.pt`` and ``onet.pt``.

    From ``weights_dir`` when given, otherwise from the installed facenet-pytorch distribution
    (found through its file list, without importing it).
    """
    if weights_dir is not None:
        folder = Path(weights_dir)
        paths = {name: folder / f"{name}.pt" for name in NETWORK_NAMES}
    else:
        try:
            distribution = importlib.metadata.distribution(WEIGHTS_DISTRIBUTION)
        except importlib.metadata.PackageNotFoundError:
            raise MissingWeightsError(
                f"the MTCNN weights come from the '{WEIGHTS_DISTRIBUTION}' package, which is not installed: "
                f"pip install {WEIGHTS_DISTRIBUTION}==2.5.3 --no-deps (or pass weights_dir=)"
            ) from None
        listed = {Path(str(f)).name: f for f in (distribution.files or ()) if str(f).endswith(".pt")}
        paths = {
            name: Path(distribution.locate_file(listed[f"{name}.pt"])) if f"{name}.pt" in listed else Path(f"{name}.pt")
            for name in NETWORK_NAMES
        }
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise MissingWeightsError(
            f"MTCNN weight file(s) not found: {missing}; reinstall '{WEIGHTS_DISTRIBUTION}' "
            f"(its data/ folder holds pnet.pt, rnet.pt, onet.pt)"
        )
    return paths


def load_networks(weights_dir: str | Path | None = None) -> tuple[PNet, RNet, ONet]:
    """The three networks with pretrained weights, in eval mode (weights loaded without pickle code)."""
    paths = locate_weights(weights_dir)
    networks = (PNet(), RNet(), ONet())
    for name, network in zip(NETWORK_NAMES, networks):
        try:
            state = torch.load(paths[name], map_location="cpu", weights_only=True)
            network.load_state_dict(state)
        except Exception as exc:
            raise MissingWeightsError(f"cannot load MTCNN weights {paths[name]}: {exc}") from exc
        network.eval().requires_grad_(False)
    return networks
