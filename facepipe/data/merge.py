"""Merge identity-folder trees from several sources into one training pool (``facepipe merge``).

A long-tailed study trains on a head from one set (Pins: 105 people with 86-237 photos each) and
a tail from another (LFW's people outside ``pairsDevTest.txt``, most with one photo). The same
person may be in both under differently spelled folder names (``pins_Adriana Lima`` and
``Adriana_Lima``); the people of a test pairs file must be left out of training entirely, from
every source.

Naming rule. Each source folder name becomes an identity name by these steps, in order:

1. ``rename_map`` (a file of ``old<TAB>new`` lines; further columns, blank lines and ``#``
   comments ignored): a listed folder takes the new name (e.g. the ``names.tsv`` that
   ``stage_pins.sh`` writes);
2. ``rename_pattern`` (a regular expression): a name it matches *entirely* becomes its first
   group (the whole match when it has none), e.g. ``pins_(.*)``; names it does not match stay;
3. ``replace`` (``(old, new)`` pairs): plain substring replacements, applied in order;
4. normalisation, always: runs of whitespace become one ``_`` and leading/trailing whitespace
   goes (``Adriana Lima`` -> ``Adriana_Lima``, the LFW spelling; LFW pairs files separate fields
   by whitespace, so a name may not hold any).

Identities of different sources with the same name (compared ignoring case when
``ignore_case``; the spelling of the first source then wins) are ONE identity; two folders of
the SAME source that reach one name are an error, as is a control character in any name.

Output. ``DST/<Name>/<Name>_<NNNN><ext>``: symbolic links to the source images (absolute, to the
real file) or copies, numbered from 1 over the sources in the order given, then by file name in
each, so image ``i`` of a pairs file line is ``<Name>_%04d`` exactly as in LFW. The extension is
the source file's, lower-cased. ``DST/merge.json`` records the sources, rules and counts.

Validation split. A fraction of the identities with 2+ images (kept after the exclusions) goes to
``DST_val`` (or ``val_out``) instead of DST, never both: the identities are ordered by the
SHA-256 of ``"<seed>:<name>"`` and the first ``round(fraction * candidates)`` (at least one) are
taken, so the split depends only on the seed and the names, not on library versions. Verification
pairs in the LFW View 1 format go to ``DST_val/pairs.txt``: ``N`` matched and ``N`` mismatched
pairs, ``N = min(val_pairs, what the validation people allow)``. Both are drawn with
``random.Random(seed)``: matched pairs round-robin over the validation identities in a seeded order
(each turn one not-yet-drawn pair of two different images of that identity), so every identity
contributes alike until its pairs run out and a head identity does not crowd out the rest;
mismatched pairs as two different identities drawn uniformly, then one image of each uniformly,
never the same two images twice.

Closed-set probes. With ``probe_fraction`` > 0, every training identity with ``probe_min_images``
(at least 3) or more images lends ``min(n - 2, max(1, floor(fraction * n)))`` of them to
``DST_probes`` (or ``probe_out``): held-out images of people the model is trained on, for a
closed-set identification readout (``facepipe eval closed-set``). Which images is seeded (the
SHA-256 order of ``"<seed>:probe:<name>:<source position>:<folder>/<file>"``, so the choice does
not depend on where the sources lie or how their paths are spelled); every identity keeps at least two
training images, and a person with fewer images lends none. Probes are taken before ``max_images``
caps what is left, so a cap never changes which images are probes.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from facepipe.data.dataset import IMAGE_EXTENSIONS, DatasetError
from facepipe.runtime.io import OutputError, atomic_folder, check_writable_output, write_json_atomic, \
    write_text_atomic
from facepipe.utils.names import check_identity_name, escape_controls

log = logging.getLogger(__name__)

__all__ = ["MergeSource", "merge_identity_sources", "normalise_identity_name", "read_rename_map",
           "read_name_list"]

RECORD = "merge.json"
PAIRS_FILE = "pairs.txt"


@dataclass
class MergeSource:
    """One identity-folder tree and the rules that turn its folder names into identity names
    (see the module docstring for the order they apply in)."""

    path: str | os.PathLike
    rename_map: str | os.PathLike | None = None
    rename_pattern: str | None = None
    replace: Sequence[tuple[str, str]] = field(default_factory=tuple)


def normalise_identity_name(name: str) -> str:
    """Whitespace runs to one ``_``, no leading or trailing whitespace: ``Adriana Lima`` ->
    ``Adriana_Lima``."""
    return "_".join(name.split())


def _check_folder_name(name: str, where: str) -> str:
    """A normalised identity name that can be a folder of the output (and a pairs-file field)."""
    if not name or name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name:
        raise DatasetError(f"{escape_controls(where)}: identity name {name!r} cannot be a folder name "
                           "(empty, hidden, or holding a path separator); change the renaming rules")
    return name


def read_rename_map(path: str | os.PathLike) -> dict[str, str]:
    """``old<TAB>new`` lines of ``path`` as a dict (columns after the second, blank lines and
    lines starting with ``#`` ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"rename map {path} does not exist (expected lines 'old<TAB>new')")
    mapping: dict[str, str] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) < 2 or not fields[0] or not fields[1].strip():
            raise DatasetError(f"{path}: line {line_no}: expected 'old<TAB>new', got {line!r}")
        old, new = fields[0], fields[1]
        check_identity_name(old, f"{path}, line {line_no}")
        check_identity_name(new, f"{path}, line {line_no}")
        if old in mapping and mapping[old] != new:
            raise DatasetError(f"{path}: line {line_no}: {old!r} is mapped twice ({mapping[old]!r} and {new!r})")
        mapping[old] = new
    return mapping


def read_name_list(path: str | os.PathLike) -> list[str]:
    """Identity names of ``path``, one a line (normalised; blank lines and ``#`` comments ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"name list {path} does not exist (expected one identity name a line)")
    names = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        check_identity_name(line, f"{path}, line {line_no}")
        names.append(normalise_identity_name(line))
    return names


def _as_source(source) -> MergeSource:
    if isinstance(source, MergeSource):
        return source
    if isinstance(source, dict):
        return MergeSource(**source)
    return MergeSource(path=source)


@dataclass
class _Folder:
    source: int  # position of the source
    folder: Path
    images: list[Path]


class _Renamer:
    def __init__(self, source: MergeSource) -> None:
        self.mapping = read_rename_map(source.rename_map) if source.rename_map is not None else {}
        try:
            self.pattern = re.compile(source.rename_pattern) if source.rename_pattern is not None else None
        except re.error as exc:
            raise DatasetError(f"rename pattern {source.rename_pattern!r} is not a regular expression: {exc}") from None
        self.replace = [tuple(pair) for pair in source.replace]
        for pair in self.replace:
            if len(pair) != 2 or not pair[0]:
                raise DatasetError(f"replace rule {pair!r} must be (old, new) with a non-empty old")
        self.unmatched = 0

    def __call__(self, name: str) -> str:
        if name in self.mapping:
            name = self.mapping[name]
        if self.pattern is not None:
            match = self.pattern.fullmatch(name)
            if match is None:
                self.unmatched += 1
            else:
                name = match.group(1) if self.pattern.groups else match.group(0)
        for old, new in self.replace:
            name = name.replace(old, new)
        return normalise_identity_name(name)


def _scan_source(position: int, source: MergeSource, key) -> tuple[dict[str, tuple[str, _Folder]], dict]:
    """{identity key: (name, folder)} of one source, and its record for merge.json."""
    root = Path(source.path)
    if not root.exists():
        raise DatasetError(f"source {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"source {root} is not a folder (expected an identity-folder tree SRC/<identity>/<image>)")
    renamer = _Renamer(source)
    suffixes = {ext.lower() for ext in IMAGE_EXTENSIONS}
    found: dict[str, tuple[str, _Folder]] = {}
    empty = renamed = images = 0
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        check_identity_name(folder.name, f"identity folder {folder}")
        name = _check_folder_name(check_identity_name(renamer(folder.name), f"identity folder {folder}"),
                                  f"identity folder {folder}")
        files = sorted(p for p in folder.iterdir()
                       if not p.name.startswith(".") and p.suffix.lower() in suffixes and p.is_file())
        if not files:
            empty += 1
            continue
        renamed += name != folder.name
        k = key(name)
        if k in found:
            raise DatasetError(f"source {root}: the folders {found[k][1].folder.name!r} and {folder.name!r} both "
                               f"become the identity {name!r}; two folders of one source are never merged: "
                               "fix the renaming rules or the folders")
        found[k] = (name, _Folder(position, folder, files))
        images += len(files)
    if not found:
        raise DatasetError(f"source {root} holds no identity folder with images (expected SRC/<identity>/<image>)")
    if renamer.unmatched:
        log.info("%s: %d folder name(s) do not match the rename pattern and keep their names", root, renamer.unmatched)
    record = {"path": str(root), "rename_map": None if source.rename_map is None else str(source.rename_map),
              "rename_pattern": source.rename_pattern, "replace": [list(pair) for pair in renamer.replace],
              "identities": len(found), "images": images, "renamed_folders": renamed,
              "pattern_unmatched": renamer.unmatched, "folders_without_images": empty}
    return found, record


def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def _order_key(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode("utf-8")).hexdigest()


def _distinct_pairs(n: int, rng: random.Random) -> Iterator[tuple[int, int]]:
    """Every unordered pair (i < j) of range(n) once, in a random order, drawn lazily."""
    total = n * (n - 1) // 2
    used: set[tuple[int, int]] = set()
    while 2 * len(used) < total:  # rejection sampling while most pairs are still free
        i, j = sorted(rng.sample(range(n), 2))
        if (i, j) not in used:
            used.add((i, j))
            yield i, j
    rest = [(i, j) for i in range(n) for j in range(i + 1, n) if (i, j) not in used]
    rng.shuffle(rest)
    yield from rest


def _draw_pairs(counts: dict[str, int], wanted: int, seed: int) -> tuple[list[tuple], list[tuple]]:
    """``N`` matched ``(name, i, j)`` and ``N`` mismatched ``(name1, i, name2, j)`` pairs (1-based
    image numbers), ``N = min(wanted, matched possible, mismatched possible)``."""
    names = sorted(counts)
    sizes = [counts[name] for name in names]
    matched_possible = sum(n * (n - 1) // 2 for n in sizes)
    mismatched_possible = (sum(sizes) ** 2 - sum(n * n for n in sizes)) // 2
    n_pairs = min(wanted, matched_possible, mismatched_possible)
    rng = random.Random(seed)
    order = names[:]
    rng.shuffle(order)
    streams = {name: _distinct_pairs(counts[name], rng) for name in order}
    matched: list[tuple] = []
    while len(matched) < n_pairs and order:
        for name in list(order):
            pair = next(streams[name], None)
            if pair is None:
                order.remove(name)
                continue
            matched.append((name, pair[0] + 1, pair[1] + 1))
            if len(matched) == n_pairs:
                break
    mismatched: list[tuple] = []
    if 2 * n_pairs >= mismatched_possible:  # few possible: enumerate them all
        every = [(a, i + 1, b, j + 1) for x, a in enumerate(names) for b in names[x + 1:]
                 for i in range(counts[a]) for j in range(counts[b])]
        rng.shuffle(every)
        mismatched = every[:n_pairs]
    else:
        seen: set[tuple] = set()
        while len(mismatched) < n_pairs:
            a, b = sorted(rng.sample(names, 2))
            pair = (a, rng.randrange(counts[a]) + 1, b, rng.randrange(counts[b]) + 1)
            if pair not in seen:
                seen.add(pair)
                mismatched.append(pair)
    return matched, mismatched


def _pairs_text(matched: list[tuple], mismatched: list[tuple]) -> str:
    lines = [str(len(matched))]
    lines += [f"{name}\t{i}\t{j}" for name, i, j in matched]
    lines += [f"{a}\t{i}\t{b}\t{j}" for a, i, b, j in mismatched]
    return "\n".join(lines) + "\n"


def _write_identity(folder: Path, name: str, images: list[Path], copy: bool) -> None:
    (folder / name).mkdir()
    for number, image in enumerate(images, 1):
        target = folder / name / f"{name}_{number:04d}{image.suffix.lower()}"
        if copy:
            shutil.copy2(image, target)
        else:
            os.symlink(image.resolve(), target)


def merge_identity_sources(
    sources: Sequence[MergeSource | str | os.PathLike | dict],
    destination: str | os.PathLike,
    *,
    exclude_pairs: Iterable[str | os.PathLike] = (),
    exclude_names: Iterable[str | os.PathLike] = (),
    exclude: Iterable[str] = (),
    ignore_case: bool = False,
    copy: bool = False,
    val_fraction: float = 0.0,
    seed: int = 0,
    val_pairs: int = 500,
    val_out: str | os.PathLike | None = None,
    max_images: int | None = None,
    probe_fraction: float = 0.0,
    probe_min_images: int = 3,
    probe_out: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict:
    """Merge the identity-folder trees ``sources`` (paths, :class:`MergeSource` or dicts of its
    fields) into ``destination``; see the module docstring for the naming rule, the numbering and
    the validation split. Leaves out every person named in the LFW pairs files ``exclude_pairs``,
    in the name-list files ``exclude_names`` (one name a line) and in ``exclude``. ``max_images``
    caps the images of each training identity (a seeded choice, by the hash of seed, name,
    source position and the image's folder/file inside its source; the images kept stay in their order and are numbered from 1), to fit a training budget
    with a head of many-image identities; what it leaves out is counted. ``probe_fraction``
    holds out closed-set probe images of the training identities (module docstring). Returns the record
    written to ``destination/merge.json`` with a one-paragraph ``summary`` added.
    """
    from facepipe.data.lfw_pairs import parse_lfw_pairs

    sources = [_as_source(source) for source in sources]
    if not sources:
        raise DatasetError("merge needs at least one source")
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_pairs < 0:
        raise DatasetError(f"val_pairs must be >= 0, got {val_pairs}")
    if max_images is not None and max_images < 1:
        raise DatasetError(f"max_images must be >= 1, got {max_images}")
    if not 0.0 <= probe_fraction < 1.0:
        raise DatasetError(f"probe_fraction must be in [0, 1), got {probe_fraction}")
    if probe_min_images < 3:
        raise DatasetError(f"probe_min_images must be >= 3 (every identity keeps two training images), "
                           f"got {probe_min_images}")
    destination = Path(destination)
    validating = val_fraction > 0
    probing = probe_fraction > 0
    val_folder = Path(val_out) if val_out is not None else destination.with_name(destination.name + "_val")
    probe_folder = Path(probe_out) if probe_out is not None else destination.with_name(destination.name + "_probes")

    # Outputs: checked before any work, and never a source or inside one (or holding one, which
    # --overwrite would delete).
    outputs = [destination] + ([val_folder] if validating else []) + ([probe_folder] if probing else [])
    if len({os.path.abspath(output) for output in outputs}) < len(outputs):
        raise OutputError(f"the destination, validation and probe folders must differ, got {[str(o) for o in outputs]}; "
                          "choose another --val-out / --probe-out")
    for source in sources:
        if not Path(source.path).is_dir():
            raise DatasetError(f"source {source.path} does not exist" if not Path(source.path).exists()
                               else f"source {source.path} is not a folder")
    real_sources = [Path(source.path).resolve() for source in sources]
    for x, real in enumerate(real_sources):
        if real in real_sources[:x]:
            raise DatasetError(f"source {sources[x].path} is given twice; its images would be counted twice")
    for output in outputs:
        real_output = output.resolve()
        for source, real in zip(sources, real_sources):
            if _inside(real_output, real) or _inside(real, real_output):
                raise OutputError(f"output {output} and source {source.path} overlap; write the merge elsewhere")
        if output.exists() and not output.is_dir():
            raise OutputError(f"{output} exists and is not a folder")
        if output.is_dir() and any(output.iterdir()) and not overwrite:
            raise OutputError(f"{output} exists and is not empty; choose a new folder or pass --overwrite to replace it")
        check_writable_output(output)

    key = (lambda name: name.casefold()) if ignore_case else (lambda name: name)

    # Exclusions, by (normalised) name.
    excluded_names: dict[str, str] = {}
    pairs_files = [str(path) for path in exclude_pairs]
    names_files = [str(path) for path in exclude_names]
    for path in pairs_files:
        for name in parse_lfw_pairs(path).persons():
            excluded_names.setdefault(key(normalise_identity_name(name)), name)
    for path in names_files:
        for name in read_name_list(path):
            excluded_names.setdefault(key(name), name)
    for name in exclude:
        check_identity_name(name, "excluded names")
        excluded_names.setdefault(key(normalise_identity_name(name)), name)

    # Scan every source, then merge by name in source order.
    pool: dict[str, tuple[str, list[_Folder]]] = {}
    source_records = []
    for position, source in enumerate(sources):
        found, record = _scan_source(position, source, key)
        source_records.append(record)
        for k, (name, folder) in found.items():
            pool.setdefault(k, (name, []))[1].append(folder)
    excluded = sorted(pool[k][0] for k in pool if k in excluded_names)
    excluded_images = sum(len(f.images) for k in pool if k in excluded_names for f in pool[k][1])
    kept = {name: folders for k, (name, folders) in pool.items() if k not in excluded_names}
    if not kept:
        raise DatasetError("no identity is left after the exclusions")
    images_of = {name: [image for folder in folders for image in folder.images] for name, folders in kept.items()}
    # What the seeded choices (probes, cap) hash for an image: the source's position and the path
    # inside it, so the choice does not depend on where the sources lie or how their paths are spelled.
    choice_key = {image: f"{folder.source}:{folder.folder.name}/{image.name}"
                  for folders in kept.values() for folder in folders for image in folder.images}
    merged = sorted(name for name, folders in kept.items() if len(folders) > 1)

    # Validation split: identity-disjoint, by seeded hash order.
    val_names: list[str] = []
    matched: list[tuple] = []
    mismatched: list[tuple] = []
    if validating:
        candidates = sorted((name for name in kept if len(images_of[name]) >= 2), key=lambda n: _order_key(seed, n))
        if not candidates:
            raise DatasetError("no identity with 2 or more images is left for a validation split")
        n_val = max(1, round(val_fraction * len(candidates)))
        if n_val >= len(kept):
            raise DatasetError(f"a validation fraction of {val_fraction} would leave no identity for training")
        val_names = sorted(candidates[:n_val])
        if val_pairs > 0:
            matched, mismatched = _draw_pairs({name: len(images_of[name]) for name in val_names}, val_pairs, seed)
            if not matched:
                raise DatasetError(f"the {len(val_names)} validation identities allow no mismatched pair (2 or more "
                                   "are needed): raise --val-fraction, or pass --val-pairs 0 for no pairs file")
    val_set = set(val_names)
    train_names = sorted(name for name in kept if name not in val_set)
    probes_of: dict[str, list[Path]] = {}
    if probing:
        for name in train_names:
            images = images_of[name]
            if len(images) < probe_min_images:
                continue
            held = min(len(images) - 2, max(1, math.floor(probe_fraction * len(images))))
            chosen = set(sorted(range(len(images)),
                                key=lambda i: _order_key(seed, f"probe:{name}:{choice_key[images[i]]}"))[:held])
            probes_of[name] = [image for i, image in enumerate(images) if i in chosen]
            images_of[name] = [image for i, image in enumerate(images) if i not in chosen]
    capped: dict[str, int] = {}
    if max_images is not None:
        for name in train_names:
            images = images_of[name]
            if len(images) > max_images:
                chosen = set(sorted(range(len(images)),
                                    key=lambda i: _order_key(seed, f"{name}:{choice_key[images[i]]}"))[:max_images])
                images_of[name] = [image for i, image in enumerate(images) if i in chosen]
                capped[name] = len(images) - max_images

    counts = {
        "identities": len(train_names),
        "images": sum(len(images_of[name]) for name in train_names),
        "single_image_identities": sum(len(images_of[name]) == 1 for name in train_names),
        "merged_identities": len(merged),
        "excluded_identities": len(excluded),
        "excluded_images": excluded_images,
        "validation_identities": len(val_names),
        "validation_images": sum(len(images_of[name]) for name in val_names),
        "validation_pairs": len(matched) + len(mismatched),
        "capped_identities": len(capped),
        "capped_images_left_out": sum(capped.values()),
        "probe_identities": len(probes_of),
        "probe_images": sum(len(images) for images in probes_of.values()),
    }
    record = {
        "destination": str(destination),
        "sources": source_records,
        "naming": "rename map, then rename pattern (full match -> first group), then replacements, then "
                  "whitespace runs -> '_'; same name in several sources = one identity",
        "ignore_case": ignore_case,
        "link": "copy" if copy else "symlink",
        "numbering": "<Name>/<Name>_%04d<ext>, from 1, by source order then file name",
        "exclusions": {"pairs_files": pairs_files, "names_files": names_files, "names_given": len(excluded_names)},
        "counts": counts,
        "merged_identities": merged,
        "excluded_identities": excluded,
        "validation": None,
        "max_images": max_images,
        "probes": None,
    }
    if validating:
        record["validation"] = {
            "folder": str(val_folder), "fraction": val_fraction, "seed": seed,
            "selection": "identities with 2+ images ordered by sha256('<seed>:<name>'), the first "
                         "round(fraction * candidates) taken",
            "pairs_file": str(val_folder / PAIRS_FILE) if matched else None,
            "pairs_requested": val_pairs, "pairs_per_class": len(matched), "identities": val_names,
        }

    if probing:
        record["probes"] = {
            "folder": str(probe_folder), "fraction": probe_fraction, "min_images": probe_min_images, "seed": seed,
            "selection": "of each training identity with min_images+ images, min(n - 2, max(1, floor(fraction * n))) "
                         "images by sha256('<seed>:probe:<name>:<source position>:<folder>/<file>') order, before any max_images cap",
        }
    mode = "copies" if copy else "links"
    summary = (f"merge: {counts['identities']} identities, {counts['images']} images ({mode}) in {destination} from "
               f"{len(sources)} source(s); {len(merged)} identities merged across sources, "
               f"{counts['single_image_identities']} with a single image; {len(excluded)} identities "
               f"({excluded_images} images) excluded by name")
    if capped:
        summary += (f"; {len(capped)} identities capped at {max_images} images ({sum(capped.values())} images "
                    "left out)")
    if validating:
        summary += (f"; validation: {len(val_names)} identities, {counts['validation_images']} images in "
                    f"{val_folder}" + (f", {len(matched)}+{len(mismatched)} pairs in {val_folder / PAIRS_FILE}"
                                       if matched else "") + f" (seed {seed})")
    if probing:
        summary += (f"; closed-set probes: {counts['probe_images']} images of {counts['probe_identities']} training "
                    f"identities in {probe_folder}")
    summary += f"; record in {destination / RECORD}"
    record["summary"] = summary

    with atomic_folder(destination, replace=overwrite) as staging:
        for name in train_names:
            _write_identity(staging, name, images_of[name], copy)
        if validating:
            with atomic_folder(val_folder, replace=overwrite) as val_staging:
                for name in val_names:
                    _write_identity(val_staging, name, images_of[name], copy)
                if matched:
                    write_text_atomic(val_staging / PAIRS_FILE, _pairs_text(matched, mismatched))
        if probing:
            with atomic_folder(probe_folder, replace=overwrite) as probe_staging:
                for name, images in probes_of.items():
                    _write_identity(probe_staging, name, images, copy)
        write_json_atomic(staging / RECORD, record)
    return record
