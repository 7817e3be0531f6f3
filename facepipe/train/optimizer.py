"""A run's optimizer by parameter group: the main groups and the plug-ins' own, each under its
learning-rate rule (``lr_rule``); a new stage's head adds groups for the parameters it brings."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from facepipe.train.plugins.base import LrRule, TrainerPlugin


def param_groups(params: list[nn.Parameter], plugins: Iterable[TrainerPlugin],
                 weight_decay: float) -> list[dict[str, Any]]:
    """The main groups (``lr_rule: main``), then the plug-ins' groups of the parameters they claim.
    No weight decay on BN/PReLU parameters and biases: decaying them only fights the
    normalisation; the classifier weight (2-D) is decayed like the convolutions."""
    own = [group for plugin in plugins for group in plugin.param_groups(params)]
    claimed = {id(p) for group in own for p in group["params"]}
    params = [p for p in params if id(p) not in claimed]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": group, "weight_decay": wd, "lr_rule": "main"}
              for group, wd in ((decay, weight_decay), (no_decay, 0.0)) if group]
    return groups + own


def build_optimizer(groups: list[dict[str, Any]], optim: Any) -> torch.optim.Optimizer:
    """SGD (with momentum, optionally Nesterov) or AdamW over ``groups`` (``optim``: the config's)."""
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov)
    return torch.optim.AdamW(groups, lr=optim.lr)


def add_param_groups(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                     groups: list[dict[str, Any]], rule_of: Callable[[dict[str, Any]], LrRule], step: int) -> None:
    """Add ``groups`` to a running optimizer and its schedule, each under ``rule_of(group)`` from
    optimisation step ``step`` on."""
    for group in groups:
        optimizer.add_param_group(group)
        added = optimizer.param_groups[-1]
        rule = rule_of(added)
        added["initial_lr"] = added["lr"]
        scheduler.base_lrs.append(added["lr"])
        scheduler.lr_lambdas.append(rule)
        added["lr"] = added["initial_lr"] * rule(step)
