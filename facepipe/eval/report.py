"""Report folders shared by every evaluation job (``facepipe eval lfw | ytf | megaface | bin``).

Each job writes one folder:

* ``metrics.json``: every number, the protocol variant, data paths, counts and the model
  fingerprint, so a result can be traced to the exact weights and files;
* ``report.md``: the same for people, with the protocol spelled out;
* ``roc.png`` / ``cmc.png``: the curves (matplotlib, see :mod:`facepipe.eval.plots`);
* ``scores.csv`` (and any other tables): one row per scored pair or trial, so every number can
  be recomputed from the report alone.

All files are written atomically and together (:mod:`facepipe.runtime.io`): a report is never
half old, half new.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from facepipe.eval.plots import plot_cmc, plot_roc
from facepipe.eval.verification import SEPARATE_THRESHOLD, VerificationResult, format_far
from facepipe.runtime.io import staged_files, write_csv_atomic, write_json_atomic, write_text_atomic

__all__ = ["EvalReport", "Table", "format_percent", "verification_rows", "write_report"]


def format_percent(value: float | None, digits: int = 2) -> str:
    """``0.9752`` -> ``97.52 %``; ``None`` or NaN -> ``n/a``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.{digits}f} %"


@dataclass
class Table:
    """A CSV table of the report: ``file`` name, header and rows."""

    file: str
    header: Sequence[str]
    rows: Iterable[Sequence[Any]]


@dataclass
class EvalReport:
    """Everything one evaluation writes; see :func:`write_report`.

    ``summary_rows`` are the (metric, value) rows of the headline table of ``report.md``;
    ``details`` is free Markdown (protocol notes, per-level tables); ``roc_curves`` maps a
    legend label to ``(fpr, tpr)``; ``cmc_curves`` maps a label to rates at ranks 1..R.
    """

    title: str
    metrics: dict[str, Any]
    summary_rows: list[tuple[str, str]]
    protocol_notes: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    roc_curves: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None
    roc_title: str = "ROC"
    roc_min_far: float = 1e-5  # left edge of the log FAR axis
    cmc_curves: Mapping[str, Sequence[float]] | None = None
    cmc_title: str = "CMC"


def verification_rows(result: VerificationResult) -> list[tuple[str, str]]:
    """Headline rows for a verification result: accuracy, AUC, EER, TAR@FAR, threshold."""
    if result.fold_scheme == SEPARATE_THRESHOLD:
        accuracy = ("accuracy (threshold from the separate pairs)", format_percent(result.accuracy_mean))
    else:
        n_folds = len(result.fold_accuracies)
        accuracy = (f"{n_folds}-fold accuracy (mean +- std over folds, {result.fold_scheme} folds)",
                    f"{100 * result.accuracy_mean:.2f} +- {100 * result.accuracy_std:.2f} %")
    rows = [accuracy, ("ROC AUC", f"{result.auc:.4f}"), ("EER", format_percent(result.eer))]
    rows += [(f"TAR @ FAR = {format_far(f, short=True)} (interpolated on the ROC)", format_percent(t))
             for f, t in result.tar_at_far.items()]
    rows.append((f"threshold ({result.threshold_source})", f"{result.threshold:.4f}"))
    rows.append(("pairs (matched / mismatched)", f"{result.num_pairs} ({result.num_positive} / {result.num_negative})"))
    return rows


def _markdown_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"{len(value)} items"
    return str(value).replace("|", "\\|")


def _markdown(report: EvalReport, files: list[str]) -> str:
    lines = [f"# {report.title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in report.summary_rows]
    if report.protocol_notes:
        lines += ["", "## Protocol", ""]
        lines += [f"- {note}" for note in report.protocol_notes]
    if report.details:
        lines += ["", *report.details]
    context = {k: v for k, v in report.metrics.items() if isinstance(v, (str, int, float, bool)) or v is None}
    for key in ("data", "counts", "model"):
        if isinstance(report.metrics.get(key), Mapping):
            context.update({f"{key}.{k}": v for k, v in report.metrics[key].items()
                            if not isinstance(v, (Mapping, np.ndarray))})
    lines += ["", "## Data and model", "", "| key | value |", "|---|---|"]
    lines += [f"| {key} | {_markdown_value(value)} |" for key, value in context.items()]
    lines += ["", "## Files", ""]
    lines += [f"- `{name}`" for name in files]
    return "\n".join(lines) + "\n"


def write_report(out: str | os.PathLike, report: EvalReport) -> dict[str, Any]:
    """Write the report folder ``out``; return the metrics as written to ``metrics.json``.

    ``metrics.json`` gets a ``files`` entry listing what the folder holds. The report's files are
    written together (:func:`facepipe.runtime.io.staged_files`, ``metrics.json`` last): a failure
    half-way (a plot, a full disk) leaves the previous report whole. Not the folder as a unit:
    it also keeps what the job put there (``aligned/``, ``distractor_embeddings/``).
    """
    files: list[str] = []
    with staged_files(out, last="metrics.json") as staging:
        for table in report.tables:
            write_csv_atomic(staging / table.file, table.header, table.rows)
            files.append(table.file)
        if report.roc_curves:
            plot_roc(report.roc_curves, staging / "roc.png", title=report.roc_title, min_far=report.roc_min_far)
            files.append("roc.png")
        if report.cmc_curves:
            plot_cmc(report.cmc_curves, staging / "cmc.png", title=report.cmc_title)
            files.append("cmc.png")
        files += ["metrics.json", "report.md"]
        metrics = {**report.metrics, "files": files}
        write_json_atomic(staging / "metrics.json", metrics)
        write_text_atomic(staging / "report.md", _markdown(report, files))
    return metrics
