"""Alignment stage: MTCNN detection and 5-point similarity alignment (``facepipe align``)."""
from facepipe.align.decode import DecodedImage, decode_for_alignment
from facepipe.align.detector import MTCNN, FaceDetections
from facepipe.align.job import AlignError, AlignSummary, align_images, read_manifest
from facepipe.align.networks import MissingWeightsError, load_networks, locate_weights
from facepipe.align.transform import (
    alignment_matrix,
    center_crop_matrix,
    landmark_template,
    umeyama_similarity,
    warp_face,
)

__all__ = [
    "AlignError",
    "AlignSummary",
    "DecodedImage",
    "FaceDetections",
    "MTCNN",
    "MissingWeightsError",
    "align_images",
    "alignment_matrix",
    "center_crop_matrix",
    "decode_for_alignment",
    "landmark_template",
    "load_networks",
    "locate_weights",
    "read_manifest",
    "umeyama_similarity",
    "warp_face",
]
