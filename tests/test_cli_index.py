"""``facepipe index build|add|remove|info`` and ``facepipe search`` on a synthetic gallery."""
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


def search(tmp_path, capsys, *inputs, top_k=2):
    out = tmp_path / "results.json"
    assert main(["search", "--index", str(tmp_path / "idx"), "--top-k", str(top_k), "--json", str(out),
                 *map(str, inputs)]) == 0
    table = capsys.readouterr().out
    return table, json.loads(out.read_text())["results"]


def test_build_info_search_add_remove(synthetic, capsys):
    tmp_path, names = synthetic
    index = str(tmp_path / "idx")
    assert main(["index", "build", index, "--embeddings", str(tmp_path / "gallery.npy"), "--labels",
                 str(tmp_path / "labels.txt"), "--cluster-size", "10", "--quiet"]) == 0
    assert "built index" in capsys.readouterr().out

    assert main(["index", "info", index]) == 0
    info = capsys.readouterr().out
    assert "kind flat" in info and f"dim {DIM}" in info and "6 identities, 9 clusters, 92 embeddings" in info
    assert "person_0  3" in info and "person_5  1" in info  # clusters: floor(30/10), max(1, floor(5/10))

    table, results = search(tmp_path, capsys, tmp_path / "queries.npy")
    assert table.splitlines()[0].split() == ["INPUT", "RANK", "IDENTITY", "SCORE"]
    assert [r["identity"] for r in results] == [names[i] for i in range(6) for _ in range(2)]
    assert all(len(r["matches"]) == 2 and r["matches"][0]["score"] > r["matches"][1]["score"] for r in results)
    assert results[0]["input"].endswith("queries.npy[0]") and "person_3" in table

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
