"""Closed-set identification of held-out images of the people a model was trained on.

The gallery is the training images (every identity, single-image ones included, so the tail
is in the gallery as the model saw it); the probes are images of training identities that were
held out of training (``facepipe merge --probe-fraction``). Two rules:

- **1-NN**: the identity of the most similar gallery embedding (cosine);
- **k-NC**: Huang et al.'s k-nearest-cluster rule (TPAMI 2019, Eq. 10) over the centroids of
  each identity's gallery embeddings clustered into clusters of ``cluster_size`` images
  (Eq. 6-7), with N nearest clusters. N is chosen on other people (a study's validation people),
  never on the probes: :func:`choose_knc_neighbours`.

Recall is reported per identity group (head / middle / tail by training images per identity),
as the mean over the group's identities of each identity's recall (every probe identity
counts once, whatever its number of probes), beside the accuracy over all probes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from facepipe.eval.imbalance import closed_set_predictions
from facepipe.eval.verification import EvalInputError

__all__ = ["ClosedSetPredictions", "closed_set_identify", "choose_knc_neighbours", "group_of_counts",
           "group_recall"]

GROUPS = ("head", "middle", "tail")


@dataclass
class ClosedSetPredictions:
    """Predicted gallery identity (an index into ``identities``) of every probe by each rule."""

    identities: list[str]
    truth: np.ndarray  # [P] identity index of each probe
    predicted: dict[str, np.ndarray]  # rule -> [P] identity index (-1: none)
    num_neighbours: int
    num_clusters: int


def _codes(labels: Sequence[str], identities: list[str]) -> np.ndarray:
    position = {name: i for i, name in enumerate(identities)}
    missing = sorted({name for name in labels if name not in position})
    if missing:
        raise EvalInputError(f"{len(missing)} probe identities are not in the gallery (a closed set needs every "
                             f"probe's identity enrolled): {missing[:5]}")
    return np.array([position[name] for name in labels], dtype=np.int64)


def knc_predict(assignment, queries: np.ndarray, num_neighbours: int) -> np.ndarray:
    """Huang et al. Eq. 10 over the ``num_neighbours`` nearest cluster centroids of ``assignment``
    (a :class:`facepipe.data.clusters.ClusterAssignment`): the predicted identity code per query."""
    import faiss

    from facepipe.index.knc import knc_scores

    centroids = np.ascontiguousarray(assignment.centroids, dtype=np.float32)
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    n = min(int(num_neighbours), len(centroids))
    sims, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), n)
    owner = np.where(rows >= 0, np.asarray(assignment.cluster_identity)[np.clip(rows, 0, None)], -1)
    return np.asarray(knc_scores(sims, owner).predicted, dtype=np.int64)


def choose_knc_neighbours(embeddings: np.ndarray, labels: Sequence[str], cluster_size: int, seed: int = 0) -> dict:
    """N of Eq. 10 chosen on the people of ``labels`` (e.g. validation people, disjoint from the
    probes): their embeddings are clustered and one image of each 2+-image identity is held out
    (:func:`facepipe.index.jobs.tune_num_neighbours_on_holdout`). Returns its record."""
    from facepipe.data.clusters import balanced_spherical_kmeans
    from facepipe.index.jobs import tune_num_neighbours_on_holdout

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    _, codes = np.unique(np.asarray(labels, dtype=object), return_inverse=True)
    assignment = balanced_spherical_kmeans(x, codes.astype(np.int64), cluster_size, seed=seed)
    return tune_num_neighbours_on_holdout(x, codes.astype(np.int64), assignment, seed=seed, min_queries=2)


def closed_set_identify(gallery: np.ndarray, gallery_labels: Sequence[str], probes: np.ndarray,
                        probe_labels: Sequence[str], *, cluster_size: int, num_neighbours: int,
                        seed: int = 0) -> ClosedSetPredictions:
    """Every probe identified among the gallery's identities by 1-NN, k-NC with N = 1 and k-NC
    with N = ``num_neighbours`` (rules ``"1-NN"``, ``"k-NC N=1"``, ``"k-NC tuned N"``)."""
    from facepipe.data.clusters import balanced_spherical_kmeans

    identities = sorted(set(gallery_labels))
    gallery_codes = _codes(gallery_labels, identities)
    truth = _codes(probe_labels, identities)
    x = np.ascontiguousarray(gallery, dtype=np.float32)
    q = np.ascontiguousarray(probes, dtype=np.float32)
    predicted = {"1-NN": closed_set_predictions(x, gallery_codes, q).astype(np.int64)}
    assignment = balanced_spherical_kmeans(x, gallery_codes, cluster_size, seed=seed)
    predicted["k-NC N=1"] = knc_predict(assignment, q, 1)
    # Fixed rule names, whatever N the tuning chose, so that runs line up in one table.
    predicted["k-NC tuned N"] = predicted["k-NC N=1"] if int(num_neighbours) == 1 \
        else knc_predict(assignment, q, int(num_neighbours))
    return ClosedSetPredictions(identities, truth, predicted, int(num_neighbours), int(len(assignment.centroids)))


def group_of_counts(counts: np.ndarray, head: int, middle: int) -> np.ndarray:
    """``"head"`` (>= head training images), ``"middle"`` (middle .. head - 1) or ``"tail"``."""
    counts = np.asarray(counts)
    return np.where(counts >= head, "head", np.where(counts >= middle, "middle", "tail"))


def group_recall(truth: np.ndarray, predicted: np.ndarray, probe_group: np.ndarray,
                 weights: np.ndarray | None = None) -> dict[str, float | None]:
    """Mean per-identity recall in each group, and ``"all"`` (accuracy over the probes);
    ``weights``: how often each probe counts (a bootstrap resample's multiplicities)."""
    w = np.ones(len(truth)) if weights is None else np.asarray(weights, dtype=np.float64)
    correct = (predicted == truth).astype(np.float64) * w
    out: dict[str, float | None] = {"all": float(correct.sum() / w.sum()) if w.sum() > 0 else None}
    size = int(truth.max()) + 1 if len(truth) else 0
    for group in GROUPS:
        mask = probe_group == group
        counts = np.bincount(truth[mask], weights=w[mask], minlength=size)
        present = counts > 0
        if not present.any():
            out[group] = None
            continue
        sums = np.bincount(truth[mask], weights=correct[mask], minlength=size)
        out[group] = float((sums[present] / counts[present]).mean())
    return out
