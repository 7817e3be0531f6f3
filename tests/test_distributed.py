"""Two gloo processes under torchrun against one process: the same global batch gives the same
step, for a margin head and for CLMLE; checkpoints move between world sizes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from facepipe.data.samplers import EpochSampler
from facepipe.runtime.checkpoint import load_checkpoint
from facepipe.runtime.distributed import (DRAIN_VARIABLE, RUNLOOP_DRAIN_SECONDS, DistributedContext,
                                          RankSlicedSampler, rank_slice, runloop_drain_seconds)
from facepipe.train.trainer import Trainer

from conftest import tiny_config

WORKER = Path(__file__).with_name("ddp_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(config, tmp_path, processes=2, max_epochs=None) -> None:
    path = tmp_path / f"config_{config.output_dir.replace('/', '_')}.json"
    path.write_text(json.dumps(config.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(WORKER), str(path)]
    result = subprocess.run(command + ([str(max_epochs)] if max_epochs else []), env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def parameters(path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)
    # DDP broadcasts rank 0's BatchNorm buffers each forward; one process with micro-batches
    # updates them once per chunk: the running statistics legitimately differ, the weights must not.
    return {k: v for k, v in state["model"].items() if "running" not in k and "num_batches" not in k}


def one_step_config(root, out, stage, micro_batches=1, **extra):
    return tiny_config(root, out, model={"dropout": 0.0}, data={"batch_size": 8},
                       train={"stages": [stage], "max_steps_per_epoch": 1, "micro_batches": micro_batches,
                              **extra})


def assert_same_step(single, distributed, start: dict[str, torch.Tensor]) -> None:
    a, b = parameters(single / "latest.pt"), parameters(distributed / "latest.pt")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(start[name], a[name]) for name in a)  # the step did change the weights


def test_rank_slices_partition_every_global_batch():
    base = EpochSampler(np.repeat(np.arange(5), 8), seed=3)
    global_order = [index for index, _ in base]
    shards = [list(RankSlicedSampler(base, 8, DistributedContext(rank, 2))) for rank in range(2)]
    for step in range(len(global_order) // 8):
        batch = global_order[step * 8:(step + 1) * 8]
        assert [i for i, _ in shards[0][step * 4:(step + 1) * 4]] + [i for i, _ in shards[1][step * 4:(step + 1) * 4]] \
            == batch
    assert [rank_slice(10, DistributedContext(r, 3)) for r in range(3)] == [slice(0, 3), slice(3, 7), slice(7, 10)]
    with pytest.raises(ValueError, match="divisible"):
        RankSlicedSampler(base, 7, DistributedContext(0, 2))


def test_exit_pause_defaults_and_rejects_bad_overrides(monkeypatch):
    monkeypatch.delenv(DRAIN_VARIABLE, raising=False)
    assert runloop_drain_seconds() == RUNLOOP_DRAIN_SECONDS
    monkeypatch.setenv(DRAIN_VARIABLE, "0")
    assert runloop_drain_seconds() == 0.0
    for bad in ("soon", "-1", "nan", "3600"):
        monkeypatch.setenv(DRAIN_VARIABLE, bad)
        with pytest.raises(ValueError, match=DRAIN_VARIABLE):
            runloop_drain_seconds()


@pytest.mark.parametrize("kind", ["cosface", "clmle"])
def test_two_gloo_processes_match_one_process_step(tiny_dataset, tmp_path, kind):
    if kind == "cosface":
        stage = {"epochs": 1, "head": {"type": "cosface", "s": 16.0, "m": 0.2}}
        extra = {}
    else:
        stage = {"epochs": 1, "head": {"type": "softmax"},
                 "loss": {"type": "clmle", "inter_margin": 0.3, "intra_margin": 0.1}}
        extra = {"clusters": {"cluster_size": 3, "clusters_per_batch": 2, "images_per_cluster": 2}}
    single = one_step_config(tiny_dataset, tmp_path / "single", stage, micro_batches=2, **extra)
    distributed = one_step_config(tiny_dataset, tmp_path / "ddp", stage, **extra)
    trainer = Trainer(single, progress=False)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    torchrun(distributed, tmp_path)
    assert_same_step(tmp_path / "single", tmp_path / "ddp", start)
    if kind == "clmle":
        a = np.load(tmp_path / "single" / "clusters.npz")["sample_cluster"]
        b = np.load(tmp_path / "ddp" / "clusters.npz")["sample_cluster"]
        np.testing.assert_array_equal(a, b)  # the clusters of gathered features equal the single-process ones


def test_checkpoint_from_two_processes_resumes_in_one(tiny_dataset, tmp_path):
    stage = {"epochs": 2, "head": {"type": "softmax"}}
    config = tiny_config(tiny_dataset, tmp_path / "run", model={"dropout": 0.0}, data={"batch_size": 8},
                         train={"stages": [stage], "max_steps_per_epoch": 2})
    torchrun(config, tmp_path, max_epochs=1)
    assert load_checkpoint(tmp_path / "run" / "latest.pt")["epoch"] == 1
    resumed = Trainer(config, resume=True, progress=False)
    assert (resumed.epoch, resumed.global_step) == (1, 2)
    resumed.fit()
    assert load_checkpoint(tmp_path / "run" / "latest.pt")["step"] == 4
    # Only rank 0 wrote: one log, each epoch once.
    events = [json.loads(line)["event"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert events.count("epoch") == 2


def test_embed_under_two_processes_writes_the_single_process_output(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, tmp_path / "run", train={"stages": [{"epochs": 1, "head": {"type": "softmax"}}],
                                                                "max_steps_per_epoch": 1})
    Trainer(config, progress=False).fit()
    checkpoint = tmp_path / "run" / "latest.pt"
    from facepipe.embed import embed_folder

    embed_folder(checkpoint, tiny_dataset, tmp_path / "single", num_workers=0, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", "-m", "facepipe", "embed", "--checkpoint", str(checkpoint),
         "--images", str(tiny_dataset), "--out", str(tmp_path / "ddp"), "--quiet"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    single, ddp = np.load(tmp_path / "single" / "embeddings.npy"), np.load(tmp_path / "ddp" / "embeddings.npy")
    assert single.shape == ddp.shape
    np.testing.assert_allclose(ddp, single, atol=1e-5)
    assert (tmp_path / "ddp" / "manifest.csv").read_text() == (tmp_path / "single" / "manifest.csv").read_text()
