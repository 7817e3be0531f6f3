"""Alignment throughput: MTCNN detection + 5-point alignment on the first N LFW images.

    .venv/bin/python bench/align_throughput.py                 # 1,000 images, all modes
    .venv/bin/python bench/align_throughput.py --images 200 --modes detector

Modes:
- ``detector``: decoded images in memory -> ``MTCNN.detect`` (batch 16), one process, all torch threads;
  the figure to compare with the reference implementation's images/s;
- ``job-1proc``: ``align_images`` end to end (decode, detect, warp, JPEG write, manifest), one process;
- ``job-allcores``: the same with one worker process per core (one torch thread each).
Prints a Markdown table and writes it as JSON next to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from facepipe.align import MTCNN, align_images, decode_for_alignment
from facepipe.config import AlignConfig

DEFAULT_LFW = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "lfw" / "lfw-deepfunneled"


def first_images(root: Path, count: int) -> list[str]:
    if not root.is_dir():
        sys.exit(f"LFW not found at {root}; pass --lfw")
    return sorted(str(p.relative_to(root)) for p in root.glob("*/*.jpg"))[:count]


def bench_detector(root: Path, relative: list[str]) -> dict:
    images = [decode_for_alignment(root / rel).pixels for rel in relative]
    detector = MTCNN()
    detector.detect(images[:16])  # warm-up: weights to cache, oneDNN kernels chosen
    start = time.perf_counter()
    found = detector.detect(images)
    seconds = time.perf_counter() - start
    return {"mode": "detector", "processes": 1, "threads": torch.get_num_threads(), "seconds": seconds,
            "images_per_s": len(images) / seconds, "faces": int(sum(len(f) for f in found)),
            "no_face": int(sum(len(f) == 0 for f in found))}


def bench_job(root: Path, relative: list[str], workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "images.txt"
        listing.write_text("\n".join(relative) + "\n")
        out = Path(tmp) / "aligned"
        summary = align_images(listing, out, AlignConfig(), root=root, workers=workers, progress=False)
        shutil.rmtree(out)
    threads = torch.get_num_threads() if workers <= 1 else max(1, (os.cpu_count() or 1) // workers)
    return {"mode": "job-1proc" if workers == 0 else "job-allcores", "processes": max(1, workers),
            "threads": threads, "seconds": summary.seconds, "images_per_s": summary.total / summary.seconds,
            **{f"n_{k}": v for k, v in summary.counts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lfw", type=Path, default=DEFAULT_LFW)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--modes", nargs="+", default=["detector", "job-1proc", "job-allcores"])
    parser.add_argument("--out", type=Path, default=Path("bench/results/align_throughput.json"))
    args = parser.parse_args()
    relative = first_images(args.lfw, args.images)
    rows = []
    for mode in args.modes:
        if mode == "detector":
            rows.append(bench_detector(args.lfw, relative))
        elif mode == "job-1proc":
            rows.append(bench_job(args.lfw, relative, workers=0))
        elif mode == "job-allcores":
            rows.append(bench_job(args.lfw, relative, workers=os.cpu_count() or 1))
        else:
            sys.exit(f"unknown mode {mode}")
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{len(relative)} LFW images (sorted, first {args.images}), {os.cpu_count()} cores, torch {torch.__version__}\n")
    print("| mode | processes x threads | images/s | seconds |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['processes']} x {row['threads']} | {row['images_per_s']:.1f} | {row['seconds']:.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"images": len(relative), "cores": os.cpu_count(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
