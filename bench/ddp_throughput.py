#!/usr/bin/env python
"""Training throughput of one process against G gloo processes on the same global batch (not a
test; on a 2-core CPU this checks that DDP runs, it is not a speed-up).

    .venv/bin/python bench/ddp_throughput.py --data /tmp/synth_small --steps 30

Trains the same config twice through the CLI: ``facepipe train`` (one process, all cores) and
``facepipe train --nproc G`` (G processes under torchrun, gloo on CPU, cores / G threads each),
and reads images/s of the timed epoch from each run's ``metrics.jsonl`` (the first epoch warms up
and is not timed). Prints a markdown table and writes ``bench/results/ddp_throughput.json``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from facepipe.runtime.io import write_json_atomic
from facepipe.train.run_log import read_run_log


def run(args: argparse.Namespace, processes: int, out: Path) -> dict:
    threads = max(1, (os.cpu_count() or 1) // processes)
    command = [sys.executable, "-m", "facepipe", "train", "--config", args.config, "--quiet", "--overwrite",
               f"--nproc={processes}", f"data.root={args.data}", f"output_dir={out}",
               f"data.batch_size={args.batch}", "data.num_workers=0", f"train.max_steps_per_epoch={args.steps}",
               "train.stages=[{epochs: 2, head: {type: cosface, s: 16.0, m: 0.2}}]"]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    epochs = [r for r in read_run_log(out / "metrics.jsonl") if r["event"] == "epoch"]
    timed = epochs[-1]
    return {"processes": processes, "threads_per_process": threads, "wall_seconds": wall,
            "epoch_seconds": timed["seconds"], "images_per_s": timed["images_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="identity folders (e.g. facepipe synth output)")
    parser.add_argument("--config", default="umm_small", help="model and data settings (its stages are replaced)")
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch (2 epochs, the second timed)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", default="runs/bench_ddp")
    args = parser.parse_args()
    rows = [run(args, 1, Path(args.out) / "single"), run(args, args.processes, Path(args.out) / "ddp")]
    print(f"global batch {args.batch}, {args.steps} timed steps, {os.cpu_count()} cores\n")
    print("| processes | threads each | images/s (timed epoch) | epoch s | wall s (start-up included) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['processes']} | {row['threads_per_process']} | {row['images_per_s']:.1f} | "
              f"{row['epoch_seconds']:.1f} | {row['wall_seconds']:.1f} |")
    write_json_atomic(Path("bench/results/ddp_throughput.json"), {"config": vars(args), "runs": rows})


if __name__ == "__main__":
    main()
