"""Alignment stage: MTCNN detection and 5-point similarity alignment (``facepipe align``).

Names load lazily, so reading a manifest (``facepipe.align.manifest``) does not import torch.
"""
from __future__ import annotations

from facepipe.utils.lazy import lazy_exports

_EXPORTS = {
    "DecodedImage": "decode", "decode_for_alignment": "decode",
    "MTCNN": "detector", "FaceDetections": "detector",
    "align_images": "job", "AlignSummary": "job",
    "AlignError": "manifest", "alignment_statuses": "manifest", "read_manifest": "manifest",
    "MissingWeightsError": "networks", "load_networks": "networks", "locate_weights": "networks",
    "alignment_matrix": "transform", "center_crop_matrix": "transform", "landmark_template": "transform",
    "umeyama_similarity": "transform", "warp_face": "transform",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, {name: f"{__name__}.{module}" for name, module in _EXPORTS.items()})
