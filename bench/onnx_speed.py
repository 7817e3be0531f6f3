#!/usr/bin/env python
"""Embedding throughput on this CPU: PyTorch eager, PyTorch as facepipe runs it, and ONNX
Runtime, side by side in one run, at batch 1 and batch 64.

    .venv/bin/python bench/onnx_speed.py            # writes bench/reports/onnx_speed/{table.md,results.json}

Models: the LFW study's model (``models/lfw-irse18-64.pt``: IR-SE-18, width 0.5, 64x64, the
first study's pre-training) and IR-SE-50 at 112x112 (width 1.0, 512-d; random weights: speed does
not depend on them). Backends, each on the same preprocessed float batches (image decoding left
out, flip fusion off):

- **PyTorch eager**: ``model(x)`` under ``torch.no_grad()``;
- **PyTorch, facepipe**: ``LoadedModel.embed`` (eval mode, the config's precision and memory
  format, normalisation), i.e. what ``facepipe embed`` and ``search`` run;
- **ONNX Runtime**: ``facepipe export`` of the same checkpoint, run by ``OnnxModel.embed``.

Each cell: images per second over at least ``--seconds`` of timed batches after ``--warmup``
untimed ones, and the per-image latency (batch time / batch size). Threads: torch and ONNX
Runtime both use every core (``--threads`` to change).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from facepipe.config import Config, DataConfig, ModelConfig
from facepipe.models import build_backbone
from facepipe.models.export import export_onnx
from facepipe.models.loaded import load_model
from facepipe.runtime.checkpoint import save_checkpoint
from facepipe.runtime.io import write_json_atomic, write_text_atomic

REPO = Path(__file__).resolve().parents[1]


def irse50_checkpoint(folder: Path) -> Path:
    config = Config(model=ModelConfig(arch="irse", depth=50, width=1.0, embedding_size=512),
                    data=DataConfig(image_size=(112, 112)))
    torch.manual_seed(0)
    model = build_backbone(config.model, config.data.image_size)
    path = folder / "irse50-112.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": config.to_dict(), "identities": [], "epoch": 0,
                           "step": 0})
    return path


def timed(run, batch: torch.Tensor, warmup: int, seconds: float) -> tuple[float, float]:
    """(images per second, seconds per image) of ``run(batch)``."""
    for _ in range(warmup):
        run(batch)
    count, started = 0, time.perf_counter()
    while True:
        run(batch)
        count += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and count >= 3:
            break
    per_image = elapsed / (count * len(batch))
    return 1.0 / per_image, per_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench" / "reports" / "onnx_speed"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnx_speed_") as tmp:
        folder = Path(tmp)
        models = {"LFW study model (IR-SE-18 x0.5, 64x64)": REPO / "models" / "lfw-irse18-64.pt",
                  "IR-SE-50, 112x112": irse50_checkpoint(folder)}
        for label, checkpoint in models.items():
            onnx_path = folder / f"{checkpoint.stem}.onnx"
            export_onnx(checkpoint, onnx_path)
            torch_model = load_model(checkpoint)
            onnx_model = load_model(onnx_path)
            network = torch_model.model.eval()

            def eager(x: torch.Tensor) -> None:
                with torch.no_grad():
                    network(x)

            backends = {"PyTorch eager": eager,
                        "PyTorch, facepipe (LoadedModel.embed)": lambda x: torch_model.embed(
                            x, flip="none", batch_size=len(x)),
                        "ONNX Runtime (OnnxModel.embed)": lambda x: onnx_model.embed(x, flip="none",
                                                                                     batch_size=len(x))}
            for batch_size in args.batches:
                batch = torch.rand(batch_size, 3, *torch_model.input_size,
                                   generator=torch.Generator().manual_seed(batch_size)) * 2 - 1
                for backend, run in backends.items():
                    rate, per_image = timed(run, batch, args.warmup, args.seconds)
                    rows.append({"model": label, "batch": batch_size, "backend": backend, "images_per_s": rate,
                                 "ms_per_image": 1000 * per_image})
                    print(f"{label:42s} batch {batch_size:3d}  {backend:40s} {rate:8.1f} img/s  "
                          f"{1000 * per_image:8.2f} ms/img", flush=True)
    lines = [f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
             f"({args.threads} threads), onnxruntime {__import__('onnxruntime').__version__}; "
             f"`.venv/bin/python bench/onnx_speed.py`", "",
             "| model | batch | backend | images/s | ms per image | vs PyTorch, facepipe |", "|---|---|---|---|---|---|"]
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["batch"] == row["batch"]
                    and r["backend"].startswith("PyTorch, facepipe"))
        lines.append(f"| {row['model']} | {row['batch']} | {row['backend']} | {row['images_per_s']:.1f} | "
                     f"{row['ms_per_image']:.2f} | {row['images_per_s'] / base['images_per_s']:.2f}x |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "table.md", "\n".join(lines) + "\n")
    write_json_atomic(out / "results.json", {"rows": rows, "threads": args.threads, "cpu_count": os.cpu_count(),
                                             "seconds": args.seconds})
    print("\n".join(lines))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
