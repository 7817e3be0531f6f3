"""Training losses and classifier heads."""
from facepipe.losses.margin_heads import (
    HEADS,
    ArcFaceHead,
    CosFaceHead,
    LSoftmaxHead,
    MarginHead,
    SoftmaxHead,
    SphereFaceHead,
    UnknownParameterError,
    build_head,
    head_params,
    psi,
)

__all__ = [
    "HEADS",
    "ArcFaceHead",
    "CosFaceHead",
    "LSoftmaxHead",
    "MarginHead",
    "SoftmaxHead",
    "SphereFaceHead",
    "UnknownParameterError",
    "build_head",
    "head_params",
    "psi",
]
