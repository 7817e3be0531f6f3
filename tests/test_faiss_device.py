"""The one CPU/GPU decision for FAISS: CPU path, and the GPU path simulated on a CPU-only faiss."""
from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest

from facepipe.runtime import faiss_device
from facepipe.runtime.faiss_device import gpu_count, kmeans_uses_gpu, to_device

LOGGER = "facepipe.runtime.faiss_device"


@pytest.fixture(autouse=True)
def fresh_log_once():
    faiss_device._reset_log_once()
    yield
    faiss_device._reset_log_once()


@pytest.fixture
def no_gpu(monkeypatch):
    """A CPU-only faiss, also where a GPU build is installed."""
    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)


class FakeClonerOptions:
    def __init__(self):
        self.shard = False


@pytest.fixture
def two_gpus(monkeypatch):
    """faiss with 2 GPUs: the "GPU index" is a CPU copy, so searches still run here."""
    calls = []

    def fake_index_cpu_to_all_gpus(index, co=None, ngpu=-1):
        calls.append({"index": index, "co": co, "shard": getattr(co, "shard", None), "ngpu": ngpu})
        return faiss.clone_index(index)

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2, raising=False)
    # faiss.Kmeans(gpu=True) counts the GPUs with its own imported name.
    monkeypatch.setattr(faiss.extra_wrappers, "get_num_gpus", lambda: 2, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", FakeClonerOptions, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", fake_index_cpu_to_all_gpus)
    return calls


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_cpu_path_returns_the_same_index_and_logs_once(no_gpu, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert gpu_count() == 0
    index = faiss.IndexFlatIP(8)
    assert to_device(index, shard=True, purpose="megaface search") is index
    assert to_device(index, shard=True, purpose="megaface search") is index
    assert messages(caplog) == ["faiss: megaface search on CPU (no GPU visible to faiss)"]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == LOGGER)


def test_cpu_path_without_get_num_gpus(monkeypatch):
    monkeypatch.delattr(faiss, "get_num_gpus", raising=False)
    assert gpu_count() == 0


def test_gpu_requested_without_a_gpu_is_an_error(no_gpu):
    with pytest.raises(RuntimeError, match="no GPU is visible to faiss"):
        to_device(faiss.IndexFlatIP(8), purpose="megaface search", use_gpu=True)


def test_gpu_path_shards_over_all_gpus_and_logs(two_gpus, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert gpu_count() == 2
    index = faiss.IndexFlatIP(8)
    moved = to_device(index, shard=True, purpose="megaface search")
    assert moved is not index
    assert len(two_gpus) == 1
    call = two_gpus[0]
    assert call["index"] is index and call["ngpu"] == 2
    assert isinstance(call["co"], FakeClonerOptions) and call["shard"] is True
    assert messages(caplog) == ["faiss: megaface search on 2 GPUs, sharded"]


def test_gpu_path_replicates_unless_sharding_is_asked(two_gpus, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    to_device(faiss.IndexFlatIP(8), purpose="cluster sampler neighbours")
    assert two_gpus[0]["shard"] is False
    assert messages(caplog) == ["faiss: cluster sampler neighbours on 2 GPUs, replicated"]


def test_gpu_turned_off_stays_on_cpu(two_gpus, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    index = faiss.IndexFlatIP(8)
    assert to_device(index, purpose="identity index search", use_gpu=False,
                     cpu_reason="HNSW has no GPU version") is index
    assert two_gpus == []
    assert messages(caplog) == ["faiss: identity index search on CPU (HNSW has no GPU version)"]


def test_kmeans_uses_gpu(no_gpu):
    assert kmeans_uses_gpu() is False
    assert kmeans_uses_gpu(10**6, 10**3) is False


def test_kmeans_uses_gpu_for_large_problems_only(two_gpus):
    assert kmeans_uses_gpu() is True
    assert kmeans_uses_gpu(100, 5) is False
    assert kmeans_uses_gpu(faiss_device.KMEANS_GPU_MIN_WORK, 1) is True


def test_one_of_several_processes_uses_only_its_own_gpu(two_gpus, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    listed = []

    def fake_index_cpu_to_gpus_list(index, co=None, gpus=None, ngpu=-1):
        listed.append({"gpus": list(gpus), "shard": co.shard})
        return faiss.clone_index(index)

    monkeypatch.setattr(faiss, "index_cpu_to_gpus_list", fake_index_cpu_to_gpus_list)
    monkeypatch.setattr(faiss_device, "_distributed_device", lambda: 1)
    to_device(faiss.IndexFlatIP(8), shard=True, purpose="megaface search")
    assert listed == [{"gpus": [1], "shard": True}] and two_gpus == []
    assert kmeans_uses_gpu(10**9, 10**3) is False
    assert messages(caplog) == [
        "faiss: megaface search on GPU 1 (this process's device; several processes share the GPUs)",
        "faiss: cluster k-means on CPU (several processes share the GPUs)",
    ]


def test_not_distributed_without_a_process_group():
    assert faiss_device._distributed_device() is None


# --------------------------------------------------------------------------------------------
# The FAISS users go through the helper
# --------------------------------------------------------------------------------------------
def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_cluster_kmeans_on_gpu_matches_cpu(two_gpus, monkeypatch):
    from facepipe.data.clusters import balanced_spherical_kmeans

    rng = np.random.default_rng(0)
    x = _unit(rng.normal(size=(120, 8)))
    labels = np.repeat(np.arange(3), 40)
    monkeypatch.setattr(faiss_device, "KMEANS_GPU_MIN_WORK", 1 << 40)
    cpu = balanced_spherical_kmeans(x, labels, cluster_size=10, seed=3)
    assert two_gpus == []
    monkeypatch.setattr(faiss_device, "KMEANS_GPU_MIN_WORK", 0)
    gpu = balanced_spherical_kmeans(x, labels, cluster_size=10, seed=3)
    # faiss.Kmeans(gpu=2) clones its IndexFlatIP with index_cpu_to_all_gpus(ngpu=2).
    assert len(two_gpus) == 3 and all(c["ngpu"] == 2 for c in two_gpus)
    np.testing.assert_array_equal(gpu.sample_cluster, cpu.sample_cluster)
    np.testing.assert_allclose(gpu.centroids, cpu.centroids, atol=1e-6)


def test_megaface_search_is_sharded_and_matches_cpu(two_gpus, caplog):
    from facepipe.eval.megaface import search_distractors

    caplog.set_level(logging.INFO, logger=LOGGER)
    rng = np.random.default_rng(1)
    probes, distractors = _unit(rng.normal(size=(6, 8))), _unit(rng.normal(size=(300, 8)))
    cpu = search_distractors(probes, distractors, [10, 300], k=20, snapshot_k=5, chunk_size=64,
                             use_gpu=False, progress=False)
    assert two_gpus == []
    gpu = search_distractors(probes, distractors, [10, 300], k=20, snapshot_k=5, chunk_size=64, progress=False)
    assert len(two_gpus) == 1 and two_gpus[0]["shard"] is True
    assert "faiss: megaface search on 2 GPUs, sharded" in messages(caplog)
    for a, b in zip(cpu[0].values(), gpu[0].values()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(cpu[2], gpu[2])


def test_megaface_keeps_large_k_on_cpu(two_gpus):
    from facepipe.eval.megaface import search_distractors
    from facepipe.eval.verification import EvalInputError

    rng = np.random.default_rng(2)
    probes, distractors = _unit(rng.normal(size=(2, 4))), _unit(rng.normal(size=(50, 4)))
    k = faiss_device.GPU_MAX_K + 1
    search_distractors(probes, distractors, [50], k=k, snapshot_k=5, progress=False)
    assert two_gpus == []
    with pytest.raises(EvalInputError, match="at most"):
        search_distractors(probes, distractors, [50], k=k, snapshot_k=5, use_gpu=True, progress=False)


def test_identity_index_replicated_on_gpus_but_hnsw_stays_on_cpu(two_gpus, tmp_path, caplog):
    from facepipe.index.store import ClusterIndex

    caplog.set_level(logging.INFO, logger=LOGGER)
    rng = np.random.default_rng(3)
    centroids = _unit(rng.normal(size=(12, 8)))
    owner = np.repeat(np.arange(4), 3)
    names = ["a", "b", "c", "d"]
    flat = ClusterIndex.build(tmp_path / "flat", centroids, owner, names)
    # Placed at the first search, not when built or opened (info, add, remove never search).
    assert not flat._on_gpu and two_gpus == [] and flat.info()["gpu"] is True
    assert messages(caplog) == []
    on_cpu = ClusterIndex.open(tmp_path / "flat", use_gpu=False)
    assert not on_cpu._on_gpu and on_cpu.info()["gpu"] is False
    queries = _unit(rng.normal(size=(5, 8)))
    assert [r.to_dict() for r in flat.search(queries, top_k=2)] == [r.to_dict() for r in on_cpu.search(queries, top_k=2)]
    assert flat._on_gpu and len(two_gpus) == 1 and two_gpus[-1]["shard"] is False
    flat.search(queries, top_k=2)
    assert len(two_gpus) == 1  # moved once, not at every search
    calls = len(two_gpus)
    hnsw = ClusterIndex.build(tmp_path / "hnsw", centroids, owner, names, kind="hnsw")
    hnsw.search(queries, top_k=2)
    assert not hnsw._on_gpu and len(two_gpus) == calls
    logged = messages(caplog)
    assert "faiss: identity index search on 2 GPUs, replicated" in logged
    assert "faiss: identity index search on CPU (HNSW has no GPU version)" in logged


def test_cluster_sampler_neighbours_on_gpus(two_gpus, caplog):
    from facepipe.data.cluster_sampler import ClusterBatchSampler

    caplog.set_level(logging.INFO, logger=LOGGER)
    rng = np.random.default_rng(4)
    centroids = _unit(rng.normal(size=(8, 6)))
    cluster_identity = np.repeat(np.arange(4), 2)
    sample_cluster = np.repeat(np.arange(8), 5)
    sampler = ClusterBatchSampler(sample_cluster, centroids, cluster_identity, clusters_per_batch=3, images_per_cluster=2)
    assert len(two_gpus) == 1 and two_gpus[0]["shard"] is False
    assert "faiss: cluster sampler neighbours on 2 GPUs, replicated" in messages(caplog)
    assert (sampler.neighbours[:, 0] == np.arange(8)).all()
