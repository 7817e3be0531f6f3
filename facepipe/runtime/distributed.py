"""Multi-process training on torch.distributed (torchrun): the process group, rank-sliced
batches and the few collectives the trainer needs.

``torchrun --nproc_per_node=G -m facepipe train ...`` starts G processes with RANK, WORLD_SIZE
and LOCAL_RANK in their environment; :func:`init_distributed` joins them into one process group
(NCCL on GPUs, gloo on CPU) and gives each its device. Without those variables everything here
is a no-op for a single process.

The batch in the config (``data.batch_size``) is the *global* batch: every optimisation step
consumes the same samples whatever the number of processes, each rank a contiguous slice of it.
So the epoch order, the number of steps per epoch and the learning-rate schedule do not depend on
the world size, and a checkpoint written with G ranks resumes with any other number.
"""
from __future__ import annotations

import atexit
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from facepipe.errors import UsageError
from facepipe.runtime.device import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_setting: str = "auto") -> tuple[DistributedContext, torch.device]:
    """Join the torchrun process group (once per process) and pick this rank's device."""
    if not launched_by_torchrun():
        return DistributedContext(), resolve_device(device_setting)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(device_setting)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        drain_seconds = runloop_drain_seconds()  # a bad override fails before the group forms
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        # A group still busy when the interpreter finalises can abort a finished run (see
        # _destroy_process_group): tear it down before that.
        atexit.register(_destroy_process_group, drain_seconds)
    return DistributedContext(rank, world, local_rank), device


# How long the exit handler leaves the GIL free (see _destroy_process_group); the environment
# variable overrides it (bench/ddp_exit_stress.py sets 0 to show the race).
RUNLOOP_DRAIN_SECONDS = 0.2
DRAIN_VARIABLE = "FACEPIPE_RUNLOOP_DRAIN_SECONDS"


def runloop_drain_seconds() -> float:
    text = os.environ.get(DRAIN_VARIABLE)
    if text is None:
        return RUNLOOP_DRAIN_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0.0 <= seconds < 60.0:
        raise UsageError(f"environment variable {DRAIN_VARIABLE}={text!r}: expected seconds in [0, 60)")
    return seconds


def _destroy_process_group(drain_seconds: float) -> None:
    """Exit handler of a torchrun process.

    Without the pause, a rank with nothing left to do after its last collective (rank 1 after
    the last ``all_gather_object``) can reach interpreter finalisation while a gloo runloop
    thread is still destroying that finished work. The destructor drops a Python-owned tensor
    and so needs the GIL; a thread that takes the GIL during finalisation is made to exit, which
    unwinds through a noexcept destructor: "terminate called without an active exception",
    SIGABRT, a finished run reported as failed (traced with gdb; about 1 two-process CLMLE run in
    17 on the 2-core machine). Destroying the group cannot prevent it: DDP's reducer keeps the
    group and its runloop threads alive until the process exits. Sleeping releases the GIL, so
    such a thread finishes (it needs microseconds) before finalisation starts.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
        time.sleep(drain_seconds)


def barrier(ctx: DistributedContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_true(ctx: DistributedContext, flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (a skipped step must be skipped everywhere, or the
    ranks' gradient all-reduces would fall out of step)."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_object(ctx: DistributedContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    holder = [obj if ctx.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_rows(ctx: DistributedContext, rows: np.ndarray) -> np.ndarray:
    """Concatenate every rank's ``rows`` in rank order, on every rank (row counts may differ)."""
    if not ctx.enabled:
        return rows
    pieces: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(pieces, np.ascontiguousarray(rows))
    return np.concatenate(pieces)


def rank_slice(count: int, ctx: DistributedContext) -> slice:
    """This rank's contiguous share of ``count`` items (shares differ by at most one)."""
    bounds = np.linspace(0, count, ctx.world_size + 1).round().astype(int)
    return slice(int(bounds[ctx.rank]), int(bounds[ctx.rank + 1]))


class RankSlicedSampler:
    """Cuts the global-batch stream of ``sampler`` into this rank's slices: of every
    ``global_batch`` consecutive items, rank r takes items [r * b, (r + 1) * b), b = B / G.

    ``set_epoch(epoch, start)`` counts ``start`` in global items, like the wrapped sampler.
    """

    def __init__(self, sampler: Any, global_batch: int, ctx: DistributedContext) -> None:
        if global_batch % ctx.world_size:
            raise ValueError(f"the global batch ({global_batch}) must be divisible by the number of processes "
                             f"({ctx.world_size})")
        self.sampler = sampler
        self.global_batch = global_batch
        self.local_batch = global_batch // ctx.world_size
        self.offset = ctx.rank * self.local_batch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start=start)

    def __iter__(self) -> Iterator[Any]:
        batch: list[Any] = []
        for item in self.sampler:
            batch.append(item)
            if len(batch) == self.global_batch:
                yield from batch[self.offset:self.offset + self.local_batch]
                batch = []

    def __len__(self) -> int:
        return len(self.sampler) // self.global_batch * self.local_batch
