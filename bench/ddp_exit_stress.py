#!/usr/bin/env python
"""How often a finished two-process run fails at exit (not a test: it counts a rare race).

    .venv/bin/python bench/ddp_exit_stress.py --runs 100

Repeats the smallest CLMLE run under ``facepipe train --nproc 2`` (gloo on CPU, one thread per
process, one step): the one whose rank 1 has nothing left to do after its last
``all_gather_object``, and so used to reach interpreter shutdown while a gloo runloop thread was
still destroying that collective ("terminate called without an active exception", SIGABRT; see
``facepipe.train.distributed._destroy_process_group``). Counts the failed runs and those with
that signature, prints a table and writes ``bench/results/ddp_exit_stress.json``. ``--drain``
overrides the exit handler's GIL-free pause, e.g. ``--drain 0`` to see the race again.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from facepipe.train.distributed import DRAIN_VARIABLE  # read by every torchrun worker
from facepipe.utils.io import write_json_atomic

ABORT_SIGNATURE = "terminate called without an active exception"


def one_run(data: Path, out: Path, drain: float | None) -> tuple[int, str]:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "facepipe", "train", "--config", "clmle", "--quiet", "--nproc=2",
               f"data.root={data}", f"output_dir={out}", "data.image_size=[32,32]", "data.batch_size=8",
               "data.num_workers=0", "model.depth=18", "model.width=0.125", "model.embedding_size=32",
               "model.dropout=0.0", "train.max_steps_per_epoch=1",
               "train.clusters={cluster_size: 3, clusters_per_batch: 2, images_per_cluster: 2}",
               "train.stages=[{epochs: 1, head: {type: softmax}, "
               "loss: {type: clmle, inter_margin: 0.3, intra_margin: 0.1}}]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if drain is not None:
        env[DRAIN_VARIABLE] = str(drain)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    return result.returncode, result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--drain", type=float, default=None,
                        help="seconds of the exit handler's GIL-free pause (default: the library's)")
    parser.add_argument("--out", default="runs/bench_ddp_exit")
    args = parser.parse_args()
    root = Path(args.out)
    data = root / "data"
    if not data.is_dir():
        subprocess.run([sys.executable, "-m", "facepipe", "synth", "--out", str(data), "--identities", "12",
                        "--seed", "1", "--max-images", "12", "--min-images", "3", "--size", "32", "--quiet"],
                       check=True)
    failed = aborted = 0
    first_error = ""
    started = time.perf_counter()
    for _ in tqdm(range(args.runs), desc="two-process runs", unit="run"):
        code, stderr = one_run(data, root / "run", args.drain)
        if code != 0:
            failed += 1
            aborted += ABORT_SIGNATURE in stderr
            first_error = first_error or stderr[-2000:]
    wall = time.perf_counter() - started
    drain = "library default" if args.drain is None else f"{args.drain:g} s"
    print(f"\n| runs | failed | of which '{ABORT_SIGNATURE}' | exit pause | wall s |")
    print("|---|---|---|---|---|")
    print(f"| {args.runs} | {failed} | {aborted} | {drain} | {wall:.0f} |")
    if first_error and failed != aborted:
        print("\nfirst failure without the abort signature:\n" + first_error)
    write_json_atomic(Path("bench/results/ddp_exit_stress.json"),
                      {"runs": args.runs, "failed": failed, "aborted": aborted, "drain": args.drain,
                       "wall_seconds": wall, "cpu_count": os.cpu_count()})


if __name__ == "__main__":
    main()
