"""``facepipe eval ytf``: video face verification under the YouTube Faces (YTF) protocol.

Protocol (Wolf, Hassner and Maoz, "Face recognition in unconstrained videos with matched
background similarity", CVPR 2011): 5,000 video pairs in 10 splits of 500 (about half
matched), listed in ``splits.txt`` as comma-separated rows ``split, first video, second video,
..., is same`` (extra columns between the videos and the flag are ignored; a header row is
allowed). Each video is a folder of aligned frames, ``<videos>/<person>/<n>/``.

A video's embedding is the L2-normalised mean of its frame embeddings, optionally of at most
``max_frames`` frames taken evenly spaced through the video (in natural file-name order). The
pair score is their cosine similarity, and accuracy is 10-fold cross-validated over the splits
(each split's threshold is the best one on the other nine), as for LFW View 2.

Frames come from a checkpoint (``videos`` folder) or from precomputed embeddings: a
``facepipe embed`` folder of the ``videos`` tree, whose manifest identity column is then the
video (``person/n``). A video without usable frames (missing folder, or every frame listed in
``missing`` as faceless) stops the evaluation with the list, unless ``allow_missing`` counts
its pairs as wrong.
"""
from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from facepipe.eval.lfw import (
    MISSING_FILE,
    NO_FACE,
    NOT_EMBEDDED,
    EmbeddingTable,
    embed_files,
    load_embeddings_folder,
    missing_error,
    normalise_relative_path,
)
from facepipe.eval.report import EvalReport, Table, verification_rows, write_report
from facepipe.eval.verification import EvalInputError, evaluate_verification, score_missing_as_wrong

__all__ = ["YTFSplits", "evaluate_ytf", "evenly_spaced", "parse_ytf_splits", "video_embeddings"]


@dataclass(eq=False)
class YTFSplits:
    """A parsed YTF splits file; pair k compares ``videos_a[k]`` with ``videos_b[k]``."""

    path: str
    videos_a: list[str]
    videos_b: list[str]
    is_same: np.ndarray  # bool
    folds: np.ndarray  # 0-based split of each pair
    num_folds: int
    line_numbers: np.ndarray

    def __len__(self) -> int:
        return int(self.is_same.shape[0])

    def videos(self) -> list[str]:
        return sorted(set(self.videos_a) | set(self.videos_b))


def parse_ytf_splits(path: str | os.PathLike) -> YTFSplits:
    """Parse a YTF ``splits.txt`` (see the module docstring); strict, with line numbers.

    Splits must be numbered 1..S with every split non-empty and S >= 2; the flag must be 0 or 1.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"YTF splits file {path} does not exist")
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EvalInputError(f"{name}: not UTF-8 text ({exc})") from None
    videos_a: list[str] = []
    videos_b: list[str] = []
    flags: list[bool] = []
    splits: list[int] = []
    lines: list[int] = []
    blank_at: int | None = None
    for line_no, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        fields = [f.strip() for f in row]
        if not any(fields):
            blank_at = blank_at or line_no
            continue
        if blank_at is not None:
            raise EvalInputError(f"{name}: line {blank_at}: blank line inside the splits list")
        if line_no == 1 and not fields[0].isdigit():
            continue  # the header row ("split number, first name, second name, ..., is same?")
        if len(fields) < 4:
            raise EvalInputError(f"{name}: line {line_no}: expected 'split, first video, second video, ..., "
                                 f"is same', got {len(fields)} field(s): {','.join(row)!r}")
        split, first, second, flag = fields[0], fields[1], fields[2], fields[-1]
        if not split.isdigit() or int(split) < 1:
            raise EvalInputError(f"{name}: line {line_no}: split must be a positive integer, got {split!r}")
        if flag not in ("0", "1"):
            raise EvalInputError(f"{name}: line {line_no}: 'is same' must be 0 or 1, got {flag!r}")
        for video in (first, second):
            parts = PurePosixPath(video.replace("\\", "/")).parts
            if not video or video.startswith(("/", "\\")) or ".." in parts:
                raise EvalInputError(f"{name}: line {line_no}: invalid video name {video!r} "
                                     "(expected a relative folder such as person/0)")
        videos_a.append(normalise_relative_path(first))
        videos_b.append(normalise_relative_path(second))
        flags.append(flag == "1")
        splits.append(int(split))
        lines.append(line_no)
    if not flags:
        raise EvalInputError(f"{name}: no video pairs")
    numbers = np.asarray(splits, dtype=np.int64)
    num_folds = int(numbers.max())
    empty = sorted(set(range(1, num_folds + 1)) - set(splits))
    if num_folds < 2 or empty:
        raise EvalInputError(f"{name}: splits must be numbered 1..S with S >= 2 and none empty; "
                             f"found splits {sorted(set(splits))}")
    return YTFSplits(path=name, videos_a=videos_a, videos_b=videos_b, is_same=np.asarray(flags, dtype=bool),
                     folds=numbers - 1, num_folds=num_folds, line_numbers=np.asarray(lines, dtype=np.int64))


def _natural_key(name: str) -> list:
    # frame_2.jpg before frame_10.jpg: video frames are numbered without zero padding.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def evenly_spaced(num_frames: int, max_frames: int | None) -> np.ndarray:
    """Indices of at most ``max_frames`` frames spread evenly from first to last (all if None)."""
    if max_frames is None or num_frames <= max_frames:
        return np.arange(num_frames)
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if max_frames == 1:
        return np.array([(num_frames - 1) // 2])
    return np.unique(np.round(np.linspace(0, num_frames - 1, max_frames)).astype(np.int64))


def video_embeddings(frames: np.ndarray, video_of_frame: Sequence[int], num_videos: int) -> np.ndarray:
    """L2-normalised mean of each video's (L2-normalised) frame embeddings; float32.

    Frame embeddings are normalised first so that every frame weighs the same in the mean.
    Every video needs at least one frame.
    """
    frames = np.asarray(frames, dtype=np.float64)
    owner = np.asarray(video_of_frame, dtype=np.int64)
    norms = np.linalg.norm(frames, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise EvalInputError("a frame embedding has zero norm or non-finite values")
    sums = np.zeros((num_videos, frames.shape[1]), dtype=np.float64)
    np.add.at(sums, owner, frames / norms)
    counts = np.bincount(owner, minlength=num_videos)
    if np.any(counts == 0):
        raise ValueError(f"{int((counts == 0).sum())} video(s) have no frames")
    means = sums / counts[:, None]
    lengths = np.linalg.norm(means, axis=1, keepdims=True)
    if np.any(lengths == 0):
        raise EvalInputError("a video's frame embeddings cancel out (zero mean)")
    return (means / lengths).astype(np.float32)


def _frames_on_disk(root: Path, video: str) -> list[str]:
    # Imported here: facepipe.data pulls in torch, which metric-only use never needs.
    from facepipe.data.dataset import IMAGE_EXTENSIONS

    folder = root / video
    if not folder.is_dir():
        return []
    suffixes = set(IMAGE_EXTENSIONS)
    names = sorted((p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes),
                   key=_natural_key)
    return [f"{video}/{n}" for n in names]


def _frames_in_table(table: EmbeddingTable) -> dict[str, list[str]]:
    by_video: dict[str, list[str]] = {}
    for key in table.keys:
        video, _, _ = key.rpartition("/")
        by_video.setdefault(video, []).append(key)
    return {video: sorted(keys, key=lambda k: _natural_key(k.rpartition("/")[2])) for video, keys in by_video.items()}


def evaluate_ytf(
    splits: str | os.PathLike,
    out: str | os.PathLike,
    *,
    videos: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    embeddings: str | os.PathLike | None = None,
    max_frames: int | None = None,
    allow_missing: bool = False,
    missing: Iterable[str] = (),
    flip: str | None = None,
    fars: Sequence[float] = (1e-3, 1e-4),
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
) -> dict:
    """``facepipe eval ytf``: YTF video-pair verification; writes a report folder ``out``.

    Pass ``videos`` (folder of ``person/n/<frames>``) with ``checkpoint``, or ``embeddings`` (a
    ``facepipe embed`` folder of that tree). ``max_frames``: use at most this many evenly spaced
    frames per video. ``missing``: frame paths relative to ``videos`` that had no face.
    Returns ``{"metrics", "summary"}``.
    """
    if (videos is None) == (embeddings is None):
        raise EvalInputError("give either videos (with a checkpoint) or precomputed frame embeddings, not both or neither")
    if videos is not None and checkpoint is None:
        raise EvalInputError("evaluating video frames needs a checkpoint to embed them")
    if max_frames is not None and max_frames < 1:
        raise EvalInputError(f"max_frames must be >= 1, got {max_frames}")
    parsed = parse_ytf_splits(splits)
    needed = parsed.videos()
    no_face = {normalise_relative_path(p) for p in missing}

    table: EmbeddingTable | None = None
    if embeddings is not None:
        table = load_embeddings_folder(embeddings)
        listing = _frames_in_table(table)
        absent_reason = NOT_EMBEDDED
    else:
        root = Path(videos)
        if not root.is_dir():
            raise EvalInputError(f"video folder {root} does not exist")
        listing = {v: _frames_on_disk(root, v) for v in tqdm(needed, desc="list frames", unit="video",
                                                                disable=not progress, leave=False)}
        absent_reason = MISSING_FILE

    chosen: dict[str, list[str]] = {}
    absent: dict[str, str] = {}
    for video in needed:
        frames = listing.get(video, [])
        usable = [f for f in frames if f not in no_face]
        if not usable:
            absent[video] = NO_FACE if frames else absent_reason
            continue
        chosen[video] = [usable[i] for i in evenly_spaced(len(usable), max_frames)]
    gone = np.array([a in absent or b in absent for a, b in zip(parsed.videos_a, parsed.videos_b)], dtype=bool)
    if absent and not allow_missing:
        raise missing_error(parsed.path, absent, int(gone.sum()), len(parsed), out, unit="video pair")
    if not chosen:
        raise EvalInputError(f"none of the {len(needed)} videos in {parsed.path} has usable frames")

    present_videos = sorted(chosen)
    frame_keys = [key for v in present_videos for key in chosen[v]]
    owner = np.repeat(np.arange(len(present_videos)), [len(chosen[v]) for v in present_videos])
    if table is None:
        table = embed_files(checkpoint, videos, frame_keys, flip=flip, device=device, batch_size=batch_size,
                            progress=progress)
    frames = np.asarray(table.vectors[table.rows(frame_keys)])
    per_video = video_embeddings(frames, owner, len(present_videos))
    row_of = {v: i for i, v in enumerate(present_videos)}

    scores = np.zeros(len(parsed), dtype=np.float64)
    keep = np.flatnonzero(~gone)
    ia = np.array([row_of[parsed.videos_a[k]] for k in keep], dtype=np.int64)
    ib = np.array([row_of[parsed.videos_b[k]] for k in keep], dtype=np.int64)
    # Video embeddings are unit vectors, so the dot product is the cosine.
    scores[keep] = np.clip(np.einsum("ij,ij->i", per_video[ia].astype(np.float64),
                                     per_video[ib].astype(np.float64)), -1.0, 1.0)
    scores = score_missing_as_wrong(scores, parsed.is_same, gone)
    result = evaluate_verification(scores, parsed.is_same, n_folds=parsed.num_folds, folds=parsed.folds, fars=fars)
    result.fold_scheme = "official splits"

    counts_frames = [len(chosen[v]) for v in present_videos]
    missing_policy = "count as wrong" if allow_missing else "stop"
    metrics: dict[str, Any] = {
        "protocol": {"name": "YouTube Faces video verification",
                     "variant": f"{parsed.num_folds}-fold cross-validation over the official splits",
                     "video_embedding": "L2-normalised mean of L2-normalised frame embeddings",
                     "max_frames": max_frames, "threshold_source": result.threshold_source,
                     "tar_at_far": "interpolated linearly on the ROC curve", "missing_pairs": missing_policy},
        "model_fingerprint": table.model_fingerprint,
        "data": {"splits": str(splits), "videos": str(videos) if videos is not None else None,
                 "embeddings": str(embeddings) if embeddings is not None else None},
        "model": {"checkpoint": str(checkpoint) if checkpoint is not None else table.source.get("checkpoint"),
                  "flip": table.flip},
        "counts": {"pairs": len(parsed), "matched": int(parsed.is_same.sum()),
                   "mismatched": int((~parsed.is_same).sum()), "videos": len(needed),
                   "frames_used": int(sum(counts_frames)), "frames_per_video_min": int(min(counts_frames)),
                   "frames_per_video_max": int(max(counts_frames)), "missing_videos": len(absent),
                   "missing_pairs": int(gone.sum())},
        "missing_videos": dict(absent),
        "verification": result.to_dict(),
    }
    rows = verification_rows(result)
    if absent:
        rows.append(("video pairs with a missing video, counted as wrong", str(int(gone.sum()))))
    table_rows = ((int(parsed.folds[k]) + 1, int(parsed.line_numbers[k]), parsed.videos_a[k], parsed.videos_b[k],
                   int(parsed.is_same[k]), f"{scores[k]:.6f}", int(gone[k])) for k in range(len(parsed)))
    label = f"{Path(str(checkpoint or embeddings)).name} (AUC {result.auc:.3f})"
    report = EvalReport(
        title=f"YouTube Faces verification: {Path(parsed.path).name}",
        metrics=metrics,
        summary_rows=rows,
        protocol_notes=[
            f"splits: {parsed.path}, {len(parsed)} video pairs in {parsed.num_folds} splits",
            "video embedding: L2-normalised mean of its frame embeddings"
            + (f", at most {max_frames} evenly spaced frames" if max_frames else ", all frames"),
            f"{parsed.num_folds}-fold cross-validation over the official splits: each split's threshold is the "
            "best one on the other splits",
            "TAR at FAR is interpolated linearly on the ROC curve",
            f"video pairs with a missing video or no face: {missing_policy}",
        ],
        tables=[Table("scores.csv", ("split", "line", "video_a", "video_b", "is_same", "score", "missing"),
                      table_rows)],
        roc_curves={label: (result.fpr, result.tpr)},
        roc_title=f"YTF {Path(parsed.path).name}",
    )
    metrics = write_report(out, report)
    summary = f"YTF {Path(parsed.path).name}: {len(parsed)} video pairs: {result.summary()}"
    if absent:
        summary += f" ({int(gone.sum())} pair(s) with missing videos counted as wrong)"
    return {"metrics": metrics, "summary": f"{summary} -> {out}"}
