"""The embeddings folder that ``facepipe embed`` writes (the writer is
:func:`facepipe.embed.extract.write_embeddings_folder`), and the one reader every later stage
uses (evaluation, the identity index). No torch here: reading precomputed embeddings must stay
cheap.

Layout: ``embeddings.npy`` (one row per image), ``manifest.csv`` (``row,path,identity``) and
``embed.json`` (model fingerprint, flip mode, counts, ...), written last, which lists the other
two as its ``parts`` (size and SHA-256) so that a reader refuses a folder mixing two outputs
(:func:`facepipe.runtime.io.check_parts`).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.errors import FacepipeUserError
from facepipe.runtime.io import MixedOutputError, check_parts

__all__ = [
    "EMBEDDINGS_FILE",
    "EMBED_RECORD",
    "MANIFEST_FILE",
    "MANIFEST_HEADER",
    "EmbeddingsFolder",
    "EmbeddingsFolderError",
    "is_embeddings_folder",
    "load_npy",
    "read_embeddings_manifest",
]

EMBEDDINGS_FILE = "embeddings.npy"
MANIFEST_FILE = "manifest.csv"
EMBED_RECORD = "embed.json"
MANIFEST_HEADER = ("row", "path", "identity")


class EmbeddingsFolderError(ValueError, FacepipeUserError):
    """An embeddings folder (or ``.npy``) that cannot be read as one; callers usually pass their
    own error class (``error=``) instead."""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def is_embeddings_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding an ``embeddings.npy`` (rather than images)."""
    return (Path(path) / EMBEDDINGS_FILE).is_file()


def load_npy(path: str | os.PathLike, mmap: bool = False,
             error: type[Exception] = EmbeddingsFolderError) -> np.ndarray:
    """A plain numeric ``.npy`` array (no pickles); ``mmap``: memory-mapped read-only."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:
        raise error(f"{path}: not a plain numeric .npy array ({exc})") from None


def read_embeddings_manifest(path: str | os.PathLike,
                             error: type[Exception] = EmbeddingsFolderError) -> tuple[list[str], list[str]]:
    """(paths, identities) of a ``manifest.csv``, rows numbered 0, 1, ... in order; identities
    with ``/`` separators and no leading or trailing ``/``."""
    paths: list[str] = []
    identities: list[str] = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != MANIFEST_HEADER:
            raise error(f"{path}: line 1: expected header {','.join(MANIFEST_HEADER)}, got {header}")
        for row in reader:
            if len(row) != 3 or row[0].strip() != str(len(paths)):
                raise error(f"{path}: line {reader.line_num}: expected row {len(paths)},path,identity; got {row}")
            # Plain string operations: a distractor manifest can hold a million rows.
            paths.append(row[1])
            identities.append(row[2].replace("\\", "/").strip("/"))
    return paths, identities


@dataclass(eq=False)
class EmbeddingsFolder:
    """What an embeddings folder (or a ``.npy`` file) holds.

    ``paths`` and ``identities`` come from ``manifest.csv`` (None without one, e.g. for a bare
    ``.npy``); ``info`` is ``embed.json`` ({} without one).
    """

    embeddings: np.ndarray  # possibly a read-only memory map
    paths: list[str] | None
    identities: list[str] | None
    info: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None  # the folder read (for a .npy: the folder it lies in)

    @property
    def fingerprint(self) -> str | None:
        return self.info.get("model_fingerprint")

    @property
    def flip(self) -> str | None:
        return self.info.get("flip")

    def keys(self) -> list[str]:
        """Each image's path relative to the folder that was embedded: ``identity/filename``."""
        if self.paths is None or self.identities is None:
            raise ValueError("these embeddings have no manifest, so no image keys")
        keys = []
        for path, identity in zip(self.paths, self.identities):
            name = path.replace("\\", "/").rpartition("/")[2]
            keys.append(f"{identity}/{name}" if identity else name)
        return keys

    @classmethod
    def open(cls, path: str | os.PathLike, *, mmap: bool = False, require_manifest: bool = False,
             error: type[Exception] = EmbeddingsFolderError) -> "EmbeddingsFolder":
        """Read an embeddings folder, or a ``.npy`` file (with the ``embed.json`` and, when it is
        a folder's ``embeddings.npy``, the ``manifest.csv`` beside it).

        A folder's ``embed.json`` is optional; when it lists the files it was written with
        (``parts``), a folder whose array or manifest is another output's is refused, as is one
        whose record counts other rows. ``require_manifest``: ``path`` must be a folder with a
        manifest. ``mmap``: the array is memory-mapped read-only instead of loaded, for sets
        larger than memory. Errors are raised as ``error``.
        """
        path = Path(path)
        if path.is_dir() or require_manifest:
            folder, npy = path, path / EMBEDDINGS_FILE
            for needed in (npy, folder / MANIFEST_FILE) if require_manifest else (npy,):
                if not needed.is_file():
                    raise error(f"embeddings folder {folder}: {needed.name} is missing "
                                "(expected the output of 'facepipe embed')")
        else:
            folder, npy = path.parent, path
            if not npy.is_file():
                raise error(f"embeddings file {npy} does not exist")
        # Only the folder's own array is one of the record's parts; another .npy beside it only
        # takes the model fingerprint and flip mode from it.
        own = npy.name == EMBEDDINGS_FILE
        info: dict[str, Any] = {}
        if (folder / EMBED_RECORD).is_file():
            try:
                info = json.loads((folder / EMBED_RECORD).read_text(encoding="utf-8"))
                parts = info.get("parts", {})
                if own:
                    check_parts(folder, parts, EMBED_RECORD)
            except (json.JSONDecodeError, AttributeError, MixedOutputError) as exc:
                raise error(f"embeddings folder {folder}: {exc}") from None
        embeddings = load_npy(npy, mmap=mmap, error=error)
        if own and (embeddings.ndim != 2 or not np.issubdtype(embeddings.dtype, np.floating)):
            raise error(f"{npy}: expected a 2-D float array, got shape {embeddings.shape}, dtype {embeddings.dtype}")
        paths = identities = None
        if own and (folder / MANIFEST_FILE).is_file():
            paths, identities = read_embeddings_manifest(folder / MANIFEST_FILE, error)
            if len(paths) != len(embeddings):
                raise error(f"{folder}: {MANIFEST_FILE} lists {len(paths)} images but {EMBEDDINGS_FILE} has "
                            f"{len(embeddings)} rows")
        if own and info.get("num_images", len(embeddings)) != len(embeddings):
            raise error(f"{folder}: {EMBED_RECORD} records {info['num_images']} images but {EMBEDDINGS_FILE} has "
                        f"{len(embeddings)} rows: the folder mixes two outputs")
        return cls(embeddings=embeddings, paths=paths, identities=identities, info=info, folder=folder)
