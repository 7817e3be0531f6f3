"""Embedding networks."""
from facepipe.models.irse import IRSEBackbone, OutputStage, build_backbone

__all__ = ["IRSEBackbone", "OutputStage", "build_backbone"]
