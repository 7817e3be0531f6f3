import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from facepipe.data.dataset import DatasetError
from facepipe.runtime.checkpoint import load_checkpoint
from facepipe.train import Trainer, TrainingError
from facepipe.train import trainer as trainer_module


def weights(trainer):
    return {**{f"model.{k}": v for k, v in trainer.model.state_dict().items()},
            **{f"head.{k}": v for k, v in trainer.head.state_dict().items()}}


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def test_two_stage_run_writes_checkpoints_logs_and_switches_head(tiny_dataset, tmp_path):
    trainer = Trainer(tiny_config(tiny_dataset, tmp_path / "run"), progress=False)
    classifier = trainer.head.weight
    metrics = trainer.fit()
    assert trainer.head.__class__.__name__ == "CosFaceHead"
    assert trainer.head.weight is classifier  # the classifier carried over the stage switch
    assert metrics["epoch"] == 2 and metrics["head"] == "cosface"
    for name in ("latest.pt", "config.yaml", "class_stats.json", "metrics.jsonl"):
        assert (tmp_path / "run" / name).is_file(), name
    assert not (tmp_path / "run" / "best.pt").exists()  # no validation set: no best (issue 26)
    state = load_checkpoint(tmp_path / "run" / "latest.pt")
    for key in ("model", "head", "optimizer", "scheduler", "scaler", "rng", "config", "identities"):
        assert key in state
    assert state["epoch"] == 2 and state["step"] == 2 * trainer.steps_per_epoch and state["head_stage"] == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = [r["event"] for r in records]
    assert events.count("epoch") == 2 and "stage" in events and events.count("train") >= 2


def test_resume_is_exact_and_independent_of_worker_count(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, tmp_path / "straight", model={"dropout": 0.2})
    straight = Trainer(config, progress=False)
    straight.fit()

    split_config = tiny_config(tiny_dataset, tmp_path / "split", model={"dropout": 0.2},
                               data={"num_workers": 2})
    Trainer(split_config, progress=False).fit(max_epochs=1)
    resumed = Trainer(split_config, resume=True, progress=False)
    assert resumed.epoch == 1
    resumed.fit()
    assert_identical(weights(straight), weights(resumed))
    assert resumed.optimizer.state_dict()["state"].keys() == straight.optimizer.state_dict()["state"].keys()


def test_crash_mid_epoch_resumes_from_step_checkpoint_exactly(tiny_dataset, tmp_path, monkeypatch):
    straight = Trainer(tiny_config(tiny_dataset, tmp_path / "a", model={"dropout": 0.2}), progress=False)
    straight.fit()

    config = tiny_config(tiny_dataset, tmp_path / "b", model={"dropout": 0.2},
                         train={"checkpoint_every_steps": 2})
    crashing = Trainer(config, progress=False)
    original = Trainer._train_step
    calls = {"n": 0}

    def crash_on_fourth_step(self, *batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, *batch)

    monkeypatch.setattr(Trainer, "_train_step", crash_on_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    monkeypatch.setattr(Trainer, "_train_step", original)
    assert load_checkpoint(tmp_path / "b" / "latest.pt")["step"] == 2
    resumed = Trainer(config, resume=True, progress=False)
    assert (resumed.epoch, resumed.step_in_epoch) == (0, 2)
    resumed.fit()
    assert_identical(weights(straight), weights(resumed))


def test_training_survives_a_corrupt_image(tiny_dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    victims = {str(sorted(folder.glob("*.png"))[0]) for folder in root.iterdir() if folder.is_dir()}
    for victim in victims:
        Path(victim).write_bytes(b"corrupt")
    trainer = Trainer(tiny_config(root, tmp_path / "run", train={"stages": [{"epochs": 1, "head": {"type": "softmax"}}]}),
                      progress=False)
    metrics = trainer.fit()
    assert metrics["epoch"] == 1
    # num_workers=0: the main process saw every bad file it drew (most, not all: drop_last).
    assert trainer.dataset.bad_files and trainer.dataset.bad_files <= victims


def test_resume_refuses_a_different_identity_list(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, tmp_path / "run")
    Trainer(config, progress=False).fit(max_epochs=1)
    other = tmp_path / "other"
    shutil.copytree(tiny_dataset, other)
    shutil.rmtree(other / "id_00000")
    with pytest.raises(TrainingError, match="identities"):
        Trainer(tiny_config(other, tmp_path / "run"), resume=True, progress=False)


def test_dataset_smaller_than_a_batch_and_missing_root(tiny_dataset, tmp_path):
    with pytest.raises(DatasetError, match="batch"):
        Trainer(tiny_config(tiny_dataset, tmp_path / "r", data={"batch_size": 100000}), progress=False)
    with pytest.raises(DatasetError, match="does not exist"):
        Trainer(tiny_config(tmp_path / "absent", tmp_path / "r"), progress=False)


def test_persistent_non_finite_loss_stops_with_a_clear_error(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "MAX_CONSECUTIVE_NONFINITE", 3)
    trainer = Trainer(tiny_config(tiny_dataset, tmp_path / "run"), progress=False)
    monkeypatch.setattr(trainer.head, "forward", lambda emb, labels, margin_weight=None: torch.full((len(labels), 12), float("nan")))
    with pytest.raises(TrainingError, match="non-finite"):
        trainer.fit()
    assert trainer.nonfinite_steps == 3


# Softmax then CosFace (s 16): the CosFace losses are on another scale (about 6 against 2.5 here).
TWO_LOSS_SCALES = {"stages": [{"epochs": 1, "head": {"type": "softmax"}},
                              {"epochs": 2, "head": {"type": "cosface", "s": 16.0, "m": 0.2}}], "log_every_steps": 2}


def epoch_records(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == "epoch"]


def validation_pairs(tiny_dataset, path):
    from facepipe.data.dataset import IdentityFolderDataset
    from facepipe.eval.verification import make_pairs, write_pairs_csv

    dataset = IdentityFolderDataset(tiny_dataset)
    idx_a, idx_b, is_same = make_pairs(dataset.labels, 40, seed=1)
    rel = [Path(s.path).relative_to(tiny_dataset).as_posix() for s in dataset.samples]
    write_pairs_csv(path, [rel[i] for i in idx_a], [rel[i] for i in idx_b], is_same)
    return path


def test_without_validation_no_best_checkpoint_is_written_and_the_log_says_why(tiny_dataset, tmp_path, caplog):
    # Issue 26: best.pt by the lowest training loss across stages picked the softmax epoch of such
    # a run, whatever the later stages learned. Without validation there is no best: latest.pt only.
    config = tiny_config(tiny_dataset, tmp_path / "run", train=TWO_LOSS_SCALES)
    with caplog.at_level("INFO", logger="facepipe"):
        result = Trainer(config, progress=False).fit()
    run = tmp_path / "run"
    assert (run / "latest.pt").is_file() and not (run / "best.pt").exists()
    said = [r.getMessage() for r in caplog.records if "no validation set" in r.getMessage()]
    assert len(said) == 1 and "only latest.pt is written" in said[0] and "no best.pt" in said[0]
    assert not any("new best.pt" in r.getMessage() for r in caplog.records)
    records = epoch_records(run)
    losses = [r["loss"] for r in records]
    assert losses[0] < min(losses[1:])  # the old rule would have kept the softmax epoch
    assert [r["best"] for r in records] == [False] * 3
    assert {r["best_reason"] for r in records} == {"no validation set: only latest.pt is written"}
    state = load_checkpoint(run / "latest.pt")
    assert state["best_metric"] == float("-inf") and state["best_epoch"] is None and state["best_metric_name"] is None
    # fit() still returns the last epoch's metrics, plus the run's summary.
    assert result["epoch"] == 3 and result["loss"] == losses[-1] and result["best"] is False
    summary = result["run"]
    assert (summary["stages"], summary["epochs"], summary["steps"]) == (2, 3, state["step"])
    assert summary["best"] is False and summary["best_epoch"] is None and summary["checkpoints"] == ["latest.pt"]
    assert summary["final_loss"] == losses[-1] and summary["resumed"] is False

    # A resumed run behaves the same: still no best.pt, the same records.
    split = tiny_config(tiny_dataset, tmp_path / "split", train=TWO_LOSS_SCALES)
    Trainer(split, progress=False).fit(max_epochs=2)
    resumed = Trainer(split, resume=True, progress=False)
    assert resumed.best_metric == float("-inf") and resumed.best_epoch is None
    summary = resumed.fit()["run"]
    assert not (tmp_path / "split" / "best.pt").exists()
    assert [(r["best"], r["best_reason"]) for r in epoch_records(tmp_path / "split")] == \
        [(r["best"], r["best_reason"]) for r in records]
    assert summary["resumed"] is True and (summary["session_start_epoch"], summary["session_epochs"]) == (2, 1)
    assert summary["steps"] == state["step"] and summary["session_steps"] == state["step"] // 3


def test_validation_pairs_drive_best_checkpoint_selection(tiny_dataset, tmp_path, caplog):
    pairs = validation_pairs(tiny_dataset, tmp_path / "val.csv")
    train = {**TWO_LOSS_SCALES, "validation": {"pairs": str(pairs), "root": str(tiny_dataset)}}
    config = tiny_config(tiny_dataset, tmp_path / "run", train=train)
    trainer = Trainer(config, progress=False)
    with caplog.at_level("INFO", logger="facepipe"):
        result = trainer.fit()
    epochs = epoch_records(tmp_path / "run")
    accuracies = [r["val_accuracy"] for r in epochs]
    assert len(accuracies) == 3 and all(0.5 <= a <= 1.0 for a in accuracies)  # best threshold >= majority
    best_epoch = 1 + accuracies.index(max(accuracies))  # the first epoch reaching the maximum
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["best_metric"] == max(accuracies)
    assert best["metrics"]["val_accuracy"] == max(accuracies)
    assert best["epoch"] == best_epoch == best["best_epoch"] == trainer.best_epoch
    assert best["best_metric_name"] == "val_accuracy"
    latest = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert (latest["best_metric"], latest["best_epoch"]) == (max(accuracies), best_epoch)
    # Each epoch's record says whether it became best.pt and why; the log names each new best.
    running = [max(accuracies[:i + 1]) for i in range(3)]
    improved = [i == 0 or a > running[i - 1] for i, a in enumerate(accuracies)]
    assert [r["best"] for r in epochs] == improved
    assert [r["best_epoch"] for r in epochs] == [1 + accuracies.index(m) for m in running]
    assert epochs[0]["best_reason"] == f"val_accuracy {accuracies[0]:.6g}, the first validated epoch"
    for i, record in enumerate(epochs[1:], start=1):
        sign = ">" if improved[i] else "<="
        assert record["best_reason"] == (f"val_accuracy {accuracies[i]:.6g} {sign} previous best {running[i - 1]:.6g} "
                                         f"(epoch {1 + accuracies.index(running[i - 1])})")
    announced = [r.getMessage() for r in caplog.records if "is the new best.pt" in r.getMessage()]
    assert announced == [f"epoch {i + 1} is the new best.pt: {epochs[i]['best_reason']}"
                         for i in range(3) if improved[i]]
    assert not any("no validation set" in r.getMessage() for r in caplog.records)
    summary = result["run"]
    assert summary["best"] is True and (summary["best_epoch"], summary["best_metric"]) == (best_epoch, max(accuracies))
    assert summary["validation_metric"] == "val_accuracy" and summary["checkpoints"] == ["latest.pt", "best.pt"]

    # Interrupted after epoch 1 and resumed: the same selection, the same records.
    split = tiny_config(tiny_dataset, tmp_path / "split", train=train)
    Trainer(split, progress=False).fit(max_epochs=1)
    assert load_checkpoint(tmp_path / "split" / "best.pt")["epoch"] == 1
    # Resumed without validation (a copy): no best any more; best.pt is left, not updated, and
    # the log says so.
    shutil.copytree(tmp_path / "split", tmp_path / "unvalidated")
    without = Trainer(tiny_config(tiny_dataset, tmp_path / "unvalidated", train=TWO_LOSS_SCALES), resume=True,
                      progress=False)
    assert (without.best_metric, without.best_epoch) == (float("-inf"), None)
    caplog.clear()
    with caplog.at_level("INFO", logger="facepipe"):
        without.fit()
    assert any("best.pt is left from before" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert load_checkpoint(tmp_path / "unvalidated" / "best.pt")["epoch"] == 1
    assert [r["best"] for r in epoch_records(tmp_path / "unvalidated")] == [True, False, False]
    resumed = Trainer(split, resume=True, progress=False)
    assert (resumed.best_metric, resumed.best_epoch) == (accuracies[0], 1)
    resumed.fit()
    assert [{k: r[k] for k in ("val_accuracy", "best", "best_epoch", "best_reason")}
            for r in epoch_records(tmp_path / "split")] == \
        [{k: r[k] for k in ("val_accuracy", "best", "best_epoch", "best_reason")} for r in epochs]
    assert load_checkpoint(tmp_path / "split" / "best.pt")["epoch"] == best_epoch
    assert (resumed.best_metric, resumed.best_epoch) == (max(accuracies), best_epoch)


def test_epochs_without_validation_are_never_best(tiny_dataset, tmp_path):
    # Validation every 2 epochs (and at the last): epoch 1 has no val_accuracy and is no
    # candidate, whatever its training loss (the old rule fell back to the loss there).
    pairs = validation_pairs(tiny_dataset, tmp_path / "val.csv")
    train = {**TWO_LOSS_SCALES, "validation": {"pairs": str(pairs), "root": str(tiny_dataset), "every_epochs": 2}}
    Trainer(tiny_config(tiny_dataset, tmp_path / "run", train=train), progress=False).fit()
    epochs = epoch_records(tmp_path / "run")
    assert ["val_accuracy" in r for r in epochs] == [False, True, True]
    assert epochs[0]["best"] is False and epochs[0]["best_epoch"] is None
    assert epochs[0]["best_reason"] == "not validated this epoch (validation every 2 epochs)"
    assert epochs[1]["best"] is True and epochs[1]["best_reason"].endswith("the first validated epoch")
    best_epoch = 2 if epochs[1]["val_accuracy"] >= epochs[2]["val_accuracy"] else 3
    assert load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == best_epoch == epochs[2]["best_epoch"]

    (tiny_dataset.parent / "gone.csv").write_text("path_a,path_b,is_same\nid_00000/0.png,nobody/1.png,0\n")
    broken = tiny_config(tiny_dataset, tmp_path / "run2",
                         train={"validation": {"pairs": str(tiny_dataset.parent / "gone.csv"), "root": str(tiny_dataset)}})
    with pytest.raises(DatasetError, match="nobody/1.png"):
        Trainer(broken, progress=False)


def test_init_from_starts_a_new_schedule_from_another_runs_weights(tiny_dataset, tmp_path):
    Trainer(tiny_config(tiny_dataset, tmp_path / "pre", train={"stages": [{"epochs": 1, "head": {"type": "softmax"}}]}),
            progress=False).fit()
    pre = load_checkpoint(tmp_path / "pre" / "latest.pt")
    config = tiny_config(tiny_dataset, tmp_path / "fine", train={
        "stages": [{"epochs": 1, "head": {"type": "arcface", "s": 16.0, "m": 0.2}}],
        "init_from": str(tmp_path / "pre" / "latest.pt")})
    fine = Trainer(config, progress=False)
    for name, value in pre["model"].items():
        assert torch.equal(fine.model.state_dict()[name], value), name
    assert torch.equal(fine.head.weight.detach(), pre["head"]["weight"])
    assert fine.global_step == 0 and fine.epoch == 0
    mismatched = tiny_config(tiny_dataset, tmp_path / "other", model={"embedding_size": 16},
                             train={"init_from": str(tmp_path / "pre" / "latest.pt")})
    with pytest.raises(TrainingError, match="does not fit"):
        Trainer(mismatched, progress=False)


class ScriptedValidator:
    """A validator whose metric falls after epoch 2, so best.pt and latest.pt differ."""

    metric = "val_score"
    every_epochs = 1

    def __init__(self, scores):
        self.scores = scores

    def __call__(self, trainer):
        return {"val_score": self.scores[trainer.epoch - 1]}


def test_best_checkpoint_is_the_epoch_of_the_highest_metric_not_the_last(tiny_dataset, tmp_path, caplog):
    config = tiny_config(tiny_dataset, tmp_path / "run", train=TWO_LOSS_SCALES)
    with caplog.at_level("INFO", logger="facepipe"):
        result = Trainer(config, progress=False, validator=ScriptedValidator([0.6, 0.8, 0.7])).fit()
    run = tmp_path / "run"
    assert load_checkpoint(run / "best.pt")["epoch"] == 2 and load_checkpoint(run / "latest.pt")["epoch"] == 3
    assert load_checkpoint(run / "best.pt")["best_metric"] == 0.8
    epochs = epoch_records(run)
    assert [(r["best"], r["best_epoch"], r["best_reason"]) for r in epochs] == [
        (True, 1, "val_score 0.6, the first validated epoch"),
        (True, 2, "val_score 0.8 > previous best 0.6 (epoch 1)"),
        (False, 2, "val_score 0.7 <= previous best 0.8 (epoch 2)"),
    ]
    assert [r.getMessage() for r in caplog.records if "new best.pt" in r.getMessage()] == [
        "epoch 1 is the new best.pt: val_score 0.6, the first validated epoch",
        "epoch 2 is the new best.pt: val_score 0.8 > previous best 0.6 (epoch 1)",
    ]
    assert (result["epoch"], result["best"], result["run"]["best_epoch"], result["run"]["best_metric"]) == \
        (3, False, 2, 0.8)
