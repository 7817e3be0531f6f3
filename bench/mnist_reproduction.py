#!/usr/bin/env python
"""Li et al. Table 1 on this machine: imbalanced MNIST G-means of CE (CPL), LA, MM-DRW and ARConvL.

    .venv/bin/python bench/mnist_reproduction.py

Runs go to ``--out`` (default ``bench/reports/mnist_reproduction``, where each finished run's
``results.json``, ``config.yaml`` and ``metrics.jsonl`` are kept in git; checkpoints stay local).

Every run is ``facepipe classify --config mnist_imbalanced`` with one method's overrides
(classify.imbalance_ratio = q, seed = s); runs go row by row (every seed of MNIST-100 first, the
order of ``--ratios``), each in its own folder. ``--shard K/N`` runs every N-th run from the K-th, so
that N processes of one thread each share the machine (on 2 cores, two one-thread processes train
about 9 % more images per second in all than one two-thread process: bench/mnist_thread_layout.py):

    OMP_NUM_THREADS=1 .venv/bin/python bench/mnist_reproduction.py --shard 0/2 &
    OMP_NUM_THREADS=1 .venv/bin/python bench/mnist_reproduction.py --shard 1/2 &
 A finished run (``results.json``) is never retrained and an interrupted one resumes
from its last epoch, so the script can be stopped and started again at any time. ``--table-only``
rewrites the table from the runs that exist. The table (``table.md`` and ``table.json`` in
``--out``) gives mean +- std of test G-mean (%) over the finished seeds beside Li et al.'s published
Table 1 (mean +- std of 10 runs there), and the mean training time per run here (the sum of
its epochs' wall times from its run log, so a resumed run counts each epoch once).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from facepipe.config import load_config
from facepipe.runtime.io import write_json_atomic, write_text_atomic
from facepipe.study.spec import load_method_table
from facepipe.train.classify import RESULTS, run_classification
from facepipe.train.run_log import read_run_log

# The methods, their labels and Li et al.'s published figures: a method table in YAML.
TABLE = load_method_table(Path(__file__).resolve().parents[1] / "configs" / "studies" / "mnist_li.yaml")
METHODS = TABLE.methods


def run_dir(out: Path, q: int, method: str, seed: int) -> Path:
    return out / f"mnist{q}" / method / f"seed{seed}"


def training_seconds(run_log: Path) -> float:
    """The sum of a run's epoch wall times from its log, so that a run resumed after an interruption
    counts the pause not at all. The log is appended to, so an epoch trained twice (a crash between
    its log line and its checkpoint, or a run restarted without its checkpoint) appears twice: the
    last record of each (stage, epoch) is the one that led to the result."""
    last = {(r.get("stage"), r["epoch"]): r["seconds"] for r in read_run_log(run_log) if r["event"] == "epoch"}
    return float(sum(last.values()))


def table_ratios(out: Path) -> list[int]:
    """Every ratio with runs in ``out``, from the most imbalanced: the table always covers the whole
    folder, whichever ratios the command ran."""
    return sorted((int(path.name[5:]) for path in out.glob("mnist*") if path.is_dir() and path.name[5:].isdigit()),
                  reverse=True)


def collect(out: Path, ratios: list[int], methods: list[str]) -> list[dict]:
    rows = []
    for q in ratios:
        for method in methods:
            finished = sorted((out / f"mnist{q}" / method).glob(f"seed*/{RESULTS}"))
            results = [json.loads(path.read_text()) for path in finished]
            seconds = [training_seconds(path.parent / "metrics.jsonl") for path in finished]
            gmeans = np.array([100 * r["test_gmean"] for r in results])
            paper = METHODS[method].published.get(f"MNIST-{q}")
            rows.append({
                "dataset": f"MNIST-{q}", "method": method, "runs": len(results),
                "gmean_mean": float(gmeans.mean()) if len(gmeans) else None,
                "gmean_std": float(gmeans.std(ddof=1)) if len(gmeans) > 1 else None,
                "gmeans": gmeans.tolist(),
                "best_epochs": [r["best_epoch"] for r in results],
                "seconds_per_run": float(np.mean(seconds)) if results else None,
                "paper_mean": paper[0] if paper else None, "paper_std": paper[1] if paper else None,
            })
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| data | method | runs here | G-mean here (%) | per seed (%) | best epochs | Li et al. Table 1 (%) "
             "| here - paper | training time / run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        here = "not run" if row["gmean_mean"] is None else (
            f"{row['gmean_mean']:.1f}" + (f" ± {row['gmean_std']:.1f}" if row["gmean_std"] is not None else ""))
        paper = "—" if row["paper_mean"] is None else f"{row['paper_mean']:.1f} ± {row['paper_std']:.1f}"
        delta = ("—" if row["paper_mean"] is None or row["gmean_mean"] is None
                 else f"{row['gmean_mean'] - row['paper_mean']:+.1f}")
        wall = "—" if row["seconds_per_run"] is None else f"{row['seconds_per_run'] / 60:.1f} min"
        per_seed = ", ".join(f"{g:.2f}" for g in row["gmeans"]) or "—"
        epochs = ", ".join(str(e) for e in row["best_epochs"]) or "—"
        lines.append(f"| {row['dataset']} | {METHODS[row['method']].label} | {row['runs']} | {here} | {per_seed} | {epochs} "
                     f"| {paper} | {delta} | {wall} |")
    return "\n".join(lines) + "\n"


def parse_shard(text: str) -> tuple[int, int]:
    try:
        shard, shards = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants K/N with integers, got {text!r}") from None
    if not 0 <= shard < shards:
        raise argparse.ArgumentTypeError(f"--shard {text}: K must be in [0, N)")
    return shard, shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/reports/mnist_reproduction")
    parser.add_argument("--ratios", type=int, nargs="+", default=[100, 10, 50])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds of every method (default: each method's seeds in the method table)")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="K/N",
                        help="run only runs K, K+N, K+2N, ... of the full list (0 <= K < N)")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every run (smoke tests)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    out = Path(args.out)
    if not args.table_only:
        shard, shards = args.shard
        seeds = sorted({seed for method in args.methods for seed in (args.seeds or METHODS[method].seeds)})
        runs = [(q, seed, method) for q in args.ratios for seed in seeds for method in args.methods
                if seed in (args.seeds or METHODS[method].seeds)]
        for q, seed, method in runs[shard::shards]:
            folder = run_dir(out, q, method, seed)
            if (folder / RESULTS).is_file():
                continue
            config = load_config(TABLE.base(), [
                f"seed={seed}", f"output_dir={folder}", f"classify.imbalance_ratio={q}",
                *TABLE.method_overrides(method), *args.overrides])
            started = time.perf_counter()
            result = run_classification(config, resume=True, progress=False)
            logging.info("MNIST-%d %s seed %d: test G-mean %.2f%% in %.1f min", q, method, seed,
                         100 * result["test_gmean"], (time.perf_counter() - started) / 60)
            rows = collect(out, table_ratios(out), list(METHODS))
            write_text_atomic(out / "table.md", markdown(rows))
    rows = collect(out, table_ratios(out), list(METHODS))
    write_json_atomic(out / "table.json", rows)
    write_text_atomic(out / "table.md", markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
