"""Exact inner-product top-k search of queries over a gallery read in chunks.

For galleries too large to hold in memory at once (a memory-mapped ``.npy`` of a million 512-d
rows is 2 GB): the gallery rows are read chunk by chunk, L2-normalised (:func:`unit_rows`),
searched with a FAISS flat inner-product index (``IndexFlatIP``; sharded over every GPU that
faiss sees, else on the CPU: :func:`facepipe.runtime.faiss_device.search_uses_gpu`) and merged
into each query's running top-k.

The gallery grows in a given order, and each query's top list is also kept at nested prefix
sizes of it ("levels"): the top-k among the first D gallery rows for every D asked for, from one
pass. MegaFace's distractor levels are such prefixes (:mod:`facepipe.eval.megaface`).
"""
from __future__ import annotations

from typing import Sequence

import faiss
import numpy as np
from tqdm import tqdm

from facepipe.errors import UsageError
from facepipe.runtime.faiss_device import search_uses_gpu, to_device

__all__ = [
    "DEFAULT_CHUNK",
    "chunked_top_k",
    "unit_rows",
]

# Gallery rows read, normalised and searched at once.
DEFAULT_CHUNK = 65536
SEARCH_PURPOSE = "gallery search"


def unit_rows(x: np.ndarray, what: str, error: type[Exception] = UsageError,
              row_numbers: np.ndarray | None = None) -> np.ndarray:
    """The rows of ``x`` scaled to unit L2 norm, as a C-contiguous float32 array.

    Inner products of unit vectors are cosine similarities, which every search here compares:
    whatever comes in is normalised. Raises ``error`` (named by ``what``) when ``x`` is not a
    2-D numeric array, or when rows have zero norm or non-finite values (no direction on the
    hypersphere); the message counts them and names the first, numbered by ``row_numbers``
    (the rows' numbers in a larger array, e.g. a chunk's rows in a gallery; default 0, 1, ...).
    """
    x = np.asarray(x)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise error(f"{what} must be a 2-D numeric array [rows, dim], got shape {list(x.shape)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    bad = np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0))
    if bad.size:
        first = int(bad[0] if row_numbers is None else row_numbers[bad[0]])
        raise error(f"{what}: {bad.size} row(s) have zero norm or non-finite values (NaN or inf), so no "
                    f"direction on the hypersphere (first: row {first})")
    return x / norms


def _merge_top(scores_a, ids_a, scores_b, ids_b, k):
    """The ``k`` highest of two (scores, ids) top lists per row, descending."""
    scores = np.concatenate((scores_a, scores_b), axis=1)
    ids = np.concatenate((ids_a, ids_b), axis=1)
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, part, axis=1)
        ids = np.take_along_axis(ids, part, axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def chunked_top_k(
    queries: np.ndarray,
    gallery: np.ndarray,
    levels: Sequence[int],
    k: int,
    snapshot_k: int,
    order: np.ndarray | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    use_gpu: bool | None = None,
    progress: bool = True,
    *,
    purpose: str = SEARCH_PURPOSE,
    error: type[Exception] = UsageError,
    what: tuple[str, str] = ("queries", "gallery rows"),
) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
    """Top-k inner-product search of unit ``queries`` over growing prefixes of ``gallery``.

    ``order`` (default: file order) is the order in which gallery rows join the search; the
    prefix of level D is ``order[:D]``. Gallery rows are read chunk by chunk (sorted within a
    chunk, so a memory map is read sequentially), normalised, searched with a FAISS flat IP
    index, and merged into each query's running top-k. ``use_gpu``: see
    :func:`facepipe.runtime.faiss_device.search_uses_gpu`; ``purpose`` names the search in the
    log and the progress bar; input problems raise ``error``, naming the queries and the gallery
    as ``what`` says.

    Returns ``(top_at_level, top_scores, top_rows)``: for each level D the (Q, snapshot_k)
    highest scores among the first D gallery rows (descending, -inf where fewer exist), and the
    final (Q, k) top scores and their gallery row numbers over all levels[-1] rows.
    """
    num = int(gallery.shape[0])
    dim = int(gallery.shape[1])
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise error(f"{what[0]} have shape {queries.shape}; {what[1]} have dimension {dim}")
    order = np.arange(num) if order is None else np.asarray(order)
    levels = sorted(int(d) for d in levels)
    if not levels or levels[-1] > num or levels[0] < 1:
        raise ValueError(f"levels must lie in [1, {num}], got {levels}")
    if snapshot_k > k:
        raise ValueError(f"snapshot_k ({snapshot_k}) must not exceed k ({k})")
    index = faiss.IndexFlatIP(dim)
    if search_uses_gpu(use_gpu, k, purpose, error=error):
        # Sharded over the GPUs: each holds a slice of a chunk; reset() before every add() keeps
        # the sharded index's add-once rule and the chunk-local row numbers.
        index = to_device(index, shard=True, purpose=purpose, use_gpu=True)
    queries = np.ascontiguousarray(queries, dtype=np.float32)

    top_s = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
    top_i = np.full((queries.shape[0], k), -1, dtype=np.int64)
    snapshots: dict[int, np.ndarray] = {}
    # Chunk ends fall on every level, so each level's top list is a snapshot between chunks.
    ends = sorted(set(levels) | set(range(chunk_size, levels[-1], chunk_size)))
    start = 0
    with tqdm(total=levels[-1], desc=purpose, unit="img", unit_scale=True, disable=not progress,
              leave=False) as bar:
        for stop in ends:
            rows = np.sort(order[start:stop])
            block = unit_rows(gallery[rows], what[1], error, row_numbers=rows)
            index.reset()
            index.add(block)
            found_s, found_local = index.search(queries, min(k, rows.size))
            top_s, top_i = _merge_top(top_s, top_i, found_s, rows[found_local], k)
            if stop in levels:
                snapshots[stop] = top_s[:, :snapshot_k].copy()
            bar.update(stop - start)
            start = stop
    index.reset()
    return snapshots, top_s, top_i
