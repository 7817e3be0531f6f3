import os
import pickle

import pytest
import torch

from facepipe.runtime import checkpoint as checkpoint_module
from facepipe.runtime.checkpoint import CheckpointError, load_checkpoint, model_fingerprint, save_checkpoint

STATE = {"model": {"w": torch.ones(2)}, "config": {}, "identities": ["a"], "epoch": 1, "step": 5}


def test_round_trip(tmp_path):
    save_checkpoint(tmp_path / "c.pt", STATE)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["step"] == 5 and torch.equal(loaded["model"]["w"], torch.ones(2))
    # A run folder resolves to its latest.pt.
    save_checkpoint(tmp_path / "latest.pt", {**STATE, "step": 7})
    assert load_checkpoint(tmp_path)["step"] == 7


def test_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    save_checkpoint(path, STATE)

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {**STATE, "step": 6})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 5
    assert sorted(os.listdir(tmp_path)) == ["latest.pt"]


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_rejected_without_running_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model": Exploit()}, protocol=2))
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_truncated_foreign_and_missing_files(tmp_path):
    save_checkpoint(tmp_path / "c.pt", STATE)
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a facepipe checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")


def test_fingerprint_changes_with_any_weight():
    a = {"w": torch.zeros(3), "b": torch.ones(1), "count": torch.tensor(3)}  # 0-dim, like BN counters
    b = {"w": torch.tensor([0.0, 0.0, 1e-6]), "b": torch.ones(1), "count": torch.tensor(3)}
    assert model_fingerprint(a) == model_fingerprint({k: v.clone() for k, v in a.items()})
    assert model_fingerprint(a) != model_fingerprint(b)
