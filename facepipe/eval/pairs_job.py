"""``facepipe eval pairs``: verification of a checkpoint on a CSV of image pairs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facepipe.data.dataset import DatasetError
from facepipe.embed.extract import extract_embeddings, load_model
from facepipe.eval.plots import plot_roc
from facepipe.eval.verification import cosine_scores, evaluate_verification, read_pairs_csv
from facepipe.utils.device import resolve_device
from facepipe.utils.io import staged_files, write_csv_atomic, write_json_atomic


@dataclass
class PairsOnDisk:
    """A pairs CSV resolved against its image folder: each image once, pairs as row indices."""

    paths: list[str]  # unique image files, sorted
    idx_a: np.ndarray
    idx_b: np.ndarray
    is_same: np.ndarray
    names_a: list[str]  # the paths as the CSV wrote them
    names_b: list[str]


def load_pairs(pairs: str | Path, root: str | Path | None = None) -> PairsOnDisk:
    """Read a pairs CSV; paths are relative to ``root`` (default: the CSV's folder).

    A missing image is an error listing the missing files: dropping pairs silently would change
    the protocol.
    """
    pairs = Path(pairs)
    if not pairs.is_file():
        raise DatasetError(f"pairs file {pairs} does not exist")
    root = Path(root) if root else pairs.parent
    names_a, names_b, is_same = read_pairs_csv(pairs)
    unique = sorted(set(names_a) | set(names_b))
    missing = [p for p in unique if not (root / p).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} image(s) named in {pairs} are missing under {root}: {missing[:5]}")
    position = {p: i for i, p in enumerate(unique)}
    return PairsOnDisk(
        paths=[str(root / p) for p in unique],
        idx_a=np.array([position[p] for p in names_a], dtype=np.int64),
        idx_b=np.array([position[p] for p in names_b], dtype=np.int64),
        is_same=is_same, names_a=names_a, names_b=names_b,
    )


def evaluate_pairs_file(checkpoint: str | Path, pairs: str | Path, root: str | Path | None, out: str | Path,
                        device: str = "auto", progress: bool = True) -> dict:
    """Embed every image the pairs name, score pairs by cosine similarity, run the 10-fold protocol.

    Writes ``metrics.json``, ``scores.csv`` (one row per pair) and ``roc.png``.
    """
    resolved = load_pairs(pairs, root)
    torch_device = resolve_device(device)
    loaded = load_model(checkpoint, torch_device)
    embeddings = extract_embeddings(loaded.model, resolved.paths, loaded.config.data.image_size,
                                    torch_device, batch_size=loaded.config.embed.batch_size,
                                    flip=loaded.config.embed.flip, progress=progress)
    scores = cosine_scores(embeddings, resolved.idx_a, resolved.idx_b)
    result = evaluate_verification(scores, resolved.is_same)
    out = Path(out)
    metrics = {"checkpoint": str(checkpoint), "model_fingerprint": loaded.fingerprint, "pairs": str(pairs),
               "root": str(Path(root) if root else Path(pairs).parent), "flip": loaded.config.embed.flip, **result.to_dict()}
    # Together, metrics.json last: a failed plot never leaves new scores beside old metrics.
    with staged_files(out, last="metrics.json") as staging:
        write_csv_atomic(staging / "scores.csv", ["path_a", "path_b", "is_same", "score"],
                         zip(resolved.names_a, resolved.names_b, resolved.is_same.astype(int), np.round(scores, 6)))
        plot_roc({f"{Path(checkpoint).name} (AUC {result.auc:.3f})": (result.fpr, result.tpr)}, staging / "roc.png")
        write_json_atomic(staging / "metrics.json", metrics)
    return {"metrics": metrics, "summary": f"{result.num_pairs} pairs: {result.summary()} -> {out}"}
