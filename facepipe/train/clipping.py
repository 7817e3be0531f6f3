"""Gradient clipping by parameter group: each group is clipped by its own norm.

One global norm let a group with its own learning-rate rule (ARConvL's radii: norm 513 at the
start of the study's fine-tuning) scale every other parameter's step by 0.0096.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

ClipGroups = dict[str, tuple[list[nn.Parameter], float | None]]


def clipping_groups(param_groups: list[dict[str, Any]], optim: Any,
                    limit_of: Callable[[str], float | None]) -> ClipGroups:
    """Parameters clipped together and their max norm: ``main`` (``optim.clip_grad_norm``) and
    each other ``lr_rule`` of the optimizer's groups with ``limit_of(rule)`` (None: not clipped).
    With ``optim.clip_mode: global`` everything is one group, as before per-group clipping."""
    if optim.clip_mode == "global":
        return {"global": ([p for group in param_groups for p in group["params"]], optim.clip_grad_norm)}
    groups: ClipGroups = {}
    for group in param_groups:
        name = group.get("lr_rule", "main")
        limit = optim.clip_grad_norm if name == "main" else limit_of(name)
        params, _ = groups.get(name, ([], limit))
        groups[name] = (params + list(group["params"]), limit)
    return groups


def clip_gradients(groups: ClipGroups) -> dict[str, float]:
    """Clip each group's (unscaled) gradients by its own norm; returns, for the log, each group's
    gradient norm and clip factor (1 = untouched)."""
    stats = {}
    for name, (params, limit) in groups.items():
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            continue
        if limit:
            norm = float(nn.utils.clip_grad_norm_(with_grad, limit))
            factor = min(1.0, limit / (norm + 1e-6))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().float())
                                                               for p in with_grad])))
            factor = 1.0
        stats[f"grad_norm_{name}"] = norm
        stats[f"clip_factor_{name}"] = factor
    return stats
