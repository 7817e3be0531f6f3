"""A training run's folder and checkpoints: what a run writes, whether a new run may start in a
folder, whether a checkpoint still fits the config to resume, weights from another run, and the
error a run stops with."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from facepipe.errors import FacepipeUserError
from facepipe.runtime.checkpoint import BEST, LATEST, load_checkpoint
from facepipe.runtime.distributed import DistributedContext, broadcast_object
from facepipe.runtime.io import write_json_atomic, write_text_atomic, writing_output
from facepipe.train.plugins.registry import plugin_run_files
from facepipe.train.run_log import NullRunLog, RunLog

log = logging.getLogger(__name__)

# What a run writes into its folder (results.json: facepipe classify). A new run removes them
# first, so that its log and files never mix with an earlier run's; other files are left alone.
RUN_FILES = (LATEST, BEST, "metrics.jsonl", "tensorboard", "config.yaml", "class_stats.json", *plugin_run_files(),
             "results.json")


class TrainingError(RuntimeError, FacepipeUserError):
    """Training cannot continue (diverged, inconsistent resume)."""


# Settings that fix the shapes of a run's saved tensors; a resumed run must keep them (the saved
# config and the current one are compared key by key, so the message can name the key).
RESUME_FIXED_SETTINGS = ("data.image_size", "model")
RESUME_ADVICE = ("restore the setting to resume this run, or start a new one (--overwrite, or another "
                 "output_dir)")


def changed_settings(saved: dict[str, Any], current: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """``key: saved -> current`` for every setting under ``keys`` (dotted; a section stands for
    all its keys) that differs between two config dicts (:meth:`Config.to_dict`)."""

    def flat(value: Any, prefix: str) -> dict[str, Any]:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}.{key}").items()}
        return {prefix: list(value) if isinstance(value, tuple) else value}

    def lookup(config: Any, key: str) -> Any:
        for part in key.split("."):
            config = config.get(part) if isinstance(config, dict) else None
        return config

    changes = []
    for key in keys:
        before, after = flat(lookup(saved, key), key), flat(lookup(current, key), key)
        for name in sorted(set(before) | set(after)):
            if before.get(name) != after.get(name):
                changes.append(f"{name}: {before.get(name)} in the checkpoint, {after.get(name)} now")
    return changes


def check_resumable(state: dict[str, Any], path: str | Path, dataset: Any, data_root: str | None,
                    current: dict[str, Any]) -> None:
    """Refuse a checkpoint trained on other identities than ``dataset``'s, or under other
    shape-fixing settings (:data:`RESUME_FIXED_SETTINGS`; ``current``: this run's config dict)."""
    if list(state["identities"]) != list(dataset.identities):
        raise TrainingError(
            f"cannot resume from {path}: it was trained on {len(state['identities'])} identities, "
            f"the dataset at {data_root} has {dataset.num_classes} (or a different list)"
        )
    changed = changed_settings(state["config"], current, RESUME_FIXED_SETTINGS)
    if changed:
        raise TrainingError(f"cannot resume from {path}: the checkpoint no longer fits the config "
                            f"({'; '.join(changed)}); {RESUME_ADVICE}")


def unfit_checkpoint(path: str | Path, exc: BaseException, limit: int = 300) -> TrainingError:
    """The error for a checkpoint whose tensors or parameter groups no longer fit (``exc``, from
    loading them, on one line: torch's load_state_dict lists every mismatch on its own)."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[:limit] + " ..."
    return TrainingError(f"cannot resume from {path}: the checkpoint no longer fits the config ({text}); "
                         f"{RESUME_ADVICE}")


def check_run_folder(run_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run where one already left a checkpoint, unless the caller said
    what to do with it: ``resume`` (continue it) or ``overwrite`` (delete it, start afresh)."""
    if resume and overwrite:
        raise TrainingError("resume and overwrite contradict each other: give one of them")
    found = [name for name in (LATEST, BEST) if (Path(run_dir) / name).exists()]
    if found and not (resume or overwrite):
        raise TrainingError(f"{run_dir} already holds a training run ({', '.join(found)}): give --resume to "
                            "continue it, or --overwrite to delete it and start afresh")


def check_run_folder_on_every_rank(dist: DistributedContext, run_dir: str | Path, resume: bool,
                                   overwrite: bool) -> None:
    """:func:`check_run_folder` by rank 0 (it alone writes the folder), its verdict raised on
    every rank, so that no rank waits in a collective for one that gave up."""
    problem = None
    if dist.is_main:
        try:
            check_run_folder(run_dir, resume, overwrite)
        except TrainingError as exc:
            problem = str(exc)
    problem = broadcast_object(dist, problem)
    if problem:
        raise TrainingError(problem)


def remove_run_files(run_dir: Path) -> None:
    """Delete what an earlier run left in the run folder (its checkpoints, log, TensorBoard
    events, and temporaries of interrupted atomic writes)."""
    removed = []
    for name in RUN_FILES:
        for path in [run_dir / name, *run_dir.glob(f".{name}.*.tmp")]:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            else:
                continue
            removed.append(path.name)
    if removed:
        log.info("%s: removed the files of the earlier run (%s)", run_dir, ", ".join(removed))


def open_run_folder(run_dir: Path, config: Any, class_stats: dict[str, Any], dist: DistributedContext,
                    clear: bool) -> RunLog | NullRunLog:
    """Rank 0 prepares the run folder (``clear``: an earlier run's files removed first), writes the
    config and the class statistics, and opens the run's log; the other ranks log nothing."""
    if not dist.is_main:
        return NullRunLog()
    with writing_output(run_dir):
        if clear:
            remove_run_files(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", config.to_yaml())
        write_json_atomic(run_dir / "class_stats.json", class_stats)
        return RunLog(run_dir)


def initialise_from(path: str | Path, model: nn.Module, head: nn.Module, identities: Sequence[str],
                    device: torch.device) -> None:
    """Weights of another run: the backbone (same architecture required) and, when it was
    trained on the same identities, the shared classifier weight. A checkpoint without a
    classifier (``facepipe import-weights``, a kept study backbone) gives the backbone only."""
    state = load_checkpoint(path, map_location=device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        mismatch = " ".join(str(exc).split())  # one line, as the CLI prints user errors
        raise TrainingError(f"train.init_from={path}: its backbone does not fit this config's model "
                            f"({mismatch[:300]}{' ...' if len(mismatch) > 300 else ''}); model.arch, depth, width, "
                            "embedding_size and data.image_size must be the checkpoint's") from None
    head_weight = (state.get("head") or {}).get("weight")
    with_classifier = list(state["identities"]) == list(identities) and head_weight is not None \
        and hasattr(head, "weight") and head_weight.shape == head.weight.shape
    if with_classifier:
        with torch.no_grad():
            head.weight.copy_(head_weight)
    log.info("initialised from %s (backbone%s)", path, ", classifier" if with_classifier else "")
