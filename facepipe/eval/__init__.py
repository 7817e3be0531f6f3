"""Evaluation: face-verification metrics, pair lists, report plots, and the evaluation jobs
(LFW, YouTube Faces, MegaFace-style identification, insightface .bin sets, imbalance metrics).

The metric functions are imported eagerly; the jobs lazily (on first attribute access), so that
code needing only the metrics (the trainer's validation) does not load FAISS or imbalanced-learn.
"""
from facepipe.utils.lazy import lazy_exports

from facepipe.eval.plots import plot_cmc, plot_roc, plot_training_curves
from facepipe.eval.verification import (
    EvalInputError,
    VerificationResult,
    accuracy_at_threshold,
    best_threshold,
    cosine_scores,
    evaluate_verification,
    format_far,
    kfold_accuracy,
    make_pairs,
    read_pairs_csv,
    roc_metrics,
    score_missing_as_wrong,
    tail_roc,
    write_pairs_csv,
)

_LAZY = {
    "EmbeddingTable": "facepipe.eval.lfw",
    "evaluate_lfw": "facepipe.eval.lfw",
    "load_embeddings_folder": "facepipe.eval.lfw",
    "YTFSplits": "facepipe.eval.ytf",
    "evaluate_ytf": "facepipe.eval.ytf",
    "parse_ytf_splits": "facepipe.eval.ytf",
    "video_embeddings": "facepipe.eval.ytf",
    "MegaFaceResult": "facepipe.eval.megaface",
    "evaluate_megaface": "facepipe.eval.megaface",
    "lfw_megaface_sets": "facepipe.eval.megaface",
    "megaface_identification": "facepipe.eval.megaface",
    "BinPairs": "facepipe.eval.insightface_bin",
    "UnsafePickleError": "facepipe.eval.insightface_bin",
    "evaluate_bin": "facepipe.eval.insightface_bin",
    "load_bin": "facepipe.eval.insightface_bin",
    "ImbalanceMetrics": "facepipe.eval.imbalance",
    "closed_set_predictions": "facepipe.eval.imbalance",
    "imbalance_metrics": "facepipe.eval.imbalance",
    "EvalReport": "facepipe.eval.report",
    "write_report": "facepipe.eval.report",
}

__all__ = [
    "EvalInputError",
    "VerificationResult",
    "accuracy_at_threshold",
    "best_threshold",
    "cosine_scores",
    "evaluate_verification",
    "format_far",
    "kfold_accuracy",
    "make_pairs",
    "plot_cmc",
    "plot_roc",
    "plot_training_curves",
    "read_pairs_csv",
    "roc_metrics",
    "score_missing_as_wrong",
    "tail_roc",
    "write_pairs_csv",
    *_LAZY,
]


__getattr__ = lazy_exports(__name__, _LAZY)
