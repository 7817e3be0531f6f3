"""Embeddings of image files with a trained checkpoint and the ``facepipe embed`` job
(``extract``; the loaded model and its forward pass are :mod:`facepipe.models.loaded`), and the
embeddings folder format (``folder``). Loaded on first use: reading an embeddings folder does not
import torch."""
from facepipe.utils.lazy import lazy_exports

_LAZY = {
    "EmbeddingsFolder": "facepipe.embed.folder",
    "write_embeddings_folder": "facepipe.embed.extract",
    "embed_folder": "facepipe.embed.extract",
    "embed_paths": "facepipe.embed.extract",
    "list_images": "facepipe.embed.extract",
}

__all__ = list(_LAZY)


__getattr__ = lazy_exports(__name__, _LAZY)
