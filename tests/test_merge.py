"""`facepipe merge`: identity-folder sources merged by name (Pins + LFW), exclusions, the seeded
identity-disjoint validation split and its View 1 pairs file."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import facepipe
from facepipe.cli import main
from facepipe.data.dataset import DatasetError, IdentityFolderDataset, scan_identity_folders
from facepipe.data.lfw_pairs import parse_lfw_pairs
from facepipe.data.merge import MergeSource, merge_identity_sources
from facepipe.data.subset import link_identity_subset
from facepipe.errors import FacepipeUserError
from facepipe.runtime.io import OutputError
from facepipe.utils.names import IdentityNameError


def png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value % 256, dtype=np.uint8)).save(path)


def lfw_tree(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        for k in range(count):
            png(root / name / f"{name}_{k + 1:04d}.png", k)
    return root


def pins_tree(root: Path, counts: dict[str, int]) -> Path:
    """Pins' own layout: `pins_Adriana Lima/Adriana Lima12.jpg`-like names (here png)."""
    for name, count in counts.items():
        for k in range(count):
            png(root / f"pins_{name}" / f"{name}{k + 1}.PNG", 100 + k)
    return root


@pytest.fixture
def sources(tmp_path):
    pins = pins_tree(tmp_path / "pins", {"Adriana Lima": 3, "Ben Affleck": 4, "Zoe Saldana": 5})
    lfw = lfw_tree(tmp_path / "lfw", {"Adriana_Lima": 2, "Ben_Affleck": 1, "Al_Gore": 3, "Bo_Derek": 1,
                                       "Cy_Young": 2, "Di_Fox": 4})
    return pins, lfw


def pins_source(pins: Path) -> MergeSource:
    return MergeSource(pins, rename_pattern=r"pins_(.*)")


def test_merges_by_name_across_naming_schemes_numbering_and_links(sources, tmp_path):
    pins, lfw = sources
    record = merge_identity_sources([pins_source(pins), lfw], tmp_path / "dst")
    dst = tmp_path / "dst"
    identities, samples = scan_identity_folders(dst)
    assert identities == ["Adriana_Lima", "Al_Gore", "Ben_Affleck", "Bo_Derek", "Cy_Young", "Di_Fox", "Zoe_Saldana"]
    # One identity from both sources: Pins first (source order), then LFW, each by file name.
    links = sorted((dst / "Adriana_Lima").iterdir())
    assert [p.name for p in links] == [f"Adriana_Lima_{k:04d}.{ext}" for k, ext in
                                       ((1, "png"), (2, "png"), (3, "png"), (4, "png"), (5, "png"))]
    assert all(p.is_symlink() and os.path.isabs(os.readlink(p)) for p in links)
    expected = sorted((pins / "pins_Adriana Lima").iterdir()) + sorted((lfw / "Adriana_Lima").iterdir())
    assert [Path(os.readlink(p)) for p in links] == [p.resolve() for p in expected]
    # Single-image identities are kept; the record counts them.
    assert [p.name for p in (dst / "Bo_Derek").iterdir()] == ["Bo_Derek_0001.png"]
    counts = record["counts"]
    assert counts["identities"] == 7 and counts["images"] == len(samples) == 25
    assert counts["merged_identities"] == 2 and record["merged_identities"] == ["Adriana_Lima", "Ben_Affleck"]
    assert counts["single_image_identities"] == 1  # Bo_Derek (Ben_Affleck has 4 + 1)
    assert counts["excluded_identities"] == 0 and counts["validation_identities"] == 0
    assert json.loads((dst / "merge.json").read_text())["counts"] == counts
    assert record["sources"][0]["renamed_folders"] == 3 and record["sources"][1]["renamed_folders"] == 0


def test_rename_map_replace_and_ignore_case(tmp_path):
    a = lfw_tree(tmp_path / "a", {"adriana lima": 1, "n0001": 2})
    b = lfw_tree(tmp_path / "b", {"Adriana_Lima": 1, "Ben_Affleck": 1})
    mapping = tmp_path / "names.tsv"
    mapping.write_text("# folder\tidentity\tcount\nn0001\tBen-Affleck\t2\n")
    source = MergeSource(a, rename_map=mapping, replace=[("-", " ")])
    record = merge_identity_sources([source, b], tmp_path / "dst", ignore_case=True)
    # "adriana lima" and "Adriana_Lima" are one (spelled as in the first source); n0001 -> Ben_Affleck.
    assert scan_identity_folders(tmp_path / "dst")[0] == ["Ben_Affleck", "adriana_lima"]
    assert record["counts"]["merged_identities"] == 2
    # Without --ignore-case they stay apart.
    record = merge_identity_sources([source, b], tmp_path / "dst2")
    assert record["counts"]["identities"] == 3


def test_exclusion_by_pairs_file_and_name_list(sources, tmp_path):
    pins, lfw = sources
    pairs = tmp_path / "pairsDevTest.txt"
    pairs.write_text("1\nAdriana_Lima\t1\t2\nAdriana_Lima\t1\tAl_Gore\t1\n")
    names = tmp_path / "exclude.txt"
    names.write_text("# test people\nZoe Saldana\n\nNot_In_Any_Source\n")
    record = merge_identity_sources([pins_source(pins), lfw], tmp_path / "dst", exclude_pairs=[pairs],
                                    exclude_names=[names])
    identities, _ = scan_identity_folders(tmp_path / "dst")
    # Excluded from every source (the Pins folder of Adriana Lima too).
    assert identities == ["Ben_Affleck", "Bo_Derek", "Cy_Young", "Di_Fox"]
    assert record["excluded_identities"] == ["Adriana_Lima", "Al_Gore", "Zoe_Saldana"]
    assert record["counts"]["excluded_identities"] == 3 and record["counts"]["excluded_images"] == 5 + 3 + 5
    assert record["counts"]["merged_identities"] == 1


def check_split(tmp_path, dst: Path, val: Path, record: dict) -> None:
    train, _ = scan_identity_folders(dst)
    held, _ = scan_identity_folders(val)
    assert held == record["validation"]["identities"] and not set(train) & set(held)
    assert all(len(list((val / name).iterdir())) >= 2 for name in held)
    pairs = parse_lfw_pairs(val / "pairs.txt")
    assert pairs.num_folds == 1 and len(pairs) == record["counts"]["validation_pairs"]
    assert set(pairs.persons()) <= set(held)
    for side in zip(*pairs.names(".png")):
        assert all((val / rel).is_file() for rel in side)


def make_pool(tmp_path) -> Path:
    return lfw_tree(tmp_path / "pool", {f"Person_{k:02d}": 1 + k % 5 for k in range(40)})


def test_validation_split_is_identity_disjoint_seeded_and_parses(tmp_path):
    pool = make_pool(tmp_path)
    one = merge_identity_sources([pool], tmp_path / "a", val_fraction=0.25, seed=0, val_pairs=20)
    check_split(tmp_path, tmp_path / "a", tmp_path / "a_val", one)
    # 32 identities have 2+ images: a quarter of them are held out, every one of their images.
    assert one["counts"]["validation_identities"] == 8
    assert one["counts"]["identities"] == 32 and one["counts"]["single_image_identities"] == 8
    assert one["counts"]["validation_pairs"] == 40 and one["validation"]["pairs_per_class"] == 20
    same = merge_identity_sources([pool], tmp_path / "b", val_fraction=0.25, seed=0, val_pairs=20,
                                  val_out=tmp_path / "b_held")
    assert same["validation"]["identities"] == one["validation"]["identities"]
    assert (tmp_path / "b_held" / "pairs.txt").read_text() == (tmp_path / "a_val" / "pairs.txt").read_text()
    other = merge_identity_sources([pool], tmp_path / "c", val_fraction=0.25, seed=1, val_pairs=20)
    assert other["validation"]["identities"] != one["validation"]["identities"]
    check_split(tmp_path, tmp_path / "c", tmp_path / "c_val", other)


def test_validation_pairs_are_capped_by_what_the_people_allow(tmp_path):
    pool = lfw_tree(tmp_path / "pool", {"Ann": 2, "Bob": 3, "Cid": 1, "Dee": 1, "Eve": 1})
    record = merge_identity_sources([pool], tmp_path / "dst", val_fraction=0.9, val_pairs=100)
    # Both identities with 2+ images are held out: 1 + 3 matched, 2 * 3 mismatched pairs possible.
    assert record["validation"]["identities"] == ["Ann", "Bob"]
    assert record["validation"]["pairs_per_class"] == 4
    check_split(tmp_path, tmp_path / "dst", tmp_path / "dst_val", record)


def test_refuses_existing_destination_and_other_user_errors(sources, tmp_path, capsys):
    pins, lfw = sources
    dst = tmp_path / "dst"
    (dst / "old").mkdir(parents=True)
    with pytest.raises(OutputError, match="--overwrite"):
        merge_identity_sources([lfw], dst)
    assert (dst / "old").is_dir()
    merge_identity_sources([lfw], dst, overwrite=True)
    assert not (dst / "old").exists() and (dst / "merge.json").is_file()
    # The CLI: one line, exit status 2.
    assert main(["merge", str(dst), "--source", str(lfw)]) == 2
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="does not exist"):
        merge_identity_sources([tmp_path / "missing"], tmp_path / "x")
    # Two folders of ONE source reaching one name are not a merge.
    clash = lfw_tree(tmp_path / "clash", {"Ann Lee": 1, "Ann_Lee": 1})
    with pytest.raises(DatasetError, match="both become"):
        merge_identity_sources([clash], tmp_path / "y")
    bad = lfw_tree(tmp_path / "bad", {"Ann\x1b[2J": 1})
    with pytest.raises(IdentityNameError):
        merge_identity_sources([bad], tmp_path / "z")
    with pytest.raises(OutputError, match="overlap"):
        merge_identity_sources([lfw], lfw / "merged")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_pins_plus_lfw_and_the_tree_reads_for_training_and_subset(sources, tmp_path, capsys):
    pins, lfw = sources
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\nAdriana_Lima\t1\t2\nAdriana_Lima\t1\tDi_Fox\t1\n")
    dst = tmp_path / "train"
    assert main(["merge", str(dst), "--source", str(pins), "--rename-pattern", "pins_(.*)", "--replace", " ", "_",
                 "--source", str(lfw), "--exclude-pairs", str(pairs), "--val-fraction", "0.5", "--seed", "3",
                 "--val-pairs", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("merge: ") and "validation:" in out and out.count("\n") == 1
    record = json.loads((dst / "merge.json").read_text())
    assert record["sources"][0]["rename_pattern"] == "pins_(.*)" and record["sources"][0]["replace"] == [[" ", "_"]]
    assert record["counts"]["excluded_identities"] == 2 and record["counts"]["validation_identities"] == 2
    check_split(tmp_path, dst, tmp_path / "train_val", record)
    dataset = IdentityFolderDataset(dst)
    image, label, _ = dataset[0]
    assert tuple(image.shape) == (4, 4, 3) and dataset.num_classes == record["counts"]["identities"]
    assert link_identity_subset(dst, tmp_path / "subset", min_images=2)["identities"] >= 1
    # A renaming option before any --source is a usage error.
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(tmp_path / "u"), "--rename-pattern", "x(.*)", "--source", str(lfw)])
    assert exit_info.value.code == 2 and "must follow the --source" in capsys.readouterr().err


def test_copy_mode_and_api_export(sources, tmp_path):
    pins, lfw = sources
    record = facepipe.merge_identity_sources([lfw], tmp_path / "dst", copy=True)
    files = sorted((tmp_path / "dst" / "Di_Fox").iterdir())
    assert record["link"] == "copy" and not any(p.is_symlink() for p in files)
    assert [p.read_bytes() for p in files] == [p.read_bytes() for p in sorted((lfw / "Di_Fox").iterdir())]
    assert issubclass(DatasetError, FacepipeUserError)


def test_max_images_caps_training_identities_with_a_seeded_choice(sources, tmp_path, capsys):
    pins, lfw = sources
    record = merge_identity_sources([pins_source(pins), lfw], tmp_path / "a", max_images=3, seed=0)
    # Ben_Affleck (4 + 1), Zoe_Saldana (5), Adriana_Lima (3 + 2) and Di_Fox (4) hold more than 3.
    assert record["counts"]["capped_identities"] == 4
    assert record["counts"]["capped_images_left_out"] == 2 + 2 + 2 + 1
    assert record["max_images"] == 3 and "4 identities capped at 3 images (7 images left out)" in record["summary"]
    names, samples = scan_identity_folders(tmp_path / "a")
    per_identity = np.bincount([s.label for s in samples], minlength=len(names))
    assert per_identity.max() == 3 and dict(zip(names, per_identity))["Al_Gore"] == 3
    assert dict(zip(names, per_identity))["Bo_Derek"] == 1  # small identities untouched
    # Numbered from 1 without gaps; the kept files are a seeded choice among the identity's images.
    zoe = sorted((tmp_path / "a" / "Zoe_Saldana").iterdir())
    assert [p.name for p in zoe] == [f"Zoe_Saldana_{k:04d}.png" for k in (1, 2, 3)]
    chosen = lambda folder: [os.readlink(p) for p in sorted(folder.iterdir())]  # noqa: E731
    again = merge_identity_sources([pins_source(pins), lfw], tmp_path / "b", max_images=3, seed=0)
    assert again["counts"] == record["counts"] and chosen(tmp_path / "b" / "Zoe_Saldana") == chosen(tmp_path / "a" / "Zoe_Saldana")
    seeds = {tuple(chosen(tmp_path / f"s{seed}" / "Zoe_Saldana"))
             for seed in range(6) if merge_identity_sources([pins_source(pins), lfw], tmp_path / f"s{seed}",
                                                           max_images=3, seed=seed)}
    assert len(seeds) > 1
    # Through the CLI, and a cap below 1 is refused.
    assert main(["merge", str(tmp_path / "cli"), "--source", str(lfw), "--max-images", "2"]) == 0
    assert "capped at 2 images" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main(["merge", str(tmp_path / "bad"), "--source", str(lfw), "--max-images", "0"])
    assert refused.value.code == 2 and "--max-images: 0 is below the minimum" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="max_images must be >= 1"):
        merge_identity_sources([lfw], tmp_path / "api", max_images=0)


def test_probe_fraction_holds_out_closed_set_probes_before_the_cap(sources, tmp_path, capsys):
    pins, lfw = sources
    # Merged counts: Adriana_Lima 5, Ben_Affleck 5, Zoe_Saldana 5, Di_Fox 4, Al_Gore 3, Cy_Young 2, Bo_Derek 1.
    record = merge_identity_sources([pins_source(pins), lfw], tmp_path / "a", probe_fraction=0.25, max_images=2,
                                    seed=0)
    # n = 5 -> max(1, floor(1.25)) = 1; n = 4 -> 1; n = 3 -> min(1, 1) = 1; n <= 2 lend none.
    assert record["counts"]["probe_identities"] == 5 and record["counts"]["probe_images"] == 5
    probe_names, probe_samples = scan_identity_folders(tmp_path / "a_probes")
    assert probe_names == ["Adriana_Lima", "Al_Gore", "Ben_Affleck", "Di_Fox", "Zoe_Saldana"]
    train = tmp_path / "a"
    # No probe image is a training image; every identity keeps two (the cap of 2 applies after).
    probe_targets = {os.readlink(p) for p in (tmp_path / "a_probes").rglob("*.png")}
    train_targets = {os.readlink(p) for p in train.rglob("*.png")}
    assert probe_targets and not probe_targets & train_targets
    assert len(list((train / "Al_Gore").iterdir())) == 2 and len(list((train / "Cy_Young").iterdir())) == 2
    assert record["counts"]["capped_images_left_out"] == 2 + 2 + 2 + 1  # 4, 4, 4, 3 left -> 2 each
    assert "closed-set probes: 5 images of 5 training identities" in record["summary"]
    # The choice is seeded: the same seed gives the same probes, and a larger fraction lends more.
    again = merge_identity_sources([pins_source(pins), lfw], tmp_path / "b", probe_fraction=0.25, seed=0)
    assert {os.readlink(p) for p in (tmp_path / "b_probes").rglob("*.png")} == probe_targets
    more = merge_identity_sources([lfw], tmp_path / "c", probe_fraction=0.5, probe_min_images=4, seed=0)
    assert more["counts"]["probe_identities"] == 1 and more["counts"]["probe_images"] == 2  # Di_Fox: min(2, 2)
    assert again["probes"]["folder"] == str(tmp_path / "b_probes")
    # Through the CLI; bad settings are refused.
    assert main(["merge", str(tmp_path / "cli"), "--source", str(lfw), "--probe-fraction", "0.3",
                 "--probe-out", str(tmp_path / "cli_q")]) == 0
    assert "closed-set probes: 2 images of 2 training identities" in capsys.readouterr().out
    with pytest.raises(DatasetError, match="probe_min_images must be >= 3"):
        merge_identity_sources([lfw], tmp_path / "api", probe_fraction=0.2, probe_min_images=2)
    with pytest.raises(OutputError, match="must differ"):
        merge_identity_sources([lfw], tmp_path / "d", probe_fraction=0.2, probe_out=tmp_path / "d")


def test_seeded_choices_do_not_depend_on_how_the_source_paths_are_spelled(sources, tmp_path, monkeypatch):
    pins, lfw = sources
    monkeypatch.chdir(tmp_path)
    relative = merge_identity_sources([MergeSource("pins", rename_pattern=r"pins_(.*)"), "lfw"], "a",
                                      probe_fraction=0.25, max_images=2, seed=3)
    spelled = merge_identity_sources([MergeSource(str(pins) + "/", rename_pattern=r"pins_(.*)"), f"./../{tmp_path.name}/lfw"],
                                     tmp_path / "b", probe_fraction=0.25, max_images=2, seed=3)
    assert relative["counts"] == spelled["counts"]
    for folder in ("a", "a_probes"):
        other = folder.replace("a", "b")
        ours = {p.relative_to(tmp_path / folder): os.readlink(p) for p in (tmp_path / folder).rglob("*.png")}
        theirs = {p.relative_to(tmp_path / other): os.readlink(p) for p in (tmp_path / other).rglob("*.png")}
        assert ours == theirs
