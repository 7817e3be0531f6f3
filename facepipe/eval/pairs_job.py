"""``facepipe eval pairs``: verification of a checkpoint on a file of image pairs.

Two formats are accepted, told apart by content (not by the file name):

- a pairs CSV, header ``path_a,path_b,is_same``, paths relative to the root;
- an LFW pairs file (View 1 ``N`` or View 2 ``SETS N`` header, then ``Name<TAB>i<TAB>j`` and
  ``A<TAB>i<TAB>B<TAB>j`` lines; see :mod:`facepipe.data.lfw_pairs`), such as the ``pairs.txt``
  that ``facepipe merge --val-pairs`` writes beside its validation people: the first non-empty
  line of one or two integers marks it. Image ``i`` of ``Name`` is ``<root>/Name/Name_%04d.jpg``,
  or, where that file is absent, the one of another image extension
  (:data:`facepipe.data.dataset.IMAGE_EXTENSIONS`, e.g. ``.png``) that exists.

A pairs file is read strictly where a silent change would move the accuracy:

- a pair listed twice (either order of its two images) would count twice: the repeats are
  dropped with a warning, and the number dropped is reported (``duplicate_pairs_removed`` in
  ``metrics.json``, the summary line); the same pair listed once as same and once as not is an
  error, as no answer can be right for both; an LFW pairs file with a repeated pair is refused
  (:func:`facepipe.data.lfw_pairs.parse_lfw_pairs`), as for ``facepipe eval lfw``;
- a missing image is an error listing the missing files (dropping its pairs would change the
  protocol);
- a path must stay under the root (no absolute path, no ``..`` climbing out of it), unless
  ``allow_outside_root``: a shared pairs file must not read whatever files it names. Links
  inside the root are followed like any file (a ``facepipe subset`` tree is links).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facepipe.data.dataset import IMAGE_EXTENSIONS, DatasetError
from facepipe.data.lfw_pairs import lfw_image_name, parse_lfw_pairs
from facepipe.embed.extract import embed_paths
from facepipe.eval.plots import plot_roc
from facepipe.eval.verification import cosine_scores, evaluate_verification, read_pairs_csv
from facepipe.models.loaded import load_model
from facepipe.runtime.device import resolve_device
from facepipe.runtime.io import staged_files, write_csv_atomic, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class PairsOnDisk:
    """A pairs file (CSV or LFW) resolved against its image folder: each image once, pairs as row indices."""

    paths: list[str]  # unique image files, sorted
    idx_a: np.ndarray
    idx_b: np.ndarray
    is_same: np.ndarray
    names_a: list[str]  # the paths as the CSV wrote them (LFW: Name/Name_%04d.ext as found under the root)
    names_b: list[str]
    duplicates: int = 0  # repeated pairs dropped (each pair is scored once)


def _leaves_root(name: str) -> bool:
    normal = os.path.normpath(name)
    return os.path.isabs(normal) or normal == ".." or normal.startswith(".." + os.sep)


def _drop_duplicate_pairs(pairs: Path, names_a: list[str], names_b: list[str],
                          is_same: np.ndarray) -> tuple[list[str], list[str], np.ndarray, int]:
    first: dict[tuple[str, ...], int] = {}
    keep: list[int] = []
    dropped: list[tuple[int, int]] = []  # (row, the row it repeats)
    for row, (a, b) in enumerate(zip(names_a, names_b)):
        # Cosine similarity is symmetric: b,a is the same comparison as a,b.
        key = tuple(sorted((os.path.normpath(a), os.path.normpath(b))))
        if key not in first:
            first[key] = row
            keep.append(row)
        elif is_same[first[key]] != is_same[row]:
            raise DatasetError(f"{pairs}: rows {first[key] + 1} and {row + 1} (after the header) list the pair "
                               f"{a}, {b} once as the same person and once as different people; fix the file")
        else:
            dropped.append((row, first[key]))
    if dropped:
        log.warning("%s: dropped %d repeated pair(s) (first: row %d, a repeat of row %d); each pair is scored once",
                    pairs, len(dropped), dropped[0][0] + 1, dropped[0][1] + 1)
    return [names_a[k] for k in keep], [names_b[k] for k in keep], is_same[keep], len(dropped)


def is_lfw_pairs_file(path: str | Path) -> bool:
    """Whether ``path`` looks like an LFW pairs file: its first non-empty line is one or two
    integers (the ``N`` / ``SETS N`` header). A pairs CSV starts with its header instead."""
    try:
        with open(path, "r", encoding="utf-8-sig") as handle:
            for line in handle:
                if line.strip():
                    fields = line.split()
                    return len(fields) in (1, 2) and all(field.isdigit() for field in fields)
    except (OSError, UnicodeDecodeError):
        return False  # the CSV reader reports what is wrong with it
    return False


# Tried in this order where Name/Name_%04d.jpg is absent: the other known extensions, then
# their upper-case spellings.
_LFW_EXTENSIONS = tuple(dict.fromkeys([".jpg", *(e.lower() for e in IMAGE_EXTENSIONS),
                                       *(e.upper() for e in IMAGE_EXTENSIONS)]))


def read_lfw_pairs_paths(pairs: Path, root: Path) -> tuple[list[str], list[str], np.ndarray]:
    """The pairs of an LFW pairs file as relative paths under ``root``, each image's extension
    found on disk (``.jpg`` first); an image found under no extension keeps its ``.jpg`` name,
    for the missing-image error."""
    parsed = parse_lfw_pairs(pairs)
    found: dict[tuple[str, int], str] = {}

    def resolve(person: str, number: int) -> str:
        key = (person, number)
        if key not in found:
            found[key] = next((name for name in (lfw_image_name(person, number, ext) for ext in _LFW_EXTENSIONS)
                               if (root / name).is_file()), lfw_image_name(person, number))
        return found[key]

    names_a = [resolve(p, int(n)) for p, n in zip(parsed.persons_a, parsed.numbers_a)]
    names_b = [resolve(p, int(n)) for p, n in zip(parsed.persons_b, parsed.numbers_b)]
    return names_a, names_b, parsed.is_same.astype(bool)


def load_pairs(pairs: str | Path, root: str | Path | None = None, allow_outside_root: bool = False) -> PairsOnDisk:
    """Read a pairs CSV or an LFW pairs file (told apart by content, see the module docstring);
    paths are relative to ``root`` (default: the pairs file's folder).

    A missing image is an error listing the missing files: dropping pairs silently would change
    the protocol. Repeated pairs of a CSV are dropped (counted in ``duplicates``); an LFW pairs
    file with a repeated pair is refused. A path outside the root is an error unless
    ``allow_outside_root`` (see the module docstring); LFW names cannot leave the root.
    """
    pairs = Path(pairs)
    if not pairs.is_file():
        raise DatasetError(f"pairs file {pairs} does not exist")
    root = Path(root) if root else pairs.parent
    lfw = is_lfw_pairs_file(pairs)
    names_a, names_b, is_same = read_lfw_pairs_paths(pairs, root) if lfw else read_pairs_csv(pairs)
    if not allow_outside_root:
        outside = [name for name in dict.fromkeys(names_a + names_b) if _leaves_root(name)]
        if outside:
            raise DatasetError(f"{len(outside)} path(s) in {pairs} are absolute or climb out of the root {root} "
                               f"(e.g. {outside[0]}); pair images must lie under the root (--root), or pass "
                               "--allow-outside-root to read them anyway")
    names_a, names_b, is_same, duplicates = _drop_duplicate_pairs(pairs, names_a, names_b, is_same)
    unique = sorted(set(names_a) | set(names_b))
    missing = [p for p in unique if not (root / p).is_file()]
    if missing:
        tried = (f" (LFW pairs file: no file of any of the extensions {', '.join(IMAGE_EXTENSIONS)} either)"
                 if lfw else "")
        raise DatasetError(f"{len(missing)} image(s) named in {pairs} are missing under {root}: {missing[:5]}{tried}")
    position = {p: i for i, p in enumerate(unique)}
    return PairsOnDisk(
        paths=[str(root / p) for p in unique],
        idx_a=np.array([position[p] for p in names_a], dtype=np.int64),
        idx_b=np.array([position[p] for p in names_b], dtype=np.int64),
        is_same=is_same, names_a=names_a, names_b=names_b, duplicates=duplicates,
    )


def evaluate_pairs_file(checkpoint: str | Path, pairs: str | Path, root: str | Path | None, out: str | Path,
                        device: str = "auto", progress: bool = True, allow_outside_root: bool = False,
                        align_check: bool = True) -> dict:
    """Embed every image the pairs name, score pairs by cosine similarity, run the 10-fold protocol.

    Writes ``metrics.json`` (with ``duplicate_pairs_removed``), ``scores.csv`` (one row per
    distinct pair) and ``roc.png``. ``allow_outside_root``: see :func:`load_pairs`. The images
    must be aligned crops: images not of the model's input size with no align manifest in their
    folder (or above it, up to the root) are refused as raw photos before any embedding
    (:class:`facepipe.eval.crops.NotAlignedCropsError`), unless ``align_check`` is False.
    """
    resolved = load_pairs(pairs, root, allow_outside_root)
    loaded = load_model(checkpoint, resolve_device(device))
    if align_check:
        from facepipe.eval.crops import check_aligned_crops

        check_aligned_crops(Path(root) if root else Path(pairs).parent, resolved.paths, loaded.input_size,
                            "align them with 'facepipe align' (at the model's input size) and point --root at its "
                            "output, or give --no-align-check (align_check=False) to evaluate them as they are")
    # The checkpoint's input size, flip fusion, batch size and mixed precision (train.amp), as
    # every other job embeds.
    embeddings, embedded = embed_paths(loaded, resolved.paths, progress=progress)
    scores = cosine_scores(embeddings, resolved.idx_a, resolved.idx_b)
    result = evaluate_verification(scores, resolved.is_same)
    out = Path(out)
    metrics = {"checkpoint": str(checkpoint), "model_fingerprint": loaded.fingerprint, "pairs": str(pairs),
               "root": str(Path(root) if root else Path(pairs).parent), "flip": embedded["flip"],
               "duplicate_pairs_removed": resolved.duplicates, **result.to_dict()}
    # Together, metrics.json last: a failed plot never leaves new scores beside old metrics.
    with staged_files(out, last="metrics.json") as staging:
        write_csv_atomic(staging / "scores.csv", ["path_a", "path_b", "is_same", "score"],
                         zip(resolved.names_a, resolved.names_b, resolved.is_same.astype(int), np.round(scores, 6)))
        plot_roc({f"{Path(checkpoint).name} (AUC {result.auc:.3f})": (result.fpr, result.tpr)}, staging / "roc.png")
        write_json_atomic(staging / "metrics.json", metrics)
    dropped = f" ({resolved.duplicates} repeated pair(s) dropped)" if resolved.duplicates else ""
    return {"metrics": metrics, "summary": f"{result.num_pairs} pairs{dropped}: {result.summary()} -> {out}"}
