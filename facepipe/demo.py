"""``facepipe demo``: the whole pipeline on synthetic faces, from nothing to a report.

1. Render a long-tailed synthetic training set and a set of held-out identities (never trained on).
2. Train the configured model (resuming if an earlier demo run was interrupted).
3. Embed the held-out images with the trained model and with the same network at random
   initialisation, score verification pairs, and run the 10-fold protocol on both.
4. Write a report folder: metrics.json, report.md, roc.png, training_curves.png, checkpoint.pt.

The random-initialisation row is the control: the synthetic identities are built so that it stays
near chance, so any gain is learned.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from facepipe.config import Config, DemoConfig, find_config, load_config
from facepipe.data.dataset import IdentityFolderDataset
from facepipe.data.synth import generate_dataset
from facepipe.eval.plots import plot_roc, plot_training_curves
from facepipe.eval.verification import (
    VerificationResult,
    cosine_scores,
    evaluate_verification,
    make_pairs,
    write_pairs_csv,
)
from facepipe.models import build_backbone
from facepipe.models.loaded import extract_embeddings
from facepipe.runtime.checkpoint import LATEST, copy_checkpoint, load_checkpoint
from facepipe.runtime.device import resolve_device
from facepipe.runtime.io import write_json_atomic, write_text_atomic
from facepipe.runtime.seed import seed_everything
from facepipe.train.run_log import read_run_log
from facepipe.train.trainer import Trainer

log = logging.getLogger(__name__)

# Held-out identities get global indices far from the training ones, so the two never overlap.
HELDOUT_FIRST_IDENTITY = 1_000_000


def _prepare_data(spec: DemoConfig, seed: int, data_dir: Path, progress: bool) -> dict[str, Any]:
    train = generate_dataset(
        data_dir / "train", num_identities=spec.identities, seed=seed, distribution=spec.distribution,
        max_images=spec.max_images, min_images=spec.min_images, gamma=spec.gamma,
        size=tuple(spec.render_size), progress=progress,
    )
    heldout = generate_dataset(
        data_dir / "heldout", num_identities=spec.heldout_identities, seed=seed,
        size=tuple(spec.render_size), first_identity=HELDOUT_FIRST_IDENTITY,
        images_per_identity=spec.heldout_images, progress=progress,
    )
    return {"train": train, "heldout": heldout}


def _verify(model: torch.nn.Module, config: Config, paths: list[str], pairs: tuple, device) -> VerificationResult:
    embeddings = extract_embeddings(model, paths, config.data.image_size, device,
                                    batch_size=config.embed.batch_size, flip=config.embed.flip)
    idx_a, idx_b, is_same = pairs
    return evaluate_verification(cosine_scores(embeddings, idx_a, idx_b), is_same)


def _report_markdown(metrics: dict[str, Any]) -> str:
    trained, random_init = metrics["verification"]["trained"], metrics["verification"]["random_init"]
    data = metrics["data"]

    def row(name: str, r: dict[str, Any]) -> str:
        tar = r["tar_at_far"].get("1e-03", float("nan"))
        return (f"| {name} | {100 * r['accuracy_mean']:.2f} +- {100 * r['accuracy_std']:.2f} | {r['auc']:.4f} "
                f"| {100 * r['eer']:.2f} | {100 * tar:.2f} |")

    return "\n".join([
        "# facepipe demo report",
        "",
        f"Synthetic long-tailed training set: {data['train_summary']}.",
        f"Held-out test identities: {data['heldout_identities']} x {data['heldout_images']} images, "
        f"{metrics['verification']['num_pairs']} pairs (half matched), 10-fold protocol "
        "(each fold's threshold chosen on the other nine).",
        "",
        "| model | accuracy % (mean +- std) | AUC | EER % | TAR@FAR=1e-3 % (interpolated) |",
        "|---|---|---|---|---|",
        row("random initialisation (control)", random_init),
        row("trained", trained),
        "",
        f"Training: {metrics['training']['epochs']} epochs, {metrics['training']['steps']} steps, "
        f"{metrics['training']['seconds']:.0f} s on {metrics['device']}; final loss "
        f"{metrics['training']['final_loss']:.3f}.",
        "",
        "![ROC](roc.png)",
        "",
        "![training curves](training_curves.png)",
        "",
    ])


def run_demo(out: str | Path = "runs/demo", config: str = "demo", overrides: Sequence[str] = (),
             progress: bool = True) -> dict[str, Any]:
    """Python API of ``facepipe demo``; returns the metrics written to ``out/report/metrics.json``."""
    started = time.perf_counter()
    out = Path(out)
    base = load_config(find_config(config), overrides)
    spec = base.demo or DemoConfig()
    run_dir, report_dir = out / "run", out / "report"
    cfg = base.model_copy(update={
        "output_dir": str(run_dir),
        "data": base.data.model_copy(update={"root": str(out / "data" / "train")}),
    })

    t0 = time.perf_counter()
    data = _prepare_data(spec, cfg.seed, out / "data", progress)
    data_seconds = time.perf_counter() - t0

    heldout = IdentityFolderDataset(data["heldout"]["root"])
    pairs = make_pairs(heldout.labels, spec.pairs, seed=cfg.seed)
    root = Path(data["heldout"]["root"])
    rel = [str(Path(s.path).relative_to(root)) for s in heldout.samples]
    write_pairs_csv(out / "data" / "heldout_pairs.csv", [rel[i] for i in pairs[0]], [rel[i] for i in pairs[1]],
                    pairs[2])
    paths = [s.path for s in heldout.samples]

    # Train, or continue an interrupted demo run.
    t0 = time.perf_counter()
    latest = run_dir / LATEST
    resume = latest.is_file()
    trainer = Trainer(cfg, resume=resume, progress=progress)
    if trainer.epoch < cfg.train.total_epochs or trainer.step_in_epoch:
        trainer.fit()
    train_seconds = time.perf_counter() - t0
    device = resolve_device(cfg.train.device)

    # The control: the same architecture, freshly initialised with the run's seed.
    seed_everything(cfg.seed)
    random_model = build_backbone(cfg.model, cfg.data.image_size).to(device)
    random_result = _verify(random_model, cfg, paths, pairs, device)
    trained_result = _verify(trainer.model, cfg, paths, pairs, device)

    report_dir.mkdir(parents=True, exist_ok=True)
    plot_roc({f"trained (AUC {trained_result.auc:.3f})": (trained_result.fpr, trained_result.tpr),
              f"random init (AUC {random_result.auc:.3f})": (random_result.fpr, random_result.tpr)},
             report_dir / "roc.png", title="Verification on held-out synthetic identities")
    records = [r for r in read_run_log(run_dir / "metrics.jsonl") if r.get("event") == "train"]
    plot_training_curves(records, report_dir / "training_curves.png", keys=("loss", "accuracy", "lr"))
    copy_checkpoint(run_dir / LATEST, report_dir / "checkpoint.pt")

    state = load_checkpoint(run_dir / LATEST)
    epochs = [r for r in read_run_log(run_dir / "metrics.jsonl") if r.get("event") == "epoch"]
    metrics = {
        "device": str(device),
        "data": {
            "train_root": data["train"]["root"], "heldout_root": data["heldout"]["root"],
            "train_identities": len(data["train"]["identities"]), "train_images": data["train"]["num_images"],
            "train_summary": trainer.stats.summary(), "train_class_stats": trainer.stats.to_dict(),
            "heldout_identities": spec.heldout_identities, "heldout_images": spec.heldout_images,
        },
        "model": cfg.model.model_dump(), "image_size": list(cfg.data.image_size),
        "schedule": [stage.model_dump() for stage in cfg.train.stages],
        "training": {
            "epochs": int(state["epoch"]), "steps": int(state["step"]), "seconds": train_seconds,
            "resumed": resume, "final_loss": epochs[-1]["loss"] if epochs else float("nan"),
            "final_train_accuracy": epochs[-1]["accuracy"] if epochs else float("nan"),
            "per_epoch": epochs,
        },
        "verification": {
            "num_pairs": int(len(pairs[2])), "protocol": "10-fold, threshold from the other 9 folds",
            "trained": trained_result.to_dict(), "random_init": random_result.to_dict(),
        },
        "checkpoint": str(report_dir / "checkpoint.pt"),
        "wall_seconds": {"data": data_seconds, "train": train_seconds, "total": time.perf_counter() - started},
    }
    write_json_atomic(report_dir / "metrics.json", metrics)
    write_text_atomic(report_dir / "report.md", _report_markdown(metrics))
    metrics["summary"] = "\n".join([
        f"facepipe demo: {trainer.stats.summary()}",
        f"  trained {metrics['training']['epochs']} epochs ({train_seconds:.0f} s on {device}), "
        f"final train loss {metrics['training']['final_loss']:.3f}",
        f"  held-out verification, {len(pairs[2])} pairs of {spec.heldout_identities} unseen identities:",
        f"    random init : {random_result.summary()}",
        f"    trained     : {trained_result.summary()}",
        f"  report: {report_dir} (metrics.json, report.md, roc.png, training_curves.png, checkpoint.pt)",
    ])
    return metrics
