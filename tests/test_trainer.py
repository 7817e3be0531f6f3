import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from facepipe.data.dataset import DatasetError
from facepipe.train import Trainer, TrainingError
from facepipe.train import trainer as trainer_module
from facepipe.train.checkpoint import load_checkpoint


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
    for name in ("latest.pt", "best.pt", "config.yaml", "class_stats.json", "metrics.jsonl"):
        assert (tmp_path / "run" / name).is_file(), name
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


def test_validation_pairs_drive_best_checkpoint_selection(tiny_dataset, tmp_path):
    from pathlib import Path as _Path

    from facepipe.data.dataset import IdentityFolderDataset
    from facepipe.eval.verification import make_pairs, write_pairs_csv

    dataset = IdentityFolderDataset(tiny_dataset)
    idx_a, idx_b, is_same = make_pairs(dataset.labels, 40, seed=1)
    rel = [_Path(s.path).relative_to(tiny_dataset).as_posix() for s in dataset.samples]
    pairs = tmp_path / "val.csv"
    write_pairs_csv(pairs, [rel[i] for i in idx_a], [rel[i] for i in idx_b], is_same)
    config = tiny_config(tiny_dataset, tmp_path / "run",
                         train={"validation": {"pairs": str(pairs), "root": str(tiny_dataset)}})
    trainer = Trainer(config, progress=False)
    trainer.fit()
    epochs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    accuracies = [r["val_accuracy"] for r in epochs if r["event"] == "epoch"]
    assert len(accuracies) == 2 and all(0.5 <= a <= 1.0 for a in accuracies)  # best threshold >= majority
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["best_metric"] == max(accuracies)
    assert best["metrics"]["val_accuracy"] == max(accuracies)

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
