"""Where facepipe's MTCNN spends its time (issue 28): wall time of each stage of ``MTCNN.detect``
on the LFW photos or the shared camera photos, two threads, batches of 16.

    .venv/bin/python bench/align_profile.py --set photos
    .venv/bin/python bench/align_profile.py --set lfw --images 200

Stages are timed by wrapping the detector's own functions (P-Net forwards, the pyramid's
``interpolate``, the summed-area table, the R-Net and O-Net stages with their crops, NMS); the
rest (tensor conversions, thresholding, box arithmetic) is reported as "other". Prints a table;
machine-dependent, so not a test.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import facepipe.align.detector as detector
from facepipe.align import MTCNN, decode_for_alignment
from facepipe.data.dataset import IMAGE_EXTENSIONS

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def load_images(which: str, count: int) -> list:
    if which == "lfw":
        paths = sorted((SHARED / "lfw" / "lfw-deepfunneled").glob("*/*.jpg"))[:count]
    else:
        paths = sorted(p for p in (SHARED / "photos").rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise SystemExit(f"no images for --set {which} under {SHARED}")
    return [decode_for_alignment(path).pixels for path in paths]


class StageTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started

        setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=["lfw", "photos"], default="photos")
    parser.add_argument("--images", type=int, default=200, help="LFW photos (the first N, sorted)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = load_images(args.set, args.images)
    mtcnn = MTCNN()
    mtcnn.detect(images[:4])  # warm-up
    timer = StageTimer()
    timer.wrap(F, "interpolate", "pyramid resampling (interpolate)")
    timer.wrap(mtcnn.pnet, "forward", "P-Net forwards")
    timer.wrap(detector, "summed_area_table", "summed-area table")
    timer.wrap(detector, "batched_nms", "NMS")
    timer.wrap(mtcnn, "_refine", "R-Net stage (crops, forward, NMS)")
    timer.wrap(mtcnn, "_output", "O-Net stage (crops, forward, NMS)")
    started = time.perf_counter()
    for start in range(0, len(images), args.batch_size):
        mtcnn.detect(images[start:start + args.batch_size])
    total = time.perf_counter() - started
    # NMS inside the R-Net and O-Net stages is counted there too: "other" subtracts only the rest.
    inner = sum(v for k, v in timer.seconds.items() if k != "NMS")
    print(f"{args.set}: {len(images)} images, {total:.2f} s, {len(images) / total:.1f} images/s, "
          f"{args.threads} threads, batches of {args.batch_size}")
    print("| stage | seconds | share |\n|---|---|---|")
    for label, seconds in sorted(timer.seconds.items(), key=lambda item: -item[1]):
        print(f"| {label} | {seconds:.2f} | {100 * seconds / total:.0f} % |")
    print(f"| other | {total - inner:.2f} | {100 * (total - inner) / total:.0f} % |")


if __name__ == "__main__":
    main()
