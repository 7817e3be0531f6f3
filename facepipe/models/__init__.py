"""Embedding networks: the IR-SE face backbone, insightface arcface_torch's IResNet family and Li et
al.'s MNIST CNN."""
from torch import nn

from facepipe.models.iresnet import IResNet
from facepipe.models.irse import IRSEBackbone, OutputStage
from facepipe.models.mnist_cnn import MnistCNN

__all__ = ["IResNet", "IRSEBackbone", "MnistCNN", "OutputStage", "build_backbone"]


def build_backbone(model_config, input_size: tuple[int, int]) -> nn.Module:
    """Backbone from a ``ModelConfig`` (``arch``) and the (height, width) of the training crops."""
    if model_config.arch == "mnist_cnn":
        return MnistCNN(model_config.embedding_size, tuple(input_size), dropout=model_config.dropout)
    if model_config.arch == "iresnet":
        return IResNet(depth=model_config.depth, embedding_size=model_config.embedding_size,
                       dropout=model_config.dropout, input_size=tuple(input_size))
    return IRSEBackbone(
        depth=model_config.depth,
        width=model_config.width,
        embedding_size=model_config.embedding_size,
        dropout=model_config.dropout,
        input_size=tuple(input_size),
        se_reduction=model_config.se_reduction,
    )
