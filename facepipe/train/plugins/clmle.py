"""CLMLE (Huang et al., TPAMI 2019, Sec. 3.2-3.3) in the trainer: a stage whose loss is ``clmle``.

On the stage's first epoch (or from the checkpoint after a resume) the training set is clustered
and training switches to cluster mini-batches (:class:`facepipe.train.cluster_stage.ClusterStage`);
the clusters are rebuilt every ``train.clusters.refresh_every_steps`` steps, also mid-epoch (each
time followed by a checkpoint). The batch loss is the cluster margin loss, plus
``classification_weight`` times the stage loss on the head's logits; without that term the
classifier gets no gradient (DDP then needs ``find_unused_parameters``) and accuracy is the
nearest batch cluster's identity. Every training log record carries the batch's mechanism in
numbers (``clmle_*``), every epoch record the clustering time (``cluster_refresh_*``).
"""
from __future__ import annotations

from typing import Any

import torch

from facepipe.config import StageConfig
from facepipe.train.cluster_stage import CLUSTERS_FILE, ClusterStage, RankClusterBatches
from facepipe.train.plugins.base import PluginContext, StepBatch, TrainerPlugin


class CLMLE(TrainerPlugin):
    name = "clmle"
    run_files = (CLUSTERS_FILE,)

    @classmethod
    def applies_to(cls, stage: StageConfig) -> bool:
        return stage.loss.type == "clmle"

    def __init__(self, ctx: PluginContext) -> None:
        super().__init__(ctx)
        self.cluster_stage: ClusterStage | None = None  # the state while a clmle stage runs
        self._saved: dict[str, Any] | None = None  # a checkpoint's cluster stage, until it is entered
        self._step_indices: torch.Tensor | None = None  # the last step's batch, for the log's batch stats

    def find_unused_parameters(self) -> bool:
        return not self.ctx.stage().loss.classification_weight

    def on_epoch_start(self) -> dict[str, Any]:
        """Clusters and cluster mini-batches on entering the stage (or its saved state)."""
        index = self.ctx.stage_index()
        if self.cluster_stage is None or self.cluster_stage.stage_index != index:
            self.cluster_stage = ClusterStage(self.ctx, index, saved=self._saved)
            self._saved = None
        return {}

    def maybe_refresh(self) -> bool:
        return self.cluster_stage is not None and self.cluster_stage.maybe_refresh()

    def sampler(self) -> RankClusterBatches | None:
        return None if self.cluster_stage is None else self.cluster_stage.rank_sampler

    def on_epoch_end(self, seconds: float) -> dict[str, Any]:
        if self.cluster_stage is None:
            return {}
        share = self.cluster_stage.add_elapsed(seconds)
        return {"cluster_refresh_seconds": self.cluster_stage.refresh_seconds, "cluster_refresh_share": share}

    def on_stage_end(self) -> None:
        self.cluster_stage = None

    def step_loss(self, batch: StepBatch) -> dict[str, Any] | None:
        """Huang et al. Eq. 8-9 on the cluster mini-batch, plus an optional classification term."""
        stage = self.cluster_stage
        if stage is None:
            return None
        clusters = stage.loss_for(batch.embeddings.float(), batch.labels, batch.indices)
        out = {"loss": clusters.loss, "cluster_losses": clusters.per_sample}
        if stage.classification_weight:
            logits = batch.head(batch.embeddings.float(), batch.labels)
            out["loss"] = out["loss"] + stage.classification_weight * batch.loss_fn(logits, batch.labels)
            out["correct"] = logits.detach().argmax(1) == batch.labels
        else:  # the classifier does not train here: score the nearest batch cluster instead
            out["correct"] = clusters.identity_correct
        return out

    def after_step(self, indices: torch.Tensor, outputs: list[dict[str, Any]]) -> None:
        if self.cluster_stage is None:
            return
        self.cluster_stage.record_losses(indices, torch.cat([out["cluster_losses"] for out in outputs]))
        self._step_indices = indices

    def log_stats(self) -> dict[str, float]:
        return {} if self.cluster_stage is None else self.cluster_stage.batch_stats(self._step_indices)

    def state_dict(self) -> dict[str, Any]:
        return {"cluster_stage": None if self.cluster_stage is None else self.cluster_stage.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved = state.get("cluster_stage")
