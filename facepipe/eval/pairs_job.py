"""``facepipe eval pairs``: verification of a checkpoint on a CSV of image pairs."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from facepipe.data.dataset import DatasetError
from facepipe.embed.extract import extract_embeddings, load_model
from facepipe.eval.plots import plot_roc
from facepipe.eval.verification import cosine_scores, evaluate_verification, read_pairs_csv
from facepipe.utils.device import resolve_device
from facepipe.utils.io import atomic_write, write_json_atomic

import numpy as np


def evaluate_pairs_file(checkpoint: str | Path, pairs: str | Path, root: str | Path | None, out: str | Path,
                        device: str = "auto", progress: bool = True) -> dict:
    """Embed every image the pairs name, score pairs by cosine similarity, run the 10-fold protocol.

    A missing image is an error listing the missing files: dropping pairs silently would change
    the protocol. Writes ``metrics.json``, ``scores.csv`` (one row per pair) and ``roc.png``.
    """
    pairs = Path(pairs)
    root = Path(root) if root else pairs.parent
    paths_a, paths_b, is_same = read_pairs_csv(pairs)
    unique = sorted(set(paths_a) | set(paths_b))
    missing = [p for p in unique if not (root / p).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} image(s) named in {pairs} are missing under {root}: {missing[:5]}")
    torch_device = resolve_device(device)
    loaded = load_model(checkpoint, torch_device)
    embeddings = extract_embeddings(loaded.model, [str(root / p) for p in unique], loaded.config.data.image_size,
                                    torch_device, batch_size=loaded.config.embed.batch_size,
                                    flip=loaded.config.embed.flip, progress=progress)
    position = {p: i for i, p in enumerate(unique)}
    idx_a = np.array([position[p] for p in paths_a])
    idx_b = np.array([position[p] for p in paths_b])
    scores = cosine_scores(embeddings, idx_a, idx_b)
    result = evaluate_verification(scores, is_same)
    out = Path(out)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path_a", "path_b", "is_same", "score"])
    writer.writerows(zip(paths_a, paths_b, is_same.astype(int), np.round(scores, 6)))
    with atomic_write(out / "scores.csv", "w", encoding="utf-8") as handle:
        handle.write(buffer.getvalue())
    plot_roc({f"{Path(checkpoint).name} (AUC {result.auc:.3f})": (result.fpr, result.tpr)}, out / "roc.png")
    metrics = {"checkpoint": str(checkpoint), "model_fingerprint": loaded.fingerprint, "pairs": str(pairs),
               "root": str(root), "flip": loaded.config.embed.flip, **result.to_dict()}
    write_json_atomic(out / "metrics.json", metrics)
    return {"metrics": metrics, "summary": f"{result.num_pairs} pairs: {result.summary()} -> {out}"}
