"""``facepipe export``: a checkpoint's embedding network as an ONNX file with a dynamic batch
axis and its preprocessing contract in the metadata (:mod:`facepipe.models.onnx_backend`), so
that ONNX Runtime, TensorRT or any other runtime embeds as facepipe does.

The graph is the backbone alone (raw embeddings); the flip fusion the checkpoint's config asks
for and the L2 normalisation are written into the metadata and applied by the runtime, as
facepipe's own ONNX backend does. Before the file is written, ONNX Runtime's embeddings of a
seeded batch are compared with PyTorch's: a graph that does not reproduce the model (cosine below
:data:`PARITY_COSINE` for any row) is not written.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from facepipe import __version__
from facepipe.models.loaded import load_model
from facepipe.models.onnx_backend import FACEPIPE_CONTRACT, FORMAT, OnnxModelError, load_onnx_model, require
from facepipe.runtime.io import atomic_write, check_writable_output

__all__ = ["PARITY_COSINE", "export_graph", "export_onnx"]

log = logging.getLogger(__name__)

PARITY_COSINE = 0.9999
DEFAULT_OPSET = 18


def _check_parity(model, exported: Path, seed: int = 0, rows: int = 4) -> float:
    """The smallest cosine between PyTorch's and ONNX Runtime's flip-fused, normalised embeddings
    of ``rows`` seeded images (an export whose batch axis is not dynamic fails here too: 2 rows
    are run after the export's example batch of 1)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(rows, 3, *model.input_size, generator=generator) * 2 - 1
    reference = model.embed(images)
    onnx_model = load_onnx_model(exported)
    exported_rows = np.concatenate([onnx_model.embed(images[:1]), onnx_model.embed(images[1:])])
    return float(np.min(np.sum(reference.astype(np.float64) * exported_rows, axis=1)))


def export_graph(network: torch.nn.Module, example: torch.Tensor, dynamic: dict, out: Path, metadata: dict[str, str],
                 opset: int, input_names: list[str], output_names: list[str], check) -> None:
    """``network`` as an ONNX graph at ``out`` (dynamic input axes ``dynamic``) with ``metadata``,
    written only after ``check(temporary path)`` returns (it raises to refuse the graph); the file
    appears whole or not at all."""
    onnx = require("onnx")
    require("onnxruntime")
    require("onnxscript")  # torch's ONNX exporter
    tmp = out.with_name(f".{out.name}.export.tmp")
    try:
        # The exporter prints its progress and logs its graph passes: not the user's concern.
        quiet = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
        levels = [logger.level for logger in quiet]
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            for logger in quiet:
                logger.setLevel(logging.WARNING)
            try:
                torch.onnx.export(network, (example,), str(tmp), input_names=input_names, output_names=output_names,
                                  dynamic_shapes=(dynamic,), dynamo=True, opset_version=opset, external_data=False,
                                  verbose=False)
            finally:
                for logger, level in zip(quiet, levels):
                    logger.setLevel(level)
        graph = onnx.load(str(tmp))
        del graph.metadata_props[:]
        for key, value in metadata.items():
            graph.metadata_props.add(key=key, value=value)
        graph.producer_name = "facepipe"
        onnx.checker.check_model(graph)
        onnx.save(graph, str(tmp))
        check(tmp)
        with atomic_write(out, "wb") as handle:
            handle.write(tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                overwrite: bool = False) -> dict:
    """Write ``checkpoint``'s backbone to ``out`` (``.onnx``); returns what was written. An
    existing ``out`` is replaced only with ``overwrite``; the file appears whole or not at all."""
    for module in ("onnx", "onnxruntime", "onnxscript"):  # before any work: say which extra is missing
        require(module)
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise OnnxModelError(f"--out {out}: give a file name ending in .onnx")
    if out.exists() and not overwrite:
        raise OnnxModelError(f"{out} exists; pass --overwrite to replace it")
    check_writable_output(out)
    model = load_model(checkpoint, "cpu")
    if not hasattr(model, "model"):
        raise OnnxModelError(f"{checkpoint} is already an ONNX model")
    network = model.model.eval()
    example = torch.zeros(1, 3, *model.input_size)
    with torch.no_grad():
        embedding_size = int(network(example).shape[1])
    metadata = {
        "facepipe_format": FORMAT,
        "input_size": f"{model.input_size[0]},{model.input_size[1]}",
        "channel_order": FACEPIPE_CONTRACT.order, "input_mean": f"{FACEPIPE_CONTRACT.mean:g}",
        "input_scale": f"{FACEPIPE_CONTRACT.scale:g}",
        "flip": model.flip, "embedding_size": str(embedding_size),
        "model_fingerprint": model.fingerprint, "facepipe_version": __version__,
        "source_checkpoint": os.fspath(checkpoint),
    }
    cosine = None

    def check(path: Path) -> None:
        nonlocal cosine
        cosine = _check_parity(model, path)
        if cosine < PARITY_COSINE:
            raise OnnxModelError(f"{checkpoint}: the exported graph's embeddings differ from PyTorch's (cosine "
                                 f"{cosine:.6f} < {PARITY_COSINE}); nothing was written")

    export_graph(network, example, {0: torch.export.Dim("batch", min=1)}, out, metadata, opset, ["images"],
                 ["embeddings"], check)
    log.info("exported %s to %s (opset %d, parity cosine >= %.6f)", checkpoint, out, opset, cosine)
    return {"out": str(out), "opset": opset, "parity_min_cosine": cosine, "bytes": out.stat().st_size,
            **{key: value for key, value in metadata.items() if key != "facepipe_format"}}
