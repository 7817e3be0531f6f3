"""facepipe: face-recognition embeddings for long-tailed identity data.

The Python API mirrors the CLI, one function per command:

    facepipe.run_demo(out)                      # facepipe demo
    facepipe.generate_dataset(out, n, ...)      # facepipe synth
    facepipe.train_model(facepipe.load_config(path))  # facepipe train
    facepipe.embed_folder(ckpt, images, out)    # facepipe embed
    facepipe.align_images(src, dst)             # facepipe align
    facepipe.link_identity_subset(src, dst, exclude)  # facepipe subset
    facepipe.merge_identity_sources([src1, src2], dst, exclude_pairs=[pairs])  # facepipe merge
    facepipe.evaluate_pairs_file(ckpt, pairs, root, out)  # facepipe eval pairs
    facepipe.evaluate_lfw(pairs, out, images=..., checkpoint=...)  # facepipe eval lfw
    facepipe.evaluate_ytf / evaluate_megaface / evaluate_bin    # facepipe eval ytf | megaface | bin
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "run_demo": "facepipe.demo",
    "generate_dataset": "facepipe.data.synth",
    "train_model": "facepipe.train.trainer",
    "Trainer": "facepipe.train.trainer",
    "embed_folder": "facepipe.embed",
    "extract_embeddings": "facepipe.models.loaded",
    "load_model": "facepipe.models.loaded",
    "export_onnx": "facepipe.models.export",
    "export_detector": "facepipe.align.export",
    "InputContract": "facepipe.models.onnx_backend",
    "ModelFile": "facepipe.models.onnx_backend",
    "import_arcface_backbone": "facepipe.models.foreign",
    "evaluate_pairs_file": "facepipe.eval.pairs_job",
    "align_images": "facepipe.align.job",
    "MTCNN": "facepipe.align.detector",
    "link_identity_subset": "facepipe.data.subset",
    "merge_identity_sources": "facepipe.data.merge",
    "evaluate_lfw": "facepipe.eval.lfw",
    "evaluate_ytf": "facepipe.eval.ytf",
    "evaluate_megaface": "facepipe.eval.megaface",
    "evaluate_bin": "facepipe.eval.insightface_bin",
    "imbalance_metrics": "facepipe.eval.imbalance",
    "load_config": "facepipe.config",
    "Config": "facepipe.config",
    "build_backbone": "facepipe.models",
    "build_head": "facepipe.losses",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    # Lazy: `import facepipe` stays cheap (no torch import) for tools that only need the CLI parser.
    if name == "train_model":  # `facepipe.train` is the subpackage, so the function gets this name
        return importlib.import_module(_API[name]).train
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'facepipe' has no attribute '{name}'")
