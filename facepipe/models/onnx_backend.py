"""An embedding network in an ONNX file, run with ONNX Runtime behind the same ``embed()`` as
:class:`facepipe.models.loaded.LoadedModel`: every command that takes ``--checkpoint`` takes an
``.onnx`` file too (:func:`facepipe.models.loaded.load_model` hands it here).

The preprocessing contract. facepipe reads an image file at the model's input size into the eval
transform's tensor (RGB, ``(x - 127.5) / 128``, :mod:`facepipe.data.transforms`). A network may
want other input: channel order, mean and scale, so that its input is ``(x - mean) / scale`` for
pixel values x in 0..255 in that channel order. facepipe's own exports (``facepipe export``,
:mod:`facepipe.models.export`) carry the contract in the model's metadata (:data:`METADATA_KEYS`),
with the flip fusion and the weights' fingerprint; a foreign model (e.g. insightface's model-zoo
recognition models: 112x112 RGB, ``(x - 127.5) / 127.5``) gets it from the user
(``--input-order --input-mean --input-scale``: :class:`InputContract`), and one with neither is
refused with a message naming the options. The graph returns raw embeddings; flip fusion and L2
normalisation run outside it, exactly as for a PyTorch model (:func:`embed_batches`).

``onnxruntime`` (and ``onnx`` for exports) are the ``onnx`` extra: ``pip install 'facepipe[onnx]'``;
the ``gpu`` extra brings ``onnxruntime-gpu`` instead (CUDA is used when present).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from facepipe.data.transforms import PIXEL_MEAN, PIXEL_SCALE
from facepipe.errors import FacepipeUserError
from facepipe.models.forward import EmbeddingModel, embed_batches, image_dataset

__all__ = ["CHANNEL_ORDERS", "FACEPIPE_CONTRACT", "InputContract", "METADATA_KEYS", "ModelFile", "OnnxModel",
           "OnnxModelError", "OnnxUnavailableError", "load_onnx_model", "onnx_input_size", "require"]

ONNX_EXTRA = "pip install 'facepipe[onnx]' (on a CUDA machine: pip install 'facepipe[gpu]' onnx onnxscript)"
FORMAT = "facepipe-embedding/1"
CHANNEL_ORDERS = ("rgb", "bgr")
# Metadata of facepipe's exports (ONNX metadata_props, string values).
METADATA_KEYS = ("facepipe_format", "input_size", "channel_order", "input_mean", "input_scale", "flip",
                 "embedding_size", "model_fingerprint", "facepipe_version", "source_checkpoint")
DEFAULT_BATCH_SIZE = 64


class OnnxModelError(ValueError, FacepipeUserError):
    """An ONNX file facepipe cannot run as an embedding network, or a contract that does not fit it."""


class OnnxUnavailableError(FacepipeUserError, ImportError):
    """onnx / onnxruntime are not installed: the message names the extra to install."""


def require(module: str) -> Any:
    """Import ``module`` (``onnxruntime``, ``onnx``) or say which extra brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise OnnxUnavailableError(f"{module} is not installed; ONNX models need the onnx extra: "
                                   f"{ONNX_EXTRA}") from None


@dataclass(frozen=True)
class InputContract:
    """What the network's input is: ``(x - mean) / scale`` of pixels x (0..255) in ``order``."""

    order: str
    mean: float
    scale: float

    def __post_init__(self) -> None:
        if self.order not in CHANNEL_ORDERS:
            raise OnnxModelError(f"--input-order {self.order!r}: choose one of {', '.join(CHANNEL_ORDERS)}")
        if not (np.isfinite(self.mean) and np.isfinite(self.scale) and self.scale > 0):
            raise OnnxModelError(f"--input-mean {self.mean} / --input-scale {self.scale}: give finite numbers, "
                                 "the scale above 0")

    def from_eval_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch in the eval transform's scaling, as this contract's input."""
        if self == FACEPIPE_CONTRACT:
            return batch
        pixels = batch * PIXEL_SCALE + PIXEL_MEAN
        out = (pixels - self.mean) / self.scale
        return out.flip(1) if self.order == "bgr" else out

    def describe(self) -> str:
        return f"{self.order.upper()}, (x - {self.mean:g}) / {self.scale:g}"


FACEPIPE_CONTRACT = InputContract("rgb", PIXEL_MEAN, PIXEL_SCALE)


class ModelFile(os.PathLike):
    """A model path with the preprocessing the user stated for it (the ``--input-*`` options):
    what the commands pass on where a checkpoint path goes; ``str()`` and ``os.fspath()`` give the
    path, so records and messages name the file."""

    def __init__(self, path: str | os.PathLike, contract: InputContract | None = None) -> None:
        self.path = os.fspath(path)
        self.contract = contract

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"ModelFile({self.path!r}, {self.contract!r})"


def is_onnx(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(".onnx")


@dataclass
class OnnxModel(EmbeddingModel):
    """An ONNX embedding network in an ONNX Runtime session, with its input size, preprocessing
    contract, default flip fusion and fingerprint (the weights' fingerprint for facepipe's own
    exports, so that their embeddings and an index of the PyTorch model's go together; else a
    hash of the file)."""

    session: Any
    path: str
    input_size: tuple[int, int]
    contract: InputContract
    flip: str
    fingerprint: str
    embedding_size: int | None
    metadata: dict[str, str]
    batch_size: int = DEFAULT_BATCH_SIZE

    @property
    def checkpoint_path(self) -> str:
        return self.path

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        inputs = self.contract.from_eval_tensor(batch).numpy().astype(np.float32, copy=False)
        return torch.from_numpy(self.session.run(None, {self.session.get_inputs()[0].name: inputs})[0])

    @property
    def default_batch_size(self) -> int:
        return self.batch_size

    def _embed(self, paths_or_array: Sequence[str] | np.ndarray | torch.Tensor, flip: str, batch_size: int,
               num_workers: int, progress: bool) -> np.ndarray:
        return embed_batches(self._forward, image_dataset(paths_or_array, self.input_size), batch_size, flip,
                             num_workers, progress)


def _file_hash(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "onnx-" + digest.hexdigest()[:16]


def _static_input_size(path: str, session: Any) -> tuple[int, int]:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise OnnxModelError(f"{path}: an embedding network has one input (images), this one has {len(inputs)}")
    shape = inputs[0].shape
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise OnnxModelError(f"{path}: input {inputs[0].name} has shape {shape}; facepipe needs [batch, 3, H, W] "
                             "with fixed channels, height and width")
    if shape[1] != 3:
        raise OnnxModelError(f"{path}: input {inputs[0].name} has {shape[1]} channels; facepipe feeds 3 (colour)")
    return int(shape[2]), int(shape[3])


def _session(path: str, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = None) -> Any:
    ort = require("onnxruntime")
    if not Path(path).is_file():
        raise FileNotFoundError(2, "No such file or directory", path)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers are not the user's concern
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(path, sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types for a bad file
        raise OnnxModelError(f"{path}: ONNX Runtime cannot load it ({type(exc).__name__}: {str(exc)[:200]})") from None


def providers_for(device: torch.device | str) -> list[str]:
    """ONNX Runtime providers for ``device``: CUDA first when it is a GPU and onnxruntime-gpu is installed."""
    ort = require("onnxruntime")
    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return providers


def onnx_input_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an ONNX embedding network's input (e.g. to align photos for it)."""
    path = os.fspath(path)
    return _static_input_size(path, _session(path))


def load_onnx_model(path: str | os.PathLike, device: torch.device | str = "cpu",
                    contract: InputContract | None = None) -> OnnxModel:
    """An ONNX Runtime session of ``path`` (CUDA when ``device`` is a GPU and onnxruntime-gpu is
    installed) with its preprocessing contract: the file's own (facepipe's exports), or
    ``contract`` (a foreign model; stating one for a facepipe export that says otherwise is refused)."""
    path = os.fspath(path)
    session = _session(path, providers_for(device))
    input_size = _static_input_size(path, session)
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    if metadata.get("facepipe_format") == FORMAT:
        own = InputContract(metadata["channel_order"], float(metadata["input_mean"]), float(metadata["input_scale"]))
        if contract is not None and contract != own:
            raise OnnxModelError(f"{path} is a facepipe export whose input is {own.describe()}; the --input-* options "
                                 f"say {contract.describe()}: leave them out")
        stated = tuple(int(v) for v in metadata["input_size"].split(","))
        if stated != input_size:
            raise OnnxModelError(f"{path}: its metadata says input size {stated}, its graph {input_size}")
        return OnnxModel(session, path, input_size, own, metadata["flip"], metadata["model_fingerprint"],
                         int(metadata["embedding_size"]), metadata)
    if contract is None:
        raise OnnxModelError(f"{path} carries no facepipe preprocessing contract: say what its input is with "
                             "--input-order rgb|bgr --input-mean M --input-scale S (insightface's model-zoo "
                             "recognition models: --input-order rgb --input-mean 127.5 --input-scale 127.5)")
    outputs = session.get_outputs()
    size = outputs[0].shape[-1] if outputs and outputs[0].shape and isinstance(outputs[0].shape[-1], int) else None
    return OnnxModel(session, path, input_size, contract, "none", _file_hash(path), size, metadata)
