"""``facepipe index build|add|remove|info|calibrate`` and ``facepipe search`` on a synthetic gallery."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from facepipe.cli import main

DIM = 24


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def synthetic(tmp_path):
    """Six identities (24-d): gallery embeddings + labels, held-out queries, a newcomer."""
    rng = np.random.default_rng(0)
    bases = unit(rng.normal(size=(7, DIM)))
    names = [f"person_{i}" for i in range(7)]

    def samples(i: int, n: int) -> np.ndarray:
        return unit(bases[i] + 0.35 * rng.normal(size=(n, DIM)) / math.sqrt(DIM))

    counts = [30, 22, 15, 12, 8, 5]
    np.save(tmp_path / "gallery.npy", np.concatenate([samples(i, n) for i, n in enumerate(counts)]))
    (tmp_path / "labels.txt").write_text("".join(f"{names[i]}\n" for i, n in enumerate(counts) for _ in range(n)))
    np.save(tmp_path / "queries.npy", np.concatenate([samples(i, 2) for i in range(6)]))
    np.save(tmp_path / "newcomer.npy", samples(6, 12))
    np.save(tmp_path / "newcomer_labels.npy", np.array([names[6]] * 12))
    np.save(tmp_path / "newcomer_query.npy", samples(6, 2))
    return tmp_path, names


def search(tmp_path, capsys, *inputs, top_k=2, options=(), index="idx"):
    out = tmp_path / "results.json"
    assert main(["search", "--index", str(tmp_path / index), "--top-k", str(top_k), "--json", str(out), *options,
                 *map(str, inputs)]) == 0
    table = capsys.readouterr().out
    return table, json.loads(out.read_text())["results"]


def build_gallery_index(tmp_path, *extra: str) -> str:
    """``facepipe index build`` of the synthetic gallery into ``tmp_path/idx`` (clusters of 10)."""
    index = str(tmp_path / "idx")
    assert main(["index", "build", index, "--embeddings", str(tmp_path / "gallery.npy"), "--labels",
                 str(tmp_path / "labels.txt"), "--cluster-size", "10", "--quiet", *extra]) == 0
    return index


def test_build_info_search_add_remove(synthetic, capsys):
    tmp_path, names = synthetic
    index = build_gallery_index(tmp_path)
    assert "built index" in capsys.readouterr().out

    assert main(["index", "info", index]) == 0
    info = capsys.readouterr().out
    assert "kind flat" in info and f"dim {DIM}" in info and "6 identities, 9 clusters, 92 embeddings" in info
    assert "person_0  3" in info and "person_5  1" in info  # clusters: floor(30/10), max(1, floor(5/10))

    table, results = search(tmp_path, capsys, tmp_path / "queries.npy")
    assert table.splitlines()[0].split() == ["INPUT", "RANK", "IDENTITY", "SCORE"]
    assert [r["identity"] for r in results] == [names[i] for i in range(6) for _ in range(2)]
    # The default N is 1 (was 100): six identities are too few to hold images out and tune N, so
    # each query retrieves one cluster and ranks its identity only, and the output says why.
    assert all(len(r["matches"]) == 1 and r["num_neighbours"] == 1 for r in results)
    assert "N=1, default: no validation data" in table and "--num-neighbours for more" in table
    assert results[0]["input"].endswith("queries.npy[0]") and "person_3" in table
    table, results = search(tmp_path, capsys, tmp_path / "queries.npy", options=["--num-neighbours", "9"])
    assert [r["identity"] for r in results] == [names[i] for i in range(6) for _ in range(2)]
    assert all(len(r["matches"]) == 2 and r["matches"][0]["score"] > r["matches"][1]["score"] for r in results)
    assert "clusters retrieved per query (Eq. 10): N=9, given for this search" in table

    assert main(["index", "add", index, "--embeddings", str(tmp_path / "newcomer.npy"), "--labels",
                 str(tmp_path / "newcomer_labels.npy"), "--quiet"]) == 0
    assert "1 new identities" in capsys.readouterr().out
    _, results = search(tmp_path, capsys, tmp_path / "newcomer_query.npy")
    assert [r["identity"] for r in results] == ["person_6", "person_6"]

    assert main(["index", "remove", index, "person_6", "person_0"]) == 0
    assert "removed 2 identities" in capsys.readouterr().out
    _, results = search(tmp_path, capsys, tmp_path / "queries.npy", tmp_path / "newcomer_query.npy", top_k=5)
    returned = {m["identity"] for r in results for m in r["matches"]}
    assert returned and not returned & {"person_0", "person_6"}
    assert [r["identity"] for r in results[2:12]] == [names[i] for i in range(1, 6) for _ in range(2)]

    assert main(["index", "remove", index, "nobody"]) == 2
    err = capsys.readouterr().err
    assert "'nobody'" in err and "nothing was removed" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert main(["index", "info", index]) == 0
    assert "5 identities, 6 clusters" in capsys.readouterr().out


def test_build_tunes_n_on_held_out_images_and_search_names_n_and_its_source(tmp_path, capsys):
    rng = np.random.default_rng(5)
    bases = unit(rng.normal(size=(25, DIM)))
    counts = rng.integers(4, 12, size=25)
    np.save(tmp_path / "gallery.npy", np.concatenate([
        unit(bases[i] + 0.9 * rng.normal(size=(n, DIM)) / math.sqrt(DIM)) for i, n in enumerate(counts)]))
    (tmp_path / "labels.txt").write_text("".join(f"p{i:02d}\n" for i, n in enumerate(counts) for _ in range(n)))
    np.save(tmp_path / "queries.npy", unit(bases[:3]))
    source = ["--embeddings", str(tmp_path / "gallery.npy"), "--labels", str(tmp_path / "labels.txt"),
              "--cluster-size", "2", "--quiet"]

    assert main(["index", "build", str(tmp_path / "idx"), *source]) == 0
    built = capsys.readouterr().out
    from facepipe.index.store import ClusterIndex

    index = ClusterIndex.open(tmp_path / "idx")
    record = index.num_neighbours_source
    assert record["method"] == "tuned" and record["num_queries"] == 25
    line = (f"N={index.num_neighbours}, tuned on 25 held-out images (one each of 25 enrolled identities) at build "
            f"time, top-1 {record['accuracy']:.4f}")
    assert f"clusters retrieved per query (Eq. 10): {line}" in built
    assert main(["index", "info", str(tmp_path / "idx")]) == 0
    assert line in capsys.readouterr().out
    table, results = search(tmp_path, capsys, tmp_path / "queries.npy")
    assert line in table and all(r["num_neighbours_source"] == line for r in results)
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["num_neighbours"] == index.num_neighbours and summary["num_neighbours_source"] == line

    # A user-given N is kept as is, and says so.
    assert main(["index", "build", str(tmp_path / "idx"), *source, "--num-neighbours", "3", "--overwrite"]) == 0
    assert "N=3, set by the user at build time" in capsys.readouterr().out
    table, results = search(tmp_path, capsys, tmp_path / "queries.npy")
    assert "N=3, set by the user at build time" in table and {r["num_neighbours"] for r in results} == {3}


def test_build_options_and_errors(synthetic, capsys):
    tmp_path, names = synthetic
    index = str(tmp_path / "idx")
    source = ["--embeddings", str(tmp_path / "gallery.npy"), "--labels", str(tmp_path / "labels.txt")]
    assert main(["index", "build", index, *source, "--kind", "hnsw", "--num-neighbours", "5", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["index", "build", index, *source, "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["index", "build", index, *source, "--kind", "ivf", "--threshold", "100", "--overwrite",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["index", "info", index]) == 0
    info = capsys.readouterr().out
    assert "kind ivf" in info and "unknown_threshold=100.0" in info and "nlist=" in info
    table, results = search(tmp_path, capsys, tmp_path / "queries.npy")
    assert all(r["unknown"] and r["identity"] is None for r in results) and "unknown" in table

    assert main(["index", "build", str(tmp_path / "x"), "--embeddings", str(tmp_path / "gallery.npy")]) == 2
    assert "--labels" in capsys.readouterr().err
    assert main(["index", "build", str(tmp_path / "x"), "--images", str(tmp_path)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    np.save(tmp_path / "wrong_dim.npy", np.ones((2, 5), dtype=np.float32))
    assert main(["search", "--index", index, str(tmp_path / "wrong_dim.npy")]) == 2
    assert "dimension 5" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path / "missing"), str(tmp_path / "queries.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "photo.png").write_bytes(b"")
    assert main(["search", "--index", index, str(tmp_path / "photo.png")]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_calibrate_stores_n_and_threshold_and_search_marks_impostors_unknown(synthetic, capsys):
    tmp_path, names = synthetic
    index = build_gallery_index(tmp_path)
    capsys.readouterr()
    # Genuine validation queries of enrolled identities; impostors: person_6 (never enrolled)
    # and random directions.
    (tmp_path / "query_labels.txt").write_text("".join(f"{names[i]}\n" for i in range(6) for _ in range(2)))
    rng = np.random.default_rng(3)
    np.save(tmp_path / "impostors.npy", np.concatenate([np.load(tmp_path / "newcomer.npy"),
                                                        unit(rng.normal(size=(20, DIM)))]))
    report_path = tmp_path / "calibration.json"
    assert main(["index", "calibrate", index, "--embeddings", str(tmp_path / "queries.npy"), "--labels",
                 str(tmp_path / "query_labels.txt"), "--impostor-embeddings", str(tmp_path / "impostors.npy"),
                 "--target-far", "0", "--grid", "1:9:2", "--json", str(report_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert set(report["accuracy_by_n"]) == {"1", "3", "5", "7", "9"} and report["num_impostor"] == 32
    assert report["accuracy"] == 1.0 and report["far"] == 0.0 and report["threshold"] is not None
    assert f"N (clusters retrieved, Eq. 10) = {report['num_neighbours']}: top-1 accuracy 1.0000" in out
    assert "FAR 0.0000 (target 0)" in out and "genuine accept rate" in out

    assert main(["index", "info", index]) == 0
    info = capsys.readouterr().out
    assert f"num_neighbours={report['num_neighbours']}" in info
    assert f"unknown_threshold={report['threshold']}" in info and "calibrated " in info and "recalibrate" not in info
    assert f"N={report['num_neighbours']}, calibrated on 12 validation images of 6 enrolled identities" in info

    _, results = search(tmp_path, capsys, tmp_path / "newcomer_query.npy", tmp_path / "queries.npy")
    assert [r["unknown"] for r in results[:2]] == [True, True] and results[0]["identity"] is None
    known = results[2:]
    assert all(r["identity"] in (names[i // 2], None) for i, r in enumerate(known))
    assert sum(r["identity"] == names[i // 2] for i, r in enumerate(known)) / len(known) \
        == pytest.approx(report["identification_rate"])

    # Without impostors only N changes; the stored threshold stays (with a warning).
    assert main(["index", "calibrate", index, "--embeddings", str(tmp_path / "queries.npy"), "--labels",
                 str(tmp_path / "query_labels.txt"), "--grid", "2,4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "unknown threshold unchanged" in out and "recalibrate with impostors" in out
    assert main(["index", "info", index]) == 0
    info = capsys.readouterr().out
    assert "num_neighbours=" in info and f"unknown_threshold={report['threshold']}" in info

    # Errors: a genuine identity that the index lacks; images without a checkpoint; a bad grid.
    (tmp_path / "wrong_labels.txt").write_text("".join(f"{names[6]}\n" for _ in range(12)))
    assert main(["index", "calibrate", index, "--embeddings", str(tmp_path / "queries.npy"), "--labels",
                 str(tmp_path / "wrong_labels.txt")]) == 2
    assert "not in the index" in capsys.readouterr().err
    assert main(["index", "calibrate", index, "--images", str(tmp_path)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["index", "calibrate", index, "--embeddings", str(tmp_path / "queries.npy"), "--grid", "9:1:2"])
    assert "START:STOP:STEP" in capsys.readouterr().err


def test_calibrate_refuses_enrolled_impostors_and_a_changed_gallery(synthetic):
    from facepipe.index.store import ClusterIndex, ClusterIndexError
    from facepipe.index.jobs import calibrate_index

    tmp_path, names = synthetic
    assert main(["index", "build", str(tmp_path / "idx"), "--embeddings", str(tmp_path / "gallery.npy"), "--labels",
                 str(tmp_path / "labels.txt"), "--cluster-size", "10", "--quiet"]) == 0
    queries = np.load(tmp_path / "queries.npy")
    labels = [names[i] for i in range(6) for _ in range(2)]
    embed = tmp_path / "impostor_embed"  # a 'facepipe embed' folder whose manifest names an enrolled identity
    embed.mkdir()
    np.save(embed / "embeddings.npy", queries[:2])
    (embed / "manifest.csv").write_text("row,path,identity\n0,a.png,person_0\n1,b.png,person_0\n")
    with pytest.raises(ClusterIndexError, match="impostor identities are in the index"):
        calibrate_index(tmp_path / "idx", embeddings=queries, labels=labels, impostor_embeddings=embed)

    stale = ClusterIndex.open(tmp_path / "idx")
    ClusterIndex.open(tmp_path / "idx").remove(["person_5"])
    with pytest.raises(ClusterIndexError, match="changed while it was being calibrated"):
        stale.calibrate(queries[:10], labels[:10], grid=[1, 2])
    assert ClusterIndex.open(tmp_path / "idx").info()["calibration"] is None


def test_calibrate_from_images_with_a_checkpoint(tiny_dataset, tmp_path, capsys):
    import shutil

    import torch

    from conftest import tiny_config
    from facepipe.models import build_backbone
    from facepipe.runtime.checkpoint import save_checkpoint

    torch.manual_seed(0)
    config = tiny_config(tmp_path, tmp_path)
    checkpoint = tmp_path / "model.pt"  # an untrained tiny model: enough to embed 32x32 crops
    save_checkpoint(checkpoint, {"model": build_backbone(config.model, config.data.image_size).state_dict(),
                                 "config": config.to_dict(), "identities": ["a"], "epoch": 0, "step": 0})
    identities = sorted(p.name for p in tiny_dataset.iterdir() if p.is_dir())
    gallery, impostors = tmp_path / "gallery", tmp_path / "impostors"
    for folder, names in ((gallery, identities[:8]), (impostors, identities[8:])):
        folder.mkdir()
        for name in names:  # copies: list_images does not follow folder links
            shutil.copytree(tiny_dataset / name, folder / name)
    index = str(tmp_path / "idx")
    common = ["--checkpoint", str(checkpoint), "--device", "cpu", "--quiet"]
    assert main(["index", "build", index, "--images", str(gallery), "--cluster-size", "1", *common]) == 0
    capsys.readouterr()
    # cluster_size 1: every enrolled image is a cluster, so at N = 1 an image finds itself.
    assert main(["index", "calibrate", index, "--images", str(gallery), "--impostor-images", str(impostors),
                 "--grid", "1,2", "--target-far", "0.1", "--json", str(tmp_path / "c.json"), *common]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["num_impostor"] > 10 and report["far"] <= 0.1 and report["threshold"] is not None
    assert "genuine queries of 8 enrolled identities" in out
    assert "N (clusters retrieved, Eq. 10) = 1: top-1 accuracy 1.0000" in out
    # An enrolled identity among the impostors is refused.
    shutil.copytree(tiny_dataset / identities[0], impostors / identities[0])
    assert main(["index", "calibrate", index, "--images", str(gallery), "--impostor-images", str(impostors),
                 *common]) == 2
    assert "impostor identities are in the index" in capsys.readouterr().err


def test_build_checks_its_destination_before_any_work(synthetic, capsys, monkeypatch):
    """A destination that the build would refuse at the end is refused first (issue 26): nothing
    is loaded, embedded or clustered, and the message is the one the final write gives."""
    import os
    from pathlib import Path

    import facepipe.data.clusters as clusters
    import facepipe.index.jobs as jobs
    from facepipe.index.store import ClusterIndex, ClusterIndexError
    from facepipe.runtime.io import UnwritableOutputError

    tmp_path, _ = synthetic
    x, labels = np.load(tmp_path / "gallery.npy"), (tmp_path / "labels.txt").read_text().split()
    late = {}
    for name, make in (("full", lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine"))),
                       ("file", lambda p: p.write_text("a file")),
                       ("not_index", lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")))):
        make(tmp_path / name)
        # The message of the check at the end of a build (what every user saw after the work).
        with pytest.raises(ClusterIndexError) as info:
            ClusterIndex.build(tmp_path / name, x[:2], [0, 1], ["a", "b"], overwrite=name == "not_index")
        late[name] = str(info.value)
    assert "exists and is not empty; pass overwrite (--overwrite)" in late["full"]
    assert "exists and is not a folder" in late["file"] and "is not a cluster index" in late["not_index"]

    def never(*args, **kwargs):
        raise AssertionError("work was done before the destination was checked")

    monkeypatch.setattr(clusters, "balanced_spherical_kmeans", never)
    monkeypatch.setattr(jobs, "load_embedding_source", never)
    monkeypatch.setattr(jobs, "_embed_identity_folder", never)
    source = ["--embeddings", str(tmp_path / "gallery.npy"), "--labels", str(tmp_path / "labels.txt"), "--quiet"]
    for name, message in late.items():
        extra = ["--overwrite"] if name == "not_index" else []
        assert main(["index", "build", str(tmp_path / name), *source, *extra]) == 2
        assert capsys.readouterr().err.strip() == f"facepipe index: error: {message}"
        assert main(["index", "build", str(tmp_path / name), "--checkpoint", "model.pt", "--images", str(tmp_path),
                     "--quiet", *extra]) == 2
        assert capsys.readouterr().err.strip() == f"facepipe index: error: {message}"
        with pytest.raises(ClusterIndexError) as info:
            jobs.build_index_from_embeddings(tmp_path / name, x, labels, overwrite=bool(extra))
        assert str(info.value) == message
        with pytest.raises(ClusterIndexError) as info:
            jobs.build_index_from_checkpoint(tmp_path / name, "model.pt", tmp_path, overwrite=bool(extra))
        assert str(info.value) == message
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"

    # A parent folder the process may not write (os.access is faked: the tests may run as root).
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw))
    assert main(["index", "build", str(locked / "new" / "idx"), *source]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {locked / 'new' / 'idx'}: permission denied in the folder {locked}" in err
    with pytest.raises(UnwritableOutputError, match="permission denied in the folder"):
        jobs.build_index_from_embeddings(locked / "idx", x, labels)
    assert not any(locked.iterdir())


def test_search_explains_its_score_and_unknown_and_notes_a_missing_threshold(synthetic, capsys):
    from facepipe.cli import SEARCH_SCORE_EXPLANATION
    from facepipe.index.store import ClusterIndex

    tmp_path, names = synthetic
    index = build_gallery_index(tmp_path)
    capsys.readouterr()
    query = ["search", "--index", index, "--top-k", "3", "--num-neighbours", "4", "--json",
             str(tmp_path / "results.json"), str(tmp_path / "queries.npy")]

    # Uncalibrated: the footer says what SCORE is, and stderr (not the table on stdout) that no
    # query can be unknown and how to set a threshold.
    assert main(query) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert SEARCH_SCORE_EXPLANATION in lines and "Eq. 10" in SEARCH_SCORE_EXPLANATION
    assert "cosine similarity" in SEARCH_SCORE_EXPLANATION and "log-sum-exp" in SEARCH_SCORE_EXPLANATION
    assert not any(line.startswith("unknown:") for line in lines) and "threshold" not in captured.out
    notice = [line for line in captured.err.splitlines() if "no unknown threshold" in line]
    assert len(notice) == 1
    assert f"the index {index} has no unknown threshold" in notice[0] and "none is 'unknown'" in notice[0]
    assert f"facepipe index calibrate {index} --embeddings" in notice[0]
    for option in ("--labels", "--impostor-embeddings", "--checkpoint", "--images", "--impostor-images"):
        assert option in notice[0]
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["unknown_threshold"] is None and {r["unknown_threshold"] for r in summary["results"]} == {None}

    # The SCORE is what the line says: min similarity of the identity's retrieved clusters minus
    # the log-sum-exp of the other identities' retrieved similarities.
    opened = ClusterIndex.open(index)
    sims, owner = opened.retrieve(np.load(tmp_path / "queries.npy"), 4)
    for row, result in enumerate(summary["results"]):
        for match in result["matches"]:
            own = owner[row] == opened.identity_ids([match["identity"]])[0]
            others = sims[row][~own & (owner[row] >= 0)]
            denominator = np.log(np.exp(others.astype(np.float64)).sum()) if others.size else -1.0
            assert match["score"] == pytest.approx(float(sims[row][own].min()) - denominator, abs=1e-5)

    # Calibrated with impostors: no notice, and the footer names the threshold below which a
    # query is unknown.
    (tmp_path / "query_labels.txt").write_text("".join(f"{names[i]}\n" for i in range(6) for _ in range(2)))
    rng = np.random.default_rng(3)
    np.save(tmp_path / "impostors.npy", np.concatenate([np.load(tmp_path / "newcomer.npy"),
                                                        unit(rng.normal(size=(20, DIM)))]))
    assert main(["index", "calibrate", index, "--embeddings", str(tmp_path / "queries.npy"), "--labels",
                 str(tmp_path / "query_labels.txt"), "--impostor-embeddings", str(tmp_path / "impostors.npy"),
                 "--target-far", "0", "--grid", "1:9:2", "--quiet"]) == 0
    capsys.readouterr()
    threshold = ClusterIndex.open(index).unknown_threshold
    assert threshold is not None
    assert main([*query[:-1], str(tmp_path / "newcomer_query.npy"), str(tmp_path / "queries.npy")]) == 0
    captured = capsys.readouterr()
    assert "no unknown threshold" not in captured.err and "index calibrate" not in captured.err
    lines = captured.out.splitlines()
    assert SEARCH_SCORE_EXPLANATION in lines
    assert (f"unknown: the best SCORE of the query is below the index's unknown threshold {threshold:.4f} (the row "
            "shows that score and its identity)") in lines
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["unknown_threshold"] == threshold
    unknown = [r for r in summary["results"] if r["unknown"]]
    assert unknown and all(r["matches"][0]["score"] < threshold for r in unknown)
    assert all(r["matches"][0]["score"] >= threshold for r in summary["results"] if not r["unknown"])
    assert any(line.split()[1:3] == ["-", "unknown"] for line in lines if line.startswith(str(tmp_path)))

    # A threshold given at build time counts as set too.
    assert main(["index", "build", index, "--embeddings", str(tmp_path / "gallery.npy"), "--labels",
                 str(tmp_path / "labels.txt"), "--threshold", "-0.5", "--overwrite", "--quiet"]) == 0
    capsys.readouterr()
    assert main(query) == 0
    captured = capsys.readouterr()
    assert "no unknown threshold" not in captured.err and "unknown threshold -0.5000" in captured.out


def test_only_searching_commands_log_the_faiss_search_device(synthetic, capsys, caplog):
    """'faiss: identity index search on ...' says where searches run: commands that open an
    index without searching it (info, add, remove, a build that tunes nothing) do not print it."""
    import logging

    from facepipe.runtime import faiss_device

    tmp_path, names = synthetic
    index = str(tmp_path / "idx")

    def device_lines(command: list[str]) -> list[str]:
        faiss_device._reset_log_once()  # logged once per process: every command starts afresh
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert main(command) == 0
        capsys.readouterr()
        return [r.getMessage() for r in caplog.records if "identity index search on" in r.getMessage()]

    source = ["--embeddings", str(tmp_path / "gallery.npy"), "--labels", str(tmp_path / "labels.txt"), "--quiet"]
    assert device_lines(["index", "build", index, *source, "--num-neighbours", "2"]) == []
    assert device_lines(["index", "info", index]) == []
    assert device_lines(["index", "add", index, "--embeddings", str(tmp_path / "newcomer.npy"), "--labels",
                         str(tmp_path / "newcomer_labels.npy"), "--quiet"]) == []
    assert device_lines(["index", "remove", index, names[6]]) == []
    searched = device_lines(["search", "--index", index, str(tmp_path / "queries.npy")])
    assert len(searched) == 1 and searched[0].startswith("faiss: identity index search on ")


def test_labels_from_an_embed_manifest_are_read_by_the_embeddings_folder_reader(tmp_path):
    """``read_labels`` of a ``manifest.csv`` takes the identity column through the one manifest
    reader (facepipe.embed.folder), so it checks the header and the row numbers as every reader of
    an embeddings folder does."""
    from facepipe.index.jobs import read_labels
    from facepipe.index.store import ClusterIndexError

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("row,path,identity\n0,a/1.png,a\n1,b/1.png,/b/\n2,c\\1.png,c\\d\n", encoding="utf-8")
    assert read_labels(manifest) == ["a", "b", "c/d"]
    manifest.write_text("row,path,identity\n0,a/1.png,a\n2,b/1.png,b\n", encoding="utf-8")
    with pytest.raises(ClusterIndexError, match=r"manifest.csv: line 3: expected row 1,path,identity"):
        read_labels(manifest)
    manifest.write_text("path,identity\na/1.png,a\n", encoding="utf-8")
    with pytest.raises(ClusterIndexError, match=r"line 1: expected header row,path,identity"):
        read_labels(manifest)
