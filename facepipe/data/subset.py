"""Identity subsets as folders of symbolic links: a training split without copying images.

The LFW development protocol trains on every person who is *not* in ``pairsDevTest.txt``; this
builds that split (or any other) as ``DST/<identity> -> SRC/<identity>`` links, which the
identity-folder dataset reads like any other tree.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from facepipe.data.dataset import IMAGE_EXTENSIONS, DatasetError
from facepipe.utils.names import check_identity_name


def link_identity_subset(source: str | Path, destination: str | Path, exclude: Iterable[str] = (),
                         min_images: int = 1) -> dict:
    """Link every identity folder of ``source`` with at least ``min_images`` images and not in
    ``exclude`` into ``destination``; returns counts. Existing correct links are kept; a
    ``destination`` entry that is not a link to the same folder is an error (never overwritten)."""
    source, destination = Path(source).resolve(), Path(destination)
    if not source.is_dir():
        raise DatasetError(f"identity folder tree {source} does not exist")
    excluded = set(exclude)
    destination.mkdir(parents=True, exist_ok=True)
    kept = images = skipped_small = skipped_excluded = 0
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        check_identity_name(folder.name, f"identity folder {folder}")
        count = sum(1 for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if folder.name in excluded:
            skipped_excluded += 1
            continue
        if count < min_images:
            skipped_small += 1
            continue
        link = destination / folder.name
        if link.is_symlink() or link.exists():
            # resolve() on both sides: SRC may itself be a subset, its folders links.
            if not (link.is_symlink() and link.resolve() == folder.resolve()):
                raise DatasetError(f"{link} exists and is not a link to {folder}; use an empty destination")
        else:
            os.symlink(folder, link, target_is_directory=True)
        kept += 1
        images += count
    if kept == 0:
        raise DatasetError(f"no identity of {source} is left after the exclusions and min_images={min_images}")
    return {"identities": kept, "images": images, "excluded": skipped_excluded, "too_few_images": skipped_small}
