"""Embedding extraction from trained checkpoints."""
from facepipe.embed.extract import embed_folder, extract_embeddings, list_images, load_model

__all__ = ["embed_folder", "extract_embeddings", "list_images", "load_model"]
