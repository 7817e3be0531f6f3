"""The one way facepipe walks a folder tree: symbolic links followed, loops cut.

``facepipe subset`` builds a training split as links to identity folders, and training has always
read such a tree (it lists identity folders with ``is_dir``, which follows links). Every other
walker (embed, index, search, align) must see the same images, or a gallery built from a subset
silently enrols only the folders that happen to be real. ``Path.rglob`` before Python 3.13 does
not descend into linked folders, so the walkers share this one instead.

A link that leads back to a folder it is already inside (``a/b -> ..``) would be walked forever:
a folder whose real path is one of its ancestors' is skipped with a warning. Two links to the
same folder elsewhere in the tree are both walked, as training reads them: each is a folder the
user named.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

__all__ = ["TreeWalk", "walk_tree"]


@dataclass
class TreeWalk:
    """What :func:`walk_tree` found, every path as reached from the root (links not resolved)."""

    files: list[Path] = field(default_factory=list)  # sorted
    broken_links: list[Path] = field(default_factory=list)  # links to nothing (any name), sorted
    loops: list[Path] = field(default_factory=list)  # links to one of their own ancestors, not walked


def walk_tree(root: str | os.PathLike, suffixes: Iterable[str] | None = None, *,
              exclude: Iterable[str | os.PathLike] = ()) -> TreeWalk:
    """Every file under ``root`` whose suffix (any case) is in ``suffixes`` (all files when None),
    following links to folders and files.

    ``exclude``: folders not to descend into, however they are reached (compared by real path),
    e.g. an output folder inside the input tree. Raises ``PermissionError`` (naming the folder)
    for a folder that cannot be listed: skipping it would drop its images silently.
    """
    root = Path(root)
    wanted = None if suffixes is None else {suffix.lower() for suffix in suffixes}
    skipped = {os.path.realpath(path) for path in exclude}
    walk = TreeWalk()
    stack = [(root, frozenset({os.path.realpath(root)}))]
    while stack:
        folder, ancestors = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                path = folder / entry.name
                try:
                    is_dir, is_file = entry.is_dir(), entry.is_file()  # both follow a link
                except OSError:  # a link to itself (ELOOP): as good as broken
                    is_dir = is_file = False
                if is_dir:
                    real = os.path.realpath(path)
                    if real in ancestors:
                        walk.loops.append(path)
                    elif real not in skipped:
                        stack.append((path, ancestors | {real}))
                elif is_file:
                    if wanted is None or os.path.splitext(entry.name)[1].lower() in wanted:
                        walk.files.append(path)
                elif entry.is_symlink():
                    walk.broken_links.append(path)
    walk.files.sort()
    walk.broken_links.sort()
    walk.loops.sort()
    for loop in walk.loops:
        log.warning("not following %s: it links back to %s, a folder it is inside", loop, os.path.realpath(loop))
    if walk.broken_links:
        # A link whose target is gone may have been a whole identity folder: say so, never just drop it.
        log.warning("%d link(s) under %s lead nowhere (first: %s -> %s)", len(walk.broken_links), root,
                    walk.broken_links[0], os.readlink(walk.broken_links[0]))
    return walk
