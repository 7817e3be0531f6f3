#!/usr/bin/env python
"""The loss study on real long-tailed faces: every method on the LFW development protocol, end
to end from the raw deep-funneled images, resumable method by method.

    .venv/bin/python bench/lfw_study.py --study runs/lfw_study --megaface

Steps (each one skipped when its output exists, so the command can be stopped and started again
at any time, across working sessions):

1. align ``--lfw-raw`` into ``--aligned`` (112x112, ArcFace template) with
   :func:`facepipe.align.align_images`; skipped when the manifest there covers every image;
2. split: the training people are those NOT in ``pairsDevTest.txt`` with ``--min-images`` images
   or more; for every training person with 3+ images the last image (sorted; more with
   ``--holdout-fraction``) is held out as a closed-set probe and not trained on. Both sets are
   symlink trees under ``<study>/data/`` (``train/`` and ``probes/``);
3. one softmax pre-training (``configs/lfw_study.yaml``, ``--pretrain-epochs``) shared by every
   method (``--pretrain-per-seed``: one per seed);
4. per method and seed (the method table ``configs/studies/lfw_first.yaml``): fine-tuning from the pre-training
   (``train.init_from``) for the method table's epochs; an interrupted run resumes from its
   ``latest.pt``; then LFW DevTest verification (:func:`facepipe.eval.evaluate_lfw`, threshold
   from ``pairsDevTrain.txt``, images ``--aligned``) into ``study_result.json`` (a finished run is
   never re-run), and the closed-set view (``closed_set.json``): identification of the held-out
   probes among the training identities by 1-NN over the training embeddings, by the
   k-nearest-cluster rule of Huang et al. (a :class:`facepipe.index.ClusterIndex` of the training
   embeddings, l = ``--knc-cluster-size``, N = 1 and the index default) and by the head's argmax
   (ARConvL: its nearest centre; a CLMLE stage without classification term has no trained
   classifier and gets none);
5. with ``--megaface``: the MegaFace-style mini protocol on LFW (the function behind ``facepipe
   eval megaface --lfw-images``) for the first seed of every method, right after its run (the
   checkpoints need not outlive the session); the table names softmax and the two best others;
6. ``--results`` (default ``bench/reports/lfw_study``, kept in git): ``table.md`` / ``table.json``
   (mean +- std over seeds, the number of seeds per row, single-seed rows marked; every run's
   metrics), ``roc.png`` (every method's DevTest ROC), ``uncertainty_umm.png`` (from a UMM run),
   ``closed_set.md`` / ``.json``, ``megaface.md`` / ``.json`` and ``runs/<method>/seed<k>/``, a
   copy of each finished run's small files (results, training log, config, pair scores; not its
   checkpoints); rewritten after every finished run (``--table-only``: only that). Smoke tests
   should pass another ``--results``.

Several invocations may share one study folder, e.g. two one-thread processes side by side on a
2-core CPU (``OMP_NUM_THREADS=1 ... --methods A B`` and ``... --methods C D``): each run is claimed
with an advisory lock under ``<study>/locks/`` (released when its process ends, even on a crash),
a run claimed by another process is skipped, and the shared pre-training is waited for.

Across fresh checkouts: a run whose files are in ``--results`` (kept in git) counts as finished
and its small files are copied back into the study folder; the shared pre-training's weights are
kept there too (``runs/pretrain/seed<k>/init.pt``, model and head only), so a new session goes on
fine-tuning from the very same initialisation instead of training a new one.

Everything is logged to ``<study>/study.log``. ``--set KEY=VALUE`` (repeatable) overrides the
config of every run, e.g. ``--set train.max_steps_per_epoch=2`` for a smoke test, or the GPU size
``--set model.depth=50 --set model.width=1.0 --set model.embedding_size=512 --set
"data.image_size=[112,112]"``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.config import Config, find_config, load_config
from facepipe.runtime.io import write_bytes_atomic, write_json_atomic, write_text_atomic
from facepipe.study.runner import claim_lock, config_differences as _config_differences, train_timed
from facepipe.study.spec import load_method_table

log = logging.getLogger("lfw_study")


# The methods: a method table in YAML (each a label, the seeds run, the fine-tuning stages and
# overrides, and for the rows whose runs did not run the method as its paper intends, why:
# bench/mechanisms.py measured each defect on this study's own data and init.pt, and the trainer
# now fixes it; the rows stay as the record of what was run, marked, and the second edition of
# the study replaces them). Every run starts from the shared softmax pre-training (train.init_from).
METHOD_TABLE = Path(__file__).resolve().parents[1] / "configs" / "studies" / "lfw_first.yaml"
TABLE = load_method_table(METHOD_TABLE)
METHODS = TABLE.methods
SUPERSEDED = {key: method.superseded for key, method in METHODS.items() if method.superseded}
PRETRAIN = "pretrain"
PRETRAIN_LABEL = "Pre-training only (softmax)"

STUDY_RESULT = "study_result.json"
CLOSED_SET = "closed_set.json"
ALIGN_TIME = "align_time.json"
TRAIN_DONE = "train_done.json"
MEGAFACE_DIR = "megaface"
SPLIT_KEYS = ("min_images", "holdout_fraction", "aligned", "dev_test")


# ============================================================================================
# Small helpers
# ============================================================================================
class StudyError(RuntimeError):
    pass


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _p_value(p: float) -> str:
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)


def _pm(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    mean, std = _mean_std(values)
    if mean is None:
        return "—"
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if std is not None else "")


class Study:
    """Paths and settings of one study folder."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(args.study)
        self.data = self.root / "data"
        self.train_dir = self.data / "train"
        self.probe_dir = self.data / "probes"
        self.results = Path(args.results)
        self.aligned = Path(args.aligned)
        self.dev_test = Path(args.dev_test)
        self.dev_train = Path(args.dev_train)

    def kept_dir(self, key: str, seed: int) -> Path:
        """Where ``--results`` keeps the small files of run ``key`` / ``seed``."""
        return self.results / "runs" / key / f"seed{seed}"

    def pretrain_dir(self, seed: int) -> Path:
        return self.root / PRETRAIN / f"seed{seed}"

    def pretrain_seed(self, seed: int) -> int:
        return seed if self.args.pretrain_per_seed else 0

    def run_dir(self, method: str, seed: int) -> Path:
        return self.root / "runs" / method / f"seed{seed}"

    def claim(self, name: str, wait: bool = False):
        """The advisory lock of run ``name`` (:func:`facepipe.study.runner.claim_lock`): yields
        False when another process holds it, unless ``wait``."""
        return claim_lock(self.root / "locks" / f"{name}.lock", wait)

    def config(self, seed: int, output_dir: Path, overrides: list[str], init_from: Path | None) -> Config:
        return load_config(find_config(self.args.config), [
            f"seed={seed}", f"output_dir={output_dir}", f"data.root={self.train_dir}",
            *([f"train.init_from={init_from}"] if init_from is not None else []),
            *overrides, *self.args.overrides])

    def pretrain_config(self, seed: int) -> Config:
        extra = [f"train.stages.0.epochs={self.args.pretrain_epochs}"] if self.args.pretrain_epochs else []
        return self.config(seed, self.pretrain_dir(seed), extra, None)

    def method_config(self, method: str, seed: int) -> Config:
        init = self.pretrain_dir(self.pretrain_seed(seed)) / "latest.pt"
        return self.config(seed, self.run_dir(method, seed), TABLE.method_overrides(method), init)


# ============================================================================================
# 1. Alignment
# ============================================================================================
def align_once(study: Study) -> None:
    from facepipe.align.job import list_inputs
    from facepipe.align.manifest import read_manifest

    raw, aligned = Path(study.args.lfw_raw), study.aligned
    manifest = aligned / "manifest.jsonl"
    if not raw.is_dir():
        if manifest.is_file():
            log.warning("align: raw images %s not found; using the existing alignment in %s as it is", raw, aligned)
            return
        raise StudyError(f"neither the raw LFW images ({raw}) nor an alignment ({manifest}) exist")
    started = time.perf_counter()
    _, relative = list_inputs(raw)
    covered = {row["path"] for row in read_manifest(manifest)}
    todo = [path for path in relative if path not in covered]
    if not todo:
        log.info("align: %s already covers all %d images of %s; skipped (%.1f s to check)", manifest,
                 len(relative), raw, time.perf_counter() - started)
        return
    from facepipe.align.job import align_images
    from facepipe.config import AlignConfig

    log.info("align: %d of %d images of %s are not in %s yet; aligning (112x112, ArcFace template)",
             len(todo), len(relative), raw, aligned)
    summary = align_images(raw, aligned, AlignConfig(image_size=(112, 112)), progress=False)
    seconds = time.perf_counter() - started
    log.info("align: %s (%.1f min)", summary.line(), seconds / 60)
    if len(todo) == len(relative):  # a whole alignment: its time goes into the study's compute total
        study.results.mkdir(parents=True, exist_ok=True)
        write_json_atomic(study.results / ALIGN_TIME, {"images": len(relative), "seconds": seconds,
                                                       "finished": time.strftime("%Y-%m-%d %H:%M:%S")})


# ============================================================================================
# 2. The training / probe split as symlink trees
# ============================================================================================
def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        if not (link.is_symlink() and Path(os.readlink(link)) == target):
            raise StudyError(f"{link} exists and is not a link to {target}; use an empty --study folder")
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)


def build_split(study: Study) -> dict:
    """Training images and held-out closed-set probes of the people not in pairsDevTest.txt."""
    from facepipe.align.manifest import USABLE_STATUSES, alignment_statuses
    from facepipe.data.dataset import IMAGE_EXTENSIONS
    from facepipe.data.lfw_pairs import parse_lfw_pairs

    args = study.args
    settings = {"min_images": args.min_images, "holdout_fraction": args.holdout_fraction,
                "aligned": str(study.aligned), "dev_test": str(study.dev_test)}
    split_file = study.data / "split.json"
    if split_file.is_file():
        split = _read_json(split_file)
        if split["settings"] == settings:
            log.info("split: %s exists (%d training people, %d training images, %d probes of %d people); kept",
                     split_file, split["counts"]["train_identities"], split["counts"]["train_images"],
                     split["counts"]["probe_images"], split["counts"]["probe_identities"])
            return split
        raise StudyError(f"{split_file} was made with {split['settings']}, not {settings}: use another --study")
    started = time.perf_counter()
    dev_people = set(parse_lfw_pairs(study.dev_test).persons())
    statuses = alignment_statuses(study.aligned)
    aligned = study.aligned.resolve()
    train: dict[str, list[str]] = {}
    probes: dict[str, list[str]] = {}
    excluded = too_few = unusable = 0
    for folder in sorted(p for p in aligned.iterdir() if p.is_dir()):
        if folder.name in dev_people:
            excluded += 1
            continue
        files = sorted(f.name for f in folder.iterdir()
                       if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                       and statuses.get(f"{folder.name}/{f.name}", "aligned") in USABLE_STATUSES)
        unusable += sum(1 for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS) \
            - len(files)
        if len(files) < args.min_images:
            too_few += 1
            continue
        held = 0
        if len(files) >= 3:
            held = min(len(files) - 2, max(1, math.floor(args.holdout_fraction * len(files))))
        train[folder.name] = files[:len(files) - held]
        if held:
            probes[folder.name] = files[len(files) - held:]
    if not train:
        raise StudyError(f"no training people left in {aligned} (min_images={args.min_images})")
    for person, files in train.items():
        for name in files:
            _link(aligned / person / name, study.train_dir / person / name)
    for person, files in probes.items():
        for name in files:
            _link(aligned / person / name, study.probe_dir / person / name)
    # How much of the threshold file (pairsDevTrain.txt) lies in the training images: its people
    # are disjoint from DevTest, not from training, so the DevTest threshold is chosen on
    # (partly) trained-on images.
    dev_train = parse_lfw_pairs(study.dev_train)
    a, b = dev_train.names()
    train_keys = {f"{p}/{n}" for p, names in train.items() for n in names}
    threshold_images = sorted(set(a) | set(b))
    counts = {
        "train_identities": len(train), "train_images": sum(len(v) for v in train.values()),
        "probe_identities": len(probes), "probe_images": sum(len(v) for v in probes.values()),
        "single_image_identities": sum(1 for v in train.values() if len(v) == 1),
        "excluded_dev_test_people": excluded, "people_with_too_few_images": too_few,
        "unusable_crops": unusable,
        "dev_train_images": len(threshold_images),
        "dev_train_images_in_training": sum(1 for k in threshold_images if k in train_keys),
    }
    split = {"settings": settings, "counts": counts,
             "train_counts": {p: len(v) for p, v in train.items()}, "probes": probes}
    write_json_atomic(split_file, split)
    log.info("split: %d training people, %d training images (%d people with one image), %d held-out probes of %d "
             "people; %d DevTest people excluded, %d with fewer than %d images; %d of %d DevTrain threshold "
             "images are training images (%.1f s)", counts["train_identities"], counts["train_images"],
             counts["single_image_identities"], counts["probe_images"], counts["probe_identities"], excluded,
             too_few, args.min_images, counts["dev_train_images_in_training"], counts["dev_train_images"],
             time.perf_counter() - started)
    return split


# ============================================================================================
# 3-4. Training, verification
# ============================================================================================
def train_run(config: Config, label: str) -> dict:
    """Train ``config`` into its output_dir unless done; resumes an interrupted run."""
    run_dir = Path(config.output_dir)
    done = run_dir / TRAIN_DONE
    if done.is_file():
        return _read_json(done)
    metrics, timing = train_timed(config, label)
    record = {**timing,
              "final_epoch": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}}
    write_json_atomic(done, record)
    log.info("%s: trained %d epochs in %s (loss %.4f, training accuracy %.3f)", label, config.train.total_epochs,
             _minutes(record["train_seconds"]), metrics.get("loss", float("nan")), metrics.get("accuracy", float("nan")))
    return record


def verify_devtest(study: Study, run_dir: Path, label: str) -> dict:
    """LFW DevTest verification (threshold from DevTrain) and 10-fold CV on DevTest from the same scores."""
    from facepipe.data.lfw_pairs import parse_lfw_pairs
    from facepipe.eval.lfw import evaluate_lfw
    from facepipe.eval.verification import evaluate_verification

    out = run_dir / "eval_devtest"
    started = time.perf_counter()
    result = evaluate_lfw(study.dev_test, out, images=study.aligned, checkpoint=run_dir / "latest.pt",
                          threshold_pairs=study.dev_train, progress=False)
    seconds = time.perf_counter() - started
    v = result["metrics"]["verification"]
    pairs = parse_lfw_pairs(study.dev_test)
    scores, _ = _pair_scores(out)
    cv = evaluate_verification(scores, pairs.is_same, n_folds=10, folds=pairs.contiguous_folds(10))
    devtest = {
        "accuracy": v["accuracy_mean"], "threshold": v["threshold"],
        "tar_at_far_1e-3": v["tar_at_far"]["1e-03"], "tar_at_far_1e-4": v["tar_at_far"]["1e-04"],
        "auc": v["auc"], "eer": v["eer"],
        "cv10_accuracy_mean": float(cv.accuracy_mean), "cv10_accuracy_std": float(cv.accuracy_std),
        "missing_pairs": result["metrics"]["counts"]["missing_pairs"],
        "report": str(out), "eval_seconds": seconds,
    }
    log.info("%s: DevTest acc %.2f %% (DevTrain threshold; 10-fold CV %.2f ± %.2f %%), TAR@FAR=1e-3 %.2f %%, "
             "AUC %.4f, EER %.2f %% (eval %s)", label, 100 * devtest["accuracy"], 100 * cv.accuracy_mean,
             100 * cv.accuracy_std, 100 * devtest["tar_at_far_1e-3"], devtest["auc"], 100 * devtest["eer"],
             _minutes(seconds))
    return devtest


def _pair_scores(eval_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The DevTest pair scores and is_same labels (bool) of a run, from its ``scores.csv``."""
    import csv

    with open(eval_dir / "scores.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return (np.array([float(row["score"]) for row in rows], dtype=np.float64),
            np.array([int(row["is_same"]) for row in rows], dtype=bool))


def _pair_correct(run: dict) -> np.ndarray:
    """Which DevTest pairs the run decides right at its own DevTrain threshold (the rule behind
    its DevTest accuracy; checked against the recorded accuracy)."""
    from facepipe.eval.verification import correct_at_threshold

    eval_dir = Path(run["devtest"]["report"])
    correct = correct_at_threshold(*_pair_scores(eval_dir), run["devtest"]["threshold"])
    if abs(float(correct.mean()) - run["devtest"]["accuracy"]) > 1e-9:
        raise StudyError(f"{eval_dir}/scores.csv at threshold {run['devtest']['threshold']} gives accuracy "
                         f"{correct.mean():.4f}, not the recorded {run['devtest']['accuracy']:.4f}")
    return correct


def finish_run(study: Study, config: Config, method: str, seed: int, label: str, overrides: list[str]) -> dict:
    """Train (or resume) and verify one run; nothing when its study_result.json exists."""
    run_dir = Path(config.output_dir)
    result_file = run_dir / STUDY_RESULT
    if not result_file.is_file() and (study.kept_dir(method, seed) / STUDY_RESULT).is_file():
        restored = restore_run(study, method, seed, run_dir)
        log.info("%s: finished in an earlier session; %d files restored from %s", label, restored,
                 study.kept_dir(method, seed))
    if result_file.is_file():
        result = _read_json(result_file)
        changed = _config_differences(result["config"], config.to_dict())
        if changed:
            log.warning("%s: finished with another config (differs in %s); kept as it is (delete %s to redo it)",
                        label, changed, run_dir)
        else:
            log.info("%s: finished earlier (DevTest acc %.2f %%); skipped", label, 100 * result["devtest"]["accuracy"])
        return result
    started = time.perf_counter()
    training = train_run(config, label)
    devtest = verify_devtest(study, run_dir, label)
    result = {
        "method": method, "seed": seed, "label": label, "run_dir": str(run_dir),
        "overrides": overrides, "user_overrides": list(study.args.overrides),
        "epochs": config.train.total_epochs, "init_from": config.train.init_from,
        "train_seconds": training["train_seconds"], "train_invocations": training["invocations"],
        "final_epoch": training["final_epoch"], "devtest": devtest,
        "eval_seconds": devtest["eval_seconds"], "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": config.to_dict(),
    }
    write_json_atomic(result_file, result)
    log.info("%s: done (train %s + eval %s; this invocation %s)", label, _minutes(result["train_seconds"]),
             _minutes(result["eval_seconds"]), _minutes(time.perf_counter() - started))
    return result


# ============================================================================================
# 4b. Closed-set identification of the held-out probes
# ============================================================================================
def _embed_two_ways(model: Any, paths: list[str], config: Config, device: Any) -> tuple[np.ndarray, np.ndarray]:
    """(raw embeddings of the images alone, unnormalised: what the head sees; embeddings as
    ``facepipe embed`` makes them: flip fusion of the config, L2-normalised)."""
    import torch
    from torch.utils.data import DataLoader

    from facepipe.data.dataset import ImageListDataset
    from facepipe.data.transforms import build_eval_transform
    from facepipe.runtime.device import autocast, resolve_amp_dtype

    flip = config.embed.flip
    amp = resolve_amp_dtype(config.train.amp, device)
    loader = DataLoader(ImageListDataset(paths, build_eval_transform(config.data.image_size)),
                        batch_size=config.embed.batch_size, shuffle=False, num_workers=0)
    raw, fused = [], []
    model.eval()
    with torch.no_grad():
        for images, _ in loader:
            images = images.to(device)
            with autocast(device, amp):
                out = model(torch.cat([images, images.flip(-1)])).float()
            plain, mirrored = out.chunk(2)
            feats = {"sum": plain + mirrored, "concat": torch.cat([plain, mirrored], 1), "none": plain}[flip]
            raw.append(plain.cpu())
            fused.append(torch.nn.functional.normalize(feats, dim=1).cpu())
    return torch.cat(raw).numpy(), torch.cat(fused).numpy()


def _rule_metrics(y_true: list[str], y_pred: list[str], head_names: set[str]) -> dict:
    from facepipe.eval.imbalance import imbalance_metrics

    labels = sorted(set(y_true))
    with warnings.catch_warnings():  # predictions of gallery-only identities are expected: not a problem
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        metrics = imbalance_metrics(y_true, y_pred, labels=labels)
    recall = dict(zip(labels, metrics.recall.tolist()))
    head = [recall[c] for c in labels if c in head_names]
    tail = [recall[c] for c in labels if c not in head_names]
    return {"accuracy": metrics.accuracy, "balanced_accuracy": metrics.balanced_accuracy, "gmean": metrics.gmean,
            "macro_f1": metrics.macro_f1,
            "head_recall": float(np.mean(head)) if head else None, "tail_recall": float(np.mean(tail)) if tail else None,
            "head_classes": len(head), "tail_classes": len(tail), "probes": len(y_true)}


def closed_set_view(study: Study, split: dict, run_dir: Path, label: str) -> dict | None:
    """Identification of the held-out probes among the training identities by three rules."""
    import torch

    from facepipe.data.stats import head_class_mask
    from facepipe.index.jobs import build_index_from_embeddings
    from facepipe.losses.trained_head import NO_TRAINED_CLASSIFIER, load_trained_head
    from facepipe.models import build_backbone
    from facepipe.runtime.checkpoint import load_checkpoint, model_fingerprint
    from facepipe.runtime.device import resolve_device

    args = study.args
    out_file = run_dir / CLOSED_SET
    settings = {"max_identities": args.closed_set_max_identities, "knc_cluster_size": args.knc_cluster_size}
    if out_file.is_file():
        previous = _read_json(out_file)
        if previous.get("settings") == settings:
            return previous
    if not split["probes"]:
        log.warning("%s: no held-out probes (no training person has 3+ images): no closed-set view", label)
        return None
    if not (run_dir / "latest.pt").is_file():
        log.warning("%s: no checkpoint in %s (a run restored from --results without its closed-set "
                    "file): no closed-set view", label, run_dir)
        return None
    started = time.perf_counter()
    state = load_checkpoint(run_dir / "latest.pt")
    config = Config.model_validate(state["config"])
    identities = list(state["identities"])
    train_counts = np.array([split["train_counts"][p] for p in identities], dtype=np.int64)
    head_names = {p for p, is_head in zip(identities, head_class_mask(train_counts, config.data.head_share)) if is_head}
    chosen = list(range(len(identities)))
    if args.closed_set_max_identities and args.closed_set_max_identities < len(identities):
        chosen = sorted(set(np.linspace(0, len(identities) - 1, args.closed_set_max_identities).round().astype(int)))
    chosen_names = [identities[i] for i in chosen]
    gallery = [(p, str(study.train_dir / p / n)) for p in chosen_names
               for n in sorted(os.listdir(study.train_dir / p))]
    probes = [(p, str(study.probe_dir / p / n)) for p in chosen_names for n in split["probes"].get(p, [])]
    if not probes:
        log.warning("%s: no probe among the %d chosen identities: no closed-set view", label, len(chosen_names))
        return None
    device = resolve_device("auto")
    model = build_backbone(config.model, config.data.image_size)
    model.load_state_dict(state["model"])
    model.to(device)
    raw_g, fused_g = _embed_two_ways(model, [p for _, p in gallery], config, device)
    raw_q, fused_q = _embed_two_ways(model, [p for _, p in probes], config, device)
    embed_seconds = time.perf_counter() - started
    truth = [p for p, _ in probes]
    gallery_names = [p for p, _ in gallery]
    rules: dict[str, dict] = {}

    # Instance-wise nearest neighbour over the training embeddings (cosine).
    nearest = np.argmax(fused_q @ fused_g.T, axis=1)
    rules["1-NN"] = _rule_metrics(truth, [gallery_names[i] for i in nearest], head_names)

    # Huang et al.'s k-nearest-cluster rule over an index of the training embeddings' clusters.
    with tempfile.TemporaryDirectory(prefix="closed_set_index_") as folder:
        index = build_index_from_embeddings(Path(folder) / "index", fused_g, gallery_names,
                                            cluster_size=args.knc_cluster_size, seed=0,
                                            fingerprint=model_fingerprint(state["model"]))
        num_clusters = index.num_clusters
        for n in (1, index.num_neighbours):
            predicted = index.identity_names(index.knc(fused_q, n).predicted.tolist())
            name = f"k-NC N={min(n, num_clusters)}" + ("" if n == 1 else " (default)")
            rules[name] = _rule_metrics(truth, [p if p is not None else "<none>" for p in predicted], head_names)

    # The head's own prediction, over the chosen identities' classes.
    trained = load_trained_head(state, train_counts.tolist())
    head_rule = None if isinstance(trained, str) else trained.rule
    if head_rule is not None:
        scores = trained.scores(torch.from_numpy(raw_q))[:, torch.tensor(chosen)]
        predicted = [chosen_names[i] for i in scores.argmax(dim=1).tolist()]
        rules[head_rule] = _rule_metrics(truth, predicted, head_names)

    seconds = time.perf_counter() - started
    result = {"settings": settings, "identities": len(chosen_names), "gallery_images": len(gallery),
              "probe_images": len(probes), "clusters": num_clusters, "head_share": config.data.head_share,
              "head_identities": len(head_names & set(chosen_names)), "rules": rules,
              "head_rule": head_rule or NO_TRAINED_CLASSIFIER,
              "embed_seconds": embed_seconds, "seconds": seconds}
    write_json_atomic(out_file, result)
    log.info("%s: closed set (%d probes, %d identities, %d training images, %d clusters): %s (%s)", label,
             len(probes), len(chosen_names), len(gallery), num_clusters,
             ", ".join(f"{k} {100 * v['accuracy']:.1f} %" for k, v in rules.items()), _minutes(seconds))
    return result


# ============================================================================================
# 5. MegaFace-style mini protocol
# ============================================================================================
def megaface_run(study: Study, run_dir: Path, label: str) -> dict | None:
    from facepipe.eval.megaface import evaluate_megaface

    out = run_dir / MEGAFACE_DIR
    done = out / "study_megaface.json"
    if done.is_file():
        return _read_json(done)
    if not (run_dir / "latest.pt").is_file():
        log.warning("%s: no checkpoint in %s (a run restored from --results without its MegaFace "
                    "files): no MegaFace-style run", label, run_dir)
        return None
    started = time.perf_counter()
    result = evaluate_megaface(out, lfw_images=study.aligned, lfw_dev_pairs=study.dev_test,
                               checkpoint=run_dir / "latest.pt", progress=False)
    record = {"seconds": time.perf_counter() - started, "summary": result["summary"]}
    write_json_atomic(done, record)
    log.info("%s: MegaFace-style LFW mini protocol in %s: %s", label, _minutes(record["seconds"]), result["summary"])
    return record


def megaface_choice(rows: list[dict], top: int = 2) -> list[str]:
    """Softmax and the ``top`` best other methods by mean DevTest accuracy (finished runs only)."""
    ranked = sorted((r for r in rows if r["key"] not in ("softmax", PRETRAIN) and r["runs"]),
                    key=lambda r: -r["accuracy_mean"])
    return (["softmax"] if any(r["key"] == "softmax" and r["runs"] for r in rows) else []) + \
        [r["key"] for r in ranked[:top]]


# ============================================================================================
# 6. Results
# ============================================================================================
def _finished_runs(study: Study, key: str) -> list[dict]:
    folder = study.root / (PRETRAIN if key == PRETRAIN else f"runs/{key}")
    runs = []
    for path in sorted(folder.glob(f"seed*/{STUDY_RESULT}"), key=lambda p: int(p.parent.name[4:])):
        result = _read_json(path)
        closed = path.parent / CLOSED_SET
        result["closed_set"] = _read_json(closed) if closed.is_file() else None
        mega = path.parent / MEGAFACE_DIR / "metrics.json"
        result["megaface"] = _read_json(mega) if mega.is_file() else None
        mega_time = path.parent / MEGAFACE_DIR / "study_megaface.json"
        result["megaface_seconds"] = _read_json(mega_time)["seconds"] if mega_time.is_file() else None
        runs.append(result)
    return runs


def collect(study: Study) -> dict:
    from facepipe.eval.verification import mcnemar_exact

    keys = [PRETRAIN, *METHODS]
    runs = {key: _finished_runs(study, key) for key in keys}
    rows = []
    for key in keys:
        rs = runs[key]
        d = [r["devtest"] for r in rs]
        acc = [x["accuracy"] for x in d]
        mean, std = _mean_std(acc)
        rows.append({
            "key": key, "method": PRETRAIN_LABEL if key == PRETRAIN else METHODS[key].label
            + (" †" if key in SUPERSEDED else ""), "runs": len(rs),
            "seeds": [r["seed"] for r in rs], "single_seed": len(rs) == 1,
            "accuracy_mean": mean, "accuracy_std": std, "accuracies": acc,
            "cv10_accuracy": [x["cv10_accuracy_mean"] for x in d],
            "tar_at_far_1e-3": [x["tar_at_far_1e-3"] for x in d], "auc": [x["auc"] for x in d],
            "eer": [x["eer"] for x in d],
            "train_seconds": [r["train_seconds"] for r in rs], "eval_seconds": [r["eval_seconds"] for r in rs],
            "epochs": sorted({r["epochs"] for r in rs}),
        })
    softmax = next(r for r in rows if r["key"] == "softmax")
    # Paired tests on the same DevTest pairs against both baselines, continued softmax and the
    # pre-training every method starts from (the stronger of the two here); each seed against the
    # baseline run of the same seed where there is one (else its first), so two-seed rows show
    # whether a gap holds seed by seed.
    correct = {key: {r["seed"]: _pair_correct(r) for r in rs} for key, rs in runs.items()}
    for row in rows:
        for ref in ("softmax", PRETRAIN):
            by_seed, tests = correct[ref], []
            if by_seed and row["key"] != ref:
                for seed, own in correct[row["key"]].items():
                    ref_seed = seed if seed in by_seed else min(by_seed)
                    tests.append({"seed": seed, "reference_seed": ref_seed, **mcnemar_exact(own, by_seed[ref_seed])})
            row[f"mcnemar_vs_{ref}"] = tests or None
        row["delta_vs_softmax"] = (row["accuracy_mean"] - softmax["accuracy_mean"]
                                   if row["accuracy_mean"] is not None and softmax["accuracy_mean"] is not None
                                   and row["key"] != "softmax" else None)
    return {"rows": rows, "runs": runs}


def _table_md(study: Study, data: dict, split: dict | None) -> str:
    lines = [
        "# LFW development protocol: the loss study (bench/lfw_study.py)", "",
        f"Study folder `{study.root}`; config `{study.args.config}`; every number below comes from the runs whose "
        f"files are copied under `{study.results / 'runs'}` (`<method>/seed<k>/study_result.json`, "
        "`closed_set.json`, `eval_devtest/`, `megaface/`, the training log `metrics.jsonl` and `config.yaml`).", "",
    ]
    if split is not None:
        c = split["counts"]
        lines += [f"Training: {c['train_identities']} LFW people not in pairsDevTest.txt with "
                  f"{split['settings']['min_images']}+ images, {c['train_images']} images "
                  f"({c['single_image_identities']} people with one training image); held out: {c['probe_images']} "
                  f"closed-set probes of {c['probe_identities']} people. DevTest: 1,000 pairs of people disjoint from "
                  f"training. Threshold: the best on pairsDevTrain.txt, whose people are in training "
                  f"({c['dev_train_images_in_training']} of its {c['dev_train_images']} images are training images); "
                  "10-fold CV on DevTest needs no threshold file. TAR@FAR=1e-3 is interpolated on the ROC "
                  "(500 mismatched pairs: the lowest measured FAR is 2e-3).", ""]
    lines += ["| method | seeds | single seed | DevTest acc % (DevTrain thr.) | vs softmax (pp) | McNemar p vs softmax "
              "(pairs only it / only softmax gets right) | McNemar p vs pre-training (only it / only pre-training) "
              "| DevTest 10-fold CV acc % | TAR@FAR=1e-3 % | AUC | EER % | epochs | train / run | eval / run |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in data["rows"]:
        if not row["runs"]:
            lines.append(f"| {row['method']} | 0 | — | not run yet | | | | | | | | | | |")
            continue
        delta = "—" if row["delta_vs_softmax"] is None else f"{100 * row['delta_vs_softmax']:+.2f}"
        mcnemar = " | ".join(
            "—" if not (tests := row[f"mcnemar_vs_{ref}"]) else "; ".join(
                (f"s{t['seed']}: " if len(tests) > 1 else "") + f"{_p_value(t['p_value'])} ({t['a_only']} / {t['b_only']})"
                for t in tests) for ref in ("softmax", PRETRAIN))
        lines.append(
            f"| {row['method']} | {row['runs']} ({', '.join(map(str, row['seeds']))}) | "
            f"{'yes' if row['single_seed'] else 'no'} | {_pm(row['accuracies'])} | {delta} | {mcnemar} | "
            f"{_pm(row['cv10_accuracy'])} | {_pm(row['tar_at_far_1e-3'])} | {_pm(row['auc'], 1.0, 4)} | "
            f"{_pm(row['eer'])} | {'/'.join(map(str, row['epochs']))} | {_minutes(float(np.mean(row['train_seconds'])))} | "
            f"{_minutes(float(np.mean(row['eval_seconds'])))} |")
    lines += ["", "mean ± std (sample std) over the seeds of a row; seeds vary the fine-tuning (data order, dropout, "
              "new head parameters)" + ("; each seed has its own pre-training" if study.args.pretrain_per_seed else
                                        "; all start from the one pre-training (seed 0)") + ". McNemar: exact "
              "two-sided test (facepipe.eval.verification.mcnemar_exact) of each seed of the row (s<k>) against the "
              "softmax run of the same seed (or softmax seed 0) and against the pre-training, on the same 1,000 "
              "DevTest pairs, each at its own DevTrain threshold; p < 0.05 is the usual bar for a real difference. "
              "It tests the pairs, not the training: seed-to-seed spread comes on top, which is what the rows with "
              "two seeds show.", "",
              "† Superseded: these runs did not run the method as its paper intends (measured with "
              "`bench/mechanisms.py`, fixed in the trainer since; the second edition of the study replaces them):", "",
              *[f"- {METHODS[key].label}: {why}." for key, why in SUPERSEDED.items()], ""]
    return "\n".join(lines)


def _closed_md(data: dict) -> tuple[str, list[dict]]:
    lines = ["# Closed-set identification of held-out images of training people", "",
             "Probes: the held-out last image (--holdout-fraction: images) of every training person with 3+ "
             "images, never trained on; gallery: the training images of the training people (the column "
             "'identities'; all of them unless --closed-set-max-identities). Head identities: the largest that hold "
             "half of the training images (facepipe.data.stats); recall = per-identity recall averaged within head / "
             "tail. With one probe per identity, balanced accuracy equals accuracy.", "",
             "| method | rule | seeds | accuracy % | balanced accuracy % | tail recall % | head recall % | probes | "
             "identities (head) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = []
    for row in data["rows"]:
        closed = [r["closed_set"] for r in data["runs"][row["key"]] if r.get("closed_set")]
        if not closed:
            continue
        rule_names = list(dict.fromkeys(name for c in closed for name in c["rules"]))
        for rule in rule_names:
            values = [c["rules"][rule] for c in closed if rule in c["rules"]]
            entry = {"method": row["method"], "key": row["key"], "rule": rule, "seeds": len(values),
                     **{k: [v[k] for v in values if v[k] is not None]
                        for k in ("accuracy", "balanced_accuracy", "tail_recall", "head_recall")},
                     "probes": closed[0]["probe_images"], "identities": closed[0]["identities"],
                     "head_identities": closed[0]["head_identities"]}
            rows.append(entry)
            lines.append(f"| {row['method']} | {rule} | {len(values)} | {_pm(entry['accuracy'])} | "
                         f"{_pm(entry['balanced_accuracy'])} | {_pm(entry['tail_recall'])} | "
                         f"{_pm(entry['head_recall'])} | {entry['probes']} | {entry['identities']} "
                         f"({entry['head_identities']}) |")
        missing = [c["head_rule"] for c in closed if c["head_rule"].startswith("none")]
        if missing:
            lines.append(f"| {row['method']} | head argmax | — | {missing[0]} | | | | | |")
    return "\n".join(lines) + "\n", rows


def _megaface_md(data: dict, chosen: list[str]) -> tuple[str, list[dict]]:
    lines = ["# MegaFace-style mini protocol on LFW (facepipe eval megaface --lfw-images)", "",
             "Run on the first seed of every method, right after its training; softmax and the best "
             f"other methods by DevTest accuracy: {', '.join(chosen) or '—'}.", ""]
    rows = []
    for row in data["rows"]:
        for run in data["runs"][row["key"]]:
            m = run.get("megaface")
            if not m:
                continue
            ident = m["identification"]
            entry = {"method": row["method"], "key": row["key"], "seed": run["seed"],
                     "rank1": ident["rank1"], "tar_at_far_1e-6": ident["tar_at_far"].get("1e-06"),
                     "probe_images": ident["num_probe_images"], "distractors": ident["num_distractors"],
                     "seconds": run.get("megaface_seconds")}
            rows.append(entry)
    if rows:
        levels = list(rows[0]["rank1"])
        lines.append("| method | seed | " + " | ".join(f"rank-1 % @ {lv}" for lv in levels)
                     + " | TAR % @ FAR 1e-6 | wall |")
        lines.append("| --- | --- | " + " | ".join("---" for _ in levels) + " | --- | --- |")
        for e in rows:
            tar = "—" if e["tar_at_far_1e-6"] is None else f"{100 * e['tar_at_far_1e-6']:.2f}"
            lines.append(f"| {e['method']} | {e['seed']} | "
                         + " | ".join(f"{100 * e['rank1'].get(lv, float('nan')):.2f}" for lv in levels)
                         + f" | {tar} | {_minutes(e['seconds'])} |")
        lines += ["", f"{rows[0]['probe_images']} probe images of the DevTest people with 2+ images; "
                  f"{rows[0]['distractors']} distractors (every other LFW person, training people included)."]
    else:
        lines.append("No MegaFace-style run yet (--megaface).")
    return "\n".join(lines) + "\n", rows


# What of a run folder the results folder keeps (small files only: checkpoints and TensorBoard
# events stay in the study folder), so the tracked results hold every number their tables show.
RUN_FILES = (STUDY_RESULT, CLOSED_SET, "metrics.jsonl", "config.yaml", "class_stats.json", "uncertainty.png",
             "eval_devtest/metrics.json", "eval_devtest/scores.csv", f"{MEGAFACE_DIR}/metrics.json",
             f"{MEGAFACE_DIR}/study_megaface.json")


def mirror_runs(study: Study, data: dict) -> int:
    """Copy every finished run's small files to ``<results>/runs/<method>/seed<k>/``; returns the count."""
    copied = 0
    for key, runs in data["runs"].items():
        for run in runs:
            source_dir = Path(run["run_dir"])
            target_dir = study.kept_dir(key, run["seed"])
            for name in RUN_FILES:
                source, target = source_dir / name, target_dir / name
                if source.is_file() and (not target.is_file() or target.stat().st_mtime < source.stat().st_mtime):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    write_bytes_atomic(target, source.read_bytes(), durable=False)
                    copied += 1
    return copied


PRETRAIN_WEIGHTS = "init.pt"


def keep_pretrain_weights(study: Study, seed: int) -> None:
    """Model and head of the finished shared pre-training, into ``--results`` (about 14 MB at the
    CPU size): what ``train.init_from`` reads, without the optimizer state a resume would need."""
    from facepipe.runtime.checkpoint import load_checkpoint, save_checkpoint

    target = study.kept_dir(PRETRAIN, seed) / PRETRAIN_WEIGHTS
    source = study.pretrain_dir(seed) / "latest.pt"
    if target.is_file() or not source.is_file():
        return
    state = load_checkpoint(source)
    keep = ("model", "head", "head_stage", "config", "identities", "epoch", "step")
    target.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(target, {key: state[key] for key in keep})


def restore_run(study: Study, key: str, seed: int, run_dir: Path) -> int:
    """Copy a finished run's kept files (and the pre-training's weights, as its ``latest.pt``)
    back into the study folder; returns the count."""
    kept = study.kept_dir(key, seed)
    pairs = [(kept / name, run_dir / name) for name in RUN_FILES]
    if key == PRETRAIN:
        pairs.append((kept / PRETRAIN_WEIGHTS, run_dir / "latest.pt"))
    restored = 0
    for source, target in pairs:
        if source.is_file() and not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(target, source.read_bytes(), durable=False)
            restored += 1
    return restored


def restore_all(study: Study) -> int:
    """Every run kept in ``--results`` back into the study folder (a fresh checkout)."""
    restored = 0
    for result_file in sorted((study.results / "runs").glob(f"*/seed*/{STUDY_RESULT}")):
        key, seed = result_file.parent.parent.name, int(result_file.parent.name[4:])
        run_dir = study.pretrain_dir(seed) if key == PRETRAIN else study.run_dir(key, seed)
        restored += restore_run(study, key, seed, run_dir)
    return restored


def compute_md(study: Study, data: dict) -> str:
    """The study's wall time on this machine, summed from the times every kept run recorded:
    training (all invocations), DevTest evaluation, closed-set view and MegaFace-style run."""
    align = study.results / ALIGN_TIME
    align_seconds = _read_json(align)["seconds"] if align.is_file() else None
    lines = ["# Compute: the whole study, summed from the recorded times of the kept runs", "",
             "| part | runs | training | evaluation + closed set + MegaFace | total |", "| --- | --- | --- | --- | --- |"]
    total = align_seconds or 0.0
    if align_seconds is not None:
        lines.append(f"| alignment of LFW (13,233 images) | 1 | | | {_minutes(align_seconds)} |")
    for row in data["rows"]:
        rs = data["runs"][row["key"]]
        if not rs:
            continue
        train = sum(r["train_seconds"] for r in rs)
        other = sum(r["eval_seconds"] + ((r.get("closed_set") or {}).get("seconds") or 0.0)
                    + (r.get("megaface_seconds") or 0.0) for r in rs)
        total += train + other
        lines.append(f"| {row['method']} | {len(rs)} | {_minutes(train)} | {_minutes(other)} | {_minutes(train + other)} |")
    lines += [f"| **whole study** | | | | **{total / 3600:.2f} h** |", "",
              "One process, two threads, the 2-core CPU of this machine"
              + ("" if align_seconds is not None else "; the alignment's time is not recorded yet") + ".", ""]
    return "\n".join(lines)


def write_results(study: Study, split: dict | None) -> dict:
    from facepipe.eval.plots import plot_roc
    from facepipe.eval.verification import roc_metrics

    data = collect(study)
    results = study.results
    results.mkdir(parents=True, exist_ok=True)
    mirror_runs(study, data)
    if split is not None:
        write_json_atomic(results / "split.json", split)
    table = _table_md(study, data, split)
    closed_md, closed_rows = _closed_md(data)
    chosen = megaface_choice(data["rows"], study.args.megaface_top)
    mega_md, mega_rows = _megaface_md(data, chosen)

    curves = {}
    for row in data["rows"]:
        if not row["runs"]:
            continue
        first = data["runs"][row["key"]][0]
        eval_dir = Path(first["devtest"]["report"])
        if (eval_dir / "scores.csv").is_file():
            roc = roc_metrics(*_pair_scores(eval_dir))
            curves[f"{row['key']} s{first['seed']} (AUC {roc['auc']:.3f})"] = (roc["fpr"], roc["tpr"])
    if curves:
        plot_roc(curves, results / "roc.png", title="LFW DevTest (1,000 pairs), first seed of each method",
                 min_far=1e-3)
    uncertainty_note = "no UMM run yet"
    for key in ("umm", "umm_sum"):
        found = [Path(r["run_dir"]) / "uncertainty.png" for r in data["runs"][key]
                 if (Path(r["run_dir"]) / "uncertainty.png").is_file()]
        if found:
            shutil.copyfile(found[0], results / "uncertainty_umm.png")
            uncertainty_note = f"`uncertainty_umm.png`: class uncertainty against class size, from {found[0]}"
            break
    files = ["`roc.png`: DevTest ROC of every method (first seed)", uncertainty_note,
             "`closed_set.md` / `closed_set.json`", "`megaface.md` / `megaface.json`",
             "`table.json`: these rows and every run's full metrics", f"`{study.root / 'study.log'}`: the log"]
    full = table + "\n" + closed_md + "\n" + mega_md + "\n" + compute_md(study, data) + "\nFiles: " + "; ".join(files) + ".\n"
    write_text_atomic(results / "table.md", full)
    write_json_atomic(results / "table.json", {"rows": data["rows"], "closed_set": closed_rows, "megaface": mega_rows,
                                               "megaface_choice": chosen, "split": split and split["counts"],
                                               "runs": data["runs"]})
    write_text_atomic(results / "closed_set.md", closed_md)
    write_json_atomic(results / "closed_set.json", closed_rows)
    write_text_atomic(results / "megaface.md", mega_md)
    write_json_atomic(results / "megaface.json", mega_rows)
    return {"data": data, "markdown": full, "megaface_choice": chosen}


README_BEGIN, README_END = "<!-- lfw_study tables: begin -->", "<!-- /lfw_study tables -->"


def sync_readme(path: Path, markdown: str) -> None:
    """Put the results tables between the README's two markers, headings demoted to level 4, so
    the README shows exactly what the results folder holds."""
    text = path.read_text()
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1 or text.index(README_BEGIN) > text.index(README_END):
        raise StudyError(f"--readme {path}: needs one line {README_BEGIN} and, below it, one line {README_END}")
    body = "\n".join("#### " + line[2:] if line.startswith("# ") else line for line in markdown.splitlines())
    head, rest = text.split(README_BEGIN)
    write_text_atomic(path, head + README_BEGIN + "\n" + body.strip() + "\n" + README_END + rest.split(README_END, 1)[1])


# ============================================================================================
# Driver
# ============================================================================================
def parse_seeds(args: argparse.Namespace) -> dict[str, list[int]]:
    seeds = {m: list(METHODS[m].seeds) for m in METHODS}
    plain: list[int] = []
    for item in args.seeds or []:
        if ":" in item:
            method, _, values = item.partition(":")
            if method not in METHODS:
                raise StudyError(f"--seeds {item}: unknown method {method}; choose from {list(METHODS)}")
            seeds[method] = [int(v) for v in values.split(",") if v.strip()]
        else:
            plain.append(int(item))
    if plain:
        seeds = {m: plain for m in METHODS}
    for item in args.extra_seeds or []:
        method, sep, value = item.partition(":")
        if not sep or method not in METHODS:
            raise StudyError(f"--extra-seeds {item}: expected METHOD:SEED with METHOD in {list(METHODS)}")
        if int(value) not in seeds[method]:
            seeds[method].append(int(value))
    return seeds


def check_study_settings(study: Study) -> None:
    args = study.args
    settings = {"min_images": args.min_images, "holdout_fraction": args.holdout_fraction,
                "aligned": str(study.aligned), "dev_test": str(study.dev_test), "config": args.config,
                "pretrain_per_seed": args.pretrain_per_seed}
    path = study.root / "study.json"
    if path.is_file():
        previous = _read_json(path)
        changed = [k for k in settings if previous.get(k) != settings[k]]
        if changed:
            raise StudyError(f"{study.root} was set up with {', '.join(f'{k}={previous.get(k)}' for k in changed)}; "
                             f"this command asks for {', '.join(f'{k}={settings[k]}' for k in changed)}: use "
                             "another --study")
    else:
        write_json_atomic(path, {**settings, "created": time.strftime("%Y-%m-%d %H:%M:%S")})


def setup_logging(study_root: Path) -> None:
    study_root.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(study_root / "study.log", encoding="utf-8")):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="runs/lfw_study", help="study folder (default runs/lfw_study)")
    parser.add_argument("--config", default="lfw_study", help="config name or path (default lfw_study)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--pretrain-epochs", type=int, default=None,
                        help="softmax pre-training epochs (default: the config's, 8)")
    parser.add_argument("--seeds", nargs="+", default=None, metavar="[METHOD:]S[,S]",
                        help="seeds: plain numbers for every method, or METHOD:S,S for one (default: each method's "
                             "seeds in the method table)")
    parser.add_argument("--extra-seeds", nargs="+", default=None, metavar="METHOD:SEED",
                        help="add a seed to a method (e.g. the best other method: arcface:1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (repeatable)")
    parser.add_argument("--min-images", type=int, default=2,
                        help="training people need this many images (2: 1,262 people; 1 adds single-image people)")
    parser.add_argument("--holdout-fraction", type=float, default=0.0,
                        help="hold out floor(F x images) (at least 1, keeping 2) of each 3+-image person as probes "
                             "(default 0: exactly the last image)")
    parser.add_argument("--pretrain-per-seed", action="store_true", help="one pre-training per seed, not one shared")
    parser.add_argument("--readme", default=None, metavar="PATH",
                        help="also write the tables into PATH (e.g. README.md) between its lfw_study markers")
    parser.add_argument("--megaface", action="store_true",
                        help="MegaFace-style LFW mini protocol on the first seed of every method")
    parser.add_argument("--megaface-top", type=int, default=2,
                        help="how many of the best other methods the MegaFace table names beside softmax (default 2)")
    parser.add_argument("--closed-set-max-identities", type=int, default=None,
                        help="closed-set view over this many training identities only (smoke tests; default all)")
    parser.add_argument("--no-closed-set", action="store_true", help="skip the closed-set view")
    parser.add_argument("--knc-cluster-size", type=int, default=5, help="l of the closed-set cluster index (default 5)")
    parser.add_argument("--results", default="bench/reports/lfw_study",
                        help="results folder: tables, plots and a copy of every run's small files "
                             "(default bench/reports/lfw_study, kept in git)")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the results folder")
    parser.add_argument("--pretrain-only", action="store_true",
                        help="align, split and pre-train, then stop (e.g. with every core before several "
                             "one-thread fine-tuning processes)")
    parser.add_argument("--show-methods", action="store_true", help="print every method's overrides and exit")
    parser.add_argument("--lfw-raw", default="../shared/data/lfw/lfw-deepfunneled")
    parser.add_argument("--aligned", default="runs/lfw112", help="aligned 112x112 crops (made here when missing)")
    parser.add_argument("--dev-test", default="../shared/data/lfw/pairsDevTest.txt")
    parser.add_argument("--dev-train", default="../shared/data/lfw/pairsDevTrain.txt")
    args = parser.parse_args(argv)

    if args.show_methods:
        study = Study(args)
        print(f"{METHOD_TABLE.name}: fine-tuning epochs {TABLE.epochs}; every run also gets seed=, output_dir=, data.root=, "
              "train.init_from=<pretraining>/latest.pt, then --set overrides")
        for key, method in METHODS.items():
            overrides = TABLE.method_overrides(key)
            study.method_config(key, 0)  # validates
            print(f"{key:12s} {method.label}\n             " + "\n             ".join(overrides))
        return 0

    study = Study(args)
    setup_logging(study.root)
    log.info("command: %s", " ".join([sys.executable, *sys.argv]))
    split_file = study.data / "split.json"
    if args.table_only:
        restored = restore_all(study)
        if restored:
            log.info("table-only: %d files of finished runs restored from %s", restored, study.results)
        kept_split = study.results / "split.json"
        split_source = split_file if split_file.is_file() else kept_split
        result = write_results(study, _read_json(split_source) if split_source.is_file() else None)
        if args.readme:
            sync_readme(Path(args.readme), result["markdown"])
        print(result["markdown"])
        return 0

    started = time.perf_counter()
    seeds = parse_seeds(args)
    check_study_settings(study)
    align_once(study)
    split = build_split(study)
    # Validate every config before anything trains.
    for method in args.methods:
        for seed in seeds[method]:
            study.method_config(method, seed)

    pretrained: set[int] = set()

    def pretrain(seed: int) -> None:
        if seed in pretrained:
            return
        pretrained.add(seed)
        config = study.pretrain_config(seed)
        # every run starts from it: wait while another process of the study trains it
        with study.claim(f"{PRETRAIN}-seed{seed}", wait=True):
            finish_run(study, config, PRETRAIN, seed, f"pretrain seed {seed}", [])
            keep_pretrain_weights(study, seed)
            if not args.no_closed_set:
                closed_set_view(study, split, study.pretrain_dir(seed), f"pretrain seed {seed}")

    order = [(seed, method) for seed in sorted({s for m in args.methods for s in seeds[m]})
             for method in args.methods if seed in seeds[method]]
    if args.pretrain_only:
        for seed in sorted({study.pretrain_seed(s) for s, _ in order} or {0}):
            pretrain(seed)
        write_results(study, split)
        log.info("pretrain-only: done in %s", _minutes(time.perf_counter() - started))
        return 0
    log.info("study %s: %d runs (%s), %d fine-tuning epochs each", study.root, len(order),
             ", ".join(f"{m} s{s}" for s, m in order), TABLE.epochs)
    for number, (seed, method) in enumerate(order, 1):
        pretrain(study.pretrain_seed(seed))
        label = f"[{number}/{len(order)}] {method} seed {seed}"
        config = study.method_config(method, seed)
        with study.claim(f"{method}-seed{seed}") as mine:
            if not mine:
                log.info("%s: being trained by another process of this study; skipped here", label)
                continue
            finish_run(study, config, method, seed, label, TABLE.method_overrides(method))
            if not args.no_closed_set:
                closed_set_view(study, split, study.run_dir(method, seed), label)
            if args.megaface and seed == seeds[method][0]:
                megaface_run(study, study.run_dir(method, seed), label)
        write_results(study, split)
        log.info("%s: results rewritten (%s since the start of this command)", label,
                 _minutes(time.perf_counter() - started))
    if not order:
        pretrain(0)
    result = write_results(study, split)
    if args.readme:
        sync_readme(Path(args.readme), result["markdown"])
        log.info("tables written into %s", args.readme)
    log.info("study: this command took %s", _minutes(time.perf_counter() - started))
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StudyError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
