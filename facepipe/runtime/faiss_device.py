"""Where FAISS runs: on every GPU that the installed faiss sees, or on the CPU.

One place decides it for every FAISS user in facepipe (cluster k-means, the cluster-sampler
neighbour table, the identity index, the chunked gallery search of
:mod:`facepipe.index.flat_search` behind MegaFace's distractor search):

* :func:`gpu_count`: GPUs visible to faiss; 0 with a CPU-only build (``faiss-cpu`` has no
  ``StandardGpuResources``) or when CUDA reports no device.
* :func:`to_device`: a CPU index cloned onto all those GPUs (replicated: every GPU holds the whole
  index and gets a share of the queries; or, with ``shard=True``, sharded: every GPU holds a slice
  of the vectors, for galleries too large for one GPU), or the CPU index itself.
* :func:`search_uses_gpu`: whether a top-k search (``use_gpu`` None / True / False) runs on the
  GPU: not for more than :data:`GPU_MAX_K` neighbours per query, which FAISS GPU search cannot
  return (a warning and the CPU when the choice was left open, an error when the GPU was asked
  for).
* :func:`kmeans_uses_gpu`: the ``gpu`` argument for ``faiss.Kmeans``.

Each decision is logged once per purpose at INFO (a search kept on the CPU for its k, at
WARNING), e.g. ``faiss: megaface search on CPU (no GPU visible to faiss)`` or ``faiss: megaface
search on 4 GPUs, sharded``, so a log shows which path a run took.

Several processes (torchrun, one per GPU): each process keeps its FAISS indexes on its own CUDA
device rather than on all GPUs, and k-means stays on the CPU, so that no process puts a CUDA
context and FAISS scratch memory on the other processes' GPUs.
"""
from __future__ import annotations

import logging
import sys
import threading

import faiss

from facepipe.errors import UsageError

log = logging.getLogger(__name__)

__all__ = [
    "GPU_MAX_K",
    "KMEANS_GPU_MIN_WORK",
    "gpu_count",
    "kmeans_uses_gpu",
    "search_uses_gpu",
    "to_device",
]

# FAISS GPU k-selection returns at most this many neighbours per query; larger k needs the CPU.
GPU_MAX_K = 2048
# Each GPU k-means sets up GPU resources on every GPU (faiss.Kmeans clones its index with
# index_cpu_to_all_gpus), which costs more than clustering a few hundred points on the CPU. The
# per-identity k-means therefore moves to the GPU only when points x clusters reaches this.
KMEANS_GPU_MIN_WORK = 1 << 22

_logged: set[str] = set()
_log_lock = threading.Lock()


def _log_once(message: str, level: int = logging.INFO) -> None:
    with _log_lock:
        if message in _logged:
            return
        _logged.add(message)
    log.log(level, message)


def _reset_log_once() -> None:
    """Forget which messages were logged (tests)."""
    with _log_lock:
        _logged.clear()


def gpu_count() -> int:
    """Number of GPUs the installed faiss can use; 0 for a CPU-only build."""
    if not (hasattr(faiss, "get_num_gpus") and hasattr(faiss, "StandardGpuResources")):
        return 0
    try:
        return max(0, int(faiss.get_num_gpus()))
    except Exception:  # a GPU build without a working CUDA driver
        return 0


def _plural(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def _distributed_device() -> int | None:
    """This process's CUDA device when it is one of several torch.distributed processes."""
    torch = sys.modules.get("torch")  # never imported here: without torch there is no process group
    if torch is None:
        return None
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return None
        return int(torch.cuda.current_device()) if torch.cuda.is_available() else None
    except Exception:
        return None


def to_device(index, shard: bool = False, purpose: str = "", *, use_gpu: bool | None = None,
              cpu_reason: str = "GPU use turned off"):
    """``index`` cloned onto every GPU faiss sees, or ``index`` itself on the CPU. In one of
    several torch.distributed processes, onto this process's CUDA device only.

    Args:
        index: a CPU FAISS index (one the GPU cloner supports: flat or IVF, possibly inside an
            ``IndexIDMap``; HNSW is not).
        shard: split the vectors over the GPUs (``GpuMultipleClonerOptions.shard``) instead of
            copying the whole index to each; for large galleries. Sharded flat indexes number
            their vectors in add order, so they accept ``add`` only when empty (``reset`` first).
        purpose: what the index is for, in the log line.
        use_gpu: None: the GPU when faiss sees one; False: the CPU (logged with ``cpu_reason``);
            True: the GPU, and an error when faiss sees none.

    Errors of the GPU cloner (unsupported index, out of memory) propagate; the caller decides
    whether to fall back to the CPU.
    """
    what = purpose or "index"
    count = gpu_count()
    if use_gpu is False:
        _log_once(f"faiss: {what} on CPU ({cpu_reason})")
        return index
    if count == 0:
        if use_gpu:
            raise RuntimeError(f"faiss GPU use was requested for {what}, but no GPU is visible to faiss "
                               "(is faiss-gpu installed instead of faiss-cpu, and a GPU visible?)")
        _log_once(f"faiss: {what} on CPU (no GPU visible to faiss)")
        return index
    options = faiss.GpuMultipleClonerOptions()
    options.shard = bool(shard)
    device = _distributed_device()
    if device is not None:
        moved = faiss.index_cpu_to_gpus_list(index, co=options, gpus=[device])
        _log_once(f"faiss: {what} on GPU {device} (this process's device; several processes share the GPUs)")
        return moved
    moved = faiss.index_cpu_to_all_gpus(index, co=options, ngpu=count)
    layout = "" if count == 1 else (", sharded" if shard else ", replicated")
    _log_once(f"faiss: {what} on {_plural(count)}{layout}")
    return moved


def search_uses_gpu(use_gpu: bool | None, k: int, purpose: str = "search", *,
                    error: type[Exception] = UsageError, k_source: str | None = None) -> bool:
    """Whether a search for the top ``k`` neighbours of each query runs on the GPU.

    ``use_gpu``: None: on the GPU when faiss sees one and ``k`` is at most :data:`GPU_MAX_K`
    (beyond it FAISS GPU search returns nothing: a warning, and the CPU); True: the GPU, and
    ``error`` when faiss sees none or ``k`` exceeds :data:`GPU_MAX_K`; False: the CPU.

    A CPU decision is logged here, once per purpose and reason, as :func:`to_device` logs its
    own; so when this returns True, place the index with ``to_device(..., use_gpu=True)``, and
    when it returns False, keep the CPU index as it is. ``k_source`` names the settings that set
    ``k``, for the error message (e.g. ``"max_rank / impostor_top_k"``).
    """
    what = purpose or "search"
    if use_gpu is None:
        if gpu_count() == 0:
            _log_once(f"faiss: {what} on CPU (no GPU visible to faiss)")
            return False
        if k > GPU_MAX_K:
            _log_once(f"faiss: {what} on CPU (the top {k} neighbours per query are more than FAISS GPU search "
                      f"returns, {GPU_MAX_K})", logging.WARNING)
            return False
        return True
    if not use_gpu:
        _log_once(f"faiss: {what} on CPU (GPU use turned off)")
        return False
    if gpu_count() == 0:
        raise error("FAISS GPU search requested, but faiss has no GPU support or sees no GPU")
    if k > GPU_MAX_K:
        source = f" ({k_source})" if k_source else ""
        raise error(f"FAISS GPU search returns at most {GPU_MAX_K} neighbours per query, but {k} are "
                    f"needed{source}; search on the CPU instead")
    return True


def kmeans_uses_gpu(num_points: int | None = None, num_clusters: int | None = None,
                    purpose: str = "cluster k-means") -> bool:
    """The ``gpu`` argument of ``faiss.Kmeans``: True when faiss sees a GPU and the problem
    (``num_points`` x ``num_clusters``, when given) is large enough to be worth the GPU set-up
    (:data:`KMEANS_GPU_MIN_WORK`), and this is not one of several torch.distributed processes
    (``faiss.Kmeans`` would take every GPU). With False, FAISS k-means runs on the CPU exactly as
    before."""
    count = gpu_count()
    if count == 0:
        _log_once(f"faiss: {purpose} on CPU (no GPU visible to faiss)")
        return False
    if _distributed_device() is not None:
        # faiss.Kmeans(gpu=...) always takes GPUs 0..n-1, which belong to other processes here.
        _log_once(f"faiss: {purpose} on CPU (several processes share the GPUs)")
        return False
    _log_once(f"faiss: {purpose} on {_plural(count)} for problems of at least {KMEANS_GPU_MIN_WORK} "
              "points x clusters, smaller ones on CPU")
    if num_points is None or num_clusters is None:
        return True
    return int(num_points) * int(num_clusters) >= KMEANS_GPU_MIN_WORK
