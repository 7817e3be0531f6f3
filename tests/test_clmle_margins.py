"""``facepipe index margins``: Huang et al.'s 2-D margin bounds of a dataset and the suggested margins."""
from __future__ import annotations

import math

import numpy as np
import pytest

from facepipe.cli import main
from facepipe.config import find_config, load_config
from facepipe.losses.clmle import suggest_margins


def identity_tree(root, counts):
    # scan_identity_folders lists files by extension only: empty files are enough.
    for i, count in enumerate(counts):
        folder = root / f"id_{i:02d}"
        folder.mkdir(parents=True)
        for j in range(count):
            (folder / f"{j}.jpg").write_bytes(b"")
    return root


def test_margins_of_an_identity_folder_tree(tmp_path, capsys):
    root = identity_tree(tmp_path / "data", [10, 20, 30, 40])  # C = 4, L = 100
    assert main(["index", "margins", str(root)]) == 0
    out = capsys.readouterr().out
    assert "4 identities, 100 images (per identity 10..40)" in out
    assert f"a1max={1 - math.cos(2 * math.pi / 4):.4g}" in out  # 1 - cos(pi / 2) = 1
    assert f"a2max min={1 - math.cos(2 * math.pi * 0.1):.4g}" in out and f"max={1 - math.cos(0.8 * math.pi):.4g}" in out
    assert "2-D" in out and "loose" in out
    # a1max = 1 is above the cap: a1 = 0.5, a2 = a1 / 3.
    assert "loss: {type: clmle, inter_margin: 0.5, intra_margin: 0.1667}" in out
    assert "train.stages.1.loss.inter_margin=0.5 train.stages.1.loss.intra_margin=0.1667" in out


def test_margins_from_labels_and_the_rule():
    # Many identities: the 2-D bound (~1e-5) is far below any usable margin; the floor applies.
    many = suggest_margins(np.arange(2, 900))
    assert many["a1max"] < 1e-4 and not many["a1max_binds"]
    assert (many["inter_margin"], many["intra_margin"]) == (0.3, 0.1)
    assert many["tail_below_intra"] == 1.0
    seven = suggest_margins([5] * 7)  # 1 - cos(2 pi / 7) = 0.377 lies inside [0.3, 0.5]: it binds
    assert seven["a1max_binds"] and seven["inter_margin"] == pytest.approx(1 - math.cos(2 * math.pi / 7), abs=1e-4)
    assert seven["intra_margin"] < seven["inter_margin"]
    # The suggestion is accepted by the CLMLE loss config (a2 < a1).
    config = load_config(find_config("clmle"), [f"train.stages.1.loss.inter_margin={seven['inter_margin']}",
                                                f"train.stages.1.loss.intra_margin={seven['intra_margin']}"])
    assert config.train.stages[1].loss.inter_margin == seven["inter_margin"]


def test_margins_cli_with_labels_and_errors(tmp_path, capsys):
    (tmp_path / "labels.txt").write_text("a\na\nb\nc\nc\nc\n")
    assert main(["index", "margins", "--labels", str(tmp_path / "labels.txt")]) == 0
    out = capsys.readouterr().out
    assert "3 identities, 6 images (per identity 1..3)" in out and "inter_margin: 0.5" in out

    assert main(["index", "margins"]) == 2
    assert "DATA_ROOT" in capsys.readouterr().err
    assert main(["index", "margins", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    identity_tree(tmp_path / "data", [3])
    (tmp_path / "data" / "empty").mkdir()
    assert main(["index", "margins", str(tmp_path / "data")]) == 2
    assert "hold no images" in capsys.readouterr().err
