"""Run a study: the shared pre-training, then every method and seed, resumable at any point.

Order: the pre-training(s); then seed 0 of every method (every sweep setting), then seed 1 of
every method, then seed 2, so that an interrupted study has the broadest table first. A run
whose sweep (or whose ``sweep_from`` method's sweep) has not finished yet is deferred to a later
pass; the chosen setting is the one whose seed-0 run reached the highest validation accuracy
(the epoch its ``best.pt`` keeps; ties: the setting listed first).

Each run: claimed with an advisory lock (several processes may share one study, e.g. two
one-thread processes on a 2-core CPU; a crashed process never keeps its claim); trained, or
resumed from its ``latest.pt`` after a config check (keys that do not change the result, such as
the number of loader workers, may differ); then its readouts from ``best.pt``
(:mod:`facepipe.study.readouts`) and its mechanism summary (:mod:`facepipe.study.mechanisms`);
then its small files are copied to the kept results (``<results>/runs/...``, in git) and, for
seed 0, its backbone in fp16 (``<results>/backbones/<method>.pt``, loadable by ``facepipe eval``,
``embed`` and ``index``). A run whose kept results exist counts as finished in a fresh checkout
(its files are restored into the study folder), so the study goes on where it stopped.

Sweeps are chosen on the validation people only, so the seed-0 run of each sweep setting is
trained and summarised (validation accuracy, mechanisms) but read out on the test sets only when
it is the chosen setting: once every setting has trained, the chosen one's readouts run (a
losing setting's test figures would be read by nobody, and cost a quarter of a run each).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from facepipe.config import Config, config_from_dict
from facepipe.errors import FacepipeUserError
from facepipe.runtime.io import write_json_atomic
from facepipe.study.spec import PRETRAIN, StudyRun, StudySpec, slug

log = logging.getLogger(__name__)

__all__ = ["StudyError", "StudyRunner", "KEPT_FILES"]

RESULT = "study_result.json"
TRAIN_DONE = "train_done.json"
# The shared pre-training's weights (model and head of its best.pt, fp32): every fine-tuning's
# train.init_from, kept in git so that fine-tunings in a fresh checkout start from the very same
# initialisation.
PRETRAIN_WEIGHTS = "init.pt"
# Small files of a run kept in git (no checkpoints): enough to rebuild every table.
KEPT_FILES = (RESULT, TRAIN_DONE, "readouts.json", "readouts.npz", "mechanisms.json", "metrics.jsonl",
              "config.yaml", "class_stats.json", "uncertainty.json")
# Config keys that may differ between the invocations of one run (they do not change the result).
VOLATILE_KEYS = ("data.num_workers", "train.device", "train.log_every_steps", "output_dir", "data.root",
                 "train.init_from", "embed.batch_size", "train.uncertainty.batch_size", "train.clusters.batch_size",
                 "train.checkpoint_every_steps")  # exact resume makes mid-epoch checkpoints change nothing


class StudyError(RuntimeError, FacepipeUserError):
    """A study that cannot go on as asked (a run started with other settings, missing weights)."""


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def config_differences(a: dict, b: dict) -> list[str]:
    """Keys whose values differ between two config dicts, volatile keys left out."""
    fa, fb = _flatten(a), _flatten(b)
    return sorted(k for k in set(fa) | set(fb)
                  if fa.get(k) != fb.get(k) and not any(k == v or k.startswith(v + ".") for v in VOLATILE_KEYS))


@contextlib.contextmanager
def claim_lock(path: Path, wait: bool = False) -> Iterator[bool]:
    """Hold the advisory lock file ``path`` while the block runs; yields False (without waiting)
    when another process holds it, unless ``wait``. flock is released by the kernel when the
    process dies, so a crashed run never stays claimed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resumable(run_dir: Path, config: Config, label: str) -> bool:
    """Whether ``run_dir`` holds a started run to resume; refused (StudyError naming the keys)
    when it was started with a config that differs beyond the volatile keys."""
    if not (run_dir / "latest.pt").is_file():
        return False
    if (run_dir / "config.yaml").is_file():
        import yaml

        previous = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        changed = config_differences(previous, config.to_dict())
        if changed:
            raise StudyError(f"{label}: {run_dir} was started with another config (differs in {changed}); "
                             "give the same settings to resume it, or delete the folder")
    return True


def _last_activity(run_dir: Path) -> float | None:
    """Wall-clock time of the last thing a run wrote (its log or its latest checkpoint)."""
    times = [path.stat().st_mtime for path in (run_dir / "metrics.jsonl", run_dir / "latest.pt") if path.is_file()]
    return max(times) if times else None


def train_timed(config: Config, label: str) -> tuple[dict, dict]:
    """Train ``config`` into its output_dir, resuming a started run (:func:`resumable`); every
    invocation's wall time is added to ``study_timing.json`` there. Returns the final epoch's
    metrics and ``{"train_seconds", "invocations", "epochs"}`` over every invocation.

    An invocation is written down as open when it starts; one that never closed (the process was
    stopped) is closed by the next at the time of the run's last log line or checkpoint, so an
    interrupted run's budget counts the time it trained before it stopped (the steps after its
    last checkpoint, done again on resume, count twice: that is time the machine spent)."""
    from facepipe.train import Trainer

    run_dir = Path(config.output_dir)
    resume = resumable(run_dir, config, label)
    timing_file = run_dir / "study_timing.json"
    timing = _read_json(timing_file) if timing_file.is_file() else {"invocations": []}
    for invocation in timing["invocations"]:
        if invocation.get("open"):
            end = _last_activity(run_dir)
            invocation.update(open=False, interrupted=True,
                              seconds=max(0.0, (end or invocation["started"]) - invocation["started"]))
    log.info("%s: %s training (%d epochs%s) in %s", label, "resuming" if resume else "starting",
             config.train.total_epochs, f", from {config.train.init_from}" if config.train.init_from else "", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    current = {"started": time.time(), "open": True, "resumed": resume}
    timing["invocations"].append(current)
    write_json_atomic(timing_file, timing)
    started = time.perf_counter()
    metrics = Trainer(config, resume=resume, progress=False).fit()
    current.update(open=False, seconds=time.perf_counter() - started, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_json_atomic(timing_file, timing)
    return metrics, {"train_seconds": sum(t["seconds"] for t in timing["invocations"]),
                     "invocations": len(timing["invocations"]), "epochs": config.train.total_epochs}


def best_validation(run_dir: Path) -> tuple[float | None, int | None]:
    """(best val_accuracy, its epoch) from a run's metrics.jsonl."""
    best, epoch = None, None
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None, None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        value = record.get("val_accuracy")
        if record.get("event") == "epoch" and isinstance(value, (int, float)) and (best is None or value > best):
            best, epoch = float(value), record.get("epoch")
    return best, epoch


class StudyRunner:
    def __init__(self, spec: StudySpec, methods: list[str] | None = None, seeds: list[int] | None = None,
                 extra_overrides: list[str] = (), device: str = "auto") -> None:
        unknown = sorted(set(methods or ()) - set(spec.methods))
        if unknown:
            raise StudyError(f"unknown method(s) {unknown}; the study has {sorted(spec.methods)}")
        self.spec = spec
        self.methods = methods or list(spec.methods)
        self.seeds = seeds
        self.extra = list(extra_overrides)
        self.device = device
        self.root = spec.root_path
        self.results = Path(spec.results)
        self._sets = None

    # ------------------------------------------------------------------ paths
    def kept_dir(self, run: StudyRun) -> Path:
        base = self.results / "runs" / run.method
        return (base / slug(run.setting) if run.setting else base) / f"seed{run.seed}"

    def kept_pretrain_dir(self, seed: int) -> Path:
        return self.results / "runs" / PRETRAIN / f"seed{seed}"

    def backbone_path(self, method: str) -> Path:
        return self.results / "backbones" / f"{method}.pt"

    def claim(self, name: str, wait: bool = False):
        """The advisory lock of ``name`` under ``<root>/locks`` (:func:`claim_lock`)."""
        return claim_lock(self.root / "locks" / f"{slug(name)}.lock", wait)

    # ------------------------------------------------------------------ choices
    def chosen_setting(self, method: str) -> str | None:
        """The sweep setting with the best validation accuracy on seed 0; None until every setting
        has finished."""
        spec = self.spec.methods[method]
        if spec.sweep is None:
            return ""
        scores = []
        for setting in spec.sweep:
            result = self.finished(StudyRun(method, setting, 0))
            if result is None:
                return None
            scores.append((result["validation_best"], setting))
        best = max(score for score, _ in scores)
        return next(setting for score, setting in scores if score == best)

    def resolve(self, run: StudyRun) -> tuple[StudyRun, list[str], str | None] | None:
        """The run with its setting and inherited overrides fixed; None while a choice is pending."""
        method = self.spec.methods[run.method]
        inherited: list[str] = []
        inherited_setting = None
        if method.sweep_from is not None:
            inherited_setting = self.chosen_setting(method.sweep_from)
            if inherited_setting is None:
                return None
            inherited = list(self.spec.methods[method.sweep_from].sweep[inherited_setting])
        if run.setting is None:
            setting = self.chosen_setting(run.method)
            if setting is None:
                return None
            run = StudyRun(run.method, setting, run.seed)
        return run, inherited, inherited_setting

    def run_config(self, run: StudyRun, inherited: list[str]) -> Config:
        config = self.spec.run_config(run, inherited)
        if self.extra:
            config = config_from_dict(config.to_dict(), self.extra)
        return config

    # ------------------------------------------------------------------ state
    def finished(self, run: StudyRun) -> dict | None:
        """The run's result record when it has finished (here, or in the kept results: restored)."""
        run_dir = self.spec.run_dir(run)
        if not (run_dir / RESULT).is_file() and (self.kept_dir(run) / RESULT).is_file():
            self._restore(self.kept_dir(run), run_dir)
        return _read_json(run_dir / RESULT) if (run_dir / RESULT).is_file() else None

    def _restore(self, kept: Path, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in KEPT_FILES:
            if (kept / name).is_file() and not (run_dir / name).is_file():
                shutil.copy2(kept / name, run_dir / name)
        log.info("%s: finished in an earlier session; restored from %s", run_dir, kept)

    def _keep(self, run_dir: Path, kept: Path) -> None:
        kept.mkdir(parents=True, exist_ok=True)
        for name in KEPT_FILES:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, kept / name)

    # ------------------------------------------------------------------ steps
    def _train(self, config: Config, label: str) -> dict:
        run_dir = Path(config.output_dir)
        done = run_dir / TRAIN_DONE
        if done.is_file():
            return _read_json(done)
        _, timing = train_timed(config, label)
        best, epoch = best_validation(run_dir)
        record = {**timing, "validation_best": best, "best_epoch": epoch}
        write_json_atomic(done, record)
        log.info("%s: trained in %.1f min; best val_accuracy %.4f at epoch %s", label, record["train_seconds"] / 60,
                 best if best is not None else float("nan"), epoch)
        return record

    def sets(self):
        if self._sets is None:
            from facepipe.study.readouts import StudySets

            self._sets = StudySets(self.spec)
        return self._sets

    def _finish(self, run_dir: Path, config: Config, record: dict, label: str, keep_backbone: Path | None,
                kept: Path, read_out: bool = True) -> dict:
        """The run's mechanism summary and result record, then (``read_out``) its readouts."""
        from facepipe.study.mechanisms import mechanism_summary

        checkpoint = run_dir / "best.pt"
        if not checkpoint.is_file():
            raise StudyError(f"{label}: no best.pt in {run_dir}: the study's base config must set train.validation")
        write_json_atomic(run_dir / "mechanisms.json", mechanism_summary(run_dir))
        result = {**record, "label": label, "run_dir": str(run_dir), "checkpoint": str(checkpoint),
                  "config": config.to_dict(), "readout_seconds": None, "readouts": "pending",
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_json_atomic(run_dir / RESULT, result)
        if not read_out:
            self._keep(run_dir, kept)
            log.info("%s: trained; validation %.2f %%; test readouts only if the sweep chooses it", label,
                     100 * (record.get("validation_best") or float("nan")))
            return result
        return self._read_out(run_dir, label, keep_backbone, kept)

    def _read_out(self, run_dir: Path, label: str, keep_backbone: Path | None, kept: Path) -> dict:
        """Readouts of a trained run from its ``best.pt`` (:mod:`facepipe.study.readouts`), into its
        result record; then its files are kept (and ``keep_backbone``: its fp16 backbone)."""
        from facepipe.study.readouts import compute_readouts

        checkpoint = run_dir / "best.pt"
        if not checkpoint.is_file():
            raise StudyError(f"{label}: its readouts are still to do, but its weights {checkpoint} are not here "
                             "(trained in another checkout: run the study there, or copy the run folder over)")
        readouts = compute_readouts(self.spec, run_dir, checkpoint, self.sets(), device=self.device)
        if keep_backbone is not None:
            keep_fp16_backbone(checkpoint, keep_backbone)
        result = {**_read_json(run_dir / RESULT), "readout_seconds": readouts["seconds"], "readouts": "done"}
        write_json_atomic(run_dir / RESULT, result)
        self._keep(run_dir, kept)
        dev = readouts.get("devtest", {})
        log.info("%s: done; validation %.2f %%, DevTest 10-fold %.2f %%, readouts %.1f min", label,
                 100 * readouts["validation"]["accuracy"], 100 * dev.get("cv10_accuracy", float("nan")),
                 readouts["seconds"] / 60)
        return result

    def read_out_chosen(self, method: str) -> None:
        """Once a method's sweep has trained every setting: the chosen setting's readouts (and kept
        backbone), if they are still to do."""
        if self.spec.methods[method].sweep is None:
            return
        setting = self.chosen_setting(method)
        if setting is None:
            return
        run = StudyRun(method, setting, 0)
        run_dir = self.spec.run_dir(run)
        if self.finished(run).get("readouts", "done") == "done":
            return
        with self.claim(f"{method}-{setting}-0-readouts") as mine:
            if mine and _read_json(run_dir / RESULT).get("readouts", "done") != "done":
                log.info("%s: the sweep chose %r; its readouts", run.label(), setting)
                self._read_out(run_dir, run.label(), self.backbone_path(method), self.kept_dir(run))

    def pretrain(self, seed: int, need_weights: bool = True) -> dict:
        """Train (or find) pre-training ``seed``. ``need_weights``: a fine-tuning is about to start
        from it, so its weights must be here (not only its kept results)."""
        run_dir = self.spec.pretrain_dir(seed)
        label = f"pretrain seed {seed}"
        kept = self.kept_pretrain_dir(seed)
        if not (run_dir / RESULT).is_file() and (kept / RESULT).is_file():
            self._restore(kept, run_dir)
        if (run_dir / RESULT).is_file():
            if not (run_dir / PRETRAIN_WEIGHTS).is_file() and (kept / PRETRAIN_WEIGHTS).is_file():
                shutil.copy2(kept / PRETRAIN_WEIGHTS, run_dir / PRETRAIN_WEIGHTS)
                log.info("%s: weights restored from %s", label, kept / PRETRAIN_WEIGHTS)
            if need_weights and not (run_dir / PRETRAIN_WEIGHTS).is_file():
                raise StudyError(f"{label}: finished in another checkout, but its weights {run_dir / PRETRAIN_WEIGHTS} "
                                 f"are not here nor in {kept}; the fine-tunings start from them (copy them over)")
            return _read_json(run_dir / RESULT)
        with self.claim(f"{PRETRAIN}-{seed}", wait=True):
            if (run_dir / RESULT).is_file():
                return _read_json(run_dir / RESULT)
            config = self.spec.pretrain_config(seed)
            if self.extra:
                config = config_from_dict(config.to_dict(), self.extra)
            record = self._train(config, label)
            # The fine-tunings start from the epoch the validation people chose (best.pt).
            keep_init_weights(run_dir / "best.pt", run_dir / PRETRAIN_WEIGHTS)
            result = self._finish(run_dir, config, record, label, None, kept)
            shutil.copy2(run_dir / PRETRAIN_WEIGHTS, kept / PRETRAIN_WEIGHTS)
            return result

    def run(self, run: StudyRun) -> dict | None:
        """Train and read out one run; its record, or None when deferred or claimed elsewhere."""
        resolved = self.resolve(run)
        if resolved is None:
            log.info("%s: waiting for a sweep to finish; deferred", run.label())
            return None
        run, inherited, inherited_setting = resolved
        done = self.finished(run)
        if done is not None:
            return done
        label = run.label()
        with self.claim(f"{run.method}-{run.setting}-{run.seed}") as mine:
            if not mine:
                log.info("%s: claimed by another process; skipped", label)
                return None
            if self.finished(run) is not None:
                return self.finished(run)
            self.pretrain(self.spec.pretrain_seed(run.seed))
            config = self.run_config(run, inherited)
            record = self._train(config, label)
            record.update({"method": run.method, "setting": run.setting, "seed": run.seed,
                           "inherited_setting": inherited_setting})
            if self.spec.methods[run.method].sweep is not None and run.seed == 0:
                result = self._finish(Path(config.output_dir), config, record, label, None, self.kept_dir(run),
                                      read_out=False)
                self.read_out_chosen(run.method)
                return self.finished(run) or result
            keep = self.backbone_path(run.method) if run.seed == 0 else None
            return self._finish(Path(config.output_dir), config, record, label, keep, self.kept_dir(run))

    def plan(self) -> list[StudyRun]:
        """Every run of the selected methods and seeds, in the study's order (module docstring)."""
        runs = [r for m in self.methods for r in self.spec.runs(m)]
        if self.seeds is not None:
            runs = [r for r in runs if r.seed in self.seeds]
        return sorted(runs, key=lambda r: r.seed)  # stable: method order within a seed

    def record_data(self) -> None:
        """The training pool's record into ``<results>/data/`` (kept in git, for the report):
        identities and images per identity, the merge record, and the alignment outcome counts
        of the sources (fallbacks included)."""
        from facepipe.align.manifest import alignment_statuses
        from facepipe.embed.extract import list_images

        folder = self.results / "data"
        if (folder / "train_counts.json").is_file():
            return
        counts: dict[str, int] = {}
        for _, identity in list_images(self.spec.data.train):
            counts[identity] = counts.get(identity, 0) + 1
        merge = Path(self.spec.data.train) / "merge.json"
        record: dict[str, Any] = {"merge": _read_json(merge) if merge.is_file() else None, "alignment": {}}
        for source in self.spec.data.alignment_records:
            statuses = alignment_statuses(source)
            tally: dict[str, int] = {}
            for status in statuses.values():
                tally[status] = tally.get(status, 0) + 1
            record["alignment"][source] = tally
        write_json_atomic(folder / "pool.json", record)
        write_json_atomic(folder / "train_counts.json", dict(sorted(counts.items())))

    def run_all(self) -> dict[str, int]:
        """Every planned run, in passes until nothing more can start; counts of what happened."""
        self.record_data()
        for seed in self.spec.pretrain.seeds:
            self.pretrain(seed, need_weights=False)  # a run that trains checks for the weights
        pending = self.plan()
        counts = {"finished": 0, "deferred": 0, "claimed_elsewhere": 0}
        while pending:
            progress = False
            still = []
            for run in pending:
                if self.resolve(run) is None:
                    still.append(run)
                    continue
                result = self.run(run)
                if result is None:
                    counts["claimed_elsewhere"] += 1
                else:
                    counts["finished"] += 1
                    progress = True
            if not progress:
                counts["deferred"] = len(still)
                break
            pending = still
        # A sweep whose choice came in an earlier session, or a process stopped between the last
        # setting's training and the chosen one's readouts: read it out now.
        for method in self.methods:
            self.read_out_chosen(method)
        return counts

    def status_lines(self) -> list[str]:
        """One line per run: finished (with its validation and DevTest figures), running or pending."""
        lines = []
        for seed in self.spec.pretrain.seeds:
            done = (self.spec.pretrain_dir(seed) / RESULT).is_file() or (self.kept_pretrain_dir(seed) / RESULT).is_file()
            lines.append(f"pretrain seed {seed}: {'finished' if done else 'pending'}")
        for run in self.plan():
            resolved = self.resolve(run)
            if resolved is None:
                lines.append(f"{run.label()}: waiting for a sweep")
                continue
            run = resolved[0]
            result = self.finished(run)
            if result is None:
                state = "started" if (self.spec.run_dir(run) / "latest.pt").is_file() else "pending"
                lines.append(f"{run.label()}: {state}")
                continue
            readouts = self.spec.run_dir(run) / "readouts.json"
            extra = ""
            if readouts.is_file():
                record = _read_json(readouts)
                extra = f", DevTest 10-fold {100 * record.get('devtest', {}).get('cv10_accuracy', float('nan')):.2f} %"
            lines.append(f"{run.label()}: finished (validation {100 * (result.get('validation_best') or float('nan')):.2f} %"
                         f"{extra}, train {result['train_seconds'] / 60:.1f} min)")
        return lines


def keep_init_weights(checkpoint: Path, target: Path) -> None:
    """Model and head of ``checkpoint`` (no optimizer state): what ``train.init_from`` reads."""
    from facepipe.runtime.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(checkpoint)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(target, {key: state[key] for key in ("model", "head", "head_stage", "config", "identities",
                                                         "epoch", "step") if key in state})


def keep_fp16_backbone(checkpoint: Path, target: Path) -> None:
    """The backbone of ``checkpoint`` in fp16 with its config and identities: a checkpoint that
    ``facepipe embed``, ``eval`` and ``index`` load (weights go back to fp32 on loading)."""
    import torch

    from facepipe.runtime.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(checkpoint)
    small = {"model": {k: (v.half() if torch.is_tensor(v) and v.is_floating_point() else v)
                       for k, v in state["model"].items()},
             "config": state["config"], "identities": state["identities"], "epoch": state.get("epoch"),
             "step": state.get("step"),  # load_checkpoint requires it (REQUIRED_KEYS)
             "precision": "fp16 weights (kept study backbone; loaded as fp32)"}
    target.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(target, small)
