"""A searchable gallery of identity clusters: FAISS index of centroids + SQLite metadata.

CLMLE (Huang et al., TPAMI 2019, Sec. 4) represents every identity by several cluster centroids
mu_k (unit vectors, Eq. 7) and labels a query with the k-nearest-cluster rule of Eq. 10 over its N
nearest centroids (:mod:`facepipe.index.knc`). This module keeps such a gallery on disk and
searches it.

Folder layout::

    DIR/meta.sqlite          identities (id, name), clusters (faiss id -> identity, size, centroid),
                             meta (format_version, dim, fingerprint, kind, config JSON, generation,
                             num_neighbours_source: how N of Eq. 10 was chosen; absent in older
                             folders, whose stored N is kept)
    DIR/centroids.<G>.faiss  the FAISS index of the centroids of generation G (the one meta names)

The SQLite database is the source of truth (it also keeps every centroid, so an update can
rebuild any index kind, e.g. re-train IVF lists or drop nodes from HNSW, which cannot delete);
the FAISS file is the search structure derived from it.

Crash safety: every update is one SQLite transaction that holds the write lock from start to
end. Inside it the new FAISS index is written to ``centroids.<G+1>.faiss`` (temporary file,
fsync, rename, fsync of the folder), the tables change, and ``generation`` becomes G+1 with the
file's SHA-256; only then does COMMIT make all of it current at once. A crash anywhere before
COMMIT leaves generation G and its file untouched (SQLite rolls the journal back; the stray
G+1 file is ignored and removed by the next update). The old file is deleted after COMMIT.
Readers take the generation and metadata from one read transaction and load that file.

Index kinds: ``flat`` (exact ``IndexFlatIP``), ``hnsw`` (``IndexHNSWFlat``, inner product) and
``ivf`` (``IndexIVFFlat``, inner product, trained on the centroids, nlist = sqrt(K) by default),
each wrapped in ``IndexIDMap2`` so that FAISS ids are the cluster ids of the database. Flat and
IVF indexes are searched on all GPUs (replicated) when this faiss build sees any
(:mod:`facepipe.runtime.faiss_device`); HNSW stays on the CPU.

Scores are log Eq. 10 scores (see :mod:`facepipe.index.knc`): ``min_m s_m - logsumexp`` of the
other identities' retrieved similarities; an optional open-set threshold on the best score
turns a query into ``unknown``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import faiss
import numpy as np

from facepipe.errors import FacepipeUserError
from facepipe.index.flat_search import unit_rows
from facepipe.index.knc import (
    DEFAULT_NUM_NEIGHBOURS_GRID,
    KNCResult,
    NeighbourChoice,
    ThresholdCalibration,
    calibrate_unknown_threshold,
    choose_num_neighbours,
    knc_scores,
)
from facepipe.runtime.faiss_device import GPU_MAX_K, gpu_count, to_device
from facepipe.runtime.io import check_writable_output, output_temp_folder, write_bytes_atomic, writing_output
from facepipe.utils.names import check_identity_names, escape_controls

log = logging.getLogger(__name__)

__all__ = [
    "ClusterIndex",
    "ClusterIndexError",
    "DimensionMismatchError",
    "EmptyGalleryError",
    "FingerprintMismatchError",
    "INDEX_KINDS",
    "SearchResult",
    "UnknownIdentityError",
    "check_index_destination",
    "check_index_names",
]

FORMAT_VERSION = 1
META_FILE = "meta.sqlite"
INDEX_KINDS = ("flat", "hnsw", "ivf")
METRIC = "inner_product"
DEFAULT_CLUSTER_SIZE = 20
# N of Eq. 10 when nothing better is known (no validation data, no user setting); clipped to the
# number of clusters. Not the middle of Huang et al.'s 20:10:200 grid (100, this module's old
# default): in the LFW study's closed-set table (bench/reports/lfw_study/closed_set.md, 668
# probes, 1,262 identities) k-NC at N = 1 beat N = 100 for every method, e.g. CosFace 57.49 vs
# 53.74 %, ArcFace 56.14 vs 52.25 %, MM-LDAM-DRW 54.12 vs 49.40 %, CLMLE 41.84 vs 37.65 %.
DEFAULT_NUM_NEIGHBOURS = 1
# What an index written before the source of N was recorded got when no N was given; such
# indexes keep the N stored in their config.
LEGACY_DEFAULT_NUM_NEIGHBOURS = 100
# Meta key of the record of where the index's N came from (see ClusterIndex.num_neighbours_source).
NEIGHBOURS_SOURCE_KEY = "num_neighbours_source"
NEIGHBOURS_SOURCE_METHODS = ("tuned", "calibrated", "user", "default")
DEFAULT_HNSW_M = 32
DEFAULT_HNSW_EF_CONSTRUCTION = 80
# FAISS GPU k-selection handles at most GPU_MAX_K neighbours (imported from
# facepipe.runtime.faiss_device); a larger N searches on the CPU copy.
SEARCH_PURPOSE = "identity index search"
SEARCH_CHUNK = 16384
_FAISS_FILE = re.compile(r"^centroids\.(\d+)\.faiss$")
_TEMP_FILE = re.compile(r"^\.centroids\.\d+\.faiss\..*\.tmp$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS identities (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS clusters (
    faiss_id INTEGER PRIMARY KEY,
    identity_id INTEGER NOT NULL REFERENCES identities(id),
    size INTEGER NOT NULL,
    centroid BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS clusters_by_identity ON clusters(identity_id);
"""
_REQUIRED_META = ("format_version", "dim", "fingerprint", "kind", "config", "generation", "faiss_sha256",
                  "next_faiss_id")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class ClusterIndexError(ValueError, FacepipeUserError):
    """A cluster index that cannot be used as asked: missing or damaged files, wrong dimension,
    wrong model, empty gallery, unknown identity. The CLI prints it as one line (exit 2)."""


class DimensionMismatchError(ClusterIndexError):
    """Embeddings whose dimension differs from the index's."""


class FingerprintMismatchError(ClusterIndexError):
    """Embeddings from another model than the one the index was built with."""


class EmptyGalleryError(ClusterIndexError):
    """An index with no cluster (built empty or emptied by ``remove``)."""


class UnknownIdentityError(ClusterIndexError, KeyError):
    """``remove`` named an identity that the index does not hold (nothing was changed)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------
# Search results
# --------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """Top-k identities of one query by log Eq. 10 score, best first; ``unknown`` when an
    open-set threshold is set and the best score is below it.

    ``num_neighbours``: the N of Eq. 10 this search retrieved (after clipping to the number of
    clusters); ``num_neighbours_source``: where it came from, in words
    (:meth:`ClusterIndex.describe_num_neighbours`). Only the identities owning one of those N
    clusters are ranked, so with N = 1 a query lists a single identity. ``unknown_threshold``:
    the index's open-set threshold this search applied (None: none is set, so no query is
    unknown).
    """

    matches: list[tuple[str, float]]
    unknown: bool = False
    num_neighbours: int | None = None
    num_neighbours_source: str | None = None
    unknown_threshold: float | None = None

    @property
    def identity(self) -> str | None:
        """The predicted identity; None when unknown or when nothing was retrieved."""
        return None if self.unknown or not self.matches else self.matches[0][0]

    def to_dict(self) -> dict:
        return {"identity": self.identity, "unknown": self.unknown,
                "matches": [{"identity": name, "score": score} for name, score in self.matches],
                "num_neighbours": self.num_neighbours, "num_neighbours_source": self.num_neighbours_source,
                "unknown_threshold": self.unknown_threshold}


@dataclass
class _Snapshot:
    meta: dict[str, Any]
    names: dict[int, str]  # identity id -> name, in id order
    faiss_ids: np.ndarray  # [K] sorted
    cluster_identity: np.ndarray  # [K] identity id of each faiss id
    cluster_size: np.ndarray  # [K]


# --------------------------------------------------------------------------------------------
# Files and the database
# --------------------------------------------------------------------------------------------
def _faiss_path(folder: Path, generation: int) -> Path:
    return folder / f"centroids.{generation}.faiss"


def _fsync_directory(folder: Path) -> None:
    # The rename of the new FAISS file must be on disk before COMMIT names it.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_faiss_file(path: Path, data: bytes) -> None:
    """Whole-or-nothing, durable write of a serialised FAISS index."""
    write_bytes_atomic(path, data)
    _fsync_directory(path.parent)


def _connect(path: Path, create: bool = False) -> sqlite3.Connection:
    if not create and not path.is_file():
        raise ClusterIndexError(f"{path.parent} is not a cluster index: {path.name} is missing")
    if create and not path.exists():
        # An empty file is an empty database. Made here it gets a new file's mode (0666 less the
        # umask, as every output), not SQLite's 0644 less it; its journals copy that mode.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o666))
    # mode=rw: opening never creates an empty database in a folder that lacks one.
    uri = f"{path.resolve().as_uri()}?mode={'rwc' if create else 'rw'}"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=60.0)
    except sqlite3.Error as exc:
        raise ClusterIndexError(f"cannot open the index database {path}: {exc}") from None
    return conn


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _read_meta(conn: sqlite3.Connection) -> dict[str, Any]:
    return {key: json.loads(value) for key, value in conn.execute("SELECT key, value FROM meta")}


def _set_meta(conn: sqlite3.Connection, **values: Any) -> None:
    conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                     [(key, _dump(value)) for key, value in values.items()])


def _read_snapshot(folder: Path) -> _Snapshot:
    path = folder / META_FILE
    conn = _connect(path)
    try:
        # One read transaction: the generation and the tables it belongs to come together.
        conn.execute("BEGIN")
        meta = _read_meta(conn)
        names = dict(conn.execute("SELECT id, name FROM identities ORDER BY id").fetchall())
        rows = conn.execute("SELECT faiss_id, identity_id, size FROM clusters ORDER BY faiss_id").fetchall()
        conn.execute("COMMIT")
    except (sqlite3.Error, json.JSONDecodeError) as exc:
        raise ClusterIndexError(f"the index database {path} is damaged or not an index database ({exc})") from None
    finally:
        conn.close()
    missing = [key for key in _REQUIRED_META if key not in meta]
    if missing:
        raise ClusterIndexError(f"the index database {path} lacks {', '.join(missing)}: not a complete cluster index")
    if int(meta["format_version"]) > FORMAT_VERSION:
        raise ClusterIndexError(f"{folder} has index format {meta['format_version']}, newer than this facepipe "
                                f"({FORMAT_VERSION}); upgrade facepipe")
    bad = next((name for name in names.values() if escape_controls(name) != name), None)
    if bad is not None:
        # Only an index written before names were checked can hold one: refuse it here, as every
        # other reader of names does, rather than print the name into the user's terminal.
        raise ClusterIndexError(f"the index database {path} holds the identity name {bad!r} with a control "
                                "character (written by an older facepipe); rebuild the index from renamed folders")
    table = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return _Snapshot(meta, names, table[:, 0].copy(), table[:, 1].copy(), table[:, 2].copy())


def _read_centroids(conn: sqlite3.Connection, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rows = conn.execute("SELECT faiss_id, centroid FROM clusters ORDER BY faiss_id").fetchall()
    ids = np.array([row[0] for row in rows], dtype=np.int64)
    vectors = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32).reshape(len(rows), dim)
    return ids, np.ascontiguousarray(vectors)


def _clean_stray_files(folder: Path, generation: int) -> None:
    """Remove FAISS files of other generations and temporary files: leftovers of a crash (a
    file never committed) or of an old generation that could not be deleted. Called only
    under the write lock, so it never deletes a concurrent writer's uncommitted file."""
    for path in folder.iterdir():
        match = _FAISS_FILE.match(path.name)
        if (match and int(match.group(1)) != generation) or _TEMP_FILE.match(path.name):
            with contextlib.suppress(OSError):
                path.unlink()
                log.info("removed stray index file %s", path)


# --------------------------------------------------------------------------------------------
# FAISS
# --------------------------------------------------------------------------------------------
def _auto_nlist(num_clusters: int, config: dict) -> int:
    nlist = config.get("nlist") or int(round(math.sqrt(num_clusters)))
    return max(1, min(int(nlist), num_clusters))


def _auto_nprobe(nlist: int, config: dict) -> int:
    # A quarter of the lists by default: Eq. 10 needs the N nearest clusters, not only the first,
    # so the search must look beyond the query's own list.
    nprobe = config.get("nprobe") or math.ceil(nlist / 4)
    return max(1, min(int(nprobe), nlist))


def _build_faiss(kind: str, config: dict, dim: int, ids: np.ndarray, vectors: np.ndarray) -> faiss.Index:
    if len(ids) == 0:
        # An emptied gallery: nothing to train an IVF on; a flat index holds nothing just as well.
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, int(config.get("hnsw_m") or DEFAULT_HNSW_M), faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = int(config.get("ef_construction") or DEFAULT_HNSW_EF_CONSTRUCTION)
    elif kind == "ivf":
        nlist = _auto_nlist(len(ids), config)
        quantizer = faiss.IndexFlatIP(dim)
        inner = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        # Galleries hold few centroids per list; the default minimum (39) would only warn.
        inner.cp.min_points_per_centroid = 1
        inner.train(vectors)
        inner.nprobe = _auto_nprobe(nlist, config)
    else:  # pragma: no cover - validated before
        raise ClusterIndexError(f"unknown index kind '{kind}'; choose one of {INDEX_KINDS}")
    index = faiss.IndexIDMap2(inner)
    index.add_with_ids(vectors, ids)
    return index


def _check_config(kind: str, config: dict) -> dict:
    if kind not in INDEX_KINDS:
        raise ClusterIndexError(f"unknown index kind '{kind}'; choose one of {', '.join(INDEX_KINDS)}")
    config = dict(config)
    if config.get("metric", METRIC) != METRIC:
        raise ClusterIndexError(f"metric '{config['metric']}' is not supported: Eq. 10 uses inner products "
                                f"of unit vectors ('{METRIC}')")
    config["metric"] = METRIC
    config.setdefault("num_neighbours", DEFAULT_NUM_NEIGHBOURS)
    config.setdefault("unknown_threshold", None)
    config.setdefault("cluster_size", None)
    for key in ("num_neighbours", "cluster_size", "nlist", "nprobe", "hnsw_m", "ef_search", "ef_construction"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ClusterIndexError(f"index config {key}={value!r} must be a positive integer")
        if value is not None:
            config[key] = int(value)
    threshold = config.get("unknown_threshold")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) \
                or not math.isfinite(threshold):
            raise ClusterIndexError(f"unknown_threshold {threshold!r} must be a finite number or None")
        config["unknown_threshold"] = float(threshold)
    return config


def _neighbours_source(method: str, num_neighbours: int, generation: int, **details: Any) -> dict:
    """The record stored under NEIGHBOURS_SOURCE_KEY. The generation says which gallery a tuned
    or calibrated N was chosen on: after ``add``/``remove`` it may no longer be the best."""
    if method not in NEIGHBOURS_SOURCE_METHODS:
        raise ClusterIndexError(f"unknown source of N '{method}'; one of {', '.join(NEIGHBOURS_SOURCE_METHODS)}")
    return {**details, "method": method, "num_neighbours": int(num_neighbours), "generation": int(generation),
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


_CALIBRATE_HINT = "run `facepipe index calibrate` with held-out images of enrolled identities to choose N"


def _describe_source(record: dict, generation: int) -> str:
    method = record.get("method")
    accuracy = record.get("accuracy")
    top1 = f", top-1 {accuracy:.4f}" if isinstance(accuracy, (int, float)) else ""
    if method == "tuned":
        text = (f"tuned on {record.get('num_queries')} held-out images (one each of {record.get('num_identities')} "
                f"enrolled identities) at build time{top1}")
    elif method == "calibrated":
        text = (f"calibrated on {record.get('num_queries')} validation images of {record.get('num_identities')} "
                f"enrolled identities{top1}")
    elif method == "user":
        text = "set by the user" + (" at build time" if record.get("at") == "build" else "")
    elif method == "default":
        text = f"default: no validation data ({record.get('reason', 'none given')}); {_CALIBRATE_HINT}"
    else:
        return (f"stored by an older facepipe that did not record where N came from (its default was "
                f"{LEGACY_DEFAULT_NUM_NEIGHBOURS}); {_CALIBRATE_HINT}")
    chosen_for = record.get("generation")
    if method in ("tuned", "calibrated") and chosen_for is not None and int(chosen_for) != generation:
        text += f"; chosen for gallery generation {chosen_for}, now {generation}: recalibrate"
    return text


# --------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------
def check_index_destination(folder: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise the error :meth:`ClusterIndex.build` would raise for the destination ``folder``: a
    file there, a non-empty folder without ``overwrite``, a non-empty folder that is not an
    index (never overwritten), or a folder the index cannot be written into. Jobs call it before
    embedding and clustering a gallery, so a wrong destination fails in a second, not after
    the whole build (:func:`facepipe.index.jobs.build_index_from_embeddings`)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ClusterIndexError(f"{folder} exists and is not a folder")
    replacing = folder.is_dir() and any(folder.iterdir())
    if replacing:
        if not overwrite:
            raise ClusterIndexError(f"{folder} exists and is not empty; pass overwrite (--overwrite) to replace "
                                    "the index in it")
        if not (folder / META_FILE).is_file():
            raise ClusterIndexError(f"{folder} is not a cluster index (no {META_FILE}); refusing to overwrite it")
    # Replaced in place (new files inside it), or made beside it and renamed into place.
    check_writable_output(folder, into=replacing)


class ClusterIndex:
    """A gallery folder: centroids of identity clusters, searched with Eq. 10 of Huang et al.

    Make one with :meth:`build`, load one with :meth:`open`. :meth:`search` ranks identities for
    query embeddings; :meth:`add`, :meth:`remove`, :meth:`set_threshold`,
    :meth:`set_num_neighbours` change the folder transactionally (see the module docstring).
    One writer at a time (others wait for the SQLite write lock); readers may run alongside.
    """

    def __init__(self, folder: str | os.PathLike, use_gpu: bool | None = None) -> None:
        # Use ClusterIndex.open(folder); the constructor loads the current generation.
        self.folder = Path(folder)
        self._use_gpu = use_gpu
        self._load()

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(cls, folder: str | os.PathLike, fingerprint: str | None = None,
             use_gpu: bool | None = None) -> "ClusterIndex":
        """Load the index in ``folder``. ``fingerprint``: the model fingerprint of the queries to
        come; a different stored one raises :class:`FingerprintMismatchError`. ``use_gpu``:
        None = when faiss sees a GPU."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ClusterIndexError(f"index folder {folder} does not exist")
        index = cls(folder, use_gpu=use_gpu)
        if fingerprint is not None:
            index.check_fingerprint(fingerprint)
        return index

    @classmethod
    def build(
        cls,
        folder: str | os.PathLike,
        centroids: np.ndarray,
        cluster_identity: Sequence[int] | np.ndarray,
        identity_names: Sequence[str],
        cluster_sizes: Sequence[int] | np.ndarray | None = None,
        fingerprint: str = "",
        kind: str = "flat",
        config: dict | None = None,
        overwrite: bool = False,
        use_gpu: bool | None = None,
        num_neighbours_source: dict | None = None,
    ) -> "ClusterIndex":
        """Write a new index of ``centroids`` [K, D] (normalised to unit rows) into ``folder``.

        ``cluster_identity`` [K]: index into ``identity_names`` of each centroid's identity;
        every name must be unique, non-empty and own at least one cluster. ``cluster_sizes``
        [K]: embeddings per cluster (0 = unknown, the default). ``fingerprint``: the model
        that made the embeddings (:func:`facepipe.runtime.checkpoint.model_fingerprint`).
        ``config``: cluster_size, num_neighbours (N of Eq. 10), unknown_threshold, and per kind
        nlist / nprobe (ivf), hnsw_m / ef_search / ef_construction (hnsw).

        N of Eq. 10 and where it came from (:attr:`num_neighbours_source`): a ``num_neighbours``
        in ``config`` is the user's; ``num_neighbours_source`` (``method`` "tuned" or "default"
        and ``num_neighbours``, plus evidence such as num_queries and accuracy) is how a caller
        that had validation data chose it (:func:`facepipe.index.jobs.build_index_from_embeddings`);
        without either, N is DEFAULT_NUM_NEIGHBOURS (1), recorded as a default.

        An existing non-empty ``folder`` needs ``overwrite``; an existing index is then replaced
        in one transaction (a crash keeps the old one). A folder that is not an index is never
        overwritten.
        """
        folder = Path(folder)
        config = dict(config or {})
        source = dict(num_neighbours_source or {})
        if source:
            chosen = source.get("num_neighbours")
            if config.get("num_neighbours") is not None and config["num_neighbours"] != chosen:
                raise ClusterIndexError(f"config num_neighbours={config['num_neighbours']} contradicts "
                                        f"num_neighbours_source (N={chosen})")
            config["num_neighbours"] = chosen
        elif config.get("num_neighbours") is not None:
            source = {"method": "user", "at": "build"}
        else:
            source = {"method": "default", "reason": "built from centroids, with no held-out images"}
        config = _check_config(kind, config)
        source = {key: value for key, value in source.items()
                  if key not in ("num_neighbours", "generation", "recorded_at")}
        if source.get("method") not in NEIGHBOURS_SOURCE_METHODS:
            raise ClusterIndexError(f"num_neighbours_source method {source.get('method')!r} is not one of "
                                    f"{', '.join(NEIGHBOURS_SOURCE_METHODS)}")
        vectors = unit_rows(centroids, "centroids", ClusterIndexError)
        num_clusters, dim = vectors.shape
        if num_clusters == 0 or dim == 0:
            raise EmptyGalleryError(f"cannot build an index of {num_clusters} clusters of dimension {dim}: "
                                    "the gallery is empty")
        names = [str(name) for name in identity_names]
        owner = np.asarray(cluster_identity)
        if owner.shape != (num_clusters,) or not np.issubdtype(owner.dtype, np.integer):
            raise ClusterIndexError(f"cluster_identity must be {num_clusters} integers (one per centroid), got "
                                    f"shape {list(owner.shape)} dtype {owner.dtype}")
        if owner.min() < 0 or owner.max() >= len(names):
            raise ClusterIndexError(f"cluster_identity must index identity_names (0..{len(names) - 1})")
        check_index_names(names)
        if len(set(names)) != len(names):
            duplicated = sorted({n for n in names if names.count(n) > 1})
            raise ClusterIndexError(f"identity names must be unique; repeated: {', '.join(duplicated[:10])}")
        without = [names[i] for i in sorted(set(range(len(names))) - set(owner.tolist()))]
        if without:
            raise ClusterIndexError(f"{len(without)} identity name(s) own no cluster: {', '.join(without[:10])}")
        sizes = _cluster_sizes(cluster_sizes, num_clusters)

        def write_all(conn: sqlite3.Connection, meta: dict) -> None:
            if meta:  # overwriting an index: replace everything (executescript would COMMIT)
                conn.execute("DELETE FROM clusters")
                conn.execute("DELETE FROM identities")
            conn.executemany("INSERT INTO identities(name) VALUES (?)", [(name,) for name in names])
            ids = dict(conn.execute("SELECT name, id FROM identities").fetchall())
            first = int(meta.get("next_faiss_id", 0))
            conn.executemany(
                "INSERT INTO clusters(faiss_id, identity_id, size, centroid) VALUES (?, ?, ?, ?)",
                [(first + k, ids[names[int(owner[k])]], int(sizes[k]), vectors[k].tobytes())
                 for k in range(num_clusters)])
            # _commit makes this build generation G + 1 of the folder.
            record = _neighbours_source(num_neighbours=config["num_neighbours"],
                                        generation=int(meta.get("generation", 0)) + 1, **source)
            _set_meta(conn, format_version=FORMAT_VERSION, dim=int(dim), fingerprint=str(fingerprint or ""),
                      kind=kind, config=config, next_faiss_id=first + num_clusters,
                      created_at=time.strftime("%Y-%m-%dT%H:%M:%S"), **{NEIGHBOURS_SOURCE_KEY: record})

        check_index_destination(folder, overwrite)
        if folder.is_dir() and any(folder.iterdir()):  # an index, and overwrite: checked above
            _commit(folder, write_all, rebuild=True)
            return cls(folder, use_gpu=use_gpu)
        # A fresh index is made in a hidden sibling folder and renamed into place: a crash
        # never leaves a half-made index at ``folder``. The folder's mode is a new folder's
        # (the umask's), not mkdtemp's 0700.
        with writing_output(folder):
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging = output_temp_folder(folder.parent, prefix=f".{folder.name}.building-", suffix="")
        try:
            _commit(staging, write_all, rebuild=True, create=True)
            os.replace(staging, folder)  # onto a missing or empty folder: atomic
            _fsync_directory(folder.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls(folder, use_gpu=use_gpu)

    def _load(self) -> None:
        for attempt in range(3):
            snapshot = _read_snapshot(self.folder)
            path = _faiss_path(self.folder, int(snapshot.meta["generation"]))
            try:
                data = path.read_bytes()
                break
            except FileNotFoundError:
                # A writer may have committed a newer generation and deleted this file since the
                # snapshot was read: read again; if the generation did not move, the file is lost.
                if _read_snapshot(self.folder).meta["generation"] == snapshot.meta["generation"]:
                    raise ClusterIndexError(f"index file {path} is missing (the database names generation "
                                            f"{snapshot.meta['generation']}); rebuild the index") from None
        else:  # pragma: no cover - three concurrent commits in a row
            raise ClusterIndexError(f"{self.folder} changed while being opened; try again")
        meta = snapshot.meta
        if hashlib.sha256(data).hexdigest() != meta["faiss_sha256"]:
            raise ClusterIndexError(f"index file {path} is corrupt (its checksum differs from the one recorded "
                                    "when it was written); rebuild the index")
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as exc:
            raise ClusterIndexError(f"index file {path} cannot be read by FAISS: {exc}") from None
        dim = int(meta["dim"])
        stored_ids = np.sort(faiss.vector_to_array(index.id_map)) if hasattr(index, "id_map") else None
        if index.d != dim or index.ntotal != len(snapshot.faiss_ids) or stored_ids is None \
                or not np.array_equal(stored_ids, snapshot.faiss_ids):
            raise ClusterIndexError(f"index file {path} does not match {META_FILE} ({index.ntotal} vectors of "
                                    f"dimension {index.d} vs {len(snapshot.faiss_ids)} clusters of dimension {dim})")
        self._snapshot = snapshot
        self._cpu_index = index
        # Where searches run is decided at the first search (:meth:`_searcher`), not here: opening
        # an index to read its info, add or remove identities never moves it to a GPU, nor logs
        # the FAISS search device. A GPU asked for where faiss sees none is still refused at once.
        self._search_index: Any = None
        self._on_gpu = False
        if not hasattr(self, "_placing"):
            self._placing = threading.Lock()
        if self._use_gpu and gpu_count() == 0 and self.kind != "hnsw" and index.ntotal > 0:
            raise ClusterIndexError("GPU search requested, but this faiss build sees no GPU")

    def _gpu_plan(self) -> tuple[bool, str]:
        """Whether searches go to the GPU, else why not (for the log line)."""
        use_gpu = gpu_count() > 0 if self._use_gpu is None else self._use_gpu
        if not use_gpu:
            return False, "no GPU visible to faiss" if self._use_gpu is None else "GPU use turned off"
        if self.kind == "hnsw":  # FAISS has no GPU HNSW
            return False, "HNSW has no GPU version"
        if self._cpu_index.ntotal == 0:
            return False, "empty gallery"
        return True, ""

    def _searcher(self) -> Any:
        """The FAISS index searches use: placed (and its device logged) at the first search of
        this generation, on every GPU faiss sees (replicated) when :meth:`_gpu_plan` says so."""
        with self._placing:
            if self._search_index is not None:
                return self._search_index
            index = self._cpu_index
            on_gpu, reason = self._gpu_plan()
            searcher = index
            if on_gpu:
                if gpu_count() == 0:
                    raise ClusterIndexError("GPU search requested, but this faiss build sees no GPU")
                try:
                    # Replicated on every GPU (a centroid gallery fits on one); queries are split.
                    searcher = to_device(index, purpose=SEARCH_PURPOSE, use_gpu=True)
                except Exception as exc:  # an index type the GPU cloner does not support, out of memory
                    log.warning("searching %s on the CPU: moving it to the GPU failed (%s)", self.folder, exc)
            elif self._use_gpu is None and reason == "no GPU visible to faiss":
                to_device(index, purpose=SEARCH_PURPOSE)  # logs the CPU path: no GPU visible to faiss
            else:
                to_device(index, purpose=SEARCH_PURPOSE, use_gpu=False, cpu_reason=reason)
            self._on_gpu = searcher is not index
            self._search_index = searcher
            return searcher

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return int(self._snapshot.meta["dim"])

    @property
    def kind(self) -> str:
        return str(self._snapshot.meta["kind"])

    @property
    def fingerprint(self) -> str:
        return str(self._snapshot.meta["fingerprint"])

    @property
    def config(self) -> dict:
        return dict(self._snapshot.meta["config"])

    @property
    def generation(self) -> int:
        return int(self._snapshot.meta["generation"])

    @property
    def num_clusters(self) -> int:
        return int(len(self._snapshot.faiss_ids))

    @property
    def unknown_threshold(self) -> float | None:
        return self._snapshot.meta["config"].get("unknown_threshold")

    @property
    def num_neighbours(self) -> int:
        """N of Eq. 10 that searches use unless told otherwise (:attr:`num_neighbours_source`)."""
        fallback = DEFAULT_NUM_NEIGHBOURS if NEIGHBOURS_SOURCE_KEY in self._snapshot.meta else \
            LEGACY_DEFAULT_NUM_NEIGHBOURS
        return int(self._snapshot.meta["config"].get("num_neighbours") or fallback)

    @property
    def num_neighbours_source(self) -> dict:
        """Where :attr:`num_neighbours` came from: ``method`` is "tuned" (on held-out gallery
        images at build time), "calibrated" (:meth:`calibrate`, :meth:`tune_num_neighbours`),
        "user", "default" (no validation data) or "unrecorded" (an index written before the
        source was recorded; its stored N is kept), with ``num_neighbours``, the ``generation``
        it was chosen for and the evidence (num_queries, num_identities, accuracy, ...)."""
        meta = self._snapshot.meta
        n = self.num_neighbours
        record = meta.get(NEIGHBOURS_SOURCE_KEY)
        # A record naming another N was overwritten by a facepipe that does not keep records.
        if isinstance(record, dict) and record.get("method") in NEIGHBOURS_SOURCE_METHODS \
                and record.get("num_neighbours") == n:
            return dict(record)
        calibration = meta.get("calibration")
        if isinstance(calibration, dict) and calibration.get("num_neighbours") == n:
            return {"method": "calibrated", "num_neighbours": n, "generation": calibration.get("generation"),
                    "num_queries": calibration.get("num_genuine"),
                    "num_identities": calibration.get("num_genuine_identities"),
                    "accuracy": calibration.get("accuracy"), "inferred_from": "calibration"}
        return {"method": "unrecorded", "num_neighbours": n}

    def describe_num_neighbours(self, num_neighbours: int | None = None) -> str:
        """The N a search uses and where it came from, in words, e.g. "N=5, tuned on 120
        held-out images (one each of 120 enrolled identities) at build time, top-1 0.9333";
        ``num_neighbours``: the N given to that search, if any."""
        n = int(num_neighbours or self.num_neighbours)
        used = min(n, self.num_clusters) if self.num_clusters else n
        text = f"N={used}" + (f" (N={n} clipped to the {self.num_clusters} clusters)" if used < n else "")
        if num_neighbours:
            return f"{text}, given for this search"
        return f"{text}, {_describe_source(self.num_neighbours_source, self.generation)}"

    def identities(self) -> list[str]:
        """Names of the identities in the gallery, in enrolment order."""
        return list(self._snapshot.names.values())

    def cluster_counts(self) -> dict[str, int]:
        """Clusters per identity name."""
        counts = np.bincount(np.searchsorted(list(self._snapshot.names), self._snapshot.cluster_identity),
                             minlength=len(self._snapshot.names))
        return {name: int(c) for name, c in zip(self._snapshot.names.values(), counts)}

    def identity_ids(self, names: Iterable[str]) -> np.ndarray:
        """Internal ids of ``names`` (-1 for a name not in the gallery), as :meth:`knc` reports them."""
        lookup = {name: i for i, name in self._snapshot.names.items()}
        return np.array([lookup.get(str(name), -1) for name in names], dtype=np.int64)

    def identity_names(self, ids: Iterable[int]) -> list[str | None]:
        return [self._snapshot.names.get(int(i)) for i in ids]

    def info(self) -> dict:
        """Summary for ``facepipe index info``."""
        counts = self.cluster_counts()
        effective: dict[str, Any] = {}
        if self.kind == "ivf" and self.num_clusters:
            inner = faiss.extract_index_ivf(self._cpu_index)
            effective = {"nlist": int(inner.nlist), "nprobe": int(inner.nprobe)}
        return {
            "folder": str(self.folder),
            "format_version": int(self._snapshot.meta["format_version"]),
            "kind": self.kind,
            "dim": self.dim,
            "fingerprint": self.fingerprint,
            "num_identities": len(counts),
            "num_clusters": self.num_clusters,
            "num_embeddings": int(self._snapshot.cluster_size.sum()),
            "generation": self.generation,
            # Where searches run (or will: the index is placed at its first search).
            "gpu": self._on_gpu if self._search_index is not None else self._gpu_plan()[0],
            "config": {**self.config, **effective},
            "num_neighbours_source": self.num_neighbours_source,
            "num_neighbours_description": self.describe_num_neighbours(),
            # The last `index calibrate` report; its generation tells whether the gallery changed since.
            "calibration": self._snapshot.meta.get("calibration"),
            "identities": counts,
        }

    def check_fingerprint(self, fingerprint: str | None, what: str = "these embeddings",
                          allow_unfingerprinted: bool = False) -> None:
        """Raise :class:`FingerprintMismatchError` when embeddings of model ``fingerprint`` do not
        belong in this index: another model's, or ``what`` without a fingerprint (a bare array or
        ``.npy``) in an index that records its model, unless ``allow_unfingerprinted`` (the caller
        vouches for the model). An index built without a fingerprint accepts any (with a warning)."""
        if not fingerprint:
            if self.fingerprint and not allow_unfingerprinted:
                raise FingerprintMismatchError(
                    f"{what} record no model fingerprint, and the index {self.folder} holds embeddings of model "
                    f"{self.fingerprint}: embeddings of another model would be mixed in unnoticed; give a "
                    "'facepipe embed' output folder (its embed.json names the model) or the fingerprint, or "
                    "--allow-unfingerprinted (allow_unfingerprinted=True) if they come from that model")
            return
        if not self.fingerprint:
            log.warning("index %s records no model fingerprint: cannot check that model %s made its embeddings",
                        self.folder, fingerprint)
            return
        if fingerprint != self.fingerprint:
            raise FingerprintMismatchError(
                f"the index {self.folder} was built with embeddings of model {self.fingerprint}, but these come "
                f"from model {fingerprint}: embeddings of different models cannot be compared; rebuild the index "
                "with this checkpoint or use the one it was built with")

    # ------------------------------------------------------------------ search
    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.asarray(queries)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim == 2 and queries.shape[1] != self.dim:
            raise DimensionMismatchError(f"queries have dimension {queries.shape[1]} but the index {self.folder} "
                                         f"holds {self.dim}-d centroids")
        return unit_rows(queries, "queries", ClusterIndexError)

    def retrieve(self, queries: np.ndarray, num_neighbours: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``num_neighbours`` nearest clusters of each query, most similar first:
        similarities [Q, n] and the identity id of each cluster [Q, n] (-1: no result);
        n = min(num_neighbours, number of clusters)."""
        queries = self._check_queries(queries)
        if self.num_clusters == 0:
            raise EmptyGalleryError(f"the index {self.folder} holds no identity (all were removed); add some first")
        if num_neighbours < 1:
            raise ClusterIndexError(f"num_neighbours must be >= 1, got {num_neighbours}")
        k = min(int(num_neighbours), self.num_clusters)
        searcher = self._searcher()
        index = searcher if (not self._on_gpu or k <= GPU_MAX_K) else self._cpu_index
        if self.kind == "hnsw":
            # HNSW returns at most efSearch results: keep the beam wider than N.
            inner = faiss.downcast_index(self._cpu_index.index)
            inner.hnsw.efSearch = max(int(self.config.get("ef_search") or 0), 2 * k, 64)
        sims = np.empty((len(queries), k), dtype=np.float32)
        labels = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), SEARCH_CHUNK):
            block = queries[start:start + SEARCH_CHUNK]
            sims[start:start + len(block)], labels[start:start + len(block)] = index.search(block, k)
        # FAISS ids -> identity ids of the clusters.
        ids, owner = self._snapshot.faiss_ids, self._snapshot.cluster_identity
        position = np.clip(np.searchsorted(ids, labels), 0, len(ids) - 1)
        found = (labels >= 0) & (ids[position] == labels)
        return sims, np.where(found, owner[position], -1)

    def knc(self, queries: np.ndarray, num_neighbours: int | None = None) -> KNCResult:
        """Eq. 10 of Huang et al. over each query's N nearest clusters (N: ``num_neighbours`` or the
        index's setting); identities as internal ids (:meth:`identity_names` maps them)."""
        # "is None", not "or": an explicit 0 is refused by retrieve, never swapped for the default.
        sims, owner = self.retrieve(queries, self.num_neighbours if num_neighbours is None else num_neighbours)
        return knc_scores(sims, owner)

    def search(self, queries: np.ndarray, top_k: int = 5, num_neighbours: int | None = None) -> list[SearchResult]:
        """Top-``top_k`` identities of each query row by the k-nearest-cluster rule (Huang et al.
        Eq. 10, log scores), with ``unknown`` set where the best score is below the index's
        open-set threshold. N: ``num_neighbours`` or the index's; every result names the N used
        and where it came from (:meth:`describe_num_neighbours`)."""
        if top_k < 1:
            raise ClusterIndexError(f"top_k must be >= 1, got {top_k}")
        result = self.knc(queries, num_neighbours)
        threshold = self.unknown_threshold
        names = self._snapshot.names
        used = min(int(num_neighbours or self.num_neighbours), self.num_clusters)
        note = self.describe_num_neighbours(num_neighbours)
        out = []
        for identities, scores in zip(result.identities[:, :top_k].tolist(), result.log_scores[:, :top_k].tolist()):
            matches = [(names[i], float(s)) for i, s in zip(identities, scores) if i >= 0]
            unknown = threshold is not None and (not matches or matches[0][1] < threshold)
            out.append(SearchResult(matches, unknown, used, note, threshold))
        return out

    # ------------------------------------------------------------------ tuning
    def tune_num_neighbours(self, queries: np.ndarray, true_names: Sequence[str],
                            grid: Iterable[int] = DEFAULT_NUM_NEIGHBOURS_GRID, store: bool = True) -> NeighbourChoice:
        """Choose N of Eq. 10 on labelled validation queries, maximising top-1 accuracy over
        ``grid`` (clipped to the number of clusters; DEFAULT_NUM_NEIGHBOURS_GRID adds 1, 2, 3, 5,
        10 to Huang et al.'s 20:10:200); ``store`` saves it with its source ("calibrated")."""
        grid = list(grid)
        names = [str(name) for name in true_names]
        sims, owner = self.retrieve(queries, max(grid))
        truth = self.identity_ids(names)
        choice = choose_num_neighbours(sims, owner, truth, grid, num_clusters=self.num_clusters)
        if store:
            self._update_config({"num_neighbours": choice.num_neighbours}, source=dict(
                method="calibrated", num_queries=len(names), num_identities=len(set(names)),
                accuracy=choice.accuracy, grid=sorted({int(n) for n in grid})))
        return choice

    def calibrate_threshold(self, genuine_queries: np.ndarray, impostor_queries: np.ndarray, target_far: float,
                            store: bool = True) -> ThresholdCalibration:
        """Open-set threshold at ``target_far`` from queries of enrolled identities (genuine)
        and of absent ones (impostor); ``store`` saves it (:meth:`set_threshold`)."""
        genuine = self.knc(genuine_queries).best_log_scores if len(genuine_queries) else np.zeros(0)
        calibration = calibrate_unknown_threshold(genuine, self.knc(impostor_queries).best_log_scores, target_far)
        if store:
            self.set_threshold(calibration.threshold if math.isfinite(calibration.threshold) else None)
        return calibration

    def calibrate(self, queries: np.ndarray, true_names: Sequence[str], impostor_queries: np.ndarray | None = None,
                  target_far: float = 0.01, grid: Iterable[int] = DEFAULT_NUM_NEIGHBOURS_GRID,
                  store: bool = True) -> dict:
        """Choose N of Eq. 10 and, given impostors, the open-set threshold; store both at once.

        ``queries`` with ``true_names``: validation embeddings of identities that *are* in the
        gallery (genuine). N maximises their top-1 accuracy over ``grid`` (by default 1, 2, 3,
        5, 10 and Huang et al.'s 20:10:200, Sec. 5; values above the number of clusters are
        clipped to it). Then, at that N, the genuine scores are the best log Eq. 10 scores of
        the genuine queries that are identified correctly, and ``impostor_queries`` (identities
        *not* in the gallery) give the threshold with a false-accept rate of at most ``target_far``
        (:func:`facepipe.index.knc.calibrate_unknown_threshold`). Without impostors only N
        changes. ``store`` writes N, the threshold and this report (meta key ``calibration``)
        in one transaction, N with its source ("calibrated", :attr:`num_neighbours_source`);
        it fails if the gallery changed since this object was loaded, as the calibration would
        then describe another gallery.

        Returns the report: num_neighbours, accuracy (top-1 at N), accuracy_by_n, and with
        impostors threshold (None = accept all), target_far, far, genuine_accept_rate (of the
        correctly identified genuine queries) and identification_rate (genuine queries both
        correctly identified and accepted: the open-set detection-and-identification rate).
        """
        grid = sorted({int(n) for n in grid})
        if not grid or grid[0] < 1:
            raise ClusterIndexError(f"the grid of N values must be positive integers, got {grid}")
        queries = self._check_queries(queries)
        names = [str(name) for name in true_names]
        if len(names) != len(queries):
            raise ClusterIndexError(f"{len(names)} identity names for {len(queries)} validation queries")
        if not len(queries):
            raise ClusterIndexError("calibration needs validation queries of identities in the index")
        truth = self.identity_ids(names)
        absent = sorted({name for name, t in zip(names, truth.tolist()) if t < 0})
        if absent:
            # A genuine query of an absent identity can never be right: it would bias N and the
            # genuine accept rate. Such queries are impostors.
            raise ClusterIndexError(f"{len(absent)} validation identities are not in the index {self.folder} "
                                    f"({', '.join(absent[:5])}); give them as impostors instead")
        sims, owner = self.retrieve(queries, max(grid))
        choice = choose_num_neighbours(sims, owner, truth, grid, num_clusters=self.num_clusters)
        n = choice.num_neighbours
        genuine = knc_scores(sims[:, :n], owner[:, :n])
        correct = genuine.predicted == truth
        report: dict[str, Any] = {
            "num_neighbours": n, "accuracy": choice.accuracy,
            "accuracy_by_n": {str(k): v for k, v in choice.accuracy_by_n.items()},
            "grid": grid, "num_genuine": int(len(queries)), "num_genuine_identities": len(set(names)),
            "num_clusters": self.num_clusters, "num_impostor": 0}
        changes: dict[str, Any] = {"num_neighbours": n}
        if impostor_queries is not None and len(impostor_queries):
            impostor = self.knc(impostor_queries, n).best_log_scores
            calib = calibrate_unknown_threshold(genuine.best_log_scores[correct], impostor, target_far)
            threshold = calib.threshold if math.isfinite(calib.threshold) else None
            accepted = genuine.best_log_scores >= (calib.threshold if threshold is not None else -math.inf)
            report.update(threshold=threshold, target_far=calib.target_far, far=calib.far,
                          genuine_accept_rate=calib.genuine_accept_rate, num_impostor=calib.num_impostor,
                          identification_rate=float(np.mean(correct & accepted)))
            changes["unknown_threshold"] = threshold
        if store:
            self._store_calibration(changes, report, source=dict(
                method="calibrated", num_queries=int(len(queries)), num_identities=len(set(names)),
                accuracy=choice.accuracy, grid=grid))
        return report

    def _store_calibration(self, changes: dict, report: dict, source: dict) -> None:
        generation = self.generation

        def change(conn: sqlite3.Connection, meta: dict) -> None:
            if int(meta["generation"]) != generation:
                raise ClusterIndexError(f"the index {self.folder} changed while it was being calibrated (generation "
                                        f"{generation} -> {meta['generation']}); run the calibration again")
            config = _check_config(meta["kind"], {**meta["config"], **changes})
            _set_meta(conn, config=config,
                      calibration={**report, "generation": generation,
                                   "calibrated_at": time.strftime("%Y-%m-%dT%H:%M:%S")},
                      **{NEIGHBOURS_SOURCE_KEY: _neighbours_source(num_neighbours=config["num_neighbours"],
                                                                   generation=generation, **source)})

        _commit(self.folder, change, rebuild=False)
        self._load()

    # ------------------------------------------------------------------ updates
    def set_threshold(self, threshold: float | None) -> None:
        """Open-set threshold on the best log Eq. 10 score (None: every query gets an identity)."""
        self._update_config({"unknown_threshold": threshold})

    def set_num_neighbours(self, num_neighbours: int) -> None:
        """N of Eq. 10: how many nearest clusters a search retrieves; recorded as the user's."""
        self._update_config({"num_neighbours": num_neighbours}, source={"method": "user"})

    def _update_config(self, changes: dict, source: dict | None = None) -> None:
        def change(conn: sqlite3.Connection, meta: dict) -> None:
            config = _check_config(meta["kind"], {**meta["config"], **changes})
            _set_meta(conn, config=config)
            if source is not None:
                _set_meta(conn, **{NEIGHBOURS_SOURCE_KEY: _neighbours_source(
                    num_neighbours=config["num_neighbours"], generation=int(meta["generation"]), **source)})

        _commit(self.folder, change, rebuild=False)
        self._load()

    def add(
        self,
        embeddings: np.ndarray,
        identity_names: Sequence[str],
        cluster_size: int | None = None,
        fingerprint: str | None = None,
        seed: int = 0,
        niter: int = 20,
        progress: bool = False,
        allow_unfingerprinted: bool = False,
    ) -> dict:
        """Enrol ``embeddings`` [M, D] with one identity name per row.

        ``fingerprint``: the model that made them; it must be the index's, and an index that
        records its model refuses embeddings without one unless ``allow_unfingerprinted``
        (:meth:`check_fingerprint`).

        The rows of each name are clustered with balanced spherical k-means (Huang et al. Eq. 6-7,
        :func:`facepipe.data.clusters.balanced_spherical_kmeans`, clusters of ``cluster_size``,
        default the index's). A new name becomes a new identity. For a name already in the
        gallery the new clusters are *added* to its existing ones: the index keeps centroids,
        not the embeddings they came from, so the old clusters cannot be re-clustered together
        with the new images. Returns counts of new/extended identities and added clusters.
        """
        from facepipe.data.clusters import balanced_spherical_kmeans

        self.check_fingerprint(fingerprint, allow_unfingerprinted=allow_unfingerprinted)
        x = np.asarray(embeddings)
        if x.ndim == 2 and x.shape[1] != self.dim:
            raise DimensionMismatchError(f"embeddings have dimension {x.shape[1]} but the index {self.folder} "
                                         f"holds {self.dim}-d centroids")
        x = unit_rows(x, "embeddings", ClusterIndexError)
        names = [str(name) for name in identity_names]
        if len(names) != len(x):
            raise ClusterIndexError(f"{len(names)} identity names for {len(x)} embeddings (one name per row)")
        if not len(x):
            raise ClusterIndexError("nothing to add: no embeddings")
        check_index_names(names)
        cluster_size = int(cluster_size or self.config.get("cluster_size") or DEFAULT_CLUSTER_SIZE)
        unique, codes = np.unique(np.array(names, dtype=object), return_inverse=True)
        assignment = balanced_spherical_kmeans(x, codes.astype(np.int64), cluster_size, seed=seed, niter=niter,
                                               progress=progress)
        centroids = unit_rows(assignment.centroids, "centroids", ClusterIndexError)
        owners = [str(unique[c]) for c in assignment.cluster_identity.tolist()]
        sizes = assignment.cluster_sizes()
        summary: dict[str, Any] = {}

        def change(conn: sqlite3.Connection, meta: dict) -> None:
            existing = dict(conn.execute("SELECT name, id FROM identities").fetchall())
            new = [str(name) for name in unique if str(name) not in existing]
            conn.executemany("INSERT INTO identities(name) VALUES (?)", [(name,) for name in new])
            ids = dict(conn.execute("SELECT name, id FROM identities").fetchall())
            first = int(meta["next_faiss_id"])
            conn.executemany(
                "INSERT INTO clusters(faiss_id, identity_id, size, centroid) VALUES (?, ?, ?, ?)",
                [(first + k, ids[owner], int(sizes[k]), centroids[k].tobytes()) for k, owner in enumerate(owners)])
            _set_meta(conn, next_faiss_id=first + len(owners))
            summary.update(new_identities=new, extended_identities=sorted(set(map(str, unique)) - set(new)),
                           clusters_added=len(owners), embeddings=len(x), cluster_size=cluster_size)

        _commit(self.folder, change, rebuild=True)
        self._load()
        return summary

    def remove(self, identity_names: Iterable[str]) -> dict:
        """Remove identities and all their clusters. An unknown name raises
        :class:`UnknownIdentityError` naming it, and nothing is changed."""
        names = list(dict.fromkeys(str(name) for name in identity_names))
        if not names:
            raise ClusterIndexError("no identity to remove was named")
        summary: dict[str, Any] = {}

        def change(conn: sqlite3.Connection, meta: dict) -> None:
            ids = dict(conn.execute("SELECT name, id FROM identities").fetchall())
            unknown = [name for name in names if name not in ids]
            if unknown:
                what = "identity" if len(unknown) == 1 else "identities"
                raise UnknownIdentityError(f"the index {self.folder} holds no {what} "
                                           f"{', '.join(repr(n) for n in unknown)}; nothing was removed")
            removed = 0
            for name in names:
                removed += conn.execute("DELETE FROM clusters WHERE identity_id = ?", (ids[name],)).rowcount
                conn.execute("DELETE FROM identities WHERE id = ?", (ids[name],))
            summary.update(removed_identities=names, removed_clusters=removed)

        _commit(self.folder, change, rebuild=True)
        self._load()
        summary["remaining_clusters"] = self.num_clusters
        return summary


def check_index_names(names: Sequence[str]) -> None:
    """Raise :class:`ClusterIndexError` unless every identity name is non-empty, has no
    surrounding spaces and passes :func:`facepipe.utils.names.check_identity_names`."""
    bad = [name for name in names if not name or name != name.strip()]
    if bad:
        raise ClusterIndexError(f"identity names must be non-empty and without surrounding spaces; got "
                                f"{', '.join(repr(n) for n in bad[:5])}")
    check_identity_names(names, "identity names")


def _cluster_sizes(cluster_sizes: Sequence[int] | np.ndarray | None, num_clusters: int) -> np.ndarray:
    if cluster_sizes is None:
        return np.zeros(num_clusters, dtype=np.int64)
    sizes = np.asarray(cluster_sizes)
    if sizes.shape != (num_clusters,) or not np.issubdtype(sizes.dtype, np.integer) or (sizes < 0).any():
        raise ClusterIndexError(f"cluster_sizes must be {num_clusters} non-negative integers (one per centroid)")
    return sizes.astype(np.int64)


def _commit(folder: Path, change: Callable[[sqlite3.Connection, dict], None], rebuild: bool,
            create: bool = False) -> None:
    """Apply ``change`` (SQL on an open transaction, given the current meta) and, with
    ``rebuild``, write the FAISS index of the resulting clusters as the next generation; all
    of it becomes current at COMMIT, or none of it (see the module docstring)."""
    conn = _connect(folder / META_FILE, create=create)
    new_path: Path | None = None
    old_generation = None
    committing = False
    try:
        try:
            # IMMEDIATE: take the write lock now, so that no other writer interleaves.
            conn.execute("BEGIN IMMEDIATE")
            if create:
                for statement in _SCHEMA.strip().split(";"):
                    if statement.strip():
                        conn.execute(statement)
            meta = _read_meta(conn)
        except sqlite3.Error as exc:
            raise ClusterIndexError(f"cannot update the index database {folder / META_FILE}: {exc}") from None
        old_generation = int(meta.get("generation", 0))
        if not create:
            missing = [key for key in _REQUIRED_META if key not in meta]
            if missing:
                raise ClusterIndexError(f"{folder / META_FILE} lacks {', '.join(missing)}: not a complete index")
            _clean_stray_files(folder, old_generation)
        change(conn, meta)
        meta = _read_meta(conn)
        if rebuild:
            generation = old_generation + 1
            dim = int(meta["dim"])
            ids, vectors = _read_centroids(conn, dim)
            index = _build_faiss(meta["kind"], meta["config"], dim, ids, vectors)
            data = faiss.serialize_index(index).tobytes()
            new_path = _faiss_path(folder, generation)
            _write_faiss_file(new_path, data)
            _set_meta(conn, generation=generation, faiss_sha256=hashlib.sha256(data).hexdigest(),
                      updated_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        committing = True
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        # The uncommitted file is garbage; after a failed COMMIT its fate is unknown, so it is
        # left for the next writer's clean-up, which keeps whatever generation was committed.
        if new_path is not None and not committing:
            with contextlib.suppress(OSError):
                new_path.unlink()
        raise
    finally:
        conn.close()
    if rebuild and old_generation:
        with contextlib.suppress(OSError):
            _faiss_path(folder, old_generation).unlink()
