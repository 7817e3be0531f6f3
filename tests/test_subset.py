"""Identity subsets as symbolic-link trees (the LFW development training split)."""
from __future__ import annotations

import pytest

from facepipe.cli import main
from facepipe.data.dataset import DatasetError, scan_identity_folders
from facepipe.data.subset import link_identity_subset


def make_tree(root, counts):
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for k in range(count):
            (root / name / f"{name}_{k + 1:04d}.jpg").write_bytes(b"x")
    return root


def test_exclusions_and_min_images(tmp_path):
    source = make_tree(tmp_path / "src", {"Ann": 3, "Bob": 1, "Cid": 2, "Dee": 5})
    counts = link_identity_subset(source, tmp_path / "dst", exclude={"Dee"}, min_images=2)
    assert counts == {"identities": 2, "images": 5, "excluded": 1, "too_few_images": 1}
    identities, samples = scan_identity_folders(tmp_path / "dst")
    assert identities == ["Ann", "Cid"] and len(samples) == 5
    assert (tmp_path / "dst" / "Ann").is_symlink()
    # Running again keeps the links; a foreign entry is never overwritten.
    assert link_identity_subset(source, tmp_path / "dst", exclude={"Dee"}, min_images=2)["identities"] == 2
    (tmp_path / "dst2" / "Ann").mkdir(parents=True)
    with pytest.raises(DatasetError, match="not a link"):
        link_identity_subset(source, tmp_path / "dst2")
    with pytest.raises(DatasetError, match="no identity"):
        link_identity_subset(source, tmp_path / "dst3", min_images=10)


def test_cli_excludes_the_people_of_a_pairs_file(tmp_path, capsys):
    source = make_tree(tmp_path / "src", {"Ann": 3, "Bob": 2, "Cid": 2})
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\nAnn\t1\t2\nBob\t1\tAnn\t3\n")
    assert main(["subset", str(source), str(tmp_path / "dst"), "--exclude-pairs", str(pairs)]) == 0
    assert "1 identities, 2 images" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["Cid"]
