"""``facepipe export --detector DIR``: the three MTCNN networks (Zhang et al. 2016; the weights
facepipe aligns with, from the facenet-pytorch distribution) as ONNX files ``pnet.onnx``,
``rnet.onnx`` and ``onet.onnx``, each with a dynamic batch axis (P-Net also dynamic height and
width: it runs on every scale of the image pyramid) and its input contract and outputs in the
metadata. Each graph is checked against PyTorch on seeded inputs before it is written.

What the networks do not contain, and a runtime must do as :mod:`facepipe.align.detector` does:
the image pyramid, the proposals from P-Net's map (stride 2, 12x12 cells), non-maximum
suppression, the box regression and square-up between the stages, the crops resized to 24x24
(R-Net) and 48x48 (O-Net), and the landmark scaling.
"""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import numpy as np
import torch

from facepipe import __version__
from facepipe.align.networks import NETWORK_NAMES, WEIGHTS_DISTRIBUTION, load_networks
from facepipe.models.export import DEFAULT_OPSET, export_graph
from facepipe.models.onnx_backend import OnnxModelError, require
from facepipe.runtime.io import check_writable_output

__all__ = ["DETECTOR_FORMAT", "DETECTOR_PARITY_ATOL", "export_detector"]

DETECTOR_FORMAT = "facepipe-mtcnn/1"
# Largest absolute difference allowed between ONNX Runtime's and PyTorch's outputs (probabilities
# and box / landmark regressions, all of order 1).
DETECTOR_PARITY_ATOL = 1e-4

# name -> (example input, dynamic axes, output names, a second input of other sizes for the check)
_GRAPHS = {
    "pnet": ((1, 3, 24, 30), {0: "batch", 2: "height", 3: "width"}, ["box_regression", "face_probability"],
             (3, 3, 77, 61)),
    "rnet": ((1, 3, 24, 24), {0: "batch"}, ["box_regression", "face_probability"], (5, 3, 24, 24)),
    "onet": ((1, 3, 48, 48), {0: "batch"}, ["box_regression", "landmarks", "face_probability"], (5, 3, 48, 48)),
}


def _parity(network: torch.nn.Module, path: Path, shape: tuple[int, ...], seed: int) -> float:
    ort = require("onnxruntime")
    images = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        want = network(images)
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))


def export_detector(out_dir: str | os.PathLike, *, weights_dir: str | os.PathLike | None = None,
                    opset: int = DEFAULT_OPSET, overwrite: bool = False) -> dict:
    """Write ``out_dir/{pnet,rnet,onet}.onnx``; returns, per network, its file, size and the
    largest difference from PyTorch on the check inputs. Existing files are replaced only with
    ``overwrite``."""
    for module in ("onnx", "onnxruntime", "onnxscript"):
        require(module)
    out_dir = Path(out_dir)
    targets = {name: out_dir / f"{name}.onnx" for name in NETWORK_NAMES}
    existing = [str(path) for path in targets.values() if path.exists()]
    if existing and not overwrite:
        raise OnnxModelError(f"{', '.join(existing)} exist; pass --overwrite to replace them")
    out_dir.mkdir(parents=True, exist_ok=True)
    check_writable_output(out_dir, into=True)
    networks = dict(zip(NETWORK_NAMES, load_networks(weights_dir)))
    try:
        weights_version = importlib.metadata.version(WEIGHTS_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        weights_version = "unknown"
    result = {}
    for seed, (name, network) in enumerate(networks.items()):
        example_shape, axes, outputs, check_shape = _GRAPHS[name]
        network.eval()
        dynamic = {axis: torch.export.Dim(label, min=12 if axis else 1) for axis, label in axes.items()}
        metadata = {
            "facepipe_format": DETECTOR_FORMAT, "network": name, "channel_order": "rgb",
            "input_mean": "127.5", "input_scale": "128", "outputs": ",".join(outputs),
            "weights": f"{WEIGHTS_DISTRIBUTION} {weights_version} (Zhang et al. 2016, converted from the Caffe release)",
            "facepipe_version": __version__,
        }
        worst = {}

        def check(path: Path, network=network, shape=check_shape, seed=seed, name=name) -> None:
            worst[name] = _parity(network, path, shape, seed)
            if worst[name] > DETECTOR_PARITY_ATOL:
                raise OnnxModelError(f"the exported {name} differs from PyTorch by {worst[name]:.2e} "
                                     f"(> {DETECTOR_PARITY_ATOL}); it was not written")

        export_graph(network, torch.zeros(*example_shape), dynamic, targets[name], metadata, opset, ["images"],
                     outputs, check)
        result[name] = {"out": str(targets[name]), "bytes": targets[name].stat().st_size,
                        "max_abs_difference": worst[name], "outputs": outputs}
    return result
