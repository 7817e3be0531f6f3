"""Evaluation: face-verification metrics, pair lists and report plots."""
from facepipe.eval.plots import plot_roc, plot_training_curves
from facepipe.eval.verification import (
    VerificationResult,
    best_threshold,
    cosine_scores,
    evaluate_verification,
    format_far,
    kfold_accuracy,
    make_pairs,
    read_pairs_csv,
    roc_metrics,
    write_pairs_csv,
)

__all__ = [
    "VerificationResult",
    "best_threshold",
    "cosine_scores",
    "evaluate_verification",
    "format_far",
    "kfold_accuracy",
    "make_pairs",
    "plot_roc",
    "plot_training_curves",
    "read_pairs_csv",
    "roc_metrics",
    "write_pairs_csv",
]
