"""The k-nearest-cluster rule of CLMLE (Huang et al., TPAMI 2019, Sec. 4, Eq. 10), vectorised over queries.

For a query q whose N nearest cluster centroids mu_1..mu_N were retrieved (similarity
s_m = f(q)^T mu_m), every identity c among them gets the score of Huang et al.'s Eq. 10::

    score_c = min_{m: c(mu_m) = c} exp(s_m) / sum_{k: c(mu_k) != c} exp(s_k)

and the prediction is the identity with the largest score: the one whose *least* similar
retrieved cluster beats the clusters of all other identities by the largest margin. Scores are
computed and returned in log space, ``log score_c = min_m s_m - logsumexp_{k not c} s_k``,
which is finite, keeps the order of Eq. 10, and reads as a margin (it can be negative).

Empty denominator: when every retrieved cluster belongs to c, Eq. 10 divides by an empty sum.
This module then uses ``empty_log_denominator`` (default -1.0) as the log of the denominator,
i.e. it acts as if one cluster of another identity had been retrieved at cosine similarity -1,
the farthest point of the unit sphere. With unit vectors every real denominator is at least
exp(-1), so the convention is the largest score any retrieval could give, it stays finite (an
open-set threshold still applies to it: a query far from everything scores low), and it grows
with the similarity of c's clusters. Retrieved entries with identity -1 (padding, or "no result"
from an approximate index) are ignored.

Also here: choosing N on validation data (Huang et al. search N over 20:10:200, Sec. 5; the
default grid here starts at 1, see DEFAULT_NUM_NEIGHBOURS_GRID) and calibrating the open-set
threshold below which a query is reported as unknown.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "DEFAULT_NUM_NEIGHBOURS_GRID",
    "PAPER_NUM_NEIGHBOURS_GRID",
    "EMPTY_LOG_DENOMINATOR",
    "KNCResult",
    "NeighbourChoice",
    "ThresholdCalibration",
    "calibrate_unknown_threshold",
    "choose_num_neighbours",
    "knc_scores",
]

# Huang et al. (TPAMI 2019) Sec. 5: "the optimal number of retrieved clusters N in Eq. (10) is
# searched from 20 : 10 : 200 on validation set".
PAPER_NUM_NEIGHBOURS_GRID = tuple(range(20, 201, 10))
# The paper's grid cannot reach small N, yet on the LFW study's closed-set table
# (bench/reports/lfw_study/closed_set.md) N = 1 beat N = 100 for every method, by 3.3 to 4.7
# points, and the README's CLMLE gallery measured 59.9 % at N = 1 against 50.6 % at N = 5: the
# best N can be below 20 and the curve need not be monotone, so the small values come first.
DEFAULT_NUM_NEIGHBOURS_GRID = (1, 2, 3, 5, 10, *PAPER_NUM_NEIGHBOURS_GRID)
# log of the Eq. 10 denominator when no other identity was retrieved (see the module docstring).
EMPTY_LOG_DENOMINATOR = -1.0
# Queries per block: bounds the temporary [block, N] arrays (about 10 of them, 8 bytes each).
DEFAULT_CHUNK = 8192


@dataclass
class KNCResult:
    """Eq. 10 scores of every identity among each query's retrieved clusters, best first.

    ``identities[q, j]`` is the j-th best identity of query q (-1 where q retrieved fewer than
    j+1 identities) and ``log_scores[q, j]`` its log Eq. 10 score (-inf for padding).
    """

    identities: np.ndarray  # [Q, P] int64
    log_scores: np.ndarray  # [Q, P] float64

    @property
    def predicted(self) -> np.ndarray:
        """[Q] argmax of Eq. 10 (-1 for a query that retrieved nothing)."""
        if self.identities.shape[1] == 0:
            return np.full(self.identities.shape[0], -1, dtype=np.int64)
        return self.identities[:, 0]

    @property
    def best_log_scores(self) -> np.ndarray:
        """[Q] log score of the prediction (-inf for a query that retrieved nothing)."""
        if self.log_scores.shape[1] == 0:
            return np.full(self.log_scores.shape[0], -np.inf)
        return self.log_scores[:, 0]


def knc_scores(
    similarities: np.ndarray,
    cluster_identity: np.ndarray,
    *,
    empty_log_denominator: float = EMPTY_LOG_DENOMINATOR,
    chunk_size: int = DEFAULT_CHUNK,
) -> KNCResult:
    """Eq. 10 of Huang et al. for every query: log scores of the identities among its retrieved clusters.

    ``similarities`` [Q, N]: f(q)^T mu of each retrieved cluster (inner products of unit vectors,
    so within [-1, 1]); ``cluster_identity`` [Q, N] int: the identity of each retrieved cluster,
    -1 for padding / no result. The order of the N columns does not matter. Returns a
    :class:`KNCResult` with each query's identities sorted by decreasing score (ties: smaller
    identity first). Vectorised with numpy; queries are processed in blocks of ``chunk_size``.
    """
    sims = np.asarray(similarities, dtype=np.float64)
    ids = np.asarray(cluster_identity)
    if sims.ndim != 2 or ids.shape != sims.shape:
        raise ValueError(f"similarities {sims.shape} and cluster_identity {ids.shape} must be two [Q, N] arrays "
                         "of the same shape")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"cluster_identity must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and ids.min() < -1:
        raise ValueError("cluster_identity holds values below -1 (-1 is the only padding value)")
    num_queries = sims.shape[0]
    blocks = [_knc_block(sims[start:start + chunk_size], ids[start:start + chunk_size], empty_log_denominator)
              for start in range(0, num_queries, max(1, chunk_size))]
    width = max((b.identities.shape[1] for b in blocks), default=0)
    identities = np.full((num_queries, width), -1, dtype=np.int64)
    log_scores = np.full((num_queries, width), -np.inf, dtype=np.float64)
    start = 0
    for block in blocks:
        rows, cols = block.identities.shape
        identities[start:start + rows, :cols] = block.identities
        log_scores[start:start + rows, :cols] = block.log_scores
        start += rows
    return KNCResult(identities, log_scores)


def _knc_block(sims: np.ndarray, ids: np.ndarray, empty_log_denominator: float) -> KNCResult:
    num_queries, num_retrieved = sims.shape
    valid = (ids >= 0) & np.isfinite(sims)
    ids = np.where(valid, ids, -1)
    if num_queries == 0 or num_retrieved == 0 or not valid.any():
        return KNCResult(np.full((num_queries, 0), -1, dtype=np.int64), np.full((num_queries, 0), -np.inf))

    # Sort each row by identity so that the clusters of one identity are contiguous; padding
    # (-1) sorts first and is masked out below.
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    sims = np.take_along_axis(sims, order, axis=1)
    valid = ids >= 0

    # exp(s - rowmax) with padding as 0. The sum over the *other* identities' clusters is the
    # sum of the entries before the group plus the entries after it: sums of positive terms
    # only, so a tiny denominator is never lost to cancellation (as total - own would risk).
    row_max = np.max(np.where(valid, sims, -np.inf), axis=1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.where(valid, np.exp(sims - row_max), 0.0)
    inclusive = np.cumsum(weights, axis=1)
    before = np.concatenate([np.zeros((num_queries, 1)), inclusive[:, :-1]], axis=1)  # strictly before j
    # strictly after j
    after = np.concatenate([np.cumsum(weights[:, ::-1], axis=1)[:, ::-1][:, 1:], np.zeros((num_queries, 1))], axis=1)

    # Groups: runs of one valid identity within a row (flattened, so reduceat never crosses rows).
    starts_mask = valid.copy()
    starts_mask[:, 1:] &= ids[:, 1:] != ids[:, :-1]
    ends_mask = valid.copy()
    ends_mask[:, :-1] &= ids[:, :-1] != ids[:, 1:]
    start_flat = np.flatnonzero(starts_mask.ravel())
    end_flat = np.flatnonzero(ends_mask.ravel())
    group_row = start_flat // num_retrieved

    flat_sims = np.where(valid, sims, np.inf).ravel()
    # reduceat over [start_g, start_{g+1}) would include the next row's padding: padding is +inf
    # in flat_sims, so it never wins a minimum.
    group_min = np.minimum.reduceat(flat_sims, start_flat)
    other = before.ravel()[start_flat] + after.ravel()[end_flat]
    with np.errstate(divide="ignore"):
        log_other = np.log(other) + row_max.ravel()[group_row]
    log_denominator = np.where(other > 0, log_other, empty_log_denominator)
    group_score = group_min - log_denominator
    group_identity = ids.ravel()[start_flat]

    # Scatter groups into [Q, P] (P = most identities any query retrieved), then sort each row.
    counts = np.bincount(group_row, minlength=num_queries)
    width = int(counts.max())
    first_group = np.concatenate([[0], np.cumsum(counts)[:-1]])
    column = np.arange(start_flat.size) - first_group[group_row]
    identities = np.full((num_queries, width), -1, dtype=np.int64)
    log_scores = np.full((num_queries, width), -np.inf, dtype=np.float64)
    identities[group_row, column] = group_identity
    log_scores[group_row, column] = group_score
    best_first = np.argsort(-log_scores, axis=1, kind="stable")
    return KNCResult(np.take_along_axis(identities, best_first, axis=1),
                     np.take_along_axis(log_scores, best_first, axis=1))


@dataclass
class NeighbourChoice:
    """Result of :func:`choose_num_neighbours`: the chosen N and top-1 accuracy at every tried N."""

    num_neighbours: int
    accuracy: float
    accuracy_by_n: dict[int, float]


def choose_num_neighbours(
    similarities: np.ndarray,
    cluster_identity: np.ndarray,
    true_identity: Sequence[int] | np.ndarray,
    grid: Iterable[int] = DEFAULT_NUM_NEIGHBOURS_GRID,
    num_clusters: int | None = None,
) -> NeighbourChoice:
    """The number N of retrieved clusters for Eq. 10 that maximises top-1 accuracy on validation
    queries (Huang et al. Sec. 5 search N over 20:10:200; the default grid adds 1, 2, 3, 5, 10).

    ``similarities`` / ``cluster_identity`` [Q, N_max]: each validation query's N_max nearest
    clusters, **sorted by decreasing similarity** (as a FAISS search returns them), so that the
    first N columns are the N nearest. Grid values above ``num_clusters`` (default N_max) or N_max
    are clipped to it. Ties go to the smallest N (the cheapest search).
    """
    sims = np.asarray(similarities)
    ids = np.asarray(cluster_identity)
    truth = np.asarray(true_identity, dtype=np.int64).reshape(-1)
    if sims.ndim != 2 or ids.shape != sims.shape:
        raise ValueError(f"similarities {sims.shape} and cluster_identity {ids.shape} must be [Q, N_max]")
    if truth.shape[0] != sims.shape[0]:
        raise ValueError(f"{truth.shape[0]} true identities for {sims.shape[0]} queries")
    if sims.shape[0] == 0 or sims.shape[1] == 0:
        raise ValueError("choosing N needs at least one validation query and one retrieved cluster")
    limit = sims.shape[1] if num_clusters is None else min(int(num_clusters), sims.shape[1])
    candidates = sorted({min(int(n), limit) for n in grid if int(n) > 0})
    if not candidates:
        raise ValueError("the grid of N values is empty")
    accuracy_by_n = {}
    for n in candidates:
        predicted = knc_scores(sims[:, :n], ids[:, :n]).predicted
        accuracy_by_n[n] = float(np.mean(predicted == truth))
    best = max(candidates, key=lambda n: (accuracy_by_n[n], -n))
    return NeighbourChoice(best, accuracy_by_n[best], accuracy_by_n)


@dataclass
class ThresholdCalibration:
    """Open-set threshold on the best log Eq. 10 score: accept a query iff score >= threshold."""

    threshold: float
    target_far: float
    far: float  # fraction of impostor queries accepted at the threshold
    genuine_accept_rate: float  # fraction of genuine queries accepted at the threshold
    num_genuine: int
    num_impostor: int


def calibrate_unknown_threshold(
    genuine_best_scores: Sequence[float] | np.ndarray,
    impostor_best_scores: Sequence[float] | np.ndarray,
    target_far: float,
) -> ThresholdCalibration:
    """Threshold for the open-set rule: a query whose best Eq. 10 (log) score is below it is
    ``unknown``.

    ``impostor_best_scores``: best scores of queries whose identity is not in the gallery;
    ``genuine_best_scores``: of queries whose identity is. The threshold is the lowest one at
    which at most ``target_far`` of the impostors are accepted (score >= threshold), so it
    keeps as many genuine queries as that false-accept rate allows. ``target_far`` >= 1 gives
    -inf (accept everything).
    """
    genuine = np.asarray(genuine_best_scores, dtype=np.float64).reshape(-1)
    impostor = np.asarray(impostor_best_scores, dtype=np.float64).reshape(-1)
    if not 0.0 <= target_far <= 1.0 or math.isnan(target_far):
        raise ValueError(f"target_far {target_far} must lie in [0, 1]")
    if impostor.size == 0:
        raise ValueError("calibrating the unknown threshold needs impostor scores (queries of absent identities)")
    if np.isnan(impostor).any() or np.isnan(genuine).any():
        raise ValueError("scores contain NaN")
    allowed = int(math.floor(target_far * impostor.size + 1e-9))  # false accepts allowed
    if allowed >= impostor.size:
        threshold = -math.inf
    else:
        ranked = np.sort(impostor)[::-1]
        # Just above the (allowed+1)-th highest impostor score: that one and all below are
        # rejected; ties with it are rejected too, so the FAR never exceeds the target.
        threshold = float(np.nextafter(ranked[allowed], np.inf))
    far = float(np.mean(impostor >= threshold))
    gar = float(np.mean(genuine >= threshold)) if genuine.size else float("nan")
    return ThresholdCalibration(threshold, float(target_far), far, gar, int(genuine.size), int(impostor.size))
