#!/usr/bin/env python
"""What one GPU needs for IR-SE-50 training, from quantities measured here on the CPU (not a test).

    .venv/bin/python bench/gpu_estimate.py --depth 50 --size 112 --batch 128

Measured (exactly, on a small batch and scaled linearly to ``--batch``): the FLOPs of one
training step (forward + backward, torch.utils.flop_counter), the bytes of activations saved for
backward (saved-tensor hooks) in float32 and under bfloat16 autocast, and the parameter count.
Derived: memory per GPU = activations + weights, gradients and SGD momentum (3 x parameters in
float32; allocator workspace and the classifier of the head are not counted), and throughput
= peak dense TFLOP/s x an assumed model-FLOPs utilisation (``--mfu``, default 0.35) / FLOPs per
image. The peak figures are the vendors' dense numbers; the utilisation is an assumption, so the
images/s are estimates, not measurements.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from facepipe.config import ModelConfig
from facepipe.models import build_backbone
from facepipe.runtime.io import write_json_atomic

# Vendor peak dense TFLOP/s: (float32 on tensor cores as TF32, bf16/fp16).
GPUS = {"A100 80GB": (156.0, 312.0), "H100 SXM": (494.0, 989.0)}


def saved_bytes(model: torch.nn.Module, images: torch.Tensor, bf16: bool) -> int:
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(images)
    out.float().sum().backward()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=128, help="per-GPU batch the estimate is for")
    parser.add_argument("--probe-batch", type=int, default=4, help="batch actually run here (scaled up)")
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed model-FLOPs utilisation")
    args = parser.parse_args()
    model = build_backbone(ModelConfig(depth=args.depth), (args.size, args.size)).train()
    images = torch.randn(args.probe_batch, 3, args.size, args.size)
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    flops_per_image = counter.get_total_flops() / args.probe_batch
    scale = args.batch / args.probe_batch
    params = sum(p.numel() for p in model.parameters())
    state_bytes = 3 * 4 * params
    result = {"config": vars(args), "params": params, "train_gflops_per_image": flops_per_image / 1e9, "gpus": {}}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        model.zero_grad(set_to_none=True)
        result[f"activation_gib_{name}"] = saved_bytes(model, images, bf16) * scale / 2**30
    print(f"IR-SE-{args.depth}, {args.size}x{args.size}, per-GPU batch {args.batch}: {params / 1e6:.1f} M parameters, "
          f"{flops_per_image / 1e9:.1f} GFLOP per image per training step (measured)\n")
    print("| GPU | precision | activations GiB (measured) | memory GiB (est.) | images/s at "
          f"{args.mfu:.0%} MFU (est.) |")
    print("|---|---|---|---|---|")
    for gpu, (tf32, bf16) in GPUS.items():
        for name, peak in (("fp32/TF32", tf32), ("bf16 AMP", bf16)):
            key = "bf16" if "bf16" in name else "fp32"
            memory = result[f"activation_gib_{key}"] + state_bytes / 2**30
            speed = peak * 1e12 * args.mfu / flops_per_image
            result["gpus"][f"{gpu} {name}"] = {"memory_gib": memory, "images_per_s": speed}
            print(f"| {gpu} | {name} | {result[f'activation_gib_{key}']:.1f} | {memory:.1f} | {speed:,.0f} |")
    write_json_atomic(Path("bench/results/gpu_estimate.json"), result)
    print(json.dumps({k: v for k, v in result.items() if k != "gpus"}))


if __name__ == "__main__":
    main()
