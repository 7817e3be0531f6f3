"""Weights trained elsewhere, made into facepipe checkpoints: ``facepipe import-weights``.

An insightface arcface_torch ``backbone.pth`` (``torch.save(backbone.state_dict())``, Deng et
al.'s IResNet) is read with ``torch.load(weights_only=True)`` and loaded by its published
parameter names, strictly, into facepipe's :class:`~facepipe.models.iresnet.IResNet`; a key that
is missing, one too many or a tensor of another shape is a :class:`ForeignWeightsError` naming
them. The result is a checkpoint as ``facepipe train`` writes one (weights, config, an empty
identity list, epoch and step 0): ``facepipe embed / eval / index --checkpoint`` read it, and
``train.init_from`` fine-tunes from it (the backbone only: it has no classifier).

Two wrappings are taken off, as neither needs a guess: the training checkpoint of arcface_torch
(``checkpoint_gpu_N.pt``, the backbone under ``state_dict_backbone``) or a dict holding the
weights under ``state_dict``; and the ``module.`` prefix of a state dict saved from inside
DistributedDataParallel, when every key has it. Anything else is refused with what was found.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from facepipe.config import Config, DataConfig, ModelConfig
from facepipe.errors import FacepipeUserError
from facepipe.models import build_backbone
from facepipe.models.iresnet import BLOCKS_PER_STAGE, STAGE_CHANNELS
from facepipe.runtime.checkpoint import REQUIRED_KEYS, model_fingerprint, save_checkpoint

# Keys under which a whole checkpoint holds the backbone's state dict: arcface_torch's resumable
# training checkpoint, and the common {"state_dict": ...}.
WRAPPER_KEYS = ("state_dict_backbone", "state_dict")
DDP_PREFIX = "module."
SHOWN = 3  # names listed per kind of mismatch


class ForeignWeightsError(ValueError, FacepipeUserError):
    """A weights file that cannot be read, or whose names or shapes do not fit the model."""


def _reason(exc: BaseException, limit: int = 160) -> str:
    """Why torch.load refused a file, in one short line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch colours parts of its messages
    if "Weights only load failed" in text:
        return "it pickles objects other than tensors, such as a whole model, which weights_only refuses to run"
    text = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return text if len(text) <= limit else text[:limit] + " ..."


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of tensors in ``path``, unwrapped as the module docstring says."""
    with open(path, "rb") as handle:  # a missing file is the OS's error, naming the path
        try:
            loaded = torch.load(handle, map_location="cpu", weights_only=True)
        except Exception as exc:  # foreign pickles (whole modules), truncated or non-torch files
            raise ForeignWeightsError(
                f"{path} cannot be read with torch.load(weights_only=True) ({_reason(exc)}); it must hold a "
                "state dict of tensors, as torch.save(backbone.state_dict(), path) writes") from None
    if not isinstance(loaded, dict):
        raise ForeignWeightsError(f"{path} holds a {type(loaded).__name__}, not a state dict (a dict of parameter "
                                  "names to tensors)")
    state: Any = loaded
    if not all(torch.is_tensor(value) for value in loaded.values()):
        if all(key in loaded for key in REQUIRED_KEYS):
            raise ForeignWeightsError(f"{path} is a facepipe checkpoint already: embed, eval, index and "
                                      "train.init_from take it as it is")
        wrapped = [key for key in WRAPPER_KEYS if isinstance(loaded.get(key), dict)]
        if len(wrapped) != 1:
            keys = [str(key) for key in loaded][:6]
            raise ForeignWeightsError(
                f"{path} is not a state dict of tensors (its top-level keys: {', '.join(keys)}"
                f"{', ...' if len(loaded) > 6 else ''}); expected parameter names (conv1.weight, ...) or the "
                f"weights under exactly one of {', '.join(WRAPPER_KEYS)}")
        state = loaded[wrapped[0]]
        odd = [str(key) for key, value in state.items() if not torch.is_tensor(value)]
        if odd:
            raise ForeignWeightsError(f"{path}: {wrapped[0]} holds values that are not tensors ({_names(odd)})")
    if not state:
        raise ForeignWeightsError(f"{path} holds no weights (an empty state dict)")
    prefixed = [key.startswith(DDP_PREFIX) for key in state]
    if all(prefixed):
        state = {key[len(DDP_PREFIX):]: value for key, value in state.items()}
    elif any(prefixed):
        raise ForeignWeightsError(f"{path}: {sum(prefixed)} of {len(state)} keys start with '{DDP_PREFIX}' and the "
                                  "others do not; save the weights of one module")
    return dict(state)


def _layout_hints(state: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """What the file's names and shapes say about the options that would fit it."""
    hints = []
    blocks = [0, 0, 0, 0]
    for key in state:
        found = re.match(r"layer([1-4])\.(\d+)\.", key)
        if found:
            stage = int(found.group(1)) - 1
            blocks[stage] = max(blocks[stage], int(found.group(2)) + 1)
    depth = next((d for d, counts in BLOCKS_PER_STAGE.items() if tuple(blocks) == counts), None)
    if depth is not None and depth != getattr(model, "depth", depth):
        hints.append(f"its layers are those of depth {depth} (--depth {depth})")
    weight, expected = state.get("fc.weight"), model.state_dict().get("fc.weight")
    if weight is not None and expected is not None and weight.dim() == 2 and weight.shape != expected.shape:
        rows, columns = weight.shape
        if rows != expected.shape[0]:
            hints.append(f"its embedding has {rows} dimensions (--embedding-size {rows})")
        channels = STAGE_CHANNELS[-1]
        positions = columns // channels if columns % channels == 0 else 0
        side = round(positions ** 0.5)
        if columns != expected.shape[1] and positions and side * side == positions:
            hints.append(f"its fc takes {side}x{side} feature maps, from {16 * side}x{16 * side} crops "
                         f"(--image-size {16 * side} {16 * side})")
    tops = {key.split(".", 1)[0] for key in state}
    own = {key.split(".", 1)[0] for key in model.state_dict()}
    if len(tops) == 1 and not tops & own:
        hints.append(f"every key starts with '{next(iter(tops))}.', a wrapping this command does not take off: "
                     "save the backbone's own state_dict()")
    return hints


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str, described: str) -> None:
    """Raise :class:`ForeignWeightsError` unless ``state`` has exactly ``model``'s keys and shapes;
    the one-line message names the missing and unexpected keys and the shape mismatches."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [f"{key} file {list(state[key].shape)} vs model {list(tensor.shape)}"
              for key, tensor in expected.items() if key in state and state[key].shape != tensor.shape]
    if not (missing or unexpected or shapes):
        return
    problems = [f"{len(names)} {kind} ({_names(names)})"
                for kind, names in (("missing key(s)", missing), ("unexpected key(s)", unexpected),
                                    ("shape mismatch(es)", shapes)) if names]
    hints = _layout_hints(state, model)
    raise ForeignWeightsError(f"{source} does not fit {described}: {'; '.join(problems)}"
                              + (f"; {'; '.join(hints)}" if hints else ""))


def import_arcface_backbone(weights: str | os.PathLike, out: str | os.PathLike, depth: int,
                            embedding_size: int = 512, image_size: tuple[int, int] = (112, 112),
                            overwrite: bool = False) -> dict[str, Any]:
    """Write ``out``, a facepipe checkpoint of ``model.arch: iresnet`` holding the arcface_torch
    backbone weights of ``weights``; returns a summary (out, keys, parameters, fingerprint)."""
    height, width = image_size
    if height < 16 or width < 16 or height % 16 or width % 16:
        raise ForeignWeightsError(f"--image-size {height} {width}: both sides must be multiples of 16 (arcface_torch "
                                  "trains at 112 112)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ForeignWeightsError(f"{out} exists; choose another --out, or --overwrite to replace it")
    config = Config(model=ModelConfig(arch="iresnet", depth=depth, embedding_size=embedding_size),
                    data=DataConfig(image_size=(height, width)))
    model = build_backbone(config.model, config.data.image_size)
    state = read_state_dict(weights)
    check_state_dict(model, state, str(weights), f"iresnet{depth} (arcface_torch names, embedding {embedding_size}, "
                                                 f"{height}x{width} crops)")
    model.load_state_dict(state)
    weights_out = model.state_dict()
    save_checkpoint(out, {
        "model": weights_out, "config": config.to_dict(), "identities": [], "epoch": 0, "step": 0, "head": {},
        "imported_from": {"path": str(weights), "format": "insightface arcface_torch IResNet state dict"},
    })
    return {"out": str(out), "keys": len(weights_out), "fingerprint": model_fingerprint(weights_out),
            "parameters": sum(p.numel() for p in model.parameters())}
