"""insightface .bin verification sets: the restricted reader, malicious pickles, the job."""
from __future__ import annotations

import csv
import json
import os
import pickle

import cv2
import numpy as np
import pytest

from conftest import SHARED_DATA
from facepipe.cli import main
from facepipe.eval import EvalInputError, kfold_accuracy
from facepipe.eval.insightface_bin import UnsafePickleError, evaluate_bin, load_bin
from test_eval_lfw import random_init_checkpoint, require


def jpeg(seed: int, size: int = 24) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    ok, data = cv2.imencode(".jpg", image)
    assert ok
    return data.tobytes()


def write_bin(path, bins, issame, protocol=pickle.HIGHEST_PROTOCOL) -> None:
    with open(path, "wb") as handle:
        pickle.dump((bins, issame), handle, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 4])
def test_reads_a_small_bin_file(tmp_path, protocol):
    bins = [jpeg(i) for i in range(6)]
    path = tmp_path / "small.bin"
    write_bin(path, bins, [True, False, True], protocol=protocol)  # protocol 2 spells bytes via _codecs
    pairs = load_bin(path)
    assert pairs.images == bins and pairs.is_same.tolist() == [True, False, True] and len(pairs) == 3


def test_reads_a_python2_style_bin(tmp_path):
    # What Python 2's pickle.dump((bins, issame), f, protocol=2) writes: images as str
    # (SHORT_BINSTRING), read back as bytes with encoding="bytes".
    images = [jpeg(1), jpeg(2)]
    body = b"".join(b"T" + len(b).to_bytes(4, "little") + b for b in images)  # BINSTRING
    data = b"\x80\x02]q\x00(" + body + b"e]q\x01\x88a\x86q\x02."
    (tmp_path / "py2.bin").write_bytes(data)
    pairs = load_bin(tmp_path / "py2.bin")
    assert pairs.images == images and pairs.is_same.tolist() == [True]


class RunsCode:
    """Pickles as a call to os.system: loading it with plain pickle would run the command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Evaluates:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


def test_malicious_pickles_are_rejected_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    write_bin(tmp_path / "evil.bin", [jpeg(0), jpeg(1), RunsCode(marker)], [True], protocol=2)
    with pytest.raises(UnsafePickleError, match="refusing to load global (posix|os|nt).system"):
        load_bin(tmp_path / "evil.bin")
    assert not marker.exists()

    write_bin(tmp_path / "eval.bin", [jpeg(0), Evaluates()], [True])
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        load_bin(tmp_path / "eval.bin")

    # Allowed globals only in their harmless form: bytes(n) would allocate n bytes, and the
    # codec of _codecs.encode must be latin-1.
    huge = b"\x80\x02c__builtin__\nbytes\nJ\x00\xca\x9a;\x85R."  # bytes(1_000_000_000)
    (tmp_path / "huge.bin").write_bytes(huge)
    with pytest.raises(UnsafePickleError, match="without arguments"):
        load_bin(tmp_path / "huge.bin")
    rot13 = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    (tmp_path / "rot13.bin").write_bytes(rot13)
    with pytest.raises(UnsafePickleError, match="latin1"):
        load_bin(tmp_path / "rot13.bin")

    # Any other class, however harmless, is refused too.
    write_bin(tmp_path / "dict.bin", __import__("collections").OrderedDict(a=1), [True])
    with pytest.raises(UnsafePickleError, match="collections.OrderedDict"):
        load_bin(tmp_path / "dict.bin")

    # The CLI reports it as a one-line user error.
    assert main(["eval", "bin", "--bin", str(tmp_path / "evil.bin"), "--embeddings", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "r")]) == 2
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (([b"\xff\xd8a"], [True]), "expected exactly 2 per pair"),
    (([b"\xff\xd8a", "text"], [True]), "image 1 is a str"),
    (([b"\xff\xd8a", b"GIF89a"], [True]), "image 1 is neither JPEG"),
    (([b"\xff\xd8a", b"\xff\xd8b"], [2]), "not a boolean"),
    ({"bins": []}, "expected a pickled pair"),
    (([], []), "no pairs"),
])
def test_malformed_bin_contents(tmp_path, content, message):
    with open(tmp_path / "bad.bin", "wb") as handle:
        pickle.dump(content, handle, protocol=4)
    with pytest.raises(EvalInputError, match=message):
        load_bin(tmp_path / "bad.bin")
    (tmp_path / "trunc.bin").write_bytes((tmp_path / "bad.bin").read_bytes()[:-3])
    with pytest.raises(EvalInputError, match="not a readable pickle"):
        load_bin(tmp_path / "trunc.bin")


def test_bin_10_fold_protocol_with_precomputed_embeddings(tmp_path):
    rng = np.random.default_rng(0)
    pairs = 200
    issame = (np.arange(pairs) % 2 == 0).tolist()
    write_bin(tmp_path / "set.bin", [jpeg(i % 7) for i in range(2 * pairs)], issame)
    centres = rng.normal(size=(pairs, 8))
    emb = np.empty((2 * pairs, 8), dtype=np.float32)
    for i, same in enumerate(issame):
        emb[2 * i] = centres[i] + 0.2 * rng.normal(size=8)
        emb[2 * i + 1] = (centres[i] if same else rng.normal(size=8)) + 0.2 * rng.normal(size=8)
    np.save(tmp_path / "emb.npy", emb)
    metrics = evaluate_bin(tmp_path / "set.bin", tmp_path / "out", embeddings=tmp_path / "emb.npy",
                           progress=False)["metrics"]
    ver = metrics["verification"]
    assert ver["accuracy_mean"] > 0.97 and len(ver["fold_accuracies"]) == 10 and ver["fold_scheme"] == "contiguous"
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert [r["fold"] for r in rows[:21:20]] == ["1", "2"]  # 20 pairs per fold, in file order
    scores = np.array([float(r["score"]) for r in rows])
    assert kfold_accuracy(scores, issame, 10)["mean"] == pytest.approx(ver["accuracy_mean"])
    np.save(tmp_path / "short.npy", emb[:10])
    with pytest.raises(EvalInputError, match="holds 400 images"):
        evaluate_bin(tmp_path / "set.bin", tmp_path / "o2", embeddings=tmp_path / "short.npy", progress=False)


def test_bin_of_real_lfw_images_with_a_checkpoint(tmp_path):
    """A tiny lfw.bin-like file of real LFW JPEGs, embedded by a (random-initialisation) checkpoint."""
    import torch

    from facepipe.models.loaded import extract_embeddings, load_model

    lfw = require(SHARED_DATA / "lfw" / "lfw-deepfunneled")
    # Pairs 0-4: two images of Abdullah Gul each; pairs 5-9: Adrien Brody against Al Gore.
    gul, brody, gore = (sorted((lfw / name).glob("*.jpg")) for name in ("Abdullah_Gul", "Adrien_Brody", "Al_Gore"))
    files = gul[:10] + [f for pair in zip(brody[:5], gore[:5]) for f in pair]
    bins = [f.read_bytes() for f in files]
    write_bin(tmp_path / "lfw_tiny.bin", bins, [True] * 5 + [False] * 5, protocol=2)
    checkpoint = random_init_checkpoint(tmp_path / "random.pt")
    assert main(["eval", "bin", "--bin", str(tmp_path / "lfw_tiny.bin"), "--checkpoint", str(checkpoint),
                 "--out", str(tmp_path / "out"), "--quiet", "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["counts"] == {"pairs": 10, "matched": 5, "mismatched": 5, "images": 20}
    loaded = load_model(checkpoint)
    emb = extract_embeddings(loaded.model, [str(f) for f in files[:2]], (32, 32), torch.device("cpu"), flip="sum")
    first = next(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert float(first["score"]) == pytest.approx(float(emb[0] @ emb[1]), abs=1e-5)
