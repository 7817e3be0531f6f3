"""Identity search over clusters (Huang et al., TPAMI 2019): the k-nearest-cluster rule
(``knc``), the on-disk FAISS + SQLite gallery (``store``), the jobs behind ``facepipe index`` /
``facepipe search`` (``jobs``) and the exact chunked top-k search (``flat_search``). The
per-identity clusters are :mod:`facepipe.data.clusters`, shared with training and evaluation."""

from facepipe.utils.lazy import lazy_exports

# The k-nearest-cluster rule (Huang et al. Eq. 10) and the on-disk cluster index. Loaded on first
# use: importing facepipe.index does not pay for FAISS.
_LAZY = {
    "knc": (
        "DEFAULT_NUM_NEIGHBOURS_GRID", "KNCResult", "NeighbourChoice", "PAPER_NUM_NEIGHBOURS_GRID",
        "ThresholdCalibration", "calibrate_unknown_threshold", "choose_num_neighbours", "knc_scores",
    ),
    "store": (
        "ClusterIndex", "ClusterIndexError", "DimensionMismatchError", "EmptyGalleryError",
        "FingerprintMismatchError", "INDEX_KINDS", "SearchResult", "UnknownIdentityError",
    ),
    "jobs": (
        "build_index_from_checkpoint", "build_index_from_embeddings", "calibrate_index", "enrol_images",
        "load_embedding_source", "read_labels", "search_images", "tune_num_neighbours_on_holdout",
    ),
}

__all__ = [name for names in _LAZY.values() for name in names]

__getattr__ = lazy_exports(__name__, {name: f"{__name__}.{module}" for module, names in _LAZY.items() for name in names})
