"""``facepipe align SRC DST``: detect, choose, align and write every face of a dataset.

The job is built to survive datasets of millions of files:

- resumable: every processed image gets one JSON line in the manifest, appended and fsynced
  after its crop was written atomically; a second run with the same config skips those images;
- shardable: ``shard=(i, n)`` takes the images whose path hash is i modulo n, so separate machines
  (or a job array) cover a dataset without overlap or coordination, each with its own manifest;
- robust: an image that cannot be decoded or has no face gets a status in the manifest and the
  run goes on;
- one writer per manifest: a run holds an exclusive lock on its manifest (``DST/.<manifest>.lock``)
  and a second run into the same DST and shard stops at once with an error; shards of one DST
  still run side by side.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np

from facepipe.align.decode import DECODE_FAILURES, MISSING, DecodedImage, decode_for_alignment
from facepipe.align.detector import MTCNN, FaceDetections
from facepipe.align.transform import alignment_matrix, center_crop_matrix, warp_face
from facepipe.config import AlignConfig
from facepipe.data.dataset import IMAGE_EXTENSIONS
from facepipe.align.manifest import (
    MANIFEST_VERSION,
    AlignError,
    latest_rows,
    manifest_path,
    read_manifest,
)
from facepipe.runtime.io import exclusive_lock, write_bytes_atomic, write_json_atomic, write_text_atomic
from facepipe.utils.walk import walk_tree

log = logging.getLogger(__name__)

# Outcome of every image, in the order the summary lists them.
STATUSES = ("aligned", "fallback", "no_face", "too_small", MISSING) + DECODE_FAILURES
# Images per unit of work: one detector call, one manifest flush.
CHUNK_SIZE = 32
# Config fields that do not change any output file (safe to change between resumed runs).
RESULT_NEUTRAL_FIELDS = ("device",)
# Suffixes OpenCV encodes; other inputs (pgm, ppm, gif) get PNG crops.
WRITABLE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class AlignSummary:
    counts: dict[str, int]  # images per status in this run
    skipped: int  # already done by an earlier run
    total: int  # images of this shard
    manifest: Path
    seconds: float

    def line(self) -> str:
        done = sum(self.counts.values())
        parts = ", ".join(f"{status} {self.counts.get(status, 0)}" for status in STATUSES if self.counts.get(status))
        rate = done / self.seconds if self.seconds > 0 else 0.0
        return (f"{done} processed ({parts or 'nothing new'}), {self.skipped} already done, "
                f"{self.total} in shard; {rate:.1f} img/s; manifest {self.manifest}")


# ----------------------------------------------------------------------------- inputs
def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    index, sep, count = text.partition("/")
    try:
        shard = int(index), int(count)
    except ValueError:
        shard = (-1, 0)
    if not sep or shard[1] < 1 or not 0 <= shard[0] < shard[1]:
        raise AlignError(f"shard '{text}' must be i/n with 0 <= i < n, e.g. 0/4")
    return shard


def in_shard(relative_path: str, shard: tuple[int, int]) -> bool:
    """Stable across machines and runs (CRC-32 of the path), unlike Python's salted ``hash``."""
    index, count = shard
    return count == 1 or zlib.crc32(relative_path.encode("utf-8")) % count == index


def list_inputs(source: str | Path, root: str | Path | None = None,
                destination: str | Path | None = None) -> tuple[Path, list[str]]:
    """The root folder and the sorted relative paths of the images to align.

    ``source`` is a folder (walked recursively, links followed; files with an image extension,
    and links with one whose target is gone, which get the status "missing") or a text file
    listing one image path per line, relative to ``root`` (default: the list's folder).
    ``destination``: the output folder, refused inside a source folder (each run would align
    the crops of the one before) and never walked into when a link leads there.
    """
    source = Path(source)
    if source.is_dir():
        if destination is not None and Path(destination).resolve() != source.resolve() \
                and Path(destination).resolve().is_relative_to(source.resolve()):
            raise AlignError(f"DST {destination} lies inside SRC {source}: the next run would align its own crops "
                             "again; choose a DST outside SRC")
        base = Path(root) if root else source
        if not source.is_relative_to(base):  # compared as relative_to below compares: by the words
            raise AlignError(f"SRC {source} is not inside --root {base}; --root is the folder a list file's paths "
                             "are relative to: leave it out for a folder")
        walk = walk_tree(source, IMAGE_EXTENSIONS, exclude=[destination] if destination is not None else [])
        images = walk.files + [link for link in walk.broken_links if link.suffix.lower() in IMAGE_EXTENSIONS]
        relative = sorted(str(p.relative_to(base)) for p in images)
        if not relative:
            raise AlignError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {source}")
        return base, relative
    if not source.is_file():
        raise AlignError(f"source {source} is neither a folder nor a list file")
    base = Path(root) if root else source.parent
    relative = []
    for number, line in enumerate(source.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry)
        if path.is_absolute():
            try:
                path = path.relative_to(base)
            except ValueError:
                raise AlignError(f"{source}:{number}: {entry} is not under the root {base}") from None
        if ".." in path.parts:
            raise AlignError(f"{source}:{number}: {entry} leaves the root folder")
        relative.append(str(path))
    if not relative:
        raise AlignError(f"list file {source} names no images")
    return base, sorted(set(relative))


def output_name(relative_path: str, output_format: str, face: int | None = None) -> str:
    """Relative path of an aligned crop: the input's path, its suffix made writable; with
    ``face`` (select=all), ``name.face<k>.ext``."""
    path = Path(relative_path)
    if output_format == "same":
        suffix = path.suffix if path.suffix.lower() in WRITABLE_SUFFIXES else ".png"
    else:
        suffix = f".{output_format}"
    stem = path.stem if face is None else f"{path.stem}.face{face}"
    return str(path.with_name(stem + suffix))


# ----------------------------------------------------------------------------- choosing faces
def choose_faces(found: FaceDetections, select: str, height: int, width: int) -> list[int]:
    """Indices of the faces to align: the largest box, the box centre nearest the image centre,
    the highest score, or all of them (highest score first)."""
    if len(found) == 0:
        return []
    if select == "all":
        return list(range(len(found)))
    boxes = found.boxes
    if select == "largest":
        key = -(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    elif select == "central":
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        key = ((centres - np.array([width / 2, height / 2])) ** 2).sum(axis=1)
    elif select == "score":
        key = -found.scores
    else:
        raise ValueError(f"select '{select}' is not one of largest, central, score, all")
    return [int(np.argmin(key))]


# ----------------------------------------------------------------------------- the work

def detection_copy(pixels: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """The image to search for faces, downscaled (area resampling) when its long side exceeds
    ``max_side``, and the factor that maps its coordinates back to full resolution
    (``FaceDetections.scaled``). The crops are then cut from the full-resolution image."""
    long_side = max(pixels.shape[:2])
    if long_side <= max_side:
        return pixels, 1.0
    factor = max_side / long_side
    size = (max(1, round(pixels.shape[1] * factor)), max(1, round(pixels.shape[0] * factor)))
    small = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    return small, pixels.shape[1] / size[0]

class Aligner:
    """Decode, detect, choose, warp and write; one instance per process."""

    def __init__(self, config: AlignConfig, root: Path, destination: Path, detector: MTCNN | None = None) -> None:
        self.config = config
        self.root = root
        self.destination = destination
        self.detector = detector or MTCNN(config.detector, device=config.device)

    def _write(self, relative: str, crop: np.ndarray) -> None:
        suffix = Path(relative).suffix.lower()
        params = [cv2.IMWRITE_JPEG_QUALITY, self.config.jpeg_quality] if suffix in (".jpg", ".jpeg") else []
        ok, encoded = cv2.imencode(suffix, cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), params)
        if not ok:
            raise OSError(f"OpenCV cannot encode {suffix} for {relative}")
        # No fsync per crop (it cost more than the warp on a busy disk): the manifest row is fsynced
        # after its chunk, and a resumed run redoes any crop that is missing or empty.
        write_bytes_atomic(self.destination / relative, encoded.tobytes(), durable=False)

    def process(self, relative_paths: Sequence[str]) -> list[dict]:
        """Manifest rows of ``relative_paths``, writing their crops."""
        cfg = self.config
        decoded = [decode_for_alignment(self.root / rel) for rel in relative_paths]
        searchable, factors, positions = [], [], []
        for position, image in enumerate(decoded):
            if image.status == "ok" and min(image.pixels.shape[:2]) >= cfg.min_image_side:
                small, factor = detection_copy(image.pixels, cfg.max_detect_side)
                searchable.append(small)
                factors.append(factor)
                positions.append(position)
        detections: list[FaceDetections | None] = [None] * len(decoded)
        for position, found, factor in zip(positions, self.detector.detect(searchable), factors):
            detections[position] = found.scaled(factor) if factor != 1.0 else found
        return [self._row(rel, image, found) for rel, image, found in zip(relative_paths, decoded, detections)]

    def _row(self, relative: str, image: DecodedImage, found: FaceDetections | None) -> dict:
        cfg = self.config
        height, width = cfg.image_size
        row: dict = {"path": relative, "status": image.status, "output": None, "num_faces": 0, "faces": []}
        if image.status != "ok":
            row["error"] = image.detail
            return row
        image_height, image_width = image.pixels.shape[:2]
        row.update(width=image_width, height=image_height, mode=image.mode, exif_rotated=image.exif_rotated)
        if image.warnings:
            row["warnings"] = image.warnings
        if found is None:
            row.update(status="too_small", error=f"short side below min_image_side={cfg.min_image_side}")
            return row
        row["num_faces"] = len(found)
        chosen = choose_faces(found, cfg.select, image_height, image_width)
        try:
            if chosen:
                for order, index in enumerate(chosen):
                    name = output_name(relative, cfg.output_format, order if cfg.select == "all" else None)
                    matrix = alignment_matrix(found.landmarks[index], height, width)
                    self._write(name, warp_face(image.pixels, matrix, height, width, cfg.border_mode))
                    row["faces"].append({
                        "index": index, "output": name, "score": round(float(found.scores[index]), 6),
                        "box": [round(float(v), 2) for v in found.boxes[index]],
                        "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in found.landmarks[index]],
                    })
                row.update(status="aligned", output=row["faces"][0]["output"])
            elif cfg.no_face == "center_crop":
                name = output_name(relative, cfg.output_format)
                matrix = center_crop_matrix(image_height, image_width, height, width, cfg.center_crop_fraction)
                self._write(name, warp_face(image.pixels, matrix, height, width, cfg.border_mode))
                row.update(status="fallback", output=name)
            else:
                row["status"] = "no_face"
        except (OSError, ValueError) as exc:  # a full disk or degenerate landmarks: record, go on
            row.update(status="unreadable", output=None, error=f"cannot write crop: {exc}")
        return row


# ----------------------------------------------------------------------------- manifest
def _result_config(config: AlignConfig) -> dict:
    data = config.model_dump(mode="json")
    for key in RESULT_NEUTRAL_FIELDS:
        data.pop(key, None)
    # Batching, and where the networks run (PyTorch or ONNX Runtime, as CPU or CUDA), do not
    # change the detections beyond rounding.
    for key in ("batch_size", "backend", "onnx_dir"):
        data["detector"].pop(key, None)
    return data


def _check_destination(destination: Path, config: AlignConfig, restart: bool) -> None:
    """DST/align.json records the config; resuming with a different one would mix two alignments."""
    record = destination / "align.json"
    wanted = _result_config(config)
    if record.is_file() and not restart:
        try:
            previous = json.loads(record.read_text(encoding="utf-8")).get("config", {})
        except (json.JSONDecodeError, AttributeError):
            raise AlignError(f"{record} is damaged; delete it or use --restart") from None
        if previous != wanted:
            changed = sorted(k for k in set(previous) | set(wanted) if previous.get(k) != wanted.get(k))
            raise AlignError(f"{destination} was aligned with a different config (differs in {changed}); "
                             f"use another DST, or --restart to redo everything with the new config")
    write_json_atomic(record, {"manifest_version": MANIFEST_VERSION, "config": wanted})


def _already_done(rows: Iterable[dict], destination: Path) -> set[str]:
    """Paths with a final status; aligned ones count only while their crops exist and are not
    empty (what an OS crash can leave of a crop written without fsync)."""
    def intact(name: str) -> bool:
        try:
            return (destination / name).stat().st_size > 0
        except OSError:
            return False

    done = set()
    for row in rows:
        if row.get("status") == MISSING:  # looked at again: the file may be back (a remounted disk)
            continue
        outputs = [face["output"] for face in row.get("faces", [])] or ([row["output"]] if row.get("output") else [])
        if all(intact(name) for name in outputs):
            done.add(row["path"])
    return done


# ----------------------------------------------------------------------------- workers
_worker_aligner: Aligner | None = None


def _init_worker(config_data: dict, root: str, destination: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    global _worker_aligner
    _worker_aligner = Aligner(AlignConfig.model_validate(config_data), Path(root), Path(destination))


def _work(chunk: list[str]) -> list[dict]:
    assert _worker_aligner is not None
    return _worker_aligner.process(chunk)


def _chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def default_workers() -> int:
    """One process per two cores: two torch threads per process kept the detector busiest on 2-16
    cores; more processes mostly add memory."""
    return max(1, (os.cpu_count() or 1) // 2)


def align_images(source: str | Path, destination: str | Path, config: AlignConfig | None = None, *,
                 root: str | Path | None = None, shard: tuple[int, int] = (0, 1), workers: int | None = None,
                 restart: bool = False, progress: bool = True) -> AlignSummary:
    """Align every image of ``source`` (folder or list file) into ``destination``; see module doc.

    ``workers``: processes that each decode, detect and write (None: one per two cores; 0: this
    process only).
    """
    config = config or AlignConfig()
    destination = Path(destination)
    base, relative = list_inputs(source, root, destination)
    if shard[1] > 1:
        relative = [rel for rel in relative if in_shard(rel, shard)]
    destination.mkdir(parents=True, exist_ok=True)
    if base.resolve() == destination.resolve():
        raise AlignError("DST must differ from SRC: aligned crops would overwrite the originals")
    manifest = manifest_path(destination, shard)
    # Per manifest, not per folder: the shards of one DST are meant to run at the same time.
    with exclusive_lock(destination / f".{manifest.name}.lock", f"{destination} ({manifest.name})"):
        return _align_locked(source, base, relative, destination, manifest, config, shard, workers, restart, progress)


def _align_locked(source: str | Path, base: Path, relative: list[str], destination: Path, manifest: Path,
                  config: AlignConfig, shard: tuple[int, int], workers: int | None, restart: bool,
                  progress: bool) -> AlignSummary:
    import time

    from tqdm import tqdm

    _check_destination(destination, config, restart)
    if config.detector.backend == "onnx" and config.detector.onnx_dir is None:
        # Export the networks once here, not in every worker process.
        from facepipe.align.onnx_networks import resolve_onnx_dir

        onnx_dir = str(resolve_onnx_dir(None))
        config = config.model_copy(update={"detector": config.detector.model_copy(update={"onnx_dir": onnx_dir})})
    rows = [] if restart else read_manifest(manifest)
    unique = latest_rows(rows)
    if len(unique) < len(rows):
        log.warning("%s: removed %d duplicate lines (each image keeps its last row)", manifest, len(rows) - len(unique))
    rows = unique
    done = _already_done(rows, destination)
    kept = [row for row in rows if row["path"] in done]
    todo = [rel for rel in relative if rel not in done]
    # Rewrite the manifest without torn lines and rows being redone, then append to it.
    write_text_atomic(manifest, "".join(json.dumps(row) + "\n" for row in kept))
    skipped = len(relative) - len(todo)
    workers = default_workers() if workers is None else workers
    workers = min(workers, len(todo))
    # Small jobs are split finer so that every worker gets a share.
    chunk_size = max(1, min(CHUNK_SIZE, -(-len(todo) // max(workers, 1))))
    counts: Counter[str] = Counter()
    start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc="align", disable=not progress, dynamic_ncols=True)
    chunks = _chunks(todo, chunk_size)
    pool = None
    try:
        if workers > 1:
            threads = max(1, (os.cpu_count() or 1) // workers)
            context = multiprocessing.get_context("spawn")  # fork is unsafe with torch threads / CUDA
            pool = context.Pool(workers, _init_worker,
                                (config.model_dump(mode="json"), str(base), str(destination), threads))
            results: Iterable[list[dict]] = pool.imap(_work, chunks)
        else:
            aligner = Aligner(config, base, destination) if todo else None
            results = (aligner.process(chunk) for chunk in chunks)  # type: ignore[union-attr]
        with manifest.open("a", encoding="utf-8") as handle:
            for chunk_rows in results:
                handle.write("".join(json.dumps(row) + "\n" for row in chunk_rows))
                handle.flush()
                os.fsync(handle.fileno())
                counts.update(row["status"] for row in chunk_rows)
                bar.update(len(chunk_rows))
                bar.set_postfix({k: v for k, v in counts.items() if k != "aligned"}, refresh=False)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    summary = AlignSummary(dict(counts), skipped, len(relative), manifest, time.perf_counter() - start)
    write_json_atomic(destination / f"{manifest.stem}.summary.json", {
        "source": str(source), "root": str(base), "shard": list(shard), "images": len(relative),
        "status_counts": dict(Counter(row["status"] for row in read_manifest(manifest))),
        "last_run": {"processed": dict(counts), "skipped": skipped, "seconds": round(summary.seconds, 2)},
    })
    return summary


def align_for_model(checkpoint: str | os.PathLike, raw_root: str | os.PathLike, keys: Sequence[str],
                    destination: str | os.PathLike, progress: bool = True) -> Path:
    """Align the raw photos ``raw_root/key`` the way a checkpoint's model expects them (its
    config's ``align`` settings at its input size) into ``destination``; resumable. What
    ``eval lfw --align`` and ``search`` do with raw photos. An ``.onnx`` model carries no config:
    the default alignment (the ArcFace template) at its input size."""
    from facepipe.models.onnx_backend import is_onnx, onnx_input_size
    from facepipe.runtime.checkpoint import checkpoint_config, load_checkpoint

    if is_onnx(checkpoint):
        align_config = AlignConfig(image_size=onnx_input_size(checkpoint))
    else:
        config = checkpoint_config(load_checkpoint(checkpoint), checkpoint)
        align_config = config.align.model_copy(update={"image_size": config.data.image_size})
    destination = Path(destination)
    listing = destination / "images.txt"
    write_text_atomic(listing, "".join(f"{key}\n" for key in keys))
    align_images(listing, destination, align_config, root=raw_root, progress=progress)
    return destination
