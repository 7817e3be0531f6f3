"""train.validation.sets: several insightface .bin files and pairs files validated during training,
each logged under its name with their mean, best.pt by the mean or one set, images decoded once."""
from __future__ import annotations

import json
import pickle

import cv2
import numpy as np
import pytest

from conftest import tiny_config
from facepipe.config import ConfigError
from facepipe.runtime.checkpoint import load_checkpoint
from facepipe.train import Trainer
from facepipe.train import validation as validation_module
from test_trainer import TWO_LOSS_SCALES, epoch_records, validation_pairs

OLD_KEYS = {"val_accuracy", "val_accuracy_10fold", "val_accuracy_10fold_std", "val_auc"}
SET_METRICS = ("accuracy", "accuracy_10fold", "accuracy_10fold_std", "auc")


def write_identity_bin(tiny_dataset, path, seed: int, ext: str, side: int = 48) -> int:
    """A .bin of pairs of tiny_dataset's images, upscaled to side x side (the model reads 32x32,
    so the eval transform resizes them) and encoded as ``ext``; returns its number of images."""
    from facepipe.data.dataset import IdentityFolderDataset, decode_image
    from facepipe.eval.verification import make_pairs

    dataset = IdentityFolderDataset(tiny_dataset)
    idx_a, idx_b, is_same = make_pairs(dataset.labels, 40, seed=seed)
    bins = []
    for a, b in zip(idx_a, idx_b):
        for index in (a, b):
            rgb = cv2.resize(decode_image(dataset.samples[index].path), (side, side), interpolation=cv2.INTER_CUBIC)
            ok, data = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            assert ok
            bins.append(data.tobytes())
    with open(path, "wb") as handle:
        pickle.dump((bins, [bool(flag) for flag in is_same]), handle, protocol=2)
    return len(bins)


@pytest.fixture(scope="module")
def sets(tiny_dataset, tmp_path_factory):
    """Two .bin sets (JPEG and PNG images) and one pairs CSV, with their image counts."""
    folder = tmp_path_factory.mktemp("valsets")
    counts = {"lfw": write_identity_bin(tiny_dataset, folder / "lfw.bin", 1, ".jpg"),
              "cfp": write_identity_bin(tiny_dataset, folder / "cfp_fp.bin", 2, ".png", side=40)}
    pairs = validation_pairs(tiny_dataset, folder / "val.csv")
    counts["val"] = len({p for row in pairs.read_text().splitlines()[1:] for p in row.split(",")[:2]})
    specs = [{"bin": str(folder / "lfw.bin")}, {"bin": str(folder / "cfp_fp.bin"), "name": "cfp"},
             {"pairs": str(pairs), "root": str(tiny_dataset)}]
    return folder, specs, counts


@pytest.fixture
def decode_counts(monkeypatch):
    """Calls of the two decode functions the validation sets read their images with."""
    counts = {"bytes": 0, "files": 0}
    encoded, files = validation_module.decode_encoded_image, validation_module.decode_image

    def count_encoded(data, source):
        counts["bytes"] += 1
        return encoded(data, source)

    def count_files(path):
        counts["files"] += 1
        return files(path)

    monkeypatch.setattr(validation_module, "decode_encoded_image", count_encoded)
    monkeypatch.setattr(validation_module, "decode_image", count_files)
    return counts


def test_every_set_is_logged_with_the_mean_and_best_follows_the_mean(tiny_dataset, tmp_path, sets, decode_counts,
                                                                      caplog):
    folder, specs, counts = sets
    train = {**TWO_LOSS_SCALES, "validation": {"sets": specs, "every_epochs": 2}}
    config = tiny_config(tiny_dataset, tmp_path / "run", train=train)
    assert [item.name for item in config.train.validation.sets] == ["lfw", "cfp", "val"]  # stems unless named
    with caplog.at_level("INFO", logger="facepipe"):
        trainer = Trainer(config, progress=False)
        # Decoded once, when validation is set up: every image of every set, once.
        assert decode_counts == {"bytes": counts["lfw"] + counts["cfp"], "files": counts["val"]}
        trainer.fit()
    # ... and not again at the two validations (epochs 2 and 3, the last).
    assert decode_counts == {"bytes": counts["lfw"] + counts["cfp"], "files": counts["val"]}
    assert all(item.pixels.shape[1:] == (32, 32, 3) and item.pixels.dtype == np.uint8
               for item in trainer.validator.sets)

    epochs = epoch_records(tmp_path / "run")
    expected = {f"val_{name}_{metric}" for name in ("lfw", "cfp", "val") for metric in SET_METRICS} | \
        {"val_mean_accuracy", "val_mean_accuracy_10fold", "val_mean_auc"}
    assert [sorted(k for k in r if k.startswith("val_")) for r in epochs] == [[], sorted(expected), sorted(expected)]
    for record in epochs[1:]:
        for metric in ("accuracy", "accuracy_10fold", "auc"):
            assert record[f"val_mean_{metric}"] == pytest.approx(
                np.mean([record[f"val_{name}_{metric}"] for name in ("lfw", "cfp", "val")]), abs=1e-12)
        assert all(0 <= record[key] <= 1 for key in expected)
    assert epochs[0]["best"] is False
    assert epochs[0]["best_reason"] == "not validated this epoch (validation every 2 epochs)"
    means = [r["val_mean_accuracy"] for r in epochs[1:]]
    best_epoch = 2 + means.index(max(means))
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["epoch"] == best_epoch == epochs[-1]["best_epoch"] and best["best_metric"] == max(means)
    assert best["best_metric_name"] == "val_mean_accuracy"
    assert epochs[1]["best_reason"] == f"val_mean_accuracy {means[0]:.6g}, the first validated epoch"
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model selection")]
    assert said == ["model selection: best.pt is the epoch of the highest val_mean_accuracy (train.validation."
                    "select_by: mean (the default): the mean over the 3 sets lfw, cfp, val of each one's accuracy "
                    "at its best threshold)"]
    assert sum("decoded once at 32x32" in r.getMessage() for r in caplog.records) == 3
    # The epoch log line shows the sets' metrics as it shows today's validation metrics.
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 3/3:"))
    assert "val_lfw_accuracy" in line and "val_cfp_auc" in line and "val_mean_accuracy" in line

    # Parity with `facepipe eval bin` for the same checkpoint: the same preprocessing (the
    # 48x48 and 40x40 images resized to 32x32), the same 10-fold protocol.
    from facepipe.cli import main

    latest = tmp_path / "run" / "latest.pt"
    for name, file in (("lfw", "lfw.bin"), ("cfp", "cfp_fp.bin")):
        out = tmp_path / f"eval_{name}"
        assert main(["eval", "bin", "--bin", str(folder / file), "--checkpoint", str(latest), "--out", str(out),
                     "--device", "cpu", "--quiet"]) == 0
        reported = json.loads((out / "metrics.json").read_text())["verification"]
        assert epochs[-1][f"val_{name}_accuracy_10fold"] == pytest.approx(reported["accuracy_mean"], abs=1e-12)
        assert epochs[-1][f"val_{name}_accuracy_10fold_std"] == pytest.approx(reported["accuracy_std"], abs=1e-12)
        assert epochs[-1][f"val_{name}_accuracy"] == pytest.approx(reported["best_threshold_accuracy"], abs=1e-12)
        assert epochs[-1][f"val_{name}_auc"] == pytest.approx(reported["auc"], abs=1e-9)

    # A resume keeps the best only when it measures the same: the mean over the same sets.
    assert Trainer(config, resume=True, progress=False).best_epoch == best_epoch
    fewer = tiny_config(tiny_dataset, tmp_path / "run", train={**train, "validation": {"sets": specs[:2]}})
    with caplog.at_level("INFO", logger="facepipe"):
        caplog.clear()
        assert Trainer(fewer, resume=True, progress=False).best_epoch is None
    assert any("selected best.pt by val_mean_accuracy over lfw, cfp, val; this run selects by val_mean_accuracy "
               "over lfw, cfp" in r.getMessage() for r in caplog.records)


def test_select_by_one_set(tiny_dataset, tmp_path, sets, caplog):
    _, specs, _ = sets
    train = {"stages": [{"epochs": 2, "head": {"type": "softmax"}}],
             "validation": {"sets": specs[:2], "select_by": "cfp"}}
    with caplog.at_level("INFO", logger="facepipe"):
        Trainer(tiny_config(tiny_dataset, tmp_path / "run", train=train), progress=False).fit()
    epochs = epoch_records(tmp_path / "run")
    chosen = [r["val_cfp_accuracy"] for r in epochs]
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["epoch"] == 1 + chosen.index(max(chosen)) and best["best_metric"] == max(chosen)
    assert best["best_metric_name"] == "val_cfp_accuracy"
    assert [r["best_reason"].split()[0] for r in epochs] == ["val_cfp_accuracy"] * 2
    assert all("val_lfw_accuracy" in r and "val_mean_accuracy" in r for r in epochs)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model selection")]
    assert said == ["model selection: best.pt is the epoch of the highest val_cfp_accuracy (train.validation."
                    "select_by: cfp: set cfp's accuracy at its best threshold; the other sets (lfw) are logged, "
                    "not used)"]


def test_the_single_pairs_form_logs_exactly_the_old_keys(tiny_dataset, tmp_path, sets):
    _, specs, _ = sets
    train = {"stages": [{"epochs": 1, "head": {"type": "softmax"}}], "validation": specs[2]}
    config = tiny_config(tiny_dataset, tmp_path / "run", train=train)
    assert config.train.validation.sets is None
    Trainer(config, progress=False).fit()
    (record,) = epoch_records(tmp_path / "run")
    assert {k for k in record if k.startswith("val_")} == OLD_KEYS
    assert load_checkpoint(tmp_path / "run" / "best.pt")["best_metric_name"] == "val_accuracy"


def test_only_the_validating_rank_decodes(sets, decode_counts):
    # Under torchrun only rank 0 validates (Trainer: decode=self.dist.is_main); the other ranks
    # read and check the files, so a broken set fails on every rank alike, but decode nothing.
    from facepipe.config import ValidationConfig

    _, specs, _ = sets
    spec = ValidationConfig(sets=specs)
    other_rank = validation_module.configured_validator(spec, (32, 32), decode=False)
    assert decode_counts == {"bytes": 0, "files": 0}
    assert [item.pixels for item in other_rank.sets] == [None] * 3
    assert [len(item.is_same) for item in other_rank.sets] == [40, 40, 40]
    np.testing.assert_array_equal(other_rank.sets[0].idx_b, other_rank.sets[0].idx_a + 1)


@pytest.mark.parametrize("validation, message", [
    ({"sets": [{"bin": "a.bin", "pairs": "p.csv"}]}, "exactly one of them; got both"),
    ({"sets": [{"name": "x"}]}, "exactly one of them; got neither"),
    ({"sets": [{"bin": "data/lfw.bin"}, {"bin": "other/lfw.bin"}]}, r"set names \['lfw'\] are used more than once"),
    ({"sets": [{"bin": "lfw.bin"}], "select_by": "agedb"}, r"select_by 'agedb' names no set; choose 'mean' "
                                                            r"\(the default\) or one of \['lfw'\]"),
    ({"sets": [{"bin": "lfw.bin", "name": "mean"}]}, "'mean' is taken by the sets' mean"),
    ({"sets": [{"bin": "lfw.bin", "name": "l-f w"}]}, "use letters, digits and '_' only"),
    ({"sets": [{"bin": "lfw.bin", "root": "data"}]}, "root and allow_outside_root apply to a pairs file"),
    ({"sets": []}, "sets is empty"),
    ({"pairs": "p.csv", "sets": [{"bin": "lfw.bin"}]}, "give either pairs .* or sets, not both"),
    ({"pairs": "p.csv", "select_by": "mean"}, "select_by chooses among sets"),
    ({"every_epochs": 2}, "give one pairs file .* or a list of sets"),
    ({"sets": [{"bin": "lfw.bin", "every_epochs": 2}]}, r"unknown key\(s\) \['every_epochs'\]"),
])
def test_bad_validation_schemas_are_clear_config_errors(tiny_dataset, tmp_path, validation, message):
    with pytest.raises(ConfigError, match=message) as info:
        tiny_config(tiny_dataset, tmp_path / "run", train={"validation": validation})
    assert "train.validation" in str(info.value)


def test_default_names_come_from_the_file_stem():
    from facepipe.config import ValidationConfig

    spec = ValidationConfig(sets=[{"bin": "data/agedb-30.bin"}, {"pairs": "data/val/pairs.txt", "root": "data/val"},
                                  {"bin": "data/lfw.bin", "name": "LFW_2"}])
    assert [item.name for item in spec.sets] == ["agedb_30", "pairs", "LFW_2"] and spec.selected == "mean"
