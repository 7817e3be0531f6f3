#!/usr/bin/env python
"""LFW View 2 metrics from precomputed embeddings: wall time of ``facepipe eval lfw``.

Not a test: timings depend on the machine. The issue's configuration (6,000 pairs):

    .venv/bin/python bench/eval_lfw_pairs.py --folds 10 --per-class 300 --dim 512

Writes, in a temporary folder, a View 2 ``pairs.txt`` (``folds`` folds of ``per-class`` matched
then mismatched pairs) over synthetic people and an embeddings folder in the ``facepipe embed``
layout, then times :func:`facepipe.eval.lfw.evaluate_lfw` end to end (parsing, lookup, scores,
10-fold protocol, ROC, report with plot and CSV) and, separately, the metric computation alone
(:func:`facepipe.eval.verification.evaluate_verification` on the same scores).
"""
from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from facepipe.eval.lfw import evaluate_lfw
from facepipe.eval.verification import evaluate_verification


def write_inputs(folder: Path, folds: int, per_class: int, dim: int, noise: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    lines = [f"{folds}\t{per_class}"]
    keys: list[str] = []
    vectors: list[np.ndarray] = []

    def add(person: str, number: int, centre: np.ndarray) -> None:
        keys.append(f"{person}/{person}_{number:04d}.jpg")
        vectors.append(centre + noise * rng.standard_normal(dim))

    for f in range(folds):
        for k in range(per_class):
            person, centre = f"M{f}_{k}", rng.standard_normal(dim)
            add(person, 1, centre), add(person, 2, centre)
            lines.append(f"{person}\t1\t2")
        for k in range(per_class):
            a, b = f"A{f}_{k}", f"B{f}_{k}"
            add(a, 1, rng.standard_normal(dim)), add(b, 1, rng.standard_normal(dim))
            lines.append(f"{a}\t1\t{b}\t1")
    (folder / "pairs.txt").write_text("\n".join(lines) + "\n")
    emb = folder / "embeddings"
    emb.mkdir()
    array = np.stack(vectors).astype(np.float32)
    np.save(emb / "embeddings.npy", array / np.linalg.norm(array, axis=1, keepdims=True))
    with open(emb / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "path", "identity"])
        writer.writerows((row, f"lfw/{key}", key.split("/")[0]) for row, key in enumerate(keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="facepipe-bench-") as tmp:
        folder = Path(tmp)
        write_inputs(folder, args.folds, args.per_class, args.dim, args.noise, args.seed)
        job_times, metric_times = [], []
        for repeat in range(args.repeats):
            started = time.perf_counter()
            result = evaluate_lfw(folder / "pairs.txt", folder / f"report{repeat}",
                                  embeddings=folder / "embeddings", progress=False)
            job_times.append(time.perf_counter() - started)
            with open(folder / f"report{repeat}" / "scores.csv") as handle:
                rows = list(csv.DictReader(handle))
            scores = np.array([float(r["score"]) for r in rows])
            is_same = np.array([r["is_same"] == "1" for r in rows])
            folds = np.array([int(r["set"]) - 1 for r in rows])
            started = time.perf_counter()
            evaluate_verification(scores, is_same, n_folds=args.folds, folds=folds)
            metric_times.append(time.perf_counter() - started)
    ver = result["metrics"]["verification"]
    print(json.dumps({
        "pairs": 2 * args.folds * args.per_class,
        "dim": args.dim,
        "job_wall_s_best": round(min(job_times), 3),
        "job_wall_s_all": [round(t, 3) for t in job_times],
        "metrics_only_s_best": round(min(metric_times), 4),
        "accuracy": f"{100 * ver['accuracy_mean']:.2f} +- {100 * ver['accuracy_std']:.2f} %",
        "auc": round(ver["auc"], 4),
    }, indent=2))


if __name__ == "__main__":
    main()
