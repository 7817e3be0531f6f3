#!/usr/bin/env python
"""Forward+backward throughput (images/s) of the IR-SE backbone with each classification head.

Not a test: timings depend on the machine. Example (the foundation issue's table):

    .venv/bin/python bench/train_throughput.py --depth 50 --size 112 --batch 64 --steps 3
    .venv/bin/python bench/train_throughput.py --depth 18 --width 0.5 --size 64 --batch 64 --steps 10

Measures full optimisation steps (forward, loss, backward, SGD update) on random images, after
warm-up steps, with the synthetic labels of a 1,000-identity problem.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from facepipe.losses import build_head
from facepipe.models import IRSEBackbone
from facepipe.runtime.device import autocast, resolve_amp_dtype, resolve_device

HEADS = {
    "softmax": {},
    "cosface": {"s": 64.0, "m": 0.35},
    "arcface": {"s": 64.0, "m": 0.5},
    "lsoftmax": {"m": 4},
    "sphereface": {"m": 4},
}


def measure(args, head_name: str, device: torch.device, amp_dtype) -> float:
    torch.manual_seed(0)
    size = (args.size, args.size_w or args.size)
    model = IRSEBackbone(args.depth, args.width, args.embedding, 0.0, size).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    head = build_head(head_name, args.classes, args.embedding, **HEADS[head_name]).to(device)
    optimizer = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
    images = torch.randn(args.batch, 3, *size, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)

    def step():
        with autocast(device, amp_dtype):
            embeddings = model(images)
        loss = F.cross_entropy(head(embeddings.float(), labels), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        head.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.batch * args.steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--size", type=int, default=112, help="input height (and width unless --size-w)")
    parser.add_argument("--size-w", type=int, default=None)
    parser.add_argument("--embedding", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--heads", default=",".join(HEADS), help="comma-separated subset of " + ",".join(HEADS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    device = resolve_device(args.device)
    amp_dtype = resolve_amp_dtype(args.amp, device)
    print(f"IR-SE-{args.depth} width {args.width} at {args.size}x{args.size_w or args.size}, batch {args.batch}, "
          f"{args.classes} classes, device {device}, amp {amp_dtype or 'off'}, torch threads {torch.get_num_threads()}")
    print("| head | images/s (forward+backward+update) |\n|---|---|")
    results = {}
    for name in args.heads.split(","):
        results[name] = measure(args, name.strip(), device, amp_dtype)
        print(f"| {name} | {results[name]:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "images_per_s": results}, handle, indent=2)


if __name__ == "__main__":
    main()
