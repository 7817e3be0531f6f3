"""Device and mixed-precision selection: CUDA when present, CPU otherwise."""
from __future__ import annotations

import contextlib
import logging

import torch

from facepipe.errors import FacepipeUserError

log = logging.getLogger(__name__)


class DeviceError(RuntimeError, FacepipeUserError):
    """A device (``--device``, ``train.device``) that this machine does not have."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when a GPU is visible; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device '{name}' is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device '{name}' was requested but no CUDA GPU is visible; use device=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device '{name}' was requested but only {torch.cuda.device_count()} CUDA GPU(s) are "
                          "visible (cuda:0 ...)")
    return device


def resolve_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``amp`` in {auto, bf16, fp16, off}; AMP only runs on CUDA.

    ``auto`` prefers bf16 (no loss scaling needed) where the GPU supports it.
    """
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def float32_region(device_type: str):
    """A region where autocast is off, so its matmuls run in the precision of their inputs.

    For numerically sensitive arithmetic inside an autocast region, such as the margin heads'
    (acos, Chebyshev polynomials, scaling by s = 64) and the margin losses built on them: under
    autocast their matmuls would silently run in fp16/bf16, which that arithmetic does not
    tolerate. Cast the inputs to float32 inside. A no-op context for a device type without
    autocast support."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, ValueError):  # device type without autocast support
        return contextlib.nullcontext()
