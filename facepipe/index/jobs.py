"""The jobs behind ``facepipe index`` and ``facepipe search``: embedding sources (arrays, label
files, ``facepipe embed`` folders, aligned identity folders through a checkpoint, raw photos
through the alignment stage) turned into :class:`facepipe.index.store.ClusterIndex` operations."""
from __future__ import annotations

import os
import shutil
import tempfile
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from facepipe.embed.folder import MANIFEST_FILE, EmbeddingsFolder, read_embeddings_manifest
from facepipe.index.flat_search import unit_rows
from facepipe.index.knc import DEFAULT_NUM_NEIGHBOURS_GRID, choose_num_neighbours
from facepipe.index.store import (
    DEFAULT_CLUSTER_SIZE,
    DEFAULT_NUM_NEIGHBOURS,
    ClusterIndex,
    ClusterIndexError,
    EmptyGalleryError,
    check_index_destination,
    check_index_names,
)
from facepipe.utils.names import check_identity_names
from facepipe.utils.walk import walk_tree

log = logging.getLogger(__name__)

__all__ = [
    "build_index_from_checkpoint",
    "build_index_from_embeddings",
    "calibrate_index",
    "enrol_images",
    "load_embedding_source",
    "read_labels",
    "search_images",
    "tune_num_neighbours_on_holdout",
]

# Build-time tuning of N needs this many held-out images (one per identity with 2+ images): with
# fewer, one image moves top-1 by more than 5 points, more than the 3.3-4.7 point gaps between
# N = 1 and N = 100 in the LFW study's closed-set table, so the choice would be noise and the
# default (N = 1) is the better-supported value.
MIN_TUNING_QUERIES = 20
# At most this many held-out images (a seeded subset of the identities): bounds the extra search
# at build time (1,000 queries against the centroids, no second k-means).
MAX_TUNING_QUERIES = 1000


def read_labels(path: str | os.PathLike) -> list[str]:
    """Identity names, one per embedding row, from a text file (one name per line), a ``.npy``
    array (strings or integers) or a ``facepipe embed`` ``manifest.csv`` (its identity column)."""
    path = Path(path)
    if not path.is_file():
        raise ClusterIndexError(f"labels file {path} does not exist")
    if path.suffix.lower() == ".npy":
        try:
            labels = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ClusterIndexError(f"{path}: not a plain .npy array of labels ({exc})") from None
        if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype.kind == "U"):
            raise ClusterIndexError(f"{path}: labels must be a 1-D array of integers or strings, got shape "
                                    f"{list(labels.shape)} dtype {labels.dtype}")
        return check_identity_names([str(x) for x in labels.tolist()], f"labels file {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ClusterIndexError(f"labels file {path} is not UTF-8 text ({exc})") from None
    if path.suffix.lower() == ".csv":
        _, identities = read_embeddings_manifest(path, ClusterIndexError)  # a 'facepipe embed' manifest
        return check_identity_names([name.strip().strip("/") for name in identities], f"labels file {path}")
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return check_identity_names([line.strip() for line in lines], f"labels file {path}")


def load_embedding_source(embeddings: str | os.PathLike | np.ndarray,
                          labels: str | os.PathLike | Sequence[str] | None = None) -> dict:
    """Embeddings and their identity names from an array, a ``.npy`` file or a ``facepipe embed``
    output folder (``embeddings.npy`` + ``manifest.csv`` for the names + ``embed.json`` for the
    model fingerprint and flip mode; a ``.npy`` inside such a folder finds them too). A folder
    whose ``embed.json`` lists other files than the ones present (``parts``: a mixed output) is
    refused.

    Returns ``{"embeddings", "names" (None if unknown), "fingerprint", "flip"}``.
    """
    info: dict[str, Any] = {}
    names: list[str] | None = None
    if isinstance(embeddings, np.ndarray):
        array = embeddings
    else:
        opened = EmbeddingsFolder.open(embeddings, error=ClusterIndexError)
        array, info = opened.embeddings, opened.info
        if labels is None and opened.identities is not None:
            names = check_identity_names(opened.identities, f"labels file {opened.folder / MANIFEST_FILE}")
    if isinstance(labels, (str, os.PathLike)):
        names = read_labels(labels)
    elif labels is not None:
        names = [str(x) for x in labels]
    if names is not None and len(names) != len(array):
        raise ClusterIndexError(f"{len(names)} labels for {len(array)} embeddings (one label per row)")
    return {"embeddings": array, "names": names, "fingerprint": info.get("model_fingerprint") or "",
            "flip": info.get("flip")}


def check_source_fingerprint(index: ClusterIndex, source: dict, what: str, allow_unfingerprinted: bool) -> None:
    """The model check of a loaded embedding ``source`` entering ``index`` (:meth:`ClusterIndex.check_fingerprint`)."""
    index.check_fingerprint(source["fingerprint"] or None, what, allow_unfingerprinted)


def tune_num_neighbours_on_holdout(
    embeddings: np.ndarray,
    codes: np.ndarray,
    assignment: Any,
    *,
    seed: int = 0,
    grid: Iterable[int] = DEFAULT_NUM_NEIGHBOURS_GRID,
    min_queries: int = MIN_TUNING_QUERIES,
    max_queries: int = MAX_TUNING_QUERIES,
    held_out: Sequence[int] | np.ndarray | None = None,
) -> dict:
    """Choose N of Eq. 10 for a gallery being built, on images held out of it.

    ``embeddings`` [M, D] unit rows, ``codes`` [M] their identity index, ``assignment`` their
    :class:`facepipe.data.clusters.ClusterAssignment`. One image of each identity with 2+
    images (a subset of at most ``max_queries`` identities, drawn with ``seed``) becomes a
    query against a gallery without it: its own cluster's centroid is recomputed as the
    normalised mean of the other members (Eq. 7), or dropped if it was the only member, and
    every other cluster stays. That is leave-one-out without a second k-means (k-means is
    nearly all of a build: 86.9 of 87.3 s in the README's 1M-embedding benchmark); re-running
    it without the image could only regroup that one identity's other images. The index built
    afterwards still holds every image. N maximises top-1 accuracy over
    ``grid`` (ties: the smaller N), clipped to the number of clusters. ``held_out``: the rows
    to hold out instead of the seeded draw (each of an identity with 2+ images).

    Returns the record for :meth:`ClusterIndex.build`'s ``num_neighbours_source``: method
    "tuned" with num_neighbours, num_queries, num_identities, accuracy, accuracy_by_n, grid,
    seed; or, with fewer than ``min_queries`` identities of 2+ images, method "default" with
    N = DEFAULT_NUM_NEIGHBOURS and the reason.
    """
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    codes = np.asarray(codes, dtype=np.int64).reshape(-1)
    counts = np.bincount(codes)
    if held_out is None:
        eligible = np.flatnonzero(counts >= 2)
        if len(eligible) < min_queries:
            return {"method": "default", "num_neighbours": DEFAULT_NUM_NEIGHBOURS,
                    "reason": f"{len(eligible)} enrolled identities have 2+ images to hold one out, build-time "
                              f"tuning needs {min_queries}"}
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(eligible, size=min(len(eligible), max_queries), replace=False))
        by_identity = np.argsort(codes, kind="stable")
        first = np.concatenate([[0], np.cumsum(counts)])
        held = np.array([rng.choice(by_identity[first[c]:first[c + 1]]) for c in chosen.tolist()], dtype=np.int64)
    else:
        held = np.asarray(held_out, dtype=np.int64).reshape(-1)
        if not len(held) or held.min() < 0 or held.max() >= len(codes) or (counts[codes[held]] < 2).any():
            raise ClusterIndexError("held_out must name rows of identities with 2+ images")
        chosen = np.unique(codes[held])

    sample_cluster = np.asarray(assignment.sample_cluster, dtype=np.int64)
    centroids = np.ascontiguousarray(assignment.centroids, dtype=np.float32)
    cluster_identity = np.asarray(assignment.cluster_identity, dtype=np.int64)
    num_clusters = len(centroids)
    by_cluster = np.argsort(sample_cluster, kind="stable")
    cluster_first = np.concatenate([[0], np.cumsum(np.bincount(sample_cluster, minlength=num_clusters))])
    own = sample_cluster[held]
    own_sim = np.full(len(held), -np.inf)
    for q, (row, cluster) in enumerate(zip(held.tolist(), own.tolist())):
        others = by_cluster[cluster_first[cluster]:cluster_first[cluster + 1]]
        others = others[others != row]
        if not len(others):
            continue  # its cluster held only this image: the gallery without it lacks the cluster
        total = x[others].astype(np.float64).sum(axis=0)
        norm = float(np.linalg.norm(total))
        # The fallback of clusters._member_centroids, so the cluster is scored as it would be stored.
        centroid = total / norm if norm >= 1e-6 else x[others[0]].astype(np.float64)
        own_sim[q] = float(x[row].astype(np.float64) @ centroid)

    grid = sorted({int(n) for n in grid if int(n) > 0})
    width = min(max(grid), num_clusters)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(centroids)
    # One more than needed: the query's own (full) cluster may be among them and is replaced.
    sims, labels = index.search(x[held], min(width + 1, num_clusters))
    is_own = labels == own[:, None]
    sims = np.concatenate([np.where(is_own, -np.inf, sims), own_sim[:, None]], axis=1)
    labels = np.concatenate([np.where(is_own, -1, labels), np.where(np.isfinite(own_sim), own, -1)[:, None]], axis=1)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :width]
    sims = np.take_along_axis(sims, order, axis=1)
    labels = np.take_along_axis(labels, order, axis=1)
    owner = np.where(labels >= 0, cluster_identity[np.clip(labels, 0, None)], -1)
    choice = choose_num_neighbours(sims, owner, codes[held], grid, num_clusters=num_clusters)
    return {"method": "tuned", "num_neighbours": choice.num_neighbours, "num_queries": int(len(held)),
            "num_identities": int(len(chosen)), "accuracy": choice.accuracy,
            "accuracy_by_n": {str(n): acc for n, acc in choice.accuracy_by_n.items()},
            "grid": sorted(choice.accuracy_by_n), "seed": int(seed), "holdout": "leave-one-out"}


def build_index_from_embeddings(
    folder: str | os.PathLike,
    embeddings: np.ndarray,
    labels: Sequence[str] | Sequence[int] | np.ndarray,
    cluster_size: int = DEFAULT_CLUSTER_SIZE,
    *,
    kind: str = "flat",
    config: dict | None = None,
    fingerprint: str = "",
    seed: int = 0,
    niter: int = 20,
    overwrite: bool = False,
    progress: bool = False,
    tune: bool = True,
) -> ClusterIndex:
    """Cluster every identity's embeddings into clusters of ``cluster_size`` (Huang et al.
    Eq. 6-7) and build an index of the centroids in ``folder`` (names: ``str`` of each label).

    N of Eq. 10: a ``num_neighbours`` in ``config`` is kept as the user's. Otherwise, with
    ``tune``, it is chosen on images held out of the gallery
    (:func:`tune_num_neighbours_on_holdout`, seeded by ``seed``) when enough identities have 2+
    images, and is DEFAULT_NUM_NEIGHBOURS (1) when not; the index records which
    (:attr:`ClusterIndex.num_neighbours_source`). The index itself holds every image.
    """
    from facepipe.data.clusters import balanced_spherical_kmeans

    check_index_destination(folder, overwrite)  # before the clustering, not after it
    x = unit_rows(embeddings, "embeddings", ClusterIndexError)
    names = [str(label) for label in (labels.tolist() if isinstance(labels, np.ndarray) else labels)]
    if len(names) != len(x):
        raise ClusterIndexError(f"{len(names)} labels for {len(x)} embeddings (one label per row)")
    if not len(x):
        raise EmptyGalleryError("cannot build an index from zero embeddings: the gallery is empty")
    check_index_names(names)
    unique, codes = np.unique(np.array(names, dtype=object), return_inverse=True)
    assignment = balanced_spherical_kmeans(x, codes.astype(np.int64), cluster_size, seed=seed, niter=niter,
                                           progress=progress)
    config = {**(config or {}), "cluster_size": int(cluster_size)}
    source = None
    if config.get("num_neighbours") is None:
        if tune:
            source = tune_num_neighbours_on_holdout(x, codes, assignment, seed=seed)
        else:
            source = {"method": "default", "num_neighbours": DEFAULT_NUM_NEIGHBOURS,
                      "reason": "build-time tuning turned off"}
        log.info("N of Eq. 10: %d (%s)", source["num_neighbours"],
                 f"tuned on {source['num_queries']} held-out images" if source["method"] == "tuned"
                 else source["reason"])
    return ClusterIndex.build(folder, assignment.centroids, assignment.cluster_identity,
                              [str(name) for name in unique], cluster_sizes=assignment.cluster_sizes(),
                              fingerprint=fingerprint, kind=kind, config=config, overwrite=overwrite,
                              num_neighbours_source=source)


def _embed_identity_folder(checkpoint: str | os.PathLike, images: str | os.PathLike, flip: str | None,
                           device: str, batch_size: int | None, progress: bool,
                           require_identities: bool = True) -> dict:
    """Embeddings of every image under ``images`` and the identity subfolder of each ('' for
    images directly in it, which only impostor sets, ``require_identities=False``, may have)."""
    from facepipe.embed.extract import embed_paths, list_images

    items = list_images(images)
    loose = [path for path, identity in items if not identity]
    if loose and require_identities:
        raise ClusterIndexError(f"{images} must hold one subfolder per identity; {len(loose)} image(s) lie directly "
                                f"in it (e.g. {loose[0]})")
    vectors, info = embed_paths(checkpoint, [path for path, _ in items], flip=flip, batch_size=batch_size,
                                device=device, progress=progress)
    return {"embeddings": vectors, "names": [identity for _, identity in items],
            "fingerprint": info["model_fingerprint"], "flip": info["flip"]}


def build_index_from_checkpoint(
    folder: str | os.PathLike,
    checkpoint: str | os.PathLike,
    image_root: str | os.PathLike,
    cluster_size: int = DEFAULT_CLUSTER_SIZE,
    *,
    kind: str = "flat",
    config: dict | None = None,
    seed: int = 0,
    niter: int = 20,
    overwrite: bool = False,
    flip: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
    tune: bool = True,
) -> ClusterIndex:
    """Embed an aligned identity-folder tree (``image_root/<identity>/<image>``) with the
    checkpoint's model and build an index of its clusters; the index records the model
    fingerprint and the flip fusion, which searches then reuse. N of Eq. 10 as in
    :func:`build_index_from_embeddings`. The destination is checked before anything is embedded."""
    check_index_destination(folder, overwrite)
    source = _embed_identity_folder(checkpoint, image_root, flip, device, batch_size, progress)
    return build_index_from_embeddings(
        folder, source["embeddings"], source["names"], cluster_size, kind=kind,
        config={**(config or {}), "flip": source["flip"]}, fingerprint=source["fingerprint"], seed=seed,
        niter=niter, overwrite=overwrite, progress=progress, tune=tune)


def enrol_images(
    folder: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    *,
    embeddings: str | os.PathLike | np.ndarray | None = None,
    labels: str | os.PathLike | Sequence[str] | None = None,
    cluster_size: int | None = None,
    seed: int = 0,
    niter: int = 20,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
    allow_unfingerprinted: bool = False,
) -> dict:
    """Add identities (or more images of enrolled ones) to the index in ``folder``: either an
    aligned identity-folder tree ``images`` embedded with ``checkpoint`` (whose fingerprint must
    match the index's), or precomputed ``embeddings`` with ``labels`` (a bare array without a
    fingerprint only with ``allow_unfingerprinted`` when the index records its model). See
    :meth:`ClusterIndex.add` for how existing identities are extended."""
    index = ClusterIndex.open(folder)
    if (images is None) == (embeddings is None):
        raise ClusterIndexError("give either images (with a checkpoint) or embeddings (with labels), "
                                "not both or neither")
    if images is not None:
        if checkpoint is None:
            raise ClusterIndexError("enrolling images needs the checkpoint to embed them")
        source = _embed_identity_folder(checkpoint, images, index.config.get("flip"), device, batch_size, progress)
    else:
        source = load_embedding_source(embeddings, labels)
        if source["names"] is None:
            raise ClusterIndexError("enrolling embeddings needs labels: one identity name per row")
        check_source_fingerprint(index, source, f"the embeddings {_describe(embeddings)}", allow_unfingerprinted)
    return index.add(source["embeddings"], source["names"], cluster_size=cluster_size,
                     fingerprint=source["fingerprint"] or None, seed=seed, niter=niter, progress=progress,
                     allow_unfingerprinted=allow_unfingerprinted)


def calibrate_index(
    folder: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    *,
    embeddings: str | os.PathLike | np.ndarray | None = None,
    labels: str | os.PathLike | Sequence[str] | None = None,
    impostor_images: str | os.PathLike | None = None,
    impostor_embeddings: str | os.PathLike | np.ndarray | None = None,
    target_far: float = 0.01,
    grid: Iterable[int] = DEFAULT_NUM_NEIGHBOURS_GRID,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
    allow_unfingerprinted: bool = False,
) -> dict:
    """``facepipe index calibrate``: choose N of Eq. 10 (Huang et al. Sec. 5) on validation data of
    enrolled identities and, with impostors, the open-set threshold at ``target_far``; both are
    stored in the index (:meth:`ClusterIndex.calibrate`).

    Genuine validation data: an aligned identity-folder tree ``images`` embedded with
    ``checkpoint`` (its fingerprint must match the index's), or ``embeddings`` with ``labels``.
    Impostors (optional): ``impostor_images`` (a folder of aligned crops, identity subfolders
    optional; needs ``checkpoint``) or ``impostor_embeddings`` (an array, ``.npy`` or
    ``facepipe embed`` folder). Impostor identities that are named (subfolders, or the embed
    manifest) must not be in the index. Embeddings without a model fingerprint need
    ``allow_unfingerprinted`` when the index records its model (as for :func:`enrol_images`).
    Returns the calibration report plus the folder.
    """
    if isinstance(target_far, bool) or not 0.0 <= float(target_far) <= 1.0:  # NaN fails too
        raise ClusterIndexError(f"target FAR {target_far!r} must lie in [0, 1] (a fraction of impostors accepted)")
    index = ClusterIndex.open(folder)
    if (images is None) == (embeddings is None):
        raise ClusterIndexError("give the validation data either as images (with a checkpoint) or as embeddings "
                                "(with labels), not both or neither")
    if impostor_images is not None and impostor_embeddings is not None:
        raise ClusterIndexError("give impostors as images or as embeddings, not both")
    flip = index.config.get("flip")
    if images is not None or impostor_images is not None:
        if checkpoint is None:
            raise ClusterIndexError("calibrating with images needs the checkpoint to embed them (--checkpoint)")
    if images is not None:
        genuine = _embed_identity_folder(checkpoint, images, flip, device, batch_size, progress)
    else:
        genuine = load_embedding_source(embeddings, labels)
        if genuine["names"] is None:
            raise ClusterIndexError("validation embeddings need labels: one enrolled identity name per row")
    check_source_fingerprint(index, genuine, f"the validation embeddings {_describe(embeddings)}",
                             allow_unfingerprinted)
    impostor = None
    if impostor_images is not None:
        impostor = _embed_identity_folder(checkpoint, impostor_images, flip, device, batch_size, progress,
                                          require_identities=False)
    elif impostor_embeddings is not None:
        impostor = load_embedding_source(impostor_embeddings)
    if impostor is not None:
        check_source_fingerprint(index, impostor, f"the impostor embeddings {_describe(impostor_embeddings)}",
                                 allow_unfingerprinted)
        # An enrolled identity among the impostors would be "falsely" accepted when it is right,
        # inflating the FAR and so the threshold.
        enrolled = set(index.identities()) & {name for name in impostor["names"] or () if name}
        if enrolled:
            shown = ", ".join(sorted(enrolled)[:5])
            raise ClusterIndexError(f"{len(enrolled)} impostor identities are in the index ({shown}); impostors "
                                    "must be identities the index does not hold")
    report = index.calibrate(genuine["embeddings"], genuine["names"],
                             None if impostor is None else np.atleast_2d(impostor["embeddings"]),
                             target_far=target_far, grid=grid)
    return {"folder": str(folder), "kept_threshold": None if impostor is not None else index.unknown_threshold,
            **report}


def _describe(source: Any) -> str:
    return "(an array)" if isinstance(source, np.ndarray) else str(source)


def _expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    from facepipe.data.dataset import IMAGE_EXTENSIONS

    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = walk_tree(path, IMAGE_EXTENSIONS).files
            if not found:
                raise ClusterIndexError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise ClusterIndexError(f"search input {path} does not exist")
    return paths


def _align_photos(checkpoint: str | os.PathLike, photos: Sequence[Path], workdir: Path,
                  progress: bool) -> list[tuple[str, Path | None]]:
    """Align raw photos the way the checkpoint's model expects (its config's ``align`` section
    at its input size, as ``facepipe eval lfw --align`` does); (status, crop or None) each."""
    from facepipe.align.manifest import USABLE_STATUSES, read_manifest
    from facepipe.align.job import align_for_model

    # Links under numbered folders give every photo a unique relative path in one root.
    raw = workdir / "raw"
    keys = []
    for number, photo in enumerate(photos):
        key = f"{number}/{photo.name}"
        (raw / key).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(photo.resolve(), raw / key)
        except OSError:
            shutil.copyfile(photo, raw / key)
        keys.append(key)
    aligned = align_for_model(checkpoint, raw, keys, workdir / "aligned", progress=progress)
    rows = {}
    for manifest in sorted(aligned.glob("manifest*.jsonl")):
        rows.update({row["path"]: row for row in read_manifest(manifest)})
    out = []
    for key in keys:
        row = rows.get(key, {"status": "missing"})
        usable = row["status"] in USABLE_STATUSES and row.get("output")
        out.append((row["status"], aligned / row["output"] if usable else None))
    return out


def search_images(
    folder: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    inputs: Iterable[str | os.PathLike] = (),
    top_k: int = 5,
    align: bool | str = "auto",
    *,
    num_neighbours: int | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
    allow_unfingerprinted: bool = False,
) -> list[dict]:
    """Search the index in ``folder`` for every input: image files, folders of images (walked
    recursively, links followed), or ``.npy`` arrays of embeddings (one query per row; no
    checkpoint needed; without a model fingerprint only with ``allow_unfingerprinted`` when the
    index records its model).

    Images are embedded with ``checkpoint`` (its fingerprint must match the index's) and the
    index's flip fusion. ``align``: True = every image is a raw photo, detected and aligned
    first (the checkpoint's align settings, in a temporary folder); False = every image is an
    aligned crop; ``"auto"`` = an image already at the model's input size is a crop, any other
    is a raw photo. Returns one dict per query: input, status (``ok`` or why there is no
    result, e.g. ``no_face``, or the image reader's ``too_large``, ``truncated``, ... with an
    ``error`` naming the file), alignment, identity (None when unknown), unknown, matches,
    num_neighbours (the N of Eq. 10 used) and num_neighbours_source (where it came from, in
    words; both None for an input without a query) and unknown_threshold (the index's open-set
    threshold on the best score; None when none is set, so that no query is unknown).
    """
    if align not in (True, False, "auto"):
        raise ClusterIndexError(f"align must be True, False or 'auto', got {align!r}")
    index = ClusterIndex.open(folder)
    if index.num_clusters == 0:
        raise EmptyGalleryError(f"the index {folder} holds no identity (all were removed); add some first")
    inputs = list(inputs)
    if not inputs:
        raise ClusterIndexError("nothing to search: give image files, folders or .npy embeddings")
    entries: list[dict] = []  # one per query, in input order
    queries: list[np.ndarray] = []
    images = []
    for item in inputs:
        if Path(item).suffix.lower() == ".npy":
            source = load_embedding_source(item)
            rows = np.atleast_2d(source["embeddings"])
            check_source_fingerprint(index, source, f"the query embeddings {item}", allow_unfingerprinted)
            for row in range(len(rows)):
                entries.append({"input": f"{item}[{row}]", "status": "ok", "alignment": "embedding",
                                "query": len(queries)})
                queries.append(rows[row])
        else:
            for path in _expand_inputs([item]):
                entry = {"input": str(path), "status": "ok", "alignment": None, "query": None}
                entries.append(entry)
                images.append((entry, path))
    if images:
        if checkpoint is None:
            raise ClusterIndexError("searching images needs the checkpoint to embed them (--checkpoint)")
        _embed_search_images(index, checkpoint, images, queries, align, device, batch_size, progress)
    results = []
    found = index.search(np.stack(queries), top_k=top_k, num_neighbours=num_neighbours) if queries else []
    for entry in entries:
        query = entry.pop("query")
        if query is None:
            results.append({**entry, "identity": None, "unknown": None, "matches": [], "num_neighbours": None,
                            "num_neighbours_source": None, "unknown_threshold": index.unknown_threshold})
        else:
            results.append({**entry, **found[query].to_dict()})
    return results


def _embed_search_images(index: ClusterIndex, checkpoint: str | os.PathLike, images: list[tuple[dict, Path]],
                         queries: list[np.ndarray], align: bool | str, device: str, batch_size: int | None,
                         progress: bool) -> None:
    from facepipe.data.dataset import UnreadableImageError, decode_image
    from facepipe.embed.extract import embed_paths
    from facepipe.models.loaded import load_model
    from facepipe.runtime.device import resolve_device

    loaded = load_model(checkpoint, resolve_device(device))
    index.check_fingerprint(loaded.fingerprint)
    height, width = loaded.input_size
    crops: list[tuple[dict, Path]] = []
    photos: list[tuple[dict, Path]] = []
    for entry, path in images:
        if align != "auto" and align:
            photos.append((entry, path))  # align decodes with the same reader and gives a status
            continue
        try:
            # Decoded here too when crops are declared: one bad query gets its status instead of
            # stopping the whole search in the embedding batch.
            shape = decode_image(path).shape[:2]
        except UnreadableImageError as exc:
            entry.update(status=exc.status, error=str(exc))
            continue
        (crops if align != "auto" or tuple(shape) == (height, width) else photos).append((entry, path))
    for entry, _ in crops:
        entry["alignment"] = "crop"
    with tempfile.TemporaryDirectory(prefix="facepipe-search-") as workdir:
        if photos:
            aligned = _align_photos(checkpoint, [path for _, path in photos], Path(workdir), progress)
            for (entry, _), (status, crop) in zip(photos, aligned):
                entry["alignment"] = status
                if crop is None:
                    entry["status"] = status
                else:
                    crops.append((entry, crop))
        if crops:
            vectors, _ = embed_paths(loaded, [str(path) for _, path in crops], flip=index.config.get("flip"),
                                     batch_size=batch_size, progress=progress)
            for (entry, _), vector in zip(crops, vectors):
                entry["query"] = len(queries)
                queries.append(vector)
