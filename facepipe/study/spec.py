"""A study spec: the methods, seeds and sweeps of a comparison, in YAML (``configs/studies/``).

A study fine-tunes every method from one shared pre-training (the base config, trained as it
is) for the same number of epochs under the same common overrides, so the methods differ only
in what their ``stages`` (and sweep settings) say. The spec is checked before anything runs:
every method's stages add up to ``finetune.epochs``, every run's config validates, and a
``sweep_from`` names a method that has a sweep.

Paths in a spec (base config, data, root, results) are relative to the working directory: run
``facepipe study`` from the repository root, as every README command.

Run keys. A run is ``(method, setting, seed)``; ``setting`` is the sweep setting's name, or
``""`` for a method without a sweep. Folders: ``<root>/runs/<method>/<setting slug>/seed<k>``
(no setting folder without a sweep); the pre-training is ``<root>/pretrain/seed<k>``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from facepipe.config import Config, ConfigError, StrictModel, find_config, load_config

__all__ = ["MethodTable", "StudySpec", "StudyRun", "load_method_table", "load_study_spec", "PRETRAIN"]

PRETRAIN = "pretrain"


class StudyData(StrictModel):
    train: str
    val_pairs: str
    probes: str | None = None
    lfw_images: str | None = None
    dev_test_pairs: str | None = None
    head_source: str | None = None  # identities found in this source are reported as its head set
    alignment_records: list[str] = []

    @model_validator(mode="after")
    def _lfw_together(self) -> "StudyData":
        if (self.lfw_images is None) != (self.dev_test_pairs is None):
            raise ValueError("give lfw_images and dev_test_pairs together (the DevTest and MegaFace-style readouts "
                             "need both) or neither")
        return self


class StudyReadouts(StrictModel):
    bootstrap: int = Field(1000, ge=100)
    # Flip fusion of the readout embeddings ("none", "sum", "concat"); None: the run's embed.flip.
    flip: Literal["none", "sum", "concat"] | None = None
    knc_cluster_size: int = Field(10, ge=1)
    groups: dict[str, int] = {"head": 50, "middle": 10}
    compare_to: list[str] = []

    @model_validator(mode="after")
    def _groups(self) -> "StudyReadouts":
        if set(self.groups) != {"head", "middle"} or not self.groups["head"] > self.groups["middle"] >= 1:
            raise ValueError("readouts.groups: give {head: H, middle: M} with H > M >= 1 (training images per "
                             "identity: head >= H, middle M..H-1, tail below M)")
        return self


class StudyPretrain(StrictModel):
    seeds: list[int] = [0]
    overrides: list[str] = []


class StudyFinetune(StrictModel):
    epochs: int = Field(ge=1)
    overrides: list[str] = []


class StudyMethod(StrictModel):
    label: str
    note: str = ""
    seeds: list[int] = Field(min_length=1)
    # The method's whole training schedule (``train.stages``); None keeps the base config's stages,
    # which the method's ``overrides`` then change (as the MNIST reproduction's methods do).
    stages: list[dict[str, Any]] | None = Field(None, min_length=1)
    overrides: list[str] = []
    sweep: dict[str, list[str]] | None = None
    sweep_from: str | None = None
    # Why this method's kept runs did not run it as its paper intends ("" when they did): the rows
    # stay as the record of what was run, marked in the tables.
    superseded: str = ""
    # The paper's own figures for this method, per readout or data set (e.g. ``MNIST-100: [92.3, 0.8]``
    # for mean and std); tables print them in columns of their own, labelled as published.
    published: dict[str, list[float]] = {}

    @model_validator(mode="after")
    def _sweep(self) -> "StudyMethod":
        if self.sweep is not None and len(self.sweep) < 2:
            raise ValueError("a sweep needs 2 or more settings")
        if self.sweep is not None and self.sweep_from is not None:
            raise ValueError("give either sweep or sweep_from, not both")
        if len(set(self.seeds)) != len(self.seeds) or 0 not in self.seeds:
            raise ValueError(f"seeds {self.seeds}: distinct, and seed 0 among them (sweeps and kept backbones use it)")
        return self


class MethodTable(StrictModel):
    """The methods of a comparison and the config they change: what every study shares (the
    second LFW study's :class:`StudySpec`, and the first LFW study and the MNIST reproduction of
    ``bench/``, whose protocols are their own)."""

    name: str
    title: str
    base_config: str
    # Every method's stages add up to this many epochs (checked), when given.
    epochs: int | None = Field(None, ge=1)
    methods: dict[str, StudyMethod] = Field(min_length=1)

    @model_validator(mode="after")
    def _methods_consistent(self) -> "MethodTable":
        epochs, setting = self.method_epochs()
        for key, method in self.methods.items():
            if not re.fullmatch(r"[a-z0-9_]+", key):
                raise ValueError(f"method key {key!r}: lower-case letters, digits and _ only (a folder name)")
            if method.stages is not None and epochs is not None:
                trained = sum(int(stage.get("epochs", 0)) for stage in method.stages)
                if trained != epochs:
                    raise ValueError(f"method {key}: its stages train {trained} epochs, not {setting} = {epochs} "
                                     "(every method trains the same epochs)")
            if method.sweep_from is not None:
                source = self.methods.get(method.sweep_from)
                if source is None or source.sweep is None:
                    raise ValueError(f"method {key}: sweep_from {method.sweep_from!r} is not a method with a sweep")
        return self

    def method_epochs(self) -> tuple[int | None, str]:
        """The epochs every method's stages add up to (None: not checked), and the key that sets them."""
        return self.epochs, "epochs"

    def base(self) -> Path:
        return find_config(self.base_config)

    def common_overrides(self) -> list[str]:
        """Overrides every method's runs share, before the method's own."""
        return []

    def method_overrides(self, method: str, setting: str = "", inherited: list[str] = (),
                         epochs: int | None = None) -> list[str]:
        """The overrides of one run: common ones, the method's stages and overrides, then the
        settings it inherits (``sweep_from``) and its own sweep setting. ``epochs``: a shorter (or
        longer) schedule of the same shape (:func:`shorten_stages`)."""
        spec = self.methods[method]
        own = list(spec.sweep[setting]) if spec.sweep is not None and setting else []
        schedule = spec.stages if epochs is None or spec.stages is None else shorten_stages(spec.stages, epochs)
        stages = [] if schedule is None else \
            ["train.stages=" + yaml.safe_dump(schedule, default_flow_style=True, width=10 ** 6).strip()]
        num_stages = len(spec.stages) if spec.stages is not None else len(load_config(self.base()).train.stages)
        return [*self.common_overrides(), *stages,
                *expand_stages([*spec.overrides, *inherited, *own], num_stages)]


class StudySpec(MethodTable):
    """A study run by ``facepipe study``: one shared pre-training, then every method fine-tuned
    from it for ``finetune.epochs`` epochs, with the readouts of :mod:`facepipe.study.readouts`."""

    root: str
    results: str
    readme_section: str | None = None
    data: StudyData
    readouts: StudyReadouts = StudyReadouts()
    pretrain: StudyPretrain = StudyPretrain()
    finetune: StudyFinetune

    @model_validator(mode="after")
    def _consistent(self) -> "StudySpec":
        for key, method in self.methods.items():
            if method.stages is None:
                raise ValueError(f"method {key}: give its stages (a study's methods say their whole fine-tuning)")
        if self.epochs is not None and self.epochs != self.finetune.epochs:
            raise ValueError("give the epochs of a study as finetune.epochs only")
        for key in self.readouts.compare_to:
            if key not in self.methods:
                raise ValueError(f"readouts.compare_to: {key!r} is not a method of the study")
        if not set(self.pretrain.seeds) >= {0}:
            raise ValueError("pretrain.seeds must include 0")
        return self

    def method_epochs(self) -> tuple[int | None, str]:
        return self.finetune.epochs, "finetune.epochs"

    def common_overrides(self) -> list[str]:
        return list(self.finetune.overrides)

    # ------------------------------------------------------------------ runs
    @property
    def root_path(self) -> Path:
        return Path(self.root)

    def pretrain_dir(self, seed: int) -> Path:
        return self.root_path / PRETRAIN / f"seed{seed}"

    def pretrain_seed(self, seed: int) -> int:
        """The pre-training a fine-tuning of ``seed`` starts from: its own when there is one, else seed 0's."""
        return seed if seed in self.pretrain.seeds else 0

    def runs(self, method: str) -> list["StudyRun"]:
        """Every run of ``method``: each sweep setting on seed 0, then the other seeds (their setting
        is the chosen one, known only once the sweep has finished: ``setting=None``)."""
        spec = self.methods[method]
        if spec.sweep is None:
            return [StudyRun(method, "", seed) for seed in spec.seeds]
        return [StudyRun(method, name, 0) for name in spec.sweep] + \
            [StudyRun(method, None, seed) for seed in spec.seeds if seed != 0]

    def run_dir(self, run: "StudyRun") -> Path:
        if run.setting is None:
            raise ValueError(f"{run.method} seed {run.seed}: the setting is not chosen yet")
        base = self.root_path / "runs" / run.method
        return (base / slug(run.setting) if run.setting else base) / f"seed{run.seed}"

    def pretrain_config(self, seed: int) -> Config:
        return load_config(self.base(), [f"seed={seed}", f"output_dir={self.pretrain_dir(seed)}",
                                         f"data.root={self.data.train}", *self.pretrain.overrides])

    def run_config(self, run: "StudyRun", inherited: list[str] = ()) -> Config:
        init = self.pretrain_dir(self.pretrain_seed(run.seed)) / "init.pt"  # written by the runner
        return load_config(self.base(), [
            f"seed={run.seed}", f"output_dir={self.run_dir(run)}", f"data.root={self.data.train}",
            f"train.init_from={init}", *self.pretrain.overrides,
            *self.method_overrides(run.method, run.setting or "", inherited)])


@dataclass(frozen=True)
class StudyRun:
    method: str
    setting: str | None  # "" without a sweep; None while the sweep's choice is pending
    seed: int

    def label(self) -> str:
        setting = f" [{self.setting}]" if self.setting else ""
        return f"{self.method}{setting} seed {self.seed}"


def expand_stages(overrides: list[str], num_stages: int) -> list[str]:
    """``train.stages.*.KEY=V`` -> one override per stage (a sweep setting of a method applies to
    every stage of the method that inherits it, e.g. UMM's m_max to UMM + SUM's two stages)."""
    out = []
    for override in overrides:
        if override.startswith("train.stages.*."):
            out += [override.replace("train.stages.*.", f"train.stages.{i}.", 1) for i in range(num_stages)]
        else:
            out.append(override)
    return out


def shorten_stages(stages: list[dict[str, Any]], epochs: int) -> list[dict[str, Any]]:
    """``stages`` rescaled to ``epochs`` in all, keeping their proportions: every stage but the
    last gets round(its epochs x scale) (at least 1), the last the rest; a DRW start epoch is
    scaled and rounded down (e.g. a quick mechanism check of a 10-epoch method in 4 epochs:
    UMM 5 + SUM 5 -> 2 + 2, DRW from epoch 6 -> from epoch 2)."""
    total = sum(int(stage.get("epochs", 0)) for stage in stages)
    if epochs < len(stages):
        raise ValueError(f"{epochs} epochs cannot hold {len(stages)} stages")
    scale = epochs / total
    out = [dict(stage) for stage in stages]
    for stage in out[:-1]:
        stage["epochs"] = max(1, round(int(stage["epochs"]) * scale))
    out[-1]["epochs"] = epochs - sum(stage["epochs"] for stage in out[:-1])
    if out[-1]["epochs"] < 1:
        raise ValueError(f"{epochs} epochs leave the last of the stages none")
    for stage in out:
        if isinstance(stage.get("drw"), dict) and "start_epoch" in stage["drw"]:
            stage["drw"] = {**stage["drw"], "start_epoch": int(stage["drw"]["start_epoch"] * scale)}
    return out


def slug(text: str) -> str:
    """A folder name for a sweep setting: ``l 5, a1 0.3`` -> ``l-5_a1-0.3``."""
    text = re.sub(r"\s*,\s*", "_", text.strip())
    text = re.sub(r"[^A-Za-z0-9._]+", "-", text)
    return text.strip("-_") or "default"


def _read_table(path: str | Path, model: type[MethodTable], what: str) -> MethodTable:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping of keys")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<spec>'}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"{what} {path}: {problems}") from None


def _validate_runs(table: MethodTable, path: str | Path, config_of) -> None:
    """Build every method's config (each sweep setting and inherited setting, seed 0), so that a
    typo fails before hours of training rather than in the middle of them."""
    for key, method in table.methods.items():
        inherited_options = [[]]
        if method.sweep_from is not None:
            inherited_options = list(table.methods[method.sweep_from].sweep.values())
        for inherited in inherited_options:
            for setting in (method.sweep or {"": []}):
                try:
                    config_of(key, setting, inherited)
                except ConfigError as error:
                    raise ConfigError(f"{path}, method {key}"
                                      f"{f' setting {setting!r}' if setting else ''}: {error}") from None


def load_method_table(path: str | Path) -> MethodTable:
    """Read and check a method table (``configs/studies/lfw_first.yaml``, ``mnist_li.yaml``): every
    method's overrides are applied to the base config and validated."""
    table = _read_table(path, MethodTable, "method table")
    _validate_runs(table, path, lambda key, setting, inherited: load_config(
        table.base(), table.method_overrides(key, setting, inherited)))
    return table


def load_study_spec(path: str | Path) -> StudySpec:
    """Read and check a study spec; every method's config (each sweep setting, seed 0) is validated
    here, so a typo fails before hours of training rather than in the middle of them."""
    spec = _read_table(path, StudySpec, "study spec")
    spec.pretrain_config(0)
    _validate_runs(spec, f"study spec {path}", lambda key, setting, inherited: spec.run_config(
        StudyRun(key, setting, 0), inherited))
    return spec
