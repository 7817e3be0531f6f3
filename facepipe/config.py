"""Typed configuration: YAML files in ``configs/`` loaded into pydantic models.

OmegaConf reads the YAML and applies ``key=value`` overrides (dotted keys, list indices allowed:
``train.stages.1.epochs=3``); pydantic validates the result. Every model forbids unknown keys,
and the error names the offending key together with the valid ones.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, Union

import yaml
from omegaconf import OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from facepipe.errors import FacepipeUserError


class ConfigError(ValueError, FacepipeUserError):
    """A config file or override that cannot be used; the message lists every problem."""


class StrictModel(BaseModel):
    # No NaN or infinity in any setting: ``lr: .inf`` passes ``gt=0``, and NaN fails no comparison
    # a model validator could make.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        # pydantic's own "extra inputs are not permitted" does not say what *is* permitted.
        if isinstance(data, dict):
            unknown = sorted(str(k) for k in set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"unknown key(s) {unknown}; valid keys: {sorted(cls.model_fields)}")
        return data


Probability = Annotated[float, Field(ge=0, le=1)]
ImageSide = Annotated[int, Field(ge=16)]  # the synthetic renderer's smallest image


# ----------------------------------------------------------------------------- data
class AugmentConfig(StrictModel):
    """Training augmentations (albumentations); each value is the probability of applying it."""

    hflip: float = Field(0.5, ge=0, le=1)
    color_jitter: float = Field(0.0, ge=0, le=1)
    blur: float = Field(0.0, ge=0, le=1)
    random_resized_crop: float = Field(0.0, ge=0, le=1)
    random_resized_crop_scale: tuple[float, float] = (0.8, 1.0)
    coarse_dropout: float = Field(0.0, ge=0, le=1)

    @field_validator("random_resized_crop_scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"random_resized_crop_scale {list(value)}: a range of area fractions [lo, hi] with "
                             "0 < lo <= hi <= 1")
        return value


class DataConfig(StrictModel):
    root: str | None = None
    image_size: tuple[int, int] = (112, 112)  # (height, width)
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(2, ge=0)
    sampler: Literal["shuffle", "class_balanced", "sqrt"] = "shuffle"
    augment: AugmentConfig = AugmentConfig()
    # Head classes: the largest identities that together hold this share of the images.
    head_share: float = Field(0.5, gt=0, lt=1)

    @field_validator("image_size")
    @classmethod
    def _positive(cls, value: tuple[int, int]) -> tuple[int, int]:
        if any(side < 1 for side in value):
            raise ValueError(f"image_size {list(value)}: both sides must be positive")
        return value


# ----------------------------------------------------------------------------- model
class ModelConfig(StrictModel):
    # irse: the IR-SE face backbone; iresnet: insightface arcface_torch's IResNet (the parameter
    # names of its backbone.pth files, `facepipe import-weights`); mnist_cnn: Li et al.'s 28x28
    # grey-level classification CNN.
    arch: Literal["irse", "iresnet", "mnist_cnn"] = "irse"
    depth: Literal[18, 34, 50, 100, 200] = 50  # 200: iresnet only
    width: float = Field(1.0, gt=0, le=4)  # irse only; iresnet has the published widths (1.0)
    embedding_size: int = Field(512, ge=2)
    dropout: float = Field(0.0, ge=0, lt=1)
    se_reduction: int = Field(16, ge=1)  # irse only

    @model_validator(mode="after")
    def _arch_options(self) -> "ModelConfig":
        if self.depth == 200 and self.arch != "iresnet":
            raise ValueError(f"depth 200 is only for arch iresnet; {self.arch} has depths 18, 34, 50 and 100")
        if self.arch == "iresnet" and self.width != 1.0:
            raise ValueError(f"width {self.width}: iresnet has the published channel widths (64 to 512), so width "
                             "must be 1.0; arch irse takes a width multiplier")
        return self


# ----------------------------------------------------------------------------- heads
class SoftmaxHeadConfig(StrictModel):
    type: Literal["softmax"] = "softmax"


# Where class margins come from: the config value for every class, or (Khan et al. UMM) class
# uncertainty from MC dropout, refreshed during the stage; `m` is then the largest margin.
MarginSource = Literal["fixed", "uncertainty"]


class CosFaceHeadConfig(StrictModel):
    type: Literal["cosface"] = "cosface"
    s: float = Field(64.0, gt=0)
    m: float = Field(0.35, ge=0)
    margin_source: MarginSource = "fixed"


class ArcFaceHeadConfig(StrictModel):
    type: Literal["arcface"] = "arcface"
    s: float = Field(64.0, gt=0)
    m: float = Field(0.5, ge=0, lt=3.14159)
    margin_source: MarginSource = "fixed"


class LSoftmaxHeadConfig(StrictModel):
    type: Literal["lsoftmax", "sphereface"] = "lsoftmax"
    m: int = Field(4, ge=1)
    margin_source: MarginSource = "fixed"
    lambda_base: float = Field(1000.0, ge=0)
    lambda_gamma: float = Field(0.12, ge=0)
    lambda_power: float = Field(1.0, ge=0)
    lambda_min: float = Field(5.0, ge=0)
    # The lambda annealing of L-Softmax / SphereFace (Liu et al.) counts optimisation steps of the
    # run, not of the head: "continue" carries the count across every stage with a margin-product
    # head (softmax -> UMM -> UMM+SUM anneals once, as Khan et al. train one network), "restart"
    # starts this stage at lambda_base again. A stage that fine-tunes a pre-trained classifier can
    # train at full margin from its first step with lambda_base equal to lambda_min.
    lambda_schedule: Literal["continue", "restart"] = "continue"

    @model_validator(mode="after")
    def _lambda_decreases(self) -> "LSoftmaxHeadConfig":
        if self.lambda_base < self.lambda_min:
            raise ValueError(f"lambda_base ({self.lambda_base}) is below lambda_min ({self.lambda_min}): lambda "
                             "anneals down from lambda_base and is floored at lambda_min; set lambda_base = "
                             "lambda_min for a full margin from the first step")
        return self


class PrototypeHeadConfig(StrictModel):
    """Convolutional prototype learning (CPL, Li et al.'s base framework): logits -||f - C_j||^2."""

    type: Literal["prototype"] = "prototype"


class ARConvLHeadConfig(StrictModel):
    """Li et al. ARConvL: class regions (centres and radii) and the loss L_R + L_D + L_M; the head
    computes its own loss, so the stage's ``loss`` must stay cross-entropy without DRW."""

    type: Literal["arconvl"] = "arconvl"
    gamma: float = Field(0.05, ge=0, le=1)
    radius_init: float = Field(0.1, ge=0)
    # Radii learning rate: radius_warmup_lr for the first radius_warmup_epochs of the stage, then
    # radius_lr (Sec. 4.1: 0.001 for 3 epochs, then 0.01); it does not follow the main schedule.
    radius_warmup_epochs: int = Field(3, ge=0)
    radius_warmup_lr: float = Field(0.001, gt=0)
    radius_lr: float = Field(0.01, gt=0)
    use_prior: bool = False  # predict with log eta_j added (the literal argmax of p(x in j))
    # Centres at the start of the stage: "random" (Li et al.: He-uniform, for a network trained
    # from scratch), or "class_means" of the backbone's raw features over the training images.
    # The latter is for a stage that fine-tunes a pre-trained backbone: random centres near 0 sit
    # far from features whose norms are tens, and the region loss starts in the tens of thousands.
    init_centers: Literal["random", "class_means"] = "random"
    # Gradient-norm clip of the radii alone (None: never clipped, as Li et al. train them). They are
    # their own clipping group: in one global norm their gradient (hundreds when the regions are far
    # from the features) scaled the centres' and backbone's steps down to about 1 %.
    radius_clip_grad_norm: float | None = Field(None, gt=0)


HeadConfig = Annotated[
    Union[SoftmaxHeadConfig, CosFaceHeadConfig, ArcFaceHeadConfig, LSoftmaxHeadConfig, PrototypeHeadConfig,
          ARConvLHeadConfig],
    Field(discriminator="type"),
]


def head_kwargs(head: BaseModel) -> dict[str, Any]:
    """Keyword arguments for ``facepipe.losses.build_head`` (everything but the type tag, the
    margin source and the lambda schedule, which the trainer's plug-ins handle)."""
    return head.model_dump(exclude={"type", "margin_source", "lambda_schedule"})


# ----------------------------------------------------------------------------- training
class OptimConfig(StrictModel):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    # Gradient-norm clip of the backbone and classifier together (None: off). A head's own parameter
    # groups (ARConvL's radii) are clipped separately, by their own setting. "global" is the former
    # single norm over every parameter, kept to reproduce older runs.
    clip_grad_norm: float | None = Field(5.0, gt=0)
    clip_mode: Literal["per_group", "global"] = "per_group"


class SchedulerConfig(StrictModel):
    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    warmup_start_factor: float = Field(0.1, gt=0, le=1)
    milestones: list[Annotated[int, Field(ge=1)]] = []  # epochs, for name=step
    gamma: float = Field(0.1, gt=0, le=1)
    min_lr_factor: float = Field(0.0, ge=0, le=1)  # cosine floor, as a fraction of lr


# ----------------------------------------------------------------------------- losses on the logits
class CrossEntropyLossConfig(StrictModel):
    type: Literal["ce"] = "ce"


class FocalLossConfig(StrictModel):
    type: Literal["focal"] = "focal"
    gamma: float = Field(1.0, ge=0)


class ClassBalancedLossConfig(StrictModel):
    """Cui et al.: CE (gamma 0) or focal loss weighted by the inverse effective number."""

    type: Literal["class_balanced"] = "class_balanced"
    beta: float = Field(0.9999, gt=0, lt=1)
    gamma: float = Field(0.0, ge=0)


class LogitAdjustedLossConfig(StrictModel):
    """Menon et al.: CE on logits + tau log(class prior) during training."""

    type: Literal["logit_adjusted"] = "logit_adjusted"
    tau: float = Field(1.0, ge=0)


class LDAMLossConfig(StrictModel):
    """Cao et al. LDAM on cosines: margins proportional to n_j^(-1/4), the largest max_margin,
    then scale s. Needs a head that outputs cosines (cosface with s 1 and m 0)."""

    type: Literal["ldam"] = "ldam"
    max_margin: float = Field(0.5, gt=0)
    scale: float = Field(30.0, gt=0)


class MaximumMarginLossConfig(StrictModel):
    """Kang MM loss: target logit z_y - Delta; delta_plus = beta * delta_minus. With
    ``ldam: true`` (MM-LDAM) it takes cosines like LDAM and adds its margins and scale."""

    type: Literal["mm"] = "mm"
    delta_minus: float = Field(0.6, ge=0)
    beta: float = Field(1.5, ge=0)
    ldam: bool = False
    max_margin: float = Field(0.5, gt=0)  # LDAM margins (ldam: true only)
    scale: float = Field(30.0, gt=0)  # LDAM scale (ldam: true only)


class ClusterMarginLossConfig(StrictModel):
    """Huang et al. CLMLE (Eq. 8-9) on the stage's cluster mini-batches (``train.clusters``): absolute
    cosine margins between a sample's cluster and the clusters of other identities
    (``inter_margin``, a1) and the other clusters of its identity (``intra_margin``, a2 < a1).
    ``classification_weight`` adds that times cross-entropy on the stage head's logits."""

    type: Literal["clmle"] = "clmle"
    scale: float = Field(16.0, gt=0)  # s = 1 is the paper's literal form (its hinge never reaches 0)
    inter_margin: float = Field(0.3, ge=0, lt=2)
    intra_margin: float = Field(0.1, ge=0, lt=2)
    cost_sensitive: bool = True  # inverse in-batch identity frequency weights, mean 1
    classification_weight: float = Field(0.0, ge=0)
    # The centroid a sample's own-cluster similarity is measured against: "leave_one_out" = the
    # other batch members of its cluster (alone in the batch: the cluster's k-means centroid),
    # "inclusive" = the paper's batch mean with the sample itself (see facepipe.losses.clmle).
    own_centroid: Literal["leave_one_out", "inclusive"] = "leave_one_out"

    @model_validator(mode="after")
    def _inter_above_intra(self) -> "ClusterMarginLossConfig":
        if self.inter_margin <= self.intra_margin:
            raise ValueError(f"inter_margin ({self.inter_margin}) must exceed intra_margin ({self.intra_margin}): "
                             "Huang et al. keep identities further apart than clusters of one identity")
        return self


LossConfig = Annotated[
    Union[CrossEntropyLossConfig, FocalLossConfig, ClassBalancedLossConfig, LogitAdjustedLossConfig,
          LDAMLossConfig, MaximumMarginLossConfig, ClusterMarginLossConfig],
    Field(discriminator="type"),
]


class DRWConfig(StrictModel):
    """Deferred re-weighting (Kang Algorithm 1): class weights from run epoch ``start_epoch``
    (0-based, counted over the whole schedule) on."""

    start_epoch: int = Field(ge=0)
    kind: Literal["effective_number", "inverse_frequency"] = "effective_number"
    beta: float = Field(0.9999, gt=0, lt=1)


class StageConfig(StrictModel):
    """One stage of the schedule: a number of epochs trained with one head (loss)."""

    name: str | None = None
    epochs: int = Field(ge=1)
    head: HeadConfig
    # Khan et al. SUM: each sample gets the fraction F (its misclassification probability under its
    # MC-dropout Gaussian embedding) of its class margin.
    sample_uncertainty: bool = False
    # The loss on the head's logits (cross-entropy by default) and optional deferred re-weighting.
    loss: LossConfig = CrossEntropyLossConfig()
    drw: DRWConfig | None = None
    # BatchNorm during this stage's training steps: "batch" normalises with the batch's statistics
    # (and updates the running ones), "frozen" runs every BatchNorm layer of the backbone in eval
    # mode (running statistics used, not updated; affine weights still train; dropout unchanged).
    # "auto": frozen in a clmle stage, whose nearest-neighbour mined batches are far from the data's
    # statistics (and Huang et al.'s network has no BatchNorm), batch elsewhere.
    bn: Literal["auto", "frozen", "batch"] = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> "StageConfig":
        if self.sample_uncertainty and self.head.type in ("softmax", "prototype", "arconvl"):
            raise ValueError(f"sample_uncertainty (SUM) weights a class margin; the {self.head.type} head has none")
        if self.loss.type == "clmle" and (self.drw is not None or self.head.type == "arconvl"
                                          or self.sample_uncertainty):
            raise ValueError("a clmle stage weights samples itself (cost-sensitive) and needs a plain "
                             "classification head: no drw, no arconvl head, no sample_uncertainty")
        if self.head.type == "arconvl" and (self.loss.type != "ce" or self.drw is not None):
            raise ValueError("the arconvl head computes its own loss (Li et al. Eq. 1): leave the stage's "
                             "loss at ce and drop drw")
        if self.drw is not None and self.loss.type == "class_balanced":
            raise ValueError("loss class_balanced already weights classes; drw on top would weight them twice")
        takes_cosines = self.loss.type == "ldam" or (self.loss.type == "mm" and self.loss.ldam)
        if takes_cosines and not (self.head.type == "cosface" and self.head.s == 1.0 and self.head.m == 0.0
                                  and self.head.margin_source == "fixed"):
            raise ValueError("LDAM losses apply their own margins and scale to cosines: use the head "
                             "{type: cosface, s: 1.0, m: 0.0}")
        return self


class UncertaintyConfig(StrictModel):
    """MC-dropout class uncertainty of UMM (Khan et al., CVPR 2019; uses the output stage's dropout,
    model.dropout) and the map from it to class margins."""

    passes: int = Field(10, ge=2)  # N dropout passes over one backbone pass
    refresh_every_epochs: int = Field(1, ge=1)  # class uncertainty at the start of every K-th epoch
    max_per_class: int | None = Field(200, ge=1)  # images per class used; None = all
    batch_size: int = Field(128, ge=1)
    # Class uncertainty -> margin. "rank": by the class's uncertainty percentile, so each integer
    # margin level holds about C / m_max classes (one outlier class cannot flatten the others to
    # m = 1); "max_scaled": u_c / max_k u_k, the map facepipe used first.
    margin_map: Literal["rank", "max_scaled"] = "rank"
    # Images the uncertainty is measured on: "clean" = un-augmented (memorised tail classes look
    # certain there), "augmented" = seeded views through the training transform. BatchNorm is in
    # eval mode either way. Clean is the default from a measurement on the LFW study's training set
    # (bench/mechanisms.py --views): Spearman(u, class size) +0.024 clean, +0.028 augmented (hflip),
    # +0.131 with stronger augmentation; neither gives the paper's negative correlation.
    views: Literal["clean", "augmented"] = "clean"


class ClusterConfig(StrictModel):
    """Clusters and cluster mini-batches of CLMLE stages (Huang et al. Sec. 3.2-3.3)."""

    cluster_size: int = Field(200, ge=1)  # l: identity c gets max(1, floor(L_c / l)) clusters
    refresh_every_steps: int = Field(2000, ge=1)  # re-extract features and re-cluster (paper: 2k-5k)
    clusters_per_batch: int = Field(12, ge=2)  # M
    images_per_cluster: int = Field(20, ge=1)  # k (batch = M * k)
    query: Literal["hardest", "uniform"] = "hardest"  # uniform: the Table 7 ablation
    kmeans_iterations: int = Field(20, ge=1)
    batch_size: int = Field(256, ge=1)  # feature extraction


# A validation set's name is part of its metric names (val_<name>_accuracy): letters, digits, '_'.
_SET_NAME = re.compile(r"[A-Za-z0-9_]+")
# The metric names of the sets' mean (val_mean_accuracy, ...).
MEAN_SET_NAME = "mean"


class ValidationSetConfig(StrictModel):
    """One set of ``train.validation.sets``: an insightface ``.bin`` file (``bin``: its images are
    in the file) or a pairs file (``pairs``, with ``root`` and ``allow_outside_root`` as in the
    single-file form of :class:`ValidationConfig`). Its metrics are logged as
    ``val_<name>_accuracy`` and so on."""

    bin: str | None = None
    pairs: str | None = None
    root: str | None = None
    allow_outside_root: bool = False
    # Default: the file's stem (data/cfp_fp.bin -> cfp_fp), other characters than letters,
    # digits and '_' replaced by '_'.
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name") is None:
            source = data.get("bin") if data.get("bin") is not None else data.get("pairs")
            if isinstance(source, str) and source:
                data = {**data, "name": re.sub(r"[^A-Za-z0-9_]+", "_", Path(source).stem).strip("_") or "set"}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> "ValidationSetConfig":
        if (self.bin is None) == (self.pairs is None):
            raise ValueError("a validation set is a .bin file (bin: FILE) or a pairs file (pairs: FILE), "
                             f"exactly one of them; got {'both' if self.bin is not None else 'neither'}")
        if self.bin is not None and (self.root is not None or self.allow_outside_root):
            raise ValueError(f"set {self.name}: root and allow_outside_root apply to a pairs file; a .bin file "
                             "holds its images")
        if self.name is None or not _SET_NAME.fullmatch(self.name):
            raise ValueError(f"set name {self.name!r}: use letters, digits and '_' only (it is part of the metric "
                             "names, e.g. val_<name>_accuracy)")
        if self.name == MEAN_SET_NAME:
            raise ValueError(f"set name {MEAN_SET_NAME!r} is taken by the sets' mean (val_mean_accuracy): "
                             "give the set another name")
        return self


class ValidationConfig(StrictModel):
    """Verification pairs checked at the end of epochs, in one of two forms.

    One pairs file (``pairs``): a CSV ``path_a,path_b,is_same`` or an LFW pairs file (e.g. the
    ``pairs.txt`` of ``facepipe merge --val-pairs``), told apart by content
    (:func:`facepipe.eval.pairs_job.load_pairs`); metrics ``val_accuracy``, ``val_auc``, ...

    Several sets (``sets``): insightface ``.bin`` files and pairs files
    (:class:`ValidationSetConfig`), each logged under its name (``val_lfw_accuracy``), with their
    mean (``val_mean_accuracy``); ``select_by`` names what best.pt follows."""

    pairs: str | None = None
    # Folder the pair paths are relative to (LFW: the folder of the <Name>/ folders); default: the
    # pairs file's folder.
    root: str | None = None
    every_epochs: int = Field(1, ge=1)
    # Pair paths that are absolute or climb out of root with '..' are refused unless this is set.
    allow_outside_root: bool = False
    sets: list[ValidationSetConfig] | None = None
    # With sets: best.pt is the epoch of the highest mean accuracy ("mean", the default) or of
    # one set's accuracy (its name).
    select_by: str | None = None

    @model_validator(mode="after")
    def _one_form(self) -> "ValidationConfig":
        if self.sets is None:
            if self.pairs is None:
                raise ValueError("give one pairs file (pairs: FILE) or a list of sets (sets: [{bin: FILE}, "
                                 "{pairs: FILE, root: DIR}, ...])")
            if self.select_by is not None:
                raise ValueError("select_by chooses among sets (sets: [...]); one pairs file is selected by "
                                 "val_accuracy")
            return self
        if self.pairs is not None or self.root is not None or self.allow_outside_root:
            raise ValueError("give either pairs (with root, allow_outside_root) or sets, not both; a pairs file "
                             "among sets takes its own root and allow_outside_root: sets: [{pairs: FILE, root: DIR}]")
        if not self.sets:
            raise ValueError("sets is empty: list at least one set, or remove train.validation")
        names = [item.name for item in self.sets]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"set names {repeated} are used more than once (a name defaults to the file's stem): "
                             "give each set its own name: {bin: FILE, name: NAME}")
        if self.select_by is not None and self.select_by not in (MEAN_SET_NAME, *names):
            raise ValueError(f"select_by {self.select_by!r} names no set; choose {MEAN_SET_NAME!r} (the default) or "
                             f"one of {names}")
        return self

    @property
    def selected(self) -> str:
        """With sets: what best.pt follows, ``mean`` or a set's name."""
        return self.select_by or MEAN_SET_NAME


class TrainConfig(StrictModel):
    stages: list[StageConfig] = Field(default_factory=lambda: [StageConfig(epochs=1, head=SoftmaxHeadConfig())])
    # Start from another run's weights (its backbone, and its classifier when the identities match):
    # several methods fine-tuned from one shared pre-training. Optimizer and schedule start afresh.
    init_from: str | None = None
    device: str = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    # NHWC memory format: "auto" = on CUDA only (what the trainer always did); true also on CPU,
    # where oneDNN runs the small MNIST CNN about 1.4x faster in it.
    channels_last: Literal["auto"] | bool = "auto"
    log_every_steps: int = Field(20, ge=1)
    checkpoint_every_steps: int = Field(0, ge=0)  # 0: checkpoints at epoch ends only
    max_steps_per_epoch: int | None = Field(None, ge=1)
    # Each process splits its share of the global batch into this many chunks whose gradients
    # accumulate (BatchNorm sees one chunk at a time): a big global batch on little memory, and the
    # single-process equivalent of that many ranks.
    micro_batches: int = Field(1, ge=1)
    validation: ValidationConfig | None = None
    uncertainty: UncertaintyConfig = UncertaintyConfig()
    clusters: ClusterConfig = ClusterConfig()

    @field_validator("stages")
    @classmethod
    def _at_least_one_stage(cls, value: list[StageConfig]) -> list[StageConfig]:
        if not value:
            raise ValueError("the schedule needs at least one stage")
        return value

    @property
    def total_epochs(self) -> int:
        return sum(stage.epochs for stage in self.stages)

    def stage_at(self, epoch: int) -> tuple[int, StageConfig]:
        """Index and config of the stage that trains (0-based) ``epoch``."""
        end = 0
        for index, stage in enumerate(self.stages):
            end += stage.epochs
            if epoch < end:
                return index, stage
        raise ValueError(f"epoch {epoch} is past the schedule ({self.total_epochs} epochs)")


class EmbedConfig(StrictModel):
    flip: Literal["sum", "concat", "none"] = "sum"
    batch_size: int = Field(128, ge=1)


class DemoConfig(StrictModel):
    """Synthetic data of ``facepipe demo``: long-tailed training identities, held-out test ones."""

    identities: int = Field(300, ge=2)
    distribution: Literal["power", "zipf", "uniform"] = "power"
    max_images: int = Field(60, ge=1)
    min_images: int = Field(2, ge=1)
    gamma: float = Field(1.0, gt=0)
    render_size: tuple[ImageSide, ImageSide] = (112, 112)
    heldout_identities: int = Field(60, ge=2)
    heldout_images: int = Field(8, ge=2)
    pairs: int = Field(3000, ge=20)

    @model_validator(mode="after")
    def _counts_ordered(self) -> "DemoConfig":
        if self.min_images > self.max_images:
            raise ValueError(f"min_images ({self.min_images}) exceeds max_images ({self.max_images})")
        return self


# ----------------------------------------------------------------------------- alignment
class DetectorConfig(StrictModel):
    """MTCNN settings; the defaults are those of the reference (facenet-pytorch 2.5.3)."""

    min_face_size: float = Field(20.0, gt=0)
    # P-Net, R-Net, O-Net face probability: above 1 no face is ever found.
    thresholds: tuple[Probability, Probability, Probability] = (0.6, 0.7, 0.7)
    factor: float = Field(0.709, gt=0, lt=1)  # image pyramid scale step
    nms_within_scale: float = Field(0.5, gt=0, le=1)  # IoU, P-Net boxes of one scale
    nms_across_scales: float = Field(0.7, gt=0, le=1)  # IoU, P-Net boxes of all scales
    nms_refine: float = Field(0.7, gt=0, le=1)  # IoU, after R-Net
    nms_output: float = Field(0.7, gt=0, le=1)  # intersection over the smaller box, after O-Net
    batch_size: int = Field(16, ge=1)  # images of equal size per P-Net forward
    # The networks run in PyTorch, or in ONNX Runtime (the onnx extra) from the files of
    # `facepipe export --detector DIR` in onnx_dir, or exported once into a cache folder.
    backend: Literal["torch", "onnx"] = "torch"
    onnx_dir: str | None = None

    @model_validator(mode="after")
    def _onnx_dir_needs_onnx(self) -> "DetectorConfig":
        if self.onnx_dir is not None and self.backend != "onnx":
            raise ValueError(f"detector.onnx_dir is set ({self.onnx_dir}) but detector.backend is "
                             f"{self.backend!r}: set detector.backend=onnx, or leave onnx_dir out")
        return self


class AlignConfig(StrictModel):
    """``facepipe align``: detection, face choice, similarity alignment and output files."""

    image_size: tuple[int, int] = (112, 112)  # (height, width); 112x96 is the SphereFace/CLMLE crop
    # Which face when several: largest box, nearest the image centre, highest score, or every face.
    select: Literal["largest", "central", "score", "all"] = "largest"
    # No face found: skip the image, or write a centre crop flagged in the manifest (LFW practice).
    no_face: Literal["skip", "center_crop"] = "center_crop"
    # Side of the fallback centre square as a fraction of the short image side; 0.53 puts an
    # LFW deep-funneled face at the template scale (median eye distance 42 px of 250 vs 35.2 of 112).
    center_crop_fraction: float = Field(0.53, gt=0, le=1)
    border_mode: Literal["constant", "replicate", "reflect"] = "constant"
    # Detection runs on a copy downscaled to at most this many pixels on the long side.
    max_detect_side: int = Field(4096, ge=64)
    # Images smaller than this on the short side are reported as too small, not searched.
    min_image_side: int = Field(12, ge=1)
    output_format: Literal["same", "jpg", "png"] = "same"
    jpeg_quality: int = Field(95, ge=1, le=100)
    detector: DetectorConfig = DetectorConfig()
    device: str = "auto"

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        if any(side < 16 for side in value):
            raise ValueError(f"image_size {list(value)}: both sides must be at least 16 pixels")
        return value


class ClassifyConfig(StrictModel):
    """``facepipe classify``: Li et al.'s imbalanced-image protocol (Sec. 4.1) on MNIST idx files."""

    root: str  # folder holding train-/t10k-images-idx3-ubyte(.gz) and the label files
    # Keep a random 1/q of the training images of each minority class (all of the others).
    imbalance_ratio: int = Field(100, ge=1)
    minority_classes: list[Annotated[int, Field(ge=0, le=9)]] = [0, 2, 4, 6, 8]  # MNIST digits
    val_fraction: float = Field(0.1, gt=0, lt=1)  # held out (stratified) for best-epoch selection
    eval_batch_size: int = Field(1024, ge=1)


class Config(StrictModel):
    # numpy's generators refuse negative seeds; FAISS k-means takes a 32-bit one.
    seed: int = Field(0, ge=0, le=2**31 - 1)
    output_dir: str = "runs/default"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    train: TrainConfig = TrainConfig()
    embed: EmbedConfig = EmbedConfig()
    align: AlignConfig = AlignConfig()  # how raw images are aligned before embedding
    demo: DemoConfig | None = None  # read by `facepipe demo` only
    classify: ClassifyConfig | None = None  # read by `facepipe classify` only

    @model_validator(mode="after")
    def _input_size_fits_backbone(self) -> "Config":
        side_ok = all(side >= 16 and side % 16 == 0 for side in self.data.image_size)
        if self.model.arch in ("irse", "iresnet") and not side_ok:
            name = "IR-SE" if self.model.arch == "irse" else "IResNet"
            raise ValueError(f"data.image_size {list(self.data.image_size)}: both sides must be multiples of "
                             f"16 for the {name} backbone (four stride-2 stages)")
        if self.model.arch == "mnist_cnn" and any(side % 4 for side in self.data.image_size):
            raise ValueError(f"data.image_size {list(self.data.image_size)}: both sides must be multiples of "
                             "4 for mnist_cnn (two 2x2 poolings)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- loading
def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "<root>"
        lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides; values are parsed as YAML (``3`` int, ``[1,2]`` list)."""
    conf = OmegaConf.create(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.stages.0.epochs=3)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from exc
        try:
            OmegaConf.update(conf, key.strip(), value, merge=True)
        except Exception as exc:  # omegaconf raises several types for bad paths
            raise ConfigError(f"override '{item}': cannot set '{key}' ({exc})") from exc
    return OmegaConf.to_container(conf, resolve=True)  # type: ignore[return-value]


def config_from_dict(data: dict[str, Any], overrides: Sequence[str] = (), source: str = "<dict>") -> Config:
    merged = apply_overrides(data, overrides) if overrides else data
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except Exception as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data, source = loaded, str(path)
    return config_from_dict(data, overrides, source)


def load_align_config(name: str | Path | None = None, overrides: Sequence[str] = ()) -> AlignConfig:
    """Align settings from a YAML (a config name or path): either the settings themselves or a
    full training config whose ``align:`` section is used; then ``key=value`` overrides."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if name is not None:
        path = find_config(str(name))
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
        except Exception as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data, source = (loaded["align"] or {}) if "align" in loaded else loaded, str(path)
    merged = apply_overrides(data, overrides) if overrides else data
    try:
        return AlignConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def config_search_path() -> list[Path]:
    """Where named configs are looked up: ./configs, the source checkout, the installed share folder."""
    repo_configs = Path(__file__).resolve().parent.parent / "configs"
    return [Path.cwd() / "configs", repo_configs, Path(sys.prefix) / "share" / "facepipe" / "configs"]


def find_config(name: str) -> Path:
    """Resolve ``name`` (a path, or a config name such as ``demo``) to a YAML file."""
    candidate = Path(name)
    if candidate.is_file():
        return candidate
    filename = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    for folder in config_search_path():
        if (folder / filename).is_file():
            return folder / filename
    searched = ", ".join(str(folder) for folder in config_search_path())
    raise ConfigError(f"config '{name}' not found (looked for {filename} in {searched})")
