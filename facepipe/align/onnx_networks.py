"""The MTCNN networks run with ONNX Runtime (``detector.backend: onnx``).

The ONNX files are those of ``facepipe export --detector DIR`` (:mod:`facepipe.align.export`):
from ``detector.onnx_dir`` when given, otherwise exported once into a cache folder keyed by the
weight files (``$XDG_CACHE_HOME/facepipe/mtcnn-onnx/<hash>/``, ``~/.cache`` when unset) and reused.
Each network is wrapped in a callable that takes and returns torch tensors as the PyTorch network
does, so that the cascade in :mod:`facepipe.align.detector` runs unchanged.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facepipe.align.networks import NETWORK_NAMES, locate_weights
from facepipe.models.onnx_backend import OnnxModelError, _session, providers_for

__all__ = ["OnnxNetwork", "cache_dir", "load_onnx_networks", "resolve_onnx_dir"]

CACHE_SUBDIR = Path("facepipe") / "mtcnn-onnx"


def cache_dir(weights_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder of the networks exported from these weight files."""
    digest = hashlib.sha256()
    for path in locate_weights(weights_dir).values():
        digest.update(path.read_bytes())
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / CACHE_SUBDIR / digest.hexdigest()[:16]


def _missing(folder: Path) -> list[str]:
    return [f"{name}.onnx" for name in NETWORK_NAMES if not (folder / f"{name}.onnx").is_file()]


def resolve_onnx_dir(onnx_dir: str | os.PathLike | None, weights_dir: str | os.PathLike | None = None) -> Path:
    """``onnx_dir`` checked to hold the three networks; without it, the cache folder, exported
    first when absent (into a temporary folder renamed into place, so that concurrent processes
    never see a partial one)."""
    if onnx_dir is not None:
        folder = Path(onnx_dir)
        missing = _missing(folder)
        if missing:
            raise OnnxModelError(f"detector.onnx_dir {folder}: {', '.join(missing)} not found; "
                                 f"write the folder with: facepipe export --detector {folder}")
        return folder
    folder = cache_dir(weights_dir)
    if not _missing(folder):
        return folder
    from facepipe.align.export import export_detector

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        export_detector(staging, weights_dir=weights_dir, overwrite=True)
        try:
            os.rename(staging, folder)
        except OSError:  # another process finished first (or left an incomplete folder)
            if _missing(folder):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


class OnnxNetwork:
    """One MTCNN network in an ONNX Runtime session: torch tensor in, tuple of torch tensors out
    (the PyTorch network's outputs, in its order, on ``device``)."""

    def __init__(self, session: Any, device: torch.device) -> None:
        self.session = session
        self.device = device
        self.input_name = session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        outputs = self.session.run(None, {self.input_name: array})
        return tuple(torch.from_numpy(np.ascontiguousarray(out)).to(self.device) for out in outputs)


def load_onnx_networks(folder: Path, device: torch.device) -> tuple[OnnxNetwork, OnnxNetwork, OnnxNetwork]:
    """P-Net, R-Net and O-Net sessions from ``folder`` (CUDA provider when ``device`` is CUDA and
    onnxruntime has it), each using as many threads as torch."""
    providers = providers_for(device)
    networks = []
    for name in NETWORK_NAMES:
        path = folder / f"{name}.onnx"
        session = _session(str(path), providers, threads=torch.get_num_threads())
        stated = dict(session.get_modelmeta().custom_metadata_map).get("network")
        if stated != name:
            raise OnnxModelError(f"{path} is not facepipe's {name} export (its metadata names {stated!r}); "
                                 f"rewrite the folder with: facepipe export --detector {folder} --overwrite")
        networks.append(OnnxNetwork(session, device))
    return tuple(networks)  # type: ignore[return-value]
