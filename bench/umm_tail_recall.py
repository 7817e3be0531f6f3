#!/usr/bin/env python
"""Tail-class recall of the Khan et al. losses on a synthetic long-tailed set (not a test).

    .venv/bin/python bench/umm_tail_recall.py --out runs/bench_umm_tail

100 synthetic identities with power-law image counts (100 for the largest, 2 for the smallest:
imbalance ratio 50) for training, plus 10 further images of every identity as a balanced test set
(rendered from the same identities, never trained on). Every method trains the same schedule on
the same data from the same seed: a shared softmax warm-up, then its own stage(s):

- softmax: softmax throughout;
- lsoftmax m=3: L-Softmax with a fixed margin 3 for every class;
- UMM: L-Softmax with margins from MC-dropout class uncertainty (max 3);
- UMM + SUM: UMM, with SUM in the last epochs.

Reported: closed-set accuracy on the test images (argmax of the margin-free logits), mean recall
of the rarest half of the identities (tail) and of the largest half (head), balanced accuracy and
G-mean, through ``facepipe.eval.imbalance_metrics``. Runs are resumable (each method's run folder
keeps its checkpoint; a finished method is not retrained).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from facepipe.config import config_from_dict
from facepipe.data.synth import generate_dataset, identity_counts
from facepipe.eval.imbalance import imbalance_metrics
from facepipe.losses.trained_head import load_trained_head
from facepipe.models.loaded import load_model
from facepipe.runtime.checkpoint import load_checkpoint
from facepipe.train.trainer import Trainer
from facepipe.data.dataset import ImageListDataset
from facepipe.data.transforms import build_eval_transform

LSOFTMAX = {"type": "lsoftmax", "m": 3, "lambda_base": 10.0, "lambda_min": 1.0}


def method_stages(method: str, warmup: int, epochs: int, sum_epochs: int) -> list[dict]:
    start = [{"name": "softmax warm-up", "epochs": warmup, "head": {"type": "softmax"}}]
    if method == "softmax":
        return start + [{"name": "softmax", "epochs": epochs, "head": {"type": "softmax"}}]
    if method == "lsoftmax m=3":
        return start + [{"name": "L-Softmax", "epochs": epochs, "head": LSOFTMAX}]
    umm = {**LSOFTMAX, "margin_source": "uncertainty"}
    if method == "UMM":
        return start + [{"name": "UMM", "epochs": epochs, "head": umm}]
    return start + [{"name": "UMM", "epochs": epochs - sum_epochs, "head": umm},
                    {"name": "UMM + SUM", "epochs": sum_epochs, "head": umm, "sample_uncertainty": True}]


def split_data(out: Path, identities: int, max_images: int, min_images: int, test_images: int, size: int):
    """Render max count + test images for every identity; link the first count_i of identity i
    into the training tree and keep the last ``test_images`` as the test set."""
    counts = identity_counts(identities, "power", max_images, min_images, 1.0)
    full = generate_dataset(out / "full", identities, seed=7, images_per_identity=int(counts.max()) + test_images,
                            size=(size, size), progress=True)
    train_root, test = out / "train", []
    for label, (name, count) in enumerate(zip(full["identities"], counts)):
        files = sorted((Path(full["root"]) / name).glob("*.png"), key=lambda p: int(p.stem))
        (train_root / name).mkdir(parents=True, exist_ok=True)
        for file in files[:count]:
            link = train_root / name / file.name
            if not link.exists():
                os.symlink(file, link)
        test += [(str(file), label) for file in files[-test_images:]]
    return train_root, test, np.asarray(counts)


@torch.no_grad()
def predict(checkpoint: Path, test: list[tuple[str, int]]) -> np.ndarray:
    loaded = load_model(checkpoint)
    trained = load_trained_head(load_checkpoint(checkpoint))
    transform = build_eval_transform(loaded.config.data.image_size)
    images = torch.stack([ImageListDataset([p], transform)[0][0] for p, _ in test])
    return trained.scores(loaded.model.eval()(images)).argmax(1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_umm_tail"))
    parser.add_argument("--identities", type=int, default=100)
    parser.add_argument("--max-images", type=int, default=100)
    parser.add_argument("--min-images", type=int, default=2)
    parser.add_argument("--test-images", type=int, default=10)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=9, help="epochs of each method after the warm-up")
    parser.add_argument("--sum-epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train_root, test, counts = split_data(args.out, args.identities, args.max_images, args.min_images,
                                          args.test_images, args.size)
    truth = np.array([label for _, label in test])
    order = np.argsort(counts, kind="stable")
    tail, head = order[: len(order) // 2], order[len(order) // 2:]
    rows = []
    for method in ("softmax", "lsoftmax m=3", "UMM", "UMM + SUM"):
        run = args.out / method.replace(" ", "_").replace("=", "").replace("+", "plus")
        config = config_from_dict({
            "seed": args.seed, "output_dir": str(run),
            "data": {"root": str(train_root), "image_size": [args.size, args.size], "batch_size": 32,
                     "num_workers": 0, "augment": {"hflip": 0.5}},
            "model": {"depth": 18, "width": 0.25, "embedding_size": 64, "dropout": 0.5},
            "optim": {"lr": 0.05}, "scheduler": {"name": "cosine", "warmup_epochs": 1},
            "train": {"stages": method_stages(method, args.warmup, args.epochs, args.sum_epochs),
                      "uncertainty": {"passes": 10, "max_per_class": 200}, "log_every_steps": 50},
        })
        trainer = Trainer(config, resume=(run / "latest.pt").is_file(), progress=False)
        trainer.fit()
        predicted = predict(run / "latest.pt", test)
        metrics = imbalance_metrics(truth, predicted, labels=list(range(len(counts))))
        rows.append({"method": method, "accuracy": metrics.accuracy, "tail_recall": float(metrics.recall[tail].mean()),
                     "head_recall": float(metrics.recall[head].mean()), "balanced_accuracy": metrics.balanced_accuracy,
                     "gmean": metrics.gmean})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{len(counts)} identities, {int(counts.sum())} training images ({counts.min()}..{counts.max()} per "
          f"identity), {len(test)} test images; {args.warmup} softmax epochs + {args.epochs} per method\n")
    print("| method | accuracy % | tail recall % (rarest half) | head recall % | balanced accuracy % | G-mean |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {100 * row['accuracy']:.2f} | {100 * row['tail_recall']:.2f} | "
              f"{100 * row['head_recall']:.2f} | {100 * row['balanced_accuracy']:.2f} | {row['gmean']:.4f} |")


if __name__ == "__main__":
    main()
