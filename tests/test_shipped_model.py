"""The model that ships in models/ and the README's "Search photos in two minutes" path: the
example lists name real LFW photos of people the model never saw, and a small gallery built from
them through the CLI names a held-out raw photo of an enrolled person."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from facepipe.cli import main
from facepipe.index.store import ClusterIndex
from facepipe.runtime.checkpoint import load_checkpoint, model_fingerprint

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "lfw-irse18-64.pt"
STUDY_COPY = REPO / "bench" / "reports" / "lfw_study" / "runs" / "pretrain" / "seed0" / "init.pt"
LFW = SHARED_DATA / "lfw" / "lfw-deepfunneled"
LISTS = {name: REPO / "examples" / f"lfw_{name}.txt" for name in ("gallery", "heldout", "strangers")}


def listed(name: str) -> list[str]:
    lines = LISTS[name].read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def people(paths: list[str]) -> set[str]:
    return {path.split("/")[0] for path in paths}


def dev_test_people() -> set[str]:
    names = set()
    for line in (SHARED_DATA / "lfw" / "pairsDevTest.txt").read_text().splitlines()[1:]:
        fields = line.split("\t")
        names.update([fields[0]] + ([fields[2]] if len(fields) == 4 else []))
    return names


@pytest.fixture(scope="module")
def shipped():
    assert LFW.is_dir(), f"LFW missing: {LFW} (see ../shared/data/README.md)"
    return load_checkpoint(MODEL)


def test_the_shipped_model_is_the_study_pretraining(shipped):
    assert MODEL.read_bytes() == STUDY_COPY.read_bytes()
    assert shipped["config"]["model"]["depth"] == 18 and shipped["config"]["data"]["image_size"] == [64, 64]


def test_example_lists_name_real_photos_of_people_the_model_never_saw(shipped):
    gallery, heldout, strangers = listed("gallery"), listed("heldout"), listed("strangers")
    for paths in (gallery, heldout, strangers):
        missing = [path for path in paths if not (LFW / path).is_file()]
        assert not missing, f"example photos missing under {LFW}: {missing[:3]}"
    assert (len(gallery), len(heldout), len(strangers)) == (100, 60, 40)
    assert people(heldout) == people(gallery) and len(people(gallery)) == 20
    assert not people(strangers) & people(gallery) and len(people(strangers)) == 20
    assert not set(gallery) & set(heldout)
    everyone = people(gallery) | people(strangers)
    assert everyone <= dev_test_people()
    assert not everyone & set(shipped["identities"])  # unseen in training


def test_a_small_gallery_from_the_examples_names_a_held_out_raw_photo(shipped, tmp_path, capsys):
    chosen = sorted(people(listed("gallery")))[:3]
    subset = tmp_path / "gallery.txt"
    subset.write_text("".join(f"{path}\n" for path in listed("gallery") if path.split("/")[0] in chosen))
    aligned, index = tmp_path / "aligned", tmp_path / "index"
    assert main(["align", str(subset), str(aligned), "--root", str(LFW), "image_size=[64,64]", "--quiet",
                 "--workers", "0"]) == 0
    assert sorted(p.name for p in aligned.iterdir() if p.is_dir()) == chosen
    assert main(["index", "build", str(index), "--checkpoint", str(MODEL), "--images", str(aligned),
                 "--quiet"]) == 0
    capsys.readouterr()
    queries = [LFW / path for path in listed("heldout") if path.split("/")[0] in chosen]
    report = tmp_path / "search.json"
    assert main(["search", "--index", str(index), "--checkpoint", str(MODEL), "--json", str(report), "--quiet",
                 *map(str, queries)]) == 0
    captured = capsys.readouterr()
    assert "no unknown threshold" in captured.err  # uncalibrated: said on every search
    results = json.loads(report.read_text())["results"]
    assert all(r["status"] == "ok" and r["alignment"] == "aligned" for r in results)
    correct = sum(r["identity"] == Path(r["input"]).parent.name for r in results)
    assert correct >= len(results) - 2, [(r["input"], r["identity"]) for r in results]
    assert ClusterIndex.open(index).fingerprint == model_fingerprint(shipped["model"])
