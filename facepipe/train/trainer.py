"""The embedding trainer: one loop for every schedule of heads, on CPU or CUDA.

A run is a list of stages, each a number of epochs with one classification head and loss. Heads
share one classifier weight, so a stage switch keeps the learned class centres and their optimizer
state. What a method adds to the loop (its head, parameter groups, sampler, step loss, schedules,
state) comes from its plug-in (:mod:`facepipe.train.plugins`), which sees a narrow view of the run,
not the trainer. Checkpoints hold everything needed to continue exactly.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from facepipe.config import Config, head_kwargs
from facepipe.data.dataset import DatasetError
from facepipe.data.recordio import open_training_dataset
from facepipe.data.samplers import build_sampler
from facepipe.data.stats import class_statistics
from facepipe.data.transforms import build_train_transform
from facepipe.losses import build_head
from facepipe.models import build_backbone
from facepipe.models.loaded import embed_dataset
from facepipe.runtime.checkpoint import BEST, LATEST, copy_checkpoint, load_checkpoint, save_checkpoint
from facepipe.runtime.device import autocast, resolve_amp_dtype
from facepipe.runtime.distributed import RankSlicedSampler, all_true, barrier, gather_rows, init_distributed, rank_slice
from facepipe.runtime.seed import rng_state, seed_everything, set_rng_state
from facepipe.train.batchnorm import apply_stage_batchnorm
from facepipe.train.clipping import ClipGroups, clip_gradients, clipping_groups
from facepipe.train.lr_schedule import lr_factor
from facepipe.train.optimizer import add_param_groups, build_optimizer, param_groups
from facepipe.train.plugins.base import PluginContext, StepBatch, TrainerPlugin
from facepipe.train.plugins.registry import build_plugins, plugins_for
from facepipe.train.run_log import NullRunLog, RunLog
from facepipe.train.runs import (
    TrainingError,
    check_resumable,
    check_run_folder_on_every_rank,
    initialise_from,
    open_run_folder,
    unfit_checkpoint,
)
from facepipe.train.stage_loss import build_stage_loss
from facepipe.train.summary import run_summary
from facepipe.train.validation import (
    Validator,
    announce_selection,
    configured_validator,
    judge_epoch,
    restored_best,
    selection_id,
)

log = logging.getLogger(__name__)

# Consecutive non-finite losses tolerated (each step skipped) before the run is stopped.
MAX_CONSECUTIVE_NONFINITE = 20


class _TrainingStep(nn.Module):
    """Backbone and head as one module whose forward is a (micro-)batch loss (the unit that
    DistributedDataParallel wraps); the trainer is kept outside the module tree."""

    def __init__(self, trainer: "Trainer") -> None:
        super().__init__()
        self.model = trainer.model
        self.head = trainer.head
        self._trainer = (trainer,)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> dict[str, Any]:
        return self._trainer[0]._batch_loss(images, labels, indices)


class Trainer:
    """Trains ``config`` into ``config.output_dir``; ``resume=True`` continues from ``latest.pt``.

    A folder that already holds a checkpoint is refused unless ``resume`` or ``overwrite`` says
    what to do with it; ``overwrite`` deletes that run's files (:data:`facepipe.train.runs.RUN_FILES`)
    when :meth:`fit` starts.

    The training set is the identity folder ``data.root`` unless ``dataset`` is given (any dataset
    with ``labels``, ``identities`` and ``(image, label, index)`` items, e.g. the in-memory images
    of ``facepipe classify``); ``validator`` replaces the verification pairs of ``train.validation``.
    """

    def __init__(self, config: Config, resume: bool = False, progress: bool = True, dataset: Any = None,
                 validator: Validator | None = None, overwrite: bool = False) -> None:
        if dataset is None and config.data.root is None:
            raise DatasetError("data.root is not set: point it at identity folders or an insightface train.rec (data.root=DIR)")
        self.config = config
        self.run_dir = Path(config.output_dir)
        # Several processes under torchrun: one rank each; rank 0 alone writes files and logs.
        self.dist, self.device = init_distributed(config.train.device)
        check_run_folder_on_every_rank(self.dist, self.run_dir, resume, overwrite)
        # Files of an earlier run to remove when this one starts writing (see fit).
        self._clear_run_dir = not resume
        self.progress = progress and self.dist.is_main
        if not self.dist.is_main:
            logging.getLogger("facepipe").setLevel(logging.WARNING)
        self.amp_dtype = resolve_amp_dtype(config.train.amp, self.device)
        seed_everything(config.seed)

        self.dataset = dataset if dataset is not None else open_training_dataset(
            config.data.root, build_train_transform(config.data.image_size, config.data.augment)
        )
        self.stats = class_statistics(self.dataset.labels, self.dataset.num_classes, config.data.head_share)
        batch_size = config.data.batch_size  # the global batch of one optimisation step
        if len(self.dataset) < batch_size:
            raise DatasetError(
                f"the dataset has {len(self.dataset)} images, fewer than one batch (data.batch_size={batch_size})"
            )
        shares = self.dist.world_size * config.train.micro_batches
        if batch_size % shares:
            raise DatasetError(f"data.batch_size={batch_size} must be divisible by processes x train.micro_batches "
                               f"= {self.dist.world_size} x {config.train.micro_batches}")
        self.epoch_sampler = build_sampler(config.data.sampler, self.dataset.labels, config.seed)
        self.steps_per_epoch = len(self.epoch_sampler) // batch_size
        if config.train.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, config.train.max_steps_per_epoch)
        self.total_steps = self.steps_per_epoch * config.train.total_epochs
        self._plugin_sampler: Any = None  # a plug-in's batch sampler in use (None: the epoch sampler)
        self._use_epoch_sampler()

        self.model = build_backbone(config.model, config.data.image_size).to(self.device)
        setting = config.train.channels_last
        self.channels_last = setting is True or (setting == "auto" and self.device.type == "cuda")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.stage_index = 0
        self.class_counts = np.bincount(self.dataset.labels, minlength=self.dataset.num_classes).tolist()
        self.run_log: RunLog | NullRunLog = NullRunLog()  # fit() opens the run's log
        # Every registered plug-in, by name; those that shape the current stage, in hook order.
        self.plugins: dict[str, TrainerPlugin] = build_plugins(self._plugin_context())
        self._active = self._stage_plugins(0)
        self.head = self._build_head(weight=None)
        self.loss_fn = self._build_loss()
        self.optimizer = build_optimizer(
            self._param_groups(list(self.model.parameters()) + list(self.head.parameters())), config.optim)
        # One rule per parameter group: the main schedule, or a plug-in's own.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, [self._lr_rule(group, 0) for group in self.optimizer.param_groups]
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self._wrap_step_module()

        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.step_in_epoch = 0  # batches of the current epoch already trained (mid-epoch resume)
        # Model selection needs a validator: best.pt is the epoch of the highest validation metric
        # (best_epoch, None until one); without a validator there is no best.pt, only latest.pt.
        self.best_metric = -math.inf
        self.best_epoch: int | None = None
        self.nonfinite_steps = 0
        self.last_metrics: dict[str, Any] = {}
        self.step_stats: dict[str, float] = {}  # per-step diagnostics of a plug-in's step loss
        self.clip_stats: dict[str, float] = {}  # per clipping group: gradient norm and clip factor of the last step
        # Only rank 0 validates, so only rank 0 decodes the images of train.validation.sets.
        self.validator = validator if validator is not None else configured_validator(
            config.train.validation, config.data.image_size, decode=self.dist.is_main)
        if resume:
            self.resume(self.run_dir / LATEST)
        else:
            if config.train.init_from:
                initialise_from(config.train.init_from, self.model, self.head, self.dataset.identities, self.device)
            for plugin in self._active:
                plugin.on_stage_start(fresh=True)

    # ------------------------------------------------------------------ construction
    def _use_epoch_sampler(self) -> None:
        batch = self.config.data.batch_size
        sampler = RankSlicedSampler(self.epoch_sampler, batch, self.dist) if self.dist.enabled else self.epoch_sampler
        self._use_sampler(sampler, batch // self.dist.world_size, items_per_step=batch)

    def _use_sampler(self, sampler: Any, batch_size: int, items_per_step: int) -> None:
        """``batch_size``: this rank's share of a step; ``items_per_step``: what a step consumes
        in the sampler's own count (its ``set_epoch`` start, for mid-epoch resumes)."""
        self.sampler = sampler
        self.items_per_step = items_per_step
        self.images_per_step = batch_size * self.dist.world_size
        self.loader = DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.config.data.num_workers,
            drop_last=True,  # BatchNorm needs more than one sample; equal batches keep steps comparable
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.config.data.num_workers > 0,
            # Its own generator: otherwise each new epoch iterator draws a seed from the global
            # torch RNG and a mid-epoch resume would shift the dropout random stream.
            generator=torch.Generator().manual_seed(self.config.seed),
        )

    def _plugin_context(self) -> PluginContext:
        return PluginContext(
            config=self.config, device=self.device, amp_dtype=self.amp_dtype, dist=self.dist, dataset=self.dataset,
            class_counts=self.class_counts, steps_per_epoch=self.steps_per_epoch, run_dir=self.run_dir,
            model=self.model, embed_training_images=self.embed_training_images,
            head=lambda: self.head, loss_fn=lambda: self.loss_fn, stage_index=lambda: self.stage_index,
            epoch=lambda: self.epoch, global_step=lambda: self.global_step,
            step_in_epoch=lambda: self.step_in_epoch, run_log=lambda: self.run_log,
        )

    def _stage_plugins(self, stage_index: int) -> list[TrainerPlugin]:
        return [self.plugins[plugin.name] for plugin in plugins_for(self.config.train.stages[stage_index])]

    @staticmethod
    def _first(plugins: Iterable[TrainerPlugin], ask: Callable[[TrainerPlugin], Any]) -> Any:
        """The first answer that is not None of ``plugins`` (None if none answers)."""
        for plugin in plugins:
            answer = ask(plugin)
            if answer is not None:
                return answer
        return None

    def _take_sampler(self) -> None:
        """Batches from the sampler a plug-in of the stage brings, else from the epoch sampler. A
        plug-in's new sampler also rebuilds the step module (its stage may leave parameters unused)."""
        sampler = self._first(self._active, lambda plugin: plugin.sampler())
        if sampler is self._plugin_sampler:
            return
        self._plugin_sampler = sampler
        if sampler is None:
            self._use_epoch_sampler()
            return
        self._use_sampler(sampler, sampler.items_per_step, sampler.items_per_step)
        self._wrap_step_module()

    def _wrap_step_module(self) -> None:
        """The module a training step calls: backbone + head, in DistributedDataParallel when
        there are several ranks, so the gradients of both are all-reduced. Rebuilt when the head
        changes; a stage in which a parameter gets no gradient (a plug-in says so) needs
        ``find_unused_parameters``."""
        step = _TrainingStep(self)
        if not self.dist.enabled:
            self.step_module = step
            return
        unused = any(plugin.find_unused_parameters() for plugin in self._active)
        self.step_module = DistributedDataParallel(
            step, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=unused,
        )

    def _build_head(self, weight: nn.Parameter | None) -> nn.Module:
        """The current stage's head: a plug-in's, or the configured margin head around ``weight``."""
        head = self._first(self._active, lambda plugin: plugin.build_head(weight))
        if head is not None:
            return head
        stage = self.config.train.stages[self.stage_index]
        head = build_head(
            stage.head.type, self.dataset.num_classes, self.config.model.embedding_size,
            weight=weight, **head_kwargs(stage.head),
        )
        return head.to(self.device)

    def embed_training_images(self, batch_size: int, normalize: bool = True) -> np.ndarray:
        """The current model's feature of every training image, in dataset order (eval mode, no
        augmentation, no flip). Under torchrun each rank embeds its share and every rank gets all
        rows."""
        share = np.arange(len(self.dataset))[rank_slice(len(self.dataset), self.dist)]
        return gather_rows(self.dist, embed_dataset(
            self.model, self.dataset.eval_view(share, self.config.data.image_size), self.device,
            batch_size=batch_size, flip="none", num_workers=self.config.data.num_workers,
            amp_dtype=self.amp_dtype, progress=self.progress, normalize=normalize,
        ))

    def _build_loss(self) -> nn.Module:
        loss, _ = build_stage_loss(self.config.train.stages[self.stage_index], self.class_counts)
        return loss.to(self.device)

    def _param_groups(self, params: list[nn.Parameter]) -> list[dict[str, Any]]:
        return param_groups(params, self.plugins.values(), self.config.optim.weight_decay)

    def _lr_rule(self, group: dict[str, Any], stage_index: int) -> Callable[[int], float]:
        """The factor on a group's initial rate at a given optimisation step: its plug-in's rule,
        else the main schedule."""
        rule = self._first(self.plugins.values(), lambda plugin: plugin.lr_rule(group, stage_index))
        if rule is not None:
            return rule
        cfg = self.config
        return lambda step: lr_factor(step, cfg.scheduler, self.steps_per_epoch, self.total_steps)

    def _sync_head_parameters(self, stage_index: int) -> None:
        """Register parameters a new head brings beyond the shared classifier weight, each group
        under its learning-rate rule from the current step on."""
        known = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        new = [p for p in self.head.parameters() if id(p) not in known]
        add_param_groups(self.optimizer, self.scheduler, self._param_groups(new),
                         lambda group: self._lr_rule(group, stage_index), self.global_step)

    def _switch_stage(self, stage_index: int, announce: bool = True) -> None:
        if stage_index == self.stage_index:
            return
        previous = self.config.train.stages[self.stage_index]
        for plugin in self._active:
            plugin.on_stage_end()
        self.stage_index = stage_index
        self._active = self._stage_plugins(stage_index)
        self.head = self._build_head(weight=self.head.weight)
        self.loss_fn = self._build_loss()
        self._sync_head_parameters(stage_index)
        for plugin in self._active:  # a resume replays the switch, then loads the head's saved state
            plugin.on_stage_start(fresh=announce)
        self._wrap_step_module()
        stage = self.config.train.stages[stage_index]
        if not announce:
            return
        log.info("stage %d (%s): %s -> %s", stage_index, stage.name or stage.head.type,
                 previous.head.type, stage.head.type)
        self.run_log.write("stage", self.global_step, epoch=self.epoch, stage=stage_index,
                           head=stage.head.type, name=stage.name)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "head": self.head.state_dict(),
            "head_stage": self.stage_index,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.global_step,
            "step_in_epoch": self.step_in_epoch,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            # What best_metric measures (None: no validator, so no best.pt), and over what (a mean
            # over validation sets names them): a resume with another validator, or a mean over
            # other sets, does not compare its metric with this one.
            "best_metric_name": self.validator.metric if self.validator is not None else None,
            "best_selection": selection_id(self.validator),
            "nonfinite_steps": self.nonfinite_steps,
            "rng": rng_state(),
            "config": self.config.to_dict(),
            "identities": list(self.dataset.identities),
            "metrics": self.last_metrics,
            **{key: value for plugin in self.plugins.values() for key, value in plugin.state_dict().items()},
        }

    def save(self, best: bool = False) -> Path:
        path = self.run_dir / LATEST
        if not self.dist.is_main:  # every rank holds the same state; rank 0 writes it
            return path
        save_checkpoint(path, self.state_dict())
        if best:
            copy_checkpoint(path, self.run_dir / BEST)
        return path

    def resume(self, path: str | Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        self._clear_run_dir = False  # continuing: the folder's files are this run's
        check_resumable(state, path, self.dataset, self.config.data.root, self.config.to_dict())
        try:
            self.model.load_state_dict(state["model"])
            # Replaying the stage switches rebuilds the optimizer's parameter groups exactly as the
            # interrupted run had them, so its state loads one-to-one.
            for stage_index in range(self.stage_index + 1, int(state["head_stage"]) + 1):
                self._switch_stage(stage_index, announce=False)
            self.head.load_state_dict(state["head"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError, IndexError) as exc:
            # The named settings above are checked first; this catches any other setting that
            # changes the saved tensors or parameter groups (e.g. the heads of train.stages).
            raise unfit_checkpoint(path, exc) from exc
        self.epoch = int(state["epoch"])
        self.global_step = int(state["step"])
        self.step_in_epoch = int(state["step_in_epoch"])
        for plugin in self.plugins.values():
            plugin.load_state_dict(state)
        self.best_metric, self.best_epoch = restored_best(state, self.validator, path)
        self.nonfinite_steps = int(state["nonfinite_steps"])
        self.last_metrics = dict(state.get("metrics") or {})
        set_rng_state(state["rng"])
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.global_step)

    # ------------------------------------------------------------------ training
    def _batch_loss(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> dict[str, Any]:
        """Loss of one (micro-)batch with the current stage's head and loss, or a plug-in's step
        loss; runs inside the DistributedDataParallel wrapper (:class:`_TrainingStep`) when there
        are several ranks."""
        with autocast(self.device, self.amp_dtype):
            feature_maps = self.model.features(images)
            embeddings = self.model.output_stage(feature_maps)
        batch = StepBatch(feature_maps, embeddings, labels, indices, self.head, self.loss_fn)
        batch.margin_weight = self._first(self._active, lambda plugin: plugin.margin_weight(batch))
        out = self._first(self._active, lambda plugin: plugin.step_loss(batch))
        if out is None:
            logits = self.head(embeddings.float(), labels, margin_weight=batch.margin_weight)
            out = {"loss": self.loss_fn(logits, labels), "correct": logits.detach().argmax(1) == labels}
        return out

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor,
                    indices: torch.Tensor | None = None) -> tuple[float, float] | None:
        """One optimisation step on this rank's share of the global batch, in
        ``train.micro_batches`` chunks whose gradients accumulate (one all-reduce, on the last)."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        indices = indices if indices is not None else torch.arange(len(labels))
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        chunks = self.config.train.micro_batches
        parts = list(zip(images.chunk(chunks), labels.chunk(chunks), indices.chunk(chunks)))
        losses, correct, outputs, finite = [], [], [], True
        for number, (part_images, part_labels, part_indices) in enumerate(parts):
            last = number == len(parts) - 1
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.step_module.no_sync()
            with sync:
                out = self.step_module(part_images, part_labels, part_indices)
                finite = finite and bool(torch.isfinite(out["loss"]))
                if last:
                    # Every rank must take (or skip) the step together, or their all-reduces desync.
                    finite = all_true(self.dist, finite, self.device)
                # Backward also runs for a non-finite loss: the other ranks' gradient all-reduce
                # needs this rank's share; the gradients are then discarded.
                if out["loss"].requires_grad:
                    self.scaler.scale(out["loss"] / len(parts)).backward()
            losses.append(out["loss"].detach())
            correct.append(out["correct"])
            outputs.append({key: value for key, value in out.items() if key != "loss"})
            if "stats" in out:
                self.step_stats = {k: float(v) for k, v in out["stats"].items()}
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self._clip_gradients()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        for plugin in self._active:
            plugin.after_step(indices, outputs)
        return torch.stack(losses).mean().item(), torch.cat(correct).float().mean().item()

    def clipping_groups(self) -> ClipGroups:
        """Parameters clipped together and their max norm: ``main`` and each plug-in group with
        its plug-in's limit (:func:`facepipe.train.clipping.clipping_groups`)."""
        return clipping_groups(self.optimizer.param_groups, self.config.optim, lambda name: self._first(
            self.plugins.values(), lambda plugin: plugin.clip_limit(name)))

    def _clip_gradients(self) -> None:
        """Clip each group of :meth:`clipping_groups` by its own norm; keep each group's gradient
        norm and clip factor for the log."""
        self.scaler.unscale_(self.optimizer)
        self.clip_stats = clip_gradients(self.clipping_groups())

    def _run_epoch(self) -> dict[str, Any]:
        cfg = self.config
        self.sampler.set_epoch(self.epoch, start=self.step_in_epoch * self.items_per_step)
        self.model.train()
        apply_stage_batchnorm(self.model, cfg.train.stages[self.stage_index])
        self.head.train()
        losses, accuracies = [], []
        window_loss, window_acc, window_images, window_start = [], [], 0, time.perf_counter()
        epoch_start = time.perf_counter()
        remaining = self.steps_per_epoch - self.step_in_epoch
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, disable=not self.progress,
                   desc=f"epoch {self.epoch + 1}/{cfg.train.total_epochs}", unit="step", dynamic_ncols=True)
        consecutive_bad = 0
        batches = iter(self.loader)
        for _ in range(remaining):
            images, labels, indices = next(batches)
            result = self._train_step(images, labels, indices)
            self.step_in_epoch += 1
            if result is None:
                self.nonfinite_steps += 1
                consecutive_bad += 1
                self.global_step += 1
                log.warning("non-finite loss at step %d: step skipped (%d so far)", self.global_step,
                            self.nonfinite_steps)
                if consecutive_bad >= MAX_CONSECUTIVE_NONFINITE:
                    raise TrainingError(
                        f"{consecutive_bad} consecutive non-finite losses at step {self.global_step}: "
                        "the run diverged; lower optim.lr or the head scale/margin and resume from the last checkpoint"
                    )
                bar.update(1)
                continue
            consecutive_bad = 0
            self.global_step += 1
            loss, accuracy = result
            losses.append(loss)
            accuracies.append(accuracy)
            window_loss.append(loss)
            window_acc.append(accuracy)
            window_images += self.images_per_step
            bar.update(1)
            if self.step_in_epoch < self.steps_per_epoch and self._maybe_refresh(self._active):
                self.save()  # a refresh costs minutes: keep its result with a checkpoint
            if self.global_step % cfg.train.log_every_steps == 0 or self.step_in_epoch == self.steps_per_epoch:
                elapsed = time.perf_counter() - window_start
                speed = window_images / max(elapsed, 1e-9)
                record = {"epoch": self.epoch, "loss": float(np.mean(window_loss)),
                          "accuracy": float(np.mean(window_acc)), "lr": self.optimizer.param_groups[0]["lr"],
                          "images_per_s": speed, **self.step_stats,
                          **{k: v for plugin in self._active for k, v in plugin.log_stats().items()},
                          **self.clip_stats}
                self.run_log.write("train", self.global_step, **record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}", img_s=f"{speed:.0f}")
                window_loss, window_acc, window_images, window_start = [], [], 0, time.perf_counter()
            if cfg.train.checkpoint_every_steps and self.global_step % cfg.train.checkpoint_every_steps == 0 \
                    and self.step_in_epoch < self.steps_per_epoch:
                self.save()
        bar.close()
        duration = time.perf_counter() - epoch_start
        return {
            "epoch": self.epoch + 1,
            "stage": self.stage_index,
            "head": cfg.train.stages[self.stage_index].head.type,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "accuracy": float(np.mean(accuracies)) if accuracies else float("nan"),
            "seconds": duration,
            "images_per_s": len(losses) * self.images_per_step / max(duration, 1e-9),
            "skipped_steps": self.nonfinite_steps,
        }

    def validate(self) -> dict[str, Any] | None:
        """The validator's metrics (``train.validation``'s pairs or sets by default), or None without one."""
        if self.validator is None:
            return None
        self.model.eval()
        self.head.eval()
        with torch.no_grad():
            return self.validator(self)

    def class_scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Class scores [B, C] without margins, whose argmax is the head's prediction."""
        scores = self._first(self._active, lambda plugin: plugin.class_scores(embeddings))
        return scores if scores is not None else self.head.inference_logits(embeddings)

    def fit(self, max_epochs: int | None = None) -> dict[str, Any]:
        """Train the remaining epochs of the schedule (or up to epoch ``max_epochs``, a checkpoint
        boundary from which ``resume`` continues); return the last epoch's metrics, with the
        summary of the whole run under ``"run"`` (:meth:`run_summary`)."""
        cfg = self.config
        session_started = time.perf_counter()
        session_start = {"epoch": self.epoch, "step": self.global_step,
                         "resumed": (self.epoch, self.step_in_epoch) != (0, 0)}
        self.run_log = open_run_folder(self.run_dir, cfg, self.stats.to_dict(), self.dist, clear=self._clear_run_dir)
        self._clear_run_dir = False  # a second fit() continues this run
        log.info("dataset %s: %s", cfg.data.root or type(self.dataset).__name__, self.stats.summary())
        log.info("device %s, amp %s, %d steps/epoch x %d epochs", self.device,
                 self.amp_dtype or "off", self.steps_per_epoch, cfg.train.total_epochs)
        announce_selection(self.validator, self.run_dir, self.dist.is_main)
        if not session_start["resumed"]:
            self.run_log.write("start", 0, device=str(self.device), num_images=len(self.dataset),
                               num_classes=self.dataset.num_classes, steps_per_epoch=self.steps_per_epoch,
                               **{f"data_{k}": v for k, v in self.stats.to_dict().items()})
        try:
            stop_at = cfg.train.total_epochs if max_epochs is None else min(max_epochs, cfg.train.total_epochs)
            while self.epoch < stop_at:
                stage_index, _ = cfg.train.stage_at(self.epoch)
                self._switch_stage(stage_index)
                epoch_started = time.perf_counter()
                started = self._start_epoch()
                metrics = {**self._run_epoch(), **started}
                for plugin in self._active:
                    metrics.update(plugin.on_epoch_end(time.perf_counter() - epoch_started))
                self.epoch += 1
                self.step_in_epoch = 0
                if self.validator is not None and self.dist.is_main and (
                    self.epoch % self.validator.every_epochs == 0 or self.epoch == cfg.train.total_epochs
                ):
                    metrics.update(self.validate())
                score, metrics["best_reason"] = judge_epoch(metrics, self.validator, self.best_metric,
                                                            self.best_epoch)
                improved = metrics["best"] = score is not None
                if improved:
                    self.best_metric, self.best_epoch = score, self.epoch
                    log.info("epoch %d is the new best.pt: %s", self.epoch, metrics["best_reason"])
                if self.validator is not None:
                    metrics["best_epoch"] = self.best_epoch
                self.last_metrics = metrics
                self.run_log.write("epoch", self.global_step, **metrics)
                log.info("epoch %d/%d: %s", self.epoch, cfg.train.total_epochs,
                         ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
                self.save(best=improved)
            barrier(self.dist)  # end together: no rank is torn down while rank 0 still writes
        finally:
            self.run_log.close()
        return {**self.last_metrics, "run": self.run_summary(session_start, time.perf_counter() - session_started)}

    def _start_epoch(self) -> dict[str, Any]:
        """Each plug-in's epoch start, then (unless the epoch resumes mid-way) its refresh, which a
        checkpoint keeps; then the stage's batch sampler. Returns the plug-ins' epoch metrics."""
        metrics: dict[str, Any] = {}
        for plugin in self._active:
            metrics.update(plugin.on_epoch_start())
            if self.step_in_epoch == 0 and self._maybe_refresh([plugin]):
                self.save()
        self._take_sampler()
        return metrics

    @staticmethod
    def _maybe_refresh(plugins: Iterable[TrainerPlugin]) -> bool:
        """Give every plug-in its refresh; True when one refreshed (and wants a checkpoint)."""
        return any([plugin.maybe_refresh() for plugin in plugins])

    def run_summary(self, session_start: dict[str, Any], seconds: float) -> dict[str, Any]:
        """The whole run as it stands after a :meth:`fit` (:func:`facepipe.train.summary.run_summary`)."""
        return run_summary(self.config, self.run_dir, self.epoch, self.global_step, self.last_metrics,
                           self.validator.metric if self.validator is not None else None, self.best_metric,
                           self.best_epoch, session_start, seconds)


def train(config: Config, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Python API of ``facepipe train``: a folder holding a checkpoint needs ``resume`` (continue
    it) or ``overwrite`` (delete it and start afresh)."""
    return Trainer(config, resume=resume, progress=progress, overwrite=overwrite).fit()
