"""Training checkpoints: one file with everything needed to resume exactly.

A checkpoint holds model, head, optimizer, LR scheduler and AMP scaler states, the epoch and step
counters, every RNG state, the config and the identity list. It is written to a temporary file
and renamed, so a crash never leaves a broken checkpoint, and it is read with
``torch.load(weights_only=True)``, so a tampered file cannot run code.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from facepipe.errors import FacepipeUserError
from facepipe.runtime.io import atomic_write

FORMAT_VERSION = 1
LATEST = "latest.pt"
BEST = "best.pt"
REQUIRED_KEYS = ("format_version", "model", "config", "identities", "epoch", "step")


class CheckpointError(RuntimeError, FacepipeUserError):
    """A checkpoint that is missing, unreadable, or not a facepipe checkpoint."""


def model_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """Short content hash of a model's weights: embeddings from different weights never mix."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    state = {"format_version": FORMAT_VERSION, **state}
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / LATEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated files, foreign pickles, wrong formats
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a facepipe checkpoint (missing {', '.join(REQUIRED_KEYS)})")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {state['format_version']}, newer than this facepipe "
            f"({FORMAT_VERSION}); upgrade facepipe"
        )
    return state


def checkpoint_config(state: dict[str, Any], path: str | os.PathLike) -> Any:
    """The run's :class:`facepipe.config.Config` saved in a checkpoint (``state`` from
    :func:`load_checkpoint`); a config this facepipe cannot use is a :class:`CheckpointError`."""
    from pydantic import ValidationError

    from facepipe.config import Config

    try:
        return Config.model_validate(state["config"])
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(part) for part in item['loc']) or '<root>'}: {item['msg']}"
                             for item in exc.errors()[:3])
        raise CheckpointError(f"checkpoint {path} holds a config this facepipe cannot use ({problems}); use a "
                              "checkpoint written by 'facepipe train' of this version") from None


def load_weights(model: torch.nn.Module, weights: Any, path: str | os.PathLike) -> None:
    """Load a checkpoint's ``model`` weights into the model its own config describes; weights of
    another shape (a checkpoint whose config was edited, or mixed from two runs) are a
    :class:`CheckpointError`."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as exc:
        mismatch = " ".join(str(exc).split())
        raise CheckpointError(f"checkpoint {path}: its weights do not fit the model its own config describes "
                              f"({mismatch[:300]}{' ...' if len(mismatch) > 300 else ''}); the file was altered or "
                              "mixed from two runs: use a checkpoint as 'facepipe train' wrote it") from None


def copy_checkpoint(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Atomic copy (``best.pt`` from ``latest.pt``)."""
    with open(source, "rb") as src, atomic_write(target, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
