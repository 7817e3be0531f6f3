#!/usr/bin/env python
"""How often a finished two-process run fails at exit (not a test: it counts a rare race).

    .venv/bin/python bench/ddp_exit_stress.py --runs 100

Repeats the two-process CLMLE run of tests/test_distributed.py (gloo on CPU, one thread per
process, one step) under torchrun, with this script as the worker: each rank trains and returns
straight away, so rank 1, with nothing to write after its last ``all_gather_object``, reaches
interpreter shutdown at once. Before the fix that was where a gloo runloop thread, still
destroying that collective, aborted the process ("terminate called without an active exception",
SIGABRT; see ``facepipe.runtime.distributed._destroy_process_group``). ``facepipe train --nproc``
does more after training and shows the race less. Counts the failed runs and those with that
signature, prints a table and writes ``bench/results/ddp_exit_stress.json``. ``--drain``
overrides the exit handler's GIL-free pause, e.g. ``--drain 0``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from facepipe.config import config_from_dict, load_config
from facepipe.runtime.distributed import DRAIN_VARIABLE  # read by every torchrun worker
from facepipe.runtime.io import write_json_atomic, write_text_atomic
from facepipe.train.trainer import Trainer

ABORT_SIGNATURE = "terminate called without an active exception"


def write_config(data: Path, out: Path) -> Path:
    config = config_from_dict({
        "seed": 0, "output_dir": str(out),
        "data": {"root": str(data), "image_size": [32, 32], "batch_size": 8, "num_workers": 0},
        "model": {"depth": 18, "width": 0.125, "embedding_size": 32, "dropout": 0.0},
        "optim": {"lr": 0.05},
        "train": {"max_steps_per_epoch": 1,
                  "clusters": {"cluster_size": 3, "clusters_per_batch": 2, "images_per_cluster": 2},
                  "stages": [{"epochs": 1, "head": {"type": "softmax"},
                              "loss": {"type": "clmle", "inter_margin": 0.3, "intra_margin": 0.1}}]},
    })
    path = out.parent / "config.yaml"
    write_text_atomic(path, config.to_yaml())
    return path


def one_run(config: Path, out: Path, drain: float | None) -> tuple[int, str]:
    shutil.rmtree(out, ignore_errors=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={port}", __file__, "--worker", str(config)]
    # faulthandler as in the runs that first traced the abort: it reports a native abort and
    # changes the interpreter's exit path, where the race lies.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    if drain is not None:
        env[DRAIN_VARIABLE] = str(drain)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    return result.returncode, result.stderr


def worker(config: Path) -> None:
    torch.set_num_threads(1)
    Trainer(load_config(config), progress=False).fit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--drain", type=float, default=None,
                        help="seconds of the exit handler's GIL-free pause (default: the library's)")
    parser.add_argument("--out", default="runs/bench_ddp_exit")
    parser.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)  # one torchrun rank
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker))
        return
    root = Path(args.out)
    data = root / "data"
    if not data.is_dir():
        subprocess.run([sys.executable, "-m", "facepipe", "synth", "--out", str(data), "--identities", "12",
                        "--seed", "1", "--max-images", "12", "--min-images", "3", "--size", "32", "--quiet"],
                       check=True)
    config = write_config(data, root / "run")
    failed = aborted = 0
    first_error = ""
    started = time.perf_counter()
    for _ in tqdm(range(args.runs), desc="two-process runs", unit="run"):
        code, stderr = one_run(config, root / "run", args.drain)
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
