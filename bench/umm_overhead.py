#!/usr/bin/env python
"""Cost of the Khan et al. uncertainty margins against plain softmax (not a test: machine-dependent).

    .venv/bin/python bench/umm_overhead.py                       # IR-SE-50, 112x112, batch 64
    .venv/bin/python bench/umm_overhead.py --depth 18 --width 0.25 --size 64 --rounds 5

Measures, on one model with the output stage's dropout p = 0.5, full optimisation steps of
- softmax: the plain classifier;
- UMM: L-Softmax with per-class integer margins (1..3), as after an uncertainty refresh;
- UMM + SUM: the same plus the N = 10 MC-dropout passes of the output stage per batch (on the
  batch's feature maps; the backbone runs once) and the misclassification probabilities;
and the refresh itself: eval-mode backbone pass + N output-stage passes + softmax per image.
The variants are interleaved round by round and the median step time is kept, so a slow minute
of the machine does not land on one variant only.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from facepipe.losses import build_head
from facepipe.losses.uncertainty import mc_embeddings, predictive_uncertainty, sum_margin_weights
from facepipe.models import IRSEBackbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--embedding", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    size = (args.size, args.size)
    model = IRSEBackbone(args.depth, args.width, args.embedding, 0.5, size)
    softmax = build_head("softmax", args.classes, args.embedding)
    umm = build_head("lsoftmax", args.classes, args.embedding, m=3, weight=softmax.weight)
    umm.set_margins(torch.randint(1, 4, (args.classes,)))
    optimizer = torch.optim.SGD(list(model.parameters()) + [softmax.weight], lr=0.01, momentum=0.9)
    images = torch.randn(args.batch, 3, *size)
    labels = torch.randint(0, args.classes, (args.batch,))

    def step(variant: str) -> None:
        model.train()
        feature_maps = model.features(images)
        embeddings = model.output_stage(feature_maps)
        if variant == "softmax":
            logits = softmax(embeddings, labels)
        else:
            weight = None
            if variant == "umm+sum":
                weight = sum_margin_weights(model.output_stage, feature_maps, umm.weight, labels, args.passes,
                                            normalise=False)
            logits = umm(embeddings, labels, margin_weight=weight)
        F.cross_entropy(logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def refresh() -> None:
        model.eval()
        samples = mc_embeddings(model.output_stage, model.features(images), args.passes)
        probabilities = F.softmax(umm.inference_logits(samples.reshape(-1, args.embedding)).view(
            args.passes, args.batch, -1), dim=2)
        predictive_uncertainty(probabilities)

    variants = {"softmax": lambda: step("softmax"), "umm": lambda: step("umm"),
                "umm+sum": lambda: step("umm+sum"), "refresh (per batch)": refresh}
    for run in variants.values():  # warm-up
        run()
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["softmax"])
    print(f"IR-SE-{args.depth} width {args.width} at {args.size}x{args.size}, batch {args.batch}, "
          f"{args.classes} classes, N = {args.passes}, torch threads {torch.get_num_threads()}, "
          f"{args.rounds} interleaved rounds (median)\n")
    print("| variant | seconds per batch | ratio to softmax step |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / base:.3f} |")


if __name__ == "__main__":
    main()
