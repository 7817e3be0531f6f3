"""``facepipe eval lfw``: face verification under the LFW protocols, and the embedding sources
every evaluation job shares.

Protocols (Huang et al., "Labeled Faces in the Wild", tech. report 07-49):

* View 2 (``pairs.txt``, header ``10 300``): 10-fold cross-validation over the 10 official
  folds; each fold's threshold is the best one on the other nine; accuracy is reported as mean
  +- std over the folds.
* View 1 (``pairsDevTest.txt``, header ``500``; ``pairsDevTrain.txt``, ``1100``): a single set.
  The threshold comes from a separate pairs file when one is given (DevTrain for DevTest),
  otherwise from 10-fold cross-validation on the test pairs themselves, with folds made of
  contiguous tenths of the matched and of the mismatched pairs. The report names which.

Images are either aligned crops (``name/name_%04d.jpg`` under ``--images``), embedded here with
a checkpoint and its flip fusion, or precomputed embeddings: a folder written by
``facepipe embed`` (``embeddings.npy`` + ``manifest.csv`` + ``embed.json``).

A pair whose image is missing (file absent, not in the embeddings manifest, or listed in
``missing`` because alignment found no face in it) is never dropped silently: evaluation stops
with the list, unless ``allow_missing``, which counts such pairs as wrong (see
:func:`facepipe.eval.verification.score_missing_as_wrong`) and reports how many.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

import numpy as np

from facepipe.align.manifest import USABLE_STATUSES, alignment_statuses
from facepipe.data.lfw_pairs import LFWPairs, parse_lfw_pairs
from facepipe.embed.folder import EmbeddingsFolder
from facepipe.eval.report import EvalReport, Table, verification_rows, write_report
from facepipe.eval.verification import (
    EvalInputError,
    cosine_scores,
    evaluate_verification,
    score_missing_as_wrong,
)
from facepipe.runtime.io import write_text_atomic

__all__ = [
    "EmbeddingTable",
    "MISSING_FILE",
    "NO_FACE",
    "NOT_EMBEDDED",
    "embed_files",
    "evaluate_lfw",
    "load_embeddings_folder",
    "missing_error",
    "normalise_relative_path",
]

# Why an image has no embedding; written into the missing-image lists.
MISSING_FILE = "file missing"
NO_FACE = "no face"
NOT_EMBEDDED = "not in the embeddings manifest"

MAX_LISTED_MISSING = 20


# --------------------------------------------------------------------------------------------
# Embedding sources (shared by the LFW, YTF and MegaFace jobs)
# --------------------------------------------------------------------------------------------
def normalise_relative_path(path: str | os.PathLike) -> str:
    """``./a\\b.jpg`` -> ``a/b.jpg``: the key an image has in pairs files, manifests and lists."""
    text = str(path).replace("\\", "/")
    return PurePosixPath(*[part for part in PurePosixPath(text).parts if part not in (".", "")]).as_posix()


@dataclass(eq=False)
class EmbeddingTable:
    """Embeddings keyed by image path relative to the image root (``identity/file.jpg``)."""

    vectors: np.ndarray  # (num_images, dim); possibly a read-only memory map
    keys: list[str]
    model_fingerprint: str | None
    flip: str | None
    source: dict[str, Any]  # where the vectors came from (checkpoint or embeddings folder)
    position: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.keys):
            raise EvalInputError(
                f"embeddings have shape {self.vectors.shape} but there are {len(self.keys)} image keys"
            )
        self.position = {key: row for row, key in enumerate(self.keys)}
        if len(self.position) != len(self.keys):
            raise EvalInputError("the embeddings list the same image more than once")

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        return np.array([self.position[k] for k in keys], dtype=np.int64)


def load_embeddings_folder(folder: str | os.PathLike, mmap: bool = False) -> EmbeddingTable:
    """Read a folder written by ``facepipe embed`` (:func:`facepipe.embed.embed_folder`).

    ``embeddings.npy`` rows follow ``manifest.csv`` (``row,path,identity``); an image's key is
    ``identity/filename``, i.e. its path relative to the folder that was embedded. ``embed.json``
    (model fingerprint, flip mode) is optional; when it lists the files it was written with
    (``parts``), a folder whose array or manifest is another output's is refused. With ``mmap``
    the array is memory-mapped read-only instead of loaded, for distractor sets larger than memory.
    """
    opened = EmbeddingsFolder.open(folder, mmap=mmap, require_manifest=True, error=EvalInputError)
    return EmbeddingTable(vectors=opened.embeddings, keys=opened.keys(), model_fingerprint=opened.fingerprint,
                          flip=opened.flip,
                          source={"embeddings": str(folder), "checkpoint": opened.info.get("checkpoint")})


def embed_files(
    checkpoint: str | os.PathLike,
    root: str | os.PathLike,
    keys: Sequence[str],
    flip: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
    crop_check: str | None = None,
) -> EmbeddingTable:
    """Embed ``root/key`` for every key with the checkpoint's model; flip fusion from its
    config (``embed.flip``) unless ``flip`` is given. ``crop_check``: first check that the
    images are aligned crops of the model's input size (:func:`facepipe.eval.crops.check_aligned_crops`),
    this text ending the error (what to do instead)."""
    # torch is imported only here, so metric-only evaluation (precomputed embeddings) never
    # pays for it.
    from facepipe.embed.extract import embed_paths
    from facepipe.models.loaded import load_model
    from facepipe.runtime.device import resolve_device

    loaded = load_model(checkpoint, resolve_device(device))
    keys = list(keys)
    if crop_check is not None:
        from facepipe.eval.crops import check_aligned_crops

        check_aligned_crops(root, [Path(root) / key for key in keys], loaded.input_size, crop_check)
    vectors, info = embed_paths(loaded, [str(Path(root) / key) for key in keys], flip=flip, batch_size=batch_size,
                                progress=progress)
    if not keys:
        vectors = np.zeros((0, 1), dtype=np.float32)
    return EmbeddingTable(vectors=vectors, keys=keys, model_fingerprint=info["model_fingerprint"], flip=info["flip"],
                          source={"checkpoint": str(checkpoint), "images": str(root)})


def missing_error(
    what: str, missing: dict[str, str], num_affected: int, num_total: int, out: str | os.PathLike | None,
    unit: str = "pair",
) -> EvalInputError:
    """The error that stops an evaluation over missing images/videos; the full list goes to
    ``out/missing.txt`` so that a long list never has to fit on a terminal line."""
    listed = ", ".join(f"{key} ({reason})" for key, reason in list(missing.items())[:MAX_LISTED_MISSING])
    more = len(missing) - MAX_LISTED_MISSING
    where = ""
    if out is not None:
        write_text_atomic(Path(out) / "missing.txt", "".join(f"{k}\t{r}\n" for k, r in missing.items()))
        where = f"; full list in {Path(out) / 'missing.txt'}"
    return EvalInputError(
        f"{num_affected} of {num_total} {unit}s in {what} name {len(missing)} missing item(s) (or ones with "
        f"no face); they are never dropped silently: evaluation stopped (allow_missing / --allow-missing "
        f"counts such {unit}s as wrong): {listed}{f' ... and {more} more' if more > 0 else ''}{where}"
    )


# --------------------------------------------------------------------------------------------
# LFW
# --------------------------------------------------------------------------------------------
@dataclass
class _ScoredPairs:
    pairs: LFWPairs
    names_a: list[str]
    names_b: list[str]
    scores: np.ndarray  # missing pairs already scored as wrong
    missing: np.ndarray  # bool per pair


def _score(pairs: LFWPairs, extension: str, table: EmbeddingTable, absent: dict[str, str]) -> _ScoredPairs:
    names_a, names_b = pairs.names(extension)
    gone = np.array([a in absent or b in absent for a, b in zip(names_a, names_b)], dtype=bool)
    present = np.flatnonzero(~gone)
    scores = np.zeros(len(pairs), dtype=np.float64)
    if present.size:
        scores[present] = cosine_scores(table.vectors, table.rows([names_a[i] for i in present]),
                                        table.rows([names_b[i] for i in present]))
    return _ScoredPairs(pairs, names_a, names_b, score_missing_as_wrong(scores, pairs.is_same, gone), gone)


def _pair_rows(scored: _ScoredPairs) -> Iterable[tuple]:
    p = scored.pairs
    for k in range(len(p)):
        yield (int(p.folds[k]) + 1, int(p.line_numbers[k]), scored.names_a[k], scored.names_b[k],
               int(p.is_same[k]), f"{scored.scores[k]:.6f}", int(scored.missing[k]))


PAIR_SCORES_HEADER = ("set", "line", "image_a", "image_b", "is_same", "score", "missing")


def evaluate_lfw(
    pairs: str | os.PathLike,
    out: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    embeddings: str | os.PathLike | None = None,
    threshold_pairs: str | os.PathLike | None = None,
    allow_missing: bool = False,
    missing: Iterable[str] = (),
    align: bool = False,
    align_check: bool = True,
    flip: str | None = None,
    extension: str = ".jpg",
    n_folds: int = 10,
    fars: Sequence[float] = (1e-3, 1e-4),
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
) -> dict:
    """``facepipe eval lfw``: LFW verification of one model; writes a report folder ``out``.

    Pass ``images`` (folder of ``name/name_%04d<extension>``) with ``checkpoint``, or
    ``embeddings`` (a ``facepipe embed`` folder of those images). ``threshold_pairs``: a
    separate pairs file whose best threshold is applied to ``pairs`` (LFW View 1: DevTrain for
    DevTest). ``missing``: relative paths known to have had no face (from the alignment
    manifest; a ``facepipe align`` output folder given as ``images`` supplies these itself).
    ``align``: ``images`` holds raw photos, aligned first into ``out/aligned`` as the checkpoint's
    config says. Without it, images not of the model's input size in a folder without an align
    manifest are refused as raw photos (:class:`facepipe.eval.crops.NotAlignedCropsError`) unless
    ``align_check`` is False (evaluate them as they are, resized). See the module docstring for
    the protocol.

    Writes ``metrics.json``, ``report.md``, ``roc.png``, ``scores.csv`` (one row per pair; also
    ``threshold_scores.csv`` for ``threshold_pairs``). Returns ``{"metrics", "summary"}``.
    """
    if (images is None) == (embeddings is None):
        raise EvalInputError("give either images (with a checkpoint) or precomputed embeddings, not both or neither")
    if images is not None and checkpoint is None:
        raise EvalInputError("evaluating images needs a checkpoint to embed them")
    test = parse_lfw_pairs(pairs)
    train = parse_lfw_pairs(threshold_pairs) if threshold_pairs is not None else None
    sets = [test] + ([train] if train is not None else [])
    wanted = sorted({name for s in sets for side in s.names(extension) for name in side})
    no_face = {normalise_relative_path(p) for p in missing}
    if align:
        if images is None or checkpoint is None:
            raise EvalInputError("aligning raw images needs the images folder and a checkpoint")
        from facepipe.align.job import align_for_model

        images = align_for_model(checkpoint, images, wanted, Path(out) / "aligned", progress=progress)
    # Crops made by `facepipe align` come with a manifest that says which images had no face.
    statuses = alignment_statuses(images) if images is not None else {}

    absent: dict[str, str] = {key: NO_FACE for key in wanted if key in no_face}
    absent.update({key: f"{NO_FACE} (alignment: {statuses[key]})" for key in wanted
                   if key not in absent and key in statuses and statuses[key] not in USABLE_STATUSES})
    if embeddings is not None:
        table = load_embeddings_folder(embeddings)
        absent.update({key: NOT_EMBEDDED for key in wanted if key not in table.position and key not in absent})
    else:
        root = Path(images)
        if not root.is_dir():
            raise EvalInputError(f"image folder {root} does not exist")
        absent.update({key: MISSING_FILE for key in wanted if key not in absent and not (root / key).is_file()})
        if len(absent) == len(wanted):
            raise EvalInputError(f"none of the {len(wanted)} images named in {pairs} exists under {root} "
                                 f"(expected files like {root / wanted[0]})")
        crop_check = None if align or not align_check else (
            "give --align (align=True) to detect and align the faces first, or point --images at aligned crops "
            "('facepipe align' output), or give --no-align-check (align_check=False) to evaluate them as they are")
        table = embed_files(checkpoint, root, [k for k in wanted if k not in absent], flip=flip, device=device,
                            batch_size=batch_size, progress=progress, crop_check=crop_check)

    scored = [_score(s, extension, table, absent) for s in sets]
    num_missing_pairs = [int(sc.missing.sum()) for sc in scored]
    if absent and not allow_missing:
        raise missing_error(", ".join(s.path for s in sets), absent, sum(num_missing_pairs),
                            sum(len(s) for s in sets), out)

    test_scored = scored[0]
    if train is not None:
        result = evaluate_verification(test_scored.scores, test.is_same, fars=fars,
                                       threshold_scores=scored[1].scores, threshold_is_same=train.is_same)
        fold_note = f"threshold: the best one on the separate pairs file {train.path} ({len(train)} pairs)"
    elif test.num_folds > 1:
        result = evaluate_verification(test_scored.scores, test.is_same, n_folds=test.num_folds,
                                       folds=test.folds, fars=fars)
        result.fold_scheme = "official"
        fold_note = (f"{test.num_folds}-fold cross-validation over the official folds of the file: each fold's "
                     "threshold is the best one on the other folds")
    else:
        result = evaluate_verification(test_scored.scores, test.is_same, n_folds=n_folds,
                                       folds=test.contiguous_folds(n_folds), fars=fars)
        result.fold_scheme = "contiguous per class"
        fold_note = (f"{n_folds}-fold cross-validation on the test pairs (no separate threshold file): fold k = "
                     "the k-th contiguous tenth of the matched plus of the mismatched pairs; each fold's "
                     "threshold is the best one on the other folds")

    missing_policy = "count as wrong" if allow_missing else "stop"
    protocol = {
        "name": "LFW verification",
        "variant": test.view,
        "fold_scheme": result.fold_scheme,
        "threshold_source": result.threshold_source,
        "tar_at_far": "interpolated linearly on the ROC curve",
        "missing_pairs": missing_policy,
        "score": "cosine similarity of L2-normalised embeddings",
    }
    metrics: dict[str, Any] = {
        "protocol": protocol,
        "model_fingerprint": table.model_fingerprint,
        "data": {"pairs": str(pairs), "threshold_pairs": str(threshold_pairs) if threshold_pairs else None,
                 "images": str(images) if images is not None else None,
                 "embeddings": str(embeddings) if embeddings is not None else None},
        "model": {"checkpoint": str(checkpoint) if checkpoint is not None else table.source.get("checkpoint"),
                  "flip": table.flip},
        "counts": {"pairs": len(test), "matched": int(test.is_same.sum()),
                   "mismatched": int((~test.is_same).sum()), "images": len(wanted),
                   "missing_images": len(absent), "missing_pairs": num_missing_pairs[0],
                   "fallback_crops": sum(statuses.get(key) == "fallback" for key in wanted),
                   "threshold_pairs": len(train) if train is not None else 0,
                   "missing_threshold_pairs": num_missing_pairs[1] if train is not None else 0},
        "missing_images": dict(absent),
        "verification": result.to_dict(),
    }
    rows = verification_rows(result)
    if absent:
        rows.append(("pairs with a missing image, counted as wrong", str(num_missing_pairs[0])))
    tables = [Table("scores.csv", PAIR_SCORES_HEADER, _pair_rows(test_scored))]
    if train is not None:
        tables.append(Table("threshold_scores.csv", PAIR_SCORES_HEADER, _pair_rows(scored[1])))
    label = f"{Path(str(checkpoint or embeddings)).name} (AUC {result.auc:.3f})"
    report = EvalReport(
        title=f"LFW verification: {Path(test.path).name}",
        metrics=metrics,
        summary_rows=rows,
        protocol_notes=[
            f"pairs: {test.path}, {test.view}",
            fold_note,
            "score: cosine similarity; a pair is 'same' when score >= threshold",
            "TAR at FAR is interpolated linearly on the ROC curve (below 1 / mismatched pairs it is "
            "an interpolation, not a measured operating point)",
            f"pairs with a missing image or no face: {missing_policy}"
            + (f" ({num_missing_pairs[0]} such pair(s))" if allow_missing else ""),
        ],
        tables=tables,
        roc_curves={label: (result.fpr, result.tpr)},
        roc_title=f"LFW {Path(test.path).name}",
    )
    metrics = write_report(out, report)
    summary = f"LFW {Path(test.path).name}: {len(test)} pairs: {result.summary()}"
    if absent:
        summary += f" ({num_missing_pairs[0]} pair(s) with missing images counted as wrong)"
    return {"metrics": metrics, "summary": f"{summary} -> {out}"}
