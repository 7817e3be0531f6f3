"""Alignment speed against the reference MTCNN (issue 28): facepipe's ``MTCNN.detect`` against
facenet-pytorch 2.5.3's ``MTCNN.detect`` on the same decoded images, in one process.

    .venv/bin/python bench/align_vs_reference.py                         # 200 LFW + 37 photos, 5 rounds
    .venv/bin/python bench/align_vs_reference.py --lfw 1000 --rounds 7 --threads 2
    .venv/bin/python bench/align_vs_reference.py --sets photos --max-photos 10 --no-parity
    .venv/bin/python bench/align_vs_reference.py --lfw 8 --rounds 1 --fixture-check 100   # quick check

What it measures (not a test: machine-dependent):

- two image sets: ``lfw``, the first ``--lfw`` LFW deep-funneled photos (sorted ``*/*.jpg``, as
  ``bench/align_throughput.py``; all 250x250), and ``photos``, the ordinary photos of
  ``--photos`` (37 files, 240p to 3000 px, RGB / RGBA / 32-bit PNG, most of them of different
  sizes). Every image is decoded once up front with ``decode_for_alignment`` (EXIF applied, RGBA
  and the like made RGB), so both detectors get the very same HxWx3 uint8 arrays and decoding is
  not timed;
- both detectors with the reference's defaults (min face 20 px, thresholds 0.6 / 0.7 / 0.7,
  pyramid factor 0.709), on CPU, ``torch.set_num_threads(--threads)``, fed ``--batch-size``
  consecutive images at a time:
  facepipe: ``MTCNN(DetectorConfig(batch_size=B)).detect(batch)`` (it groups equal sizes itself);
  reference: ``MTCNN(keep_all=True, device="cpu").detect(list_of_arrays, landmarks=True)``. The
  reference batches only images of one size (a list of unequal sizes raises "MTCNN batch
  processing only compatible with equal-dimension images"), so each batch is split, in order,
  into its equal-shape groups and ``detect`` is called once per group: what a user holding a
  mixed batch has to do. On LFW (one size) that is one call per batch; on the photos it is
  mostly one call per image (a few sizes repeat). Grouping by the exact array shape also
  sidesteps the reference's size check, which for numpy arrays compares ``ndarray.size`` (the
  element count), so two transposed shapes would pass it and then fail in ``np.stack``;
- ``--warmup`` images of each set through both detectors first (weights into cache, oneDNN
  kernels chosen), then ``--rounds`` rounds; each round times every set with both detectors,
  the reference first in even rounds and facepipe first in odd rounds (so a drift of the machine
  does not favour one side). Reported per set: images/s of each detector per round, the ratio
  facepipe / reference per round, and the median ratio;
- parity on the detections of round 0 (both are deterministic): per image, equal face count or
  not; faces matched greedily by box IoU; for matched faces the IoU (min, median), the largest
  landmark error in px (max, median over faces) and the largest score difference.

Why a stand-in for torchvision: facenet_pytorch imports ``torchvision.ops.boxes.batched_nms``
and ``torchvision.transforms.functional`` at import time, and the installed torchvision cannot be
imported next to facepipe's CPU torch build (its compiled ops do not register: "operator
torchvision::nms does not exist"). So before facenet_pytorch is imported this script puts a small
module tree into ``sys.modules``: ``torchvision``, ``torchvision.ops``, ``torchvision.ops.boxes``
(``nms``, ``batched_nms``), ``torchvision.transforms`` and ``torchvision.transforms.functional``
(``to_tensor``, used only by facenet_pytorch's ``extract_face``, never by ``detect``). Its
``batched_nms`` follows torchvision 0.28 exactly: above 4,000 box coordinates (CPU) one NMS per
index, kept indices sorted by decreasing score; otherwise the coordinate-offset trick, the
offsets computed in the boxes' dtype as torchvision does. Each NMS is greedy, highest score first,
ties in input order (torchvision's stable sort), IoU with continuous areas ((x2 - x1) * (y2 - y1),
no +1) and suppression when IoU > threshold; it runs in OpenCV's C++ ``cv2.dnn.NMSBoxes`` (which
computes exactly that overlap, so the reference keeps a compiled NMS as with real torchvision),
with the scores shifted positive because NMSBoxes asserts a score threshold >= 0. Two remaining
differences: OpenCV computes the IoU in double and rounds it to float, torchvision in the boxes'
float32 (last-bit differences, only for an IoU within 1e-7 of the threshold), and boxes of zero or
negative width or height (where OpenCV calls two empty boxes identical and torchvision's IoU is
NaN, never suppressing) go to an exact numpy transcription of torchvision's CPU kernel instead.
facepipe itself never imports torchvision nor facenet_pytorch (checked at start; it reads the
weight files through the distribution's metadata). ``--fixture-check N`` runs the reference with
the stand-in on N small images of ``../shared/fixtures/mtcnn_reference.json`` (made with the
real torchvision) and reports how far it is from those detections.

``--backend onnx`` runs facepipe's three networks in ONNX Runtime (``detector.backend: onnx``, as
many threads as ``--threads``) instead of PyTorch; the reference is unchanged.

Writes ``results.json`` and ``results.md`` (the printed tables, with the machine and the exact
command) into ``--out``, each atomically.
"""
from __future__ import annotations

import argparse
import gc
import importlib.machinery
import importlib.metadata
import os
import platform
import shlex
import statistics
import sys
import time
import types
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
DEFAULT_LFW_ROOT = SHARED / "data" / "lfw" / "lfw-deepfunneled"
DEFAULT_PHOTOS = SHARED / "data" / "photos"
FIXTURE = SHARED / "fixtures" / "mtcnn_reference.json"
DEFAULT_OUT = Path("bench/reports/align_vs_reference")

# The reference's defaults (facenet-pytorch 2.5.3 MTCNN), given to both detectors explicitly.
MIN_FACE = 20
THRESHOLDS = (0.6, 0.7, 0.7)
FACTOR = 0.709

# ----------------------------------------------------------------------------- torchvision stand-in
# torchvision 0.28 ops/boxes.py: batched_nms loops over the indices above this many coordinates on CPU.
VANILLA_ABOVE_NUMEL_CPU = 4000


def exact_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """torchvision's CPU ``nms`` kernel transcribed in numpy, in the boxes' own dtype.

    Stable descending score order; for each kept box, later boxes with
    inter / (area_i + area_j - inter) > threshold are suppressed (a NaN IoU suppresses nothing).
    """
    x1, y1, x2, y2 = (boxes[:, k] for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    zero = boxes.dtype.type(0)
    for position, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[position + 1:]
        rest = rest[~suppressed[rest]]
        w = np.maximum(zero, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(zero, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        with np.errstate(invalid="ignore", divide="ignore"):
            overlap = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[overlap > iou_threshold]] = True
    return np.asarray(keep, dtype=np.int64)


def stand_in_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``torchvision.ops.nms`` semantics, computed by OpenCV's C++ greedy NMS."""
    device = boxes.device
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=device)
    corners = boxes.detach().cpu().numpy()
    score = scores.detach().cpu().numpy()
    wide = corners.astype(np.float64)
    sizes = wide[:, 2:4] - wide[:, 0:2]
    if not (np.all(sizes > 0) and np.all(np.isfinite(wide)) and np.all(np.isfinite(score))):
        keep = exact_nms(corners, score, iou_threshold)  # degenerate boxes: OpenCV differs there
    else:
        rects = np.concatenate([wide[:, 0:2], sizes], axis=1)
        positive = score.astype(np.float64) - float(score.min()) + 1.0  # NMSBoxes wants scores > 0
        keep = np.asarray(cv2.dnn.NMSBoxes(rects, positive, 0.0, float(iou_threshold)), dtype=np.int64).reshape(-1)
    return torch.from_numpy(keep).to(device)


def stand_in_batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                         iou_threshold: float) -> torch.Tensor:
    """``torchvision.ops.boxes.batched_nms`` (0.28): the same dispatch, the same offsets."""
    if boxes.numel() > (VANILLA_ABOVE_NUMEL_CPU if boxes.device.type == "cpu" else 100_000):
        keep_mask = torch.zeros_like(scores, dtype=torch.bool)
        for class_id in torch.unique(idxs):
            current = torch.where(idxs == class_id)[0]
            keep_mask[current[stand_in_nms(boxes[current], scores[current], iou_threshold)]] = True
        kept = torch.where(keep_mask)[0]
        return kept[torch.sort(scores[kept], descending=True, stable=True)[1]]
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    return stand_in_nms(boxes + offsets[:, None], scores, iou_threshold)


def stand_in_to_tensor(pic) -> torch.Tensor:
    """``torchvision.transforms.functional.to_tensor`` for numpy arrays (HxWxC, or HxW), the one
    input facenet_pytorch gives it (``extract_face``; not on the path that ``detect`` takes)."""
    if not isinstance(pic, np.ndarray):
        raise NotImplementedError("the torchvision stand-in's to_tensor takes numpy arrays only")
    array = pic[:, :, None] if pic.ndim == 2 else pic
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    return tensor.float().div(255) if tensor.dtype == torch.uint8 else tensor


def install_torchvision_stand_in() -> None:
    """Put the stand-in module tree into ``sys.modules`` (before facenet_pytorch is imported)."""
    real = sys.modules.get("torchvision")
    if real is not None and not getattr(real, "__facepipe_stand_in__", False):
        sys.exit("the real torchvision is already imported in this process; the stand-in cannot replace it")

    def module(name: str, package: bool, **attributes) -> types.ModuleType:
        mod = types.ModuleType(name, f"facepipe bench stand-in for {name} (see bench/align_vs_reference.py)")
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
        if package:
            mod.__path__ = []
        mod.__facepipe_stand_in__ = True
        for key, value in attributes.items():
            setattr(mod, key, value)
        sys.modules[name] = mod
        return mod

    boxes = module("torchvision.ops.boxes", False, nms=stand_in_nms, batched_nms=stand_in_batched_nms)
    ops = module("torchvision.ops", True, boxes=boxes, nms=stand_in_nms, batched_nms=stand_in_batched_nms)
    functional = module("torchvision.transforms.functional", False, to_tensor=stand_in_to_tensor)
    transforms = module("torchvision.transforms", True, functional=functional)
    module("torchvision", True, ops=ops, transforms=transforms, __version__="stand-in",
           _is_tracing=lambda: False)


def check_stand_in(cases: int = 24, seed: int = 0) -> dict:
    """The stand-in's batched_nms against the numpy transcription of torchvision's kernel on random
    float32 boxes (both dispatch paths: small sets use the offset trick, large ones the loop)."""
    rng = np.random.default_rng(seed)
    agree = 0
    for case in range(cases):
        n = int(rng.integers(1, 60)) if case % 3 else int(rng.integers(1001, 1600))  # > 4,000 coordinates
        corner = rng.uniform(0, 250, (n, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(1, 80, (n, 2))], axis=1).astype(np.float32)
        scores = rng.uniform(0.6, 1.0, n).astype(np.float32)
        groups = rng.integers(0, 4, n)
        threshold = float(rng.choice([0.5, 0.7]))
        got = stand_in_batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(groups),
                                   threshold).numpy()
        kept = np.concatenate([np.flatnonzero(groups == g)[exact_nms(boxes[groups == g], scores[groups == g], threshold)]
                               for g in np.unique(groups)])
        expected = kept[np.argsort(-scores[kept], kind="stable")]
        agree += int(np.array_equal(got, expected))
    return {"cases": cases, "agree": agree}


# ----------------------------------------------------------------------------- images
def lfw_images(root: Path, count: int) -> list[tuple[str, Path]]:
    if not root.is_dir():
        sys.exit(f"LFW not found at {root}; pass --lfw-root")
    relative = sorted(str(p.relative_to(root)) for p in root.glob("*/*.jpg"))[:count]
    return [(f"lfw/{rel}", root / rel) for rel in relative]


def photo_images(root: Path, count: int | None) -> list[tuple[str, Path]]:
    if not root.is_dir():
        sys.exit(f"photos not found at {root}; pass --photos")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    paths = paths[:count] if count is not None else paths
    return [(f"photos/{p.relative_to(root)}", p) for p in paths]


def decode_set(items: list[tuple[str, Path]]) -> tuple[list[str], list[np.ndarray], list[dict]]:
    from facepipe.align import decode_for_alignment

    names, pixels, skipped = [], [], []
    for name, path in items:
        decoded = decode_for_alignment(path)
        if decoded.status != "ok":
            skipped.append({"image": name, "status": decoded.status, "detail": decoded.detail})
            continue
        names.append(name)
        pixels.append(decoded.pixels)
    return names, pixels, skipped


# ----------------------------------------------------------------------------- the two detectors
def run_reference(detector, images: list[np.ndarray], batch_size: int) -> list[tuple]:
    """The reference on ``batch_size`` consecutive images at a time, one ``detect`` call per
    equal-shape group of each batch (it refuses batches of unequal sizes). Raw outputs per image."""
    results: list[tuple | None] = [None] * len(images)
    for start in range(0, len(images), batch_size):
        groups: dict[tuple, list[int]] = defaultdict(list)  # insertion-ordered: first appearance
        for index in range(start, min(start + batch_size, len(images))):
            groups[images[index].shape].append(index)
        for indices in groups.values():
            boxes, probs, points = detector.detect([images[i] for i in indices], landmarks=True)
            for k, index in enumerate(indices):
                results[index] = (boxes[k], probs[k], points[k])
    return results  # type: ignore[return-value]


def reference_faces(raw: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes [n,4], scores [n], landmarks [n,5,2]) of one image's reference output (None: no face)."""
    boxes, probs, points = raw
    if boxes is None:
        return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
    return (np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(probs, dtype=np.float64).reshape(-1),
            np.asarray(points, dtype=np.float64).reshape(-1, 5, 2))


def run_facepipe(detector, images: list[np.ndarray], batch_size: int) -> list:
    found = []
    for start in range(0, len(images), batch_size):
        found.extend(detector.detect(images[start:start + batch_size]))
    return found


def run_facepipe_downscaled(detector, images: list[np.ndarray], batch_size: int, max_side: int) -> list:
    """facepipe's fast mode (``max_detect_side``, as ``facepipe align`` runs it): each image
    larger than ``max_side`` is searched on a downscaled copy, and the detections are mapped back
    to full resolution. The downscaling is timed with the detection."""
    from facepipe.align.job import detection_copy

    found = []
    for start in range(0, len(images), batch_size):
        copies = [detection_copy(image, max_side) for image in images[start:start + batch_size]]
        detected = detector.detect([small for small, _ in copies])
        found.extend(faces.scaled(factor) if factor != 1.0 else faces for faces, (_, factor) in zip(detected, copies))
    return found


def facepipe_faces(found) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (found.boxes.astype(np.float64), found.scores.astype(np.float64), found.landmarks.astype(np.float64))


def timed(function, *args) -> tuple[float, list]:
    gc.collect()
    start = time.perf_counter()
    out = function(*args)
    return time.perf_counter() - start, out


# ----------------------------------------------------------------------------- parity
def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` with every box of ``b`` (continuous areas, x1 y1 x2 y2)."""
    inter_w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    inter_h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = inter_w * inter_h
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(inter / (area_a[:, None] + area_b[None, :] - inter))


def greedy_match(ious: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (row, column), the highest IoU first, each face used once; IoU 0 never matches."""
    ious = ious.copy()
    pairs = []
    while ious.size and ious.max() > 0:
        row, col = np.unravel_index(int(np.argmax(ious)), ious.shape)
        pairs.append((int(row), int(col)))
        ious[row, :] = -1
        ious[:, col] = -1
    return pairs


def parity(names: list[str], expected: list[tuple], got: list[tuple], label: str = "facepipe") -> dict:
    """Compare per-image detections (boxes, scores, landmarks) of ``got`` with ``expected``."""
    ious, landmark_errors, relative_errors, score_errors, differ = [], [], [], [], []
    worst = {"iou": None, "landmarks": None}
    faces_expected = faces_got = 0
    for name, (eb, es, el), (gb, gs, gl) in zip(names, expected, got):
        faces_expected += len(eb)
        faces_got += len(gb)
        if len(eb) != len(gb):
            differ.append({"image": name, "reference": len(eb), label: len(gb)})
        if not len(eb) or not len(gb):
            continue
        matrix = iou_matrix(eb, gb)
        for i, j in greedy_match(matrix):
            ious.append(float(matrix[i, j]))
            landmark_errors.append(float(np.abs(el[i] - gl[j]).max()))
            # The same error as a share of the face's size (the reference box's width): what it
            # does to a crop, whose scale follows the face.
            relative_errors.append(landmark_errors[-1] / max(float(eb[i, 2] - eb[i, 0]), 1e-6))
            score_errors.append(float(abs(es[i] - gs[j])))
            if worst["iou"] is None or ious[-1] < worst["iou"]["iou"]:
                worst["iou"] = {"image": name, "iou": ious[-1]}
            if worst["landmarks"] is None or landmark_errors[-1] > worst["landmarks"]["px"]:
                worst["landmarks"] = {"image": name, "px": landmark_errors[-1]}
    return {
        "images": len(names), "same_count": len(names) - len(differ), "different_count": len(differ),
        "different": differ[:50], "faces_reference": faces_expected, f"faces_{label}": faces_got,
        "matched": len(ious), "unmatched_reference": faces_expected - len(ious), f"unmatched_{label}": faces_got - len(ious),
        "iou_min": min(ious) if ious else None, "iou_median": statistics.median(ious) if ious else None,
        "landmark_err_px_max": max(landmark_errors) if landmark_errors else None,
        "landmark_err_px_median": statistics.median(landmark_errors) if landmark_errors else None,
        "landmark_err_face_max": max(relative_errors) if relative_errors else None,
        "landmark_err_face_median": statistics.median(relative_errors) if relative_errors else None,
        "score_diff_max": max(score_errors) if score_errors else None, "worst": worst,
    }


def fixture_check(reference_detector, count: int, batch_size: int) -> dict:
    """The reference (with the stand-in) against the fixture detections of the real reference
    (real torchvision) on the first ``count`` small fixture images (LFW and ORL), decoded as the
    fixture was: Pillow ``convert("RGB")``, no EXIF transpose."""
    import json

    from PIL import Image

    if not FIXTURE.is_file():
        return {"error": f"fixture not found: {FIXTURE}"}
    items = [item for item in json.loads(FIXTURE.read_text())["images"] if item["image"].split("/")[0] in ("lfw", "orl")]
    items = items[:count]
    images = [np.asarray(Image.open(SHARED / "data" / item["image"]).convert("RGB")) for item in items]
    got = [reference_faces(raw) for raw in run_reference(reference_detector, images, batch_size)]
    expected = [(np.array([f["box"] for f in item["faces"]], dtype=np.float64).reshape(-1, 4),
                 np.array([f["prob"] for f in item["faces"]], dtype=np.float64),
                 np.array([f["landmarks"] for f in item["faces"]], dtype=np.float64).reshape(-1, 5, 2))
                for item in items]
    return parity([item["image"] for item in items], expected, got, label="stand_in")


# ----------------------------------------------------------------------------- report
def fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def machine_info(threads: int) -> dict:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            cpu_model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {"cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)), "cpu_model": cpu_model,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": threads, "torch_interop_threads": torch.get_num_interop_threads(),
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"), "numpy": np.__version__,
            "opencv": cv2.__version__, "onnxruntime": version("onnxruntime"), "facenet_pytorch": version("facenet-pytorch"),
            "torchvision": "stand-in (installed: %s, not importable)" % version("torchvision")}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Alignment speed: facepipe MTCNN vs the reference (facenet-pytorch MTCNN)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['cpu_affinity']} usable), {m['cpu_model'] or 'unknown CPU'}; "
        f"torch {m['torch']}, {m['torch_threads']} thread(s); facenet-pytorch {m['facenet_pytorch']} with the "
        f"torchvision stand-in (self-check {result['stand_in_check']['agree']}/{result['stand_in_check']['cases']}); "
        f"OpenCV {m['opencv']}.",
        "",
        f"facepipe's networks run in {'ONNX Runtime ' + m['onnxruntime'] if result.get('backend') == 'onnx' else 'PyTorch'}.",
        "",
        f"Settings: min face {MIN_FACE}, thresholds {list(THRESHOLDS)}, factor {FACTOR}; batches of "
        f"{result['batch_size']} images (the reference called once per equal-size group of a batch); "
        f"{result['warmup']} warm-up images per set; {result['rounds']} rounds, order alternating.",
        "",
        "## Speed",
        "",
        "| set | images | sizes | reference images/s | facepipe images/s | facepipe / reference (median) | per-round ratios |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in result["sets"].items():
        ratios = ", ".join(f"{r:.2f}" for r in s["ratios"])
        lines.append(f"| {name} | {s['images']} | {s['distinct_sizes']} | {s['reference_images_per_s_median']:.2f} | "
                     f"{s['facepipe_images_per_s_median']:.2f} | **{s['ratio_median']:.2f}x** | {ratios} |")
    lines += ["", "Images/s are medians over the rounds; the ratio is the median of the per-round ratios.", ""]
    if any("parity" in s for s in result["sets"].values()):
        lines += ["## Parity (round 0 detections; reference = facenet-pytorch with the stand-in)", "",
                  "| set | images | same face count | different count | faces ref / facepipe | matched | "
                  "IoU min | IoU median | landmark err max (px) | landmark err median (px) | score diff max |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in result["sets"].items():
            p = s.get("parity")
            if p is None:
                continue
            lines.append(f"| {name} | {p['images']} | {p['same_count']} | {p['different_count']} | "
                         f"{p['faces_reference']} / {p['faces_facepipe']} | {p['matched']} | {fmt(p['iou_min'], '.4f')} | "
                         f"{fmt(p['iou_median'], '.4f')} | {fmt(p['landmark_err_px_max'], '.3g')} | "
                         f"{fmt(p['landmark_err_px_median'], '.3g')} | {fmt(p['score_diff_max'], '.3g')} |")
        for name, s in result["sets"].items():
            for d in s.get("parity", {}).get("different", []):
                lines.append(f"\n- {name}: `{d['image']}`: reference {d['reference']} faces, facepipe {d['facepipe']}")
        lines.append("")
    if any(s.get("fast") for s in result["sets"].values()):
        lines += ["## Fast mode (`max_detect_side`: detect on a downscaled copy, crop at full resolution)", "",
                  "Compared with the reference at full resolution; faces smaller than min face x (long side / N) "
                  "at full resolution cannot be found on the copy.", "",
                  "| set | N | images downscaled | images/s | / reference (median) | same face count | faces ref / fast | "
                  "matched | IoU min | IoU median | landmark err max (px) | landmark err median (px) | "
                  "landmark err max / median (% of face width) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in result["sets"].items():
            for fast in s.get("fast", {}).values():
                p = fast.get("parity") or {}
                lines.append(f"| {name} | {fast['max_side']} | {fast['images_downscaled']} | "
                             f"{fast['images_per_s_median']:.2f} | **{fast['ratio_median']:.2f}x** | "
                             f"{p.get('same_count', '')} of {p.get('images', '')} | {p.get('faces_reference', '')} / "
                             f"{p.get('faces_facepipe', '')} | {p.get('matched', '')} | {fmt(p.get('iou_min'), '.4f')} | "
                             f"{fmt(p.get('iou_median'), '.4f')} | {fmt(p.get('landmark_err_px_max'), '.3g')} | "
                             f"{fmt(p.get('landmark_err_px_median'), '.3g')} | "
                             f"{fmt(100 * p['landmark_err_face_max'] if p.get('landmark_err_face_max') is not None else None, '.2f')} / "
                             f"{fmt(100 * p['landmark_err_face_median'] if p.get('landmark_err_face_median') is not None else None, '.2f')} |")
        lines.append("")
    check = result.get("fixture_check")
    if check:
        lines += ["## Stand-in check against the fixture (real torchvision)", ""]
        if "error" in check:
            lines.append(check["error"])
        else:
            lines.append(f"{check['images']} fixture images (LFW, ORL): {check['same_count']} with the same face count, "
                         f"{check['matched']} faces matched; IoU min {fmt(check['iou_min'], '.4f')}, landmark error max "
                         f"{fmt(check['landmark_err_px_max'], '.3g')} px, score difference max {fmt(check['score_diff_max'], '.3g')} "
                         "(the fixture rounds to 3 decimals in px, 6 in score).")
        lines.append("")
    if result["skipped"]:
        lines += ["Skipped (not decodable): " + ", ".join(f"`{s['image']}` ({s['status']})" for s in result["skipped"]), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lfw", type=int, default=200, metavar="N", help="first N LFW images (default 200)")
    parser.add_argument("--lfw-root", type=Path, default=DEFAULT_LFW_ROOT)
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, metavar="DIR")
    parser.add_argument("--max-photos", type=int, default=None, metavar="N", help="first N photos (default all)")
    parser.add_argument("--sets", nargs="+", choices=["lfw", "photos"], default=["lfw", "photos"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads, both detectors")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4, help="warm-up images per set (default 4)")
    parser.add_argument("--no-parity", action="store_true", help="skip the detection comparison")
    parser.add_argument("--fast-side", type=int, nargs="*", default=[], metavar="N",
                        help="also time facepipe's fast mode (max_detect_side=N: detect on a copy downscaled to "
                             "N px on the long side, map back) and compare it with the full-resolution reference")
    parser.add_argument("--fixture-check", type=int, default=0, metavar="N",
                        help="also run the reference with the stand-in on N small fixture images (default 0: off)")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                        help="where facepipe's MTCNN networks run (detector.backend; onnx needs the onnx extra and "
                             "exports the networks once into its cache folder); the reference always runs PyTorch")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for results.json and results.md")
    args = parser.parse_args()
    if args.rounds < 1 or args.batch_size < 1 or args.threads < 1 or args.lfw < 0:
        parser.error("--rounds, --batch-size and --threads must be >= 1, --lfw >= 0")
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    torch.set_num_threads(args.threads)

    # facepipe first, and alone: it must not pull in torchvision or facenet_pytorch.
    from facepipe.align import MTCNN, decode_for_alignment  # noqa: F401  (loaded now for the check)
    from facepipe.config import DetectorConfig
    from facepipe.runtime.io import write_json_atomic, write_text_atomic

    leaked = sorted(name for name in ("torchvision", "facenet_pytorch") if name in sys.modules)
    if leaked:
        sys.exit(f"facepipe imported {leaked}: the comparison would not be fair (and torchvision cannot load here)")
    install_torchvision_stand_in()
    stand_in = check_stand_in()
    if stand_in["agree"] != stand_in["cases"]:
        sys.exit(f"the torchvision stand-in disagrees with torchvision's NMS definition: {stand_in}")
    from facenet_pytorch import MTCNN as ReferenceMTCNN

    items = {}
    if "lfw" in args.sets:
        items["lfw"] = lfw_images(args.lfw_root, args.lfw)
    if "photos" in args.sets:
        items["photos"] = photo_images(args.photos, args.max_photos)
    sets, skipped = {}, []
    for name, listed in items.items():
        names, pixels, bad = decode_set(listed)
        skipped += bad
        if pixels:
            sets[name] = (names, pixels)
        print(f"{name}: {len(pixels)} images decoded ({len(bad)} skipped), "
              f"{len({p.shape for p in pixels})} distinct sizes", flush=True)
    if not sets:
        sys.exit("no images to run")

    config = DetectorConfig(min_face_size=MIN_FACE, thresholds=THRESHOLDS, factor=FACTOR, batch_size=args.batch_size,
                            backend=args.backend)
    facepipe = MTCNN(config, device="cpu")
    reference = ReferenceMTCNN(min_face_size=MIN_FACE, thresholds=list(THRESHOLDS), factor=FACTOR,
                               keep_all=True, device="cpu")
    runners = {"reference": lambda images: run_reference(reference, images, args.batch_size),
               "facepipe": lambda images: run_facepipe(facepipe, images, args.batch_size)}
    fast_names = [f"facepipe@{side}" for side in args.fast_side]
    for side, who in zip(args.fast_side, fast_names):
        runners[who] = lambda images, side=side: run_facepipe_downscaled(facepipe, images, args.batch_size, side)

    for name, (_, pixels) in sets.items():  # warm-up
        for runner in runners.values():
            runner(pixels[:args.warmup])

    seconds = {name: {who: [] for who in runners} for name in sets}
    detections: dict[str, dict[str, list]] = {}
    for round_index in range(args.rounds):
        order = ["reference", "facepipe", *fast_names]
        order = order if round_index % 2 == 0 else order[::-1]
        for name, (_, pixels) in sets.items():
            for who in order:
                elapsed, out = timed(runners[who], pixels)
                seconds[name][who].append(elapsed)
                if round_index == 0:
                    detections.setdefault(name, {})[who] = out
            ref_ips = len(pixels) / seconds[name]["reference"][-1]
            fp_ips = len(pixels) / seconds[name]["facepipe"][-1]
            print(f"round {round_index} ({' then '.join(order)}) {name}: reference {ref_ips:.2f} images/s, "
                  f"facepipe {fp_ips:.2f} images/s, ratio {fp_ips / ref_ips:.2f}", flush=True)

    result = {"command": command, "machine": machine_info(args.threads), "stand_in_check": stand_in,
              "backend": args.backend, "batch_size": args.batch_size, "rounds": args.rounds, "warmup": args.warmup,
              "settings": {"min_face_size": MIN_FACE, "thresholds": list(THRESHOLDS), "factor": FACTOR},
              "skipped": skipped, "sets": {}}
    for name, (names, pixels) in sets.items():
        ref_ips = [len(pixels) / s for s in seconds[name]["reference"]]
        fp_ips = [len(pixels) / s for s in seconds[name]["facepipe"]]
        ratios = [f / r for f, r in zip(fp_ips, ref_ips)]
        entry = {"images": len(pixels), "distinct_sizes": len({p.shape for p in pixels}),
                 "megapixels": sum(p.shape[0] * p.shape[1] for p in pixels) / 1e6,
                 "reference_calls_per_round": sum(len({pixels[i].shape for i in range(s, min(s + args.batch_size, len(pixels)))})
                                                  for s in range(0, len(pixels), args.batch_size)),
                 "seconds": seconds[name], "reference_images_per_s": ref_ips, "facepipe_images_per_s": fp_ips,
                 "ratios": ratios, "reference_images_per_s_median": statistics.median(ref_ips),
                 "facepipe_images_per_s_median": statistics.median(fp_ips), "ratio_median": statistics.median(ratios)}
        if not args.no_parity:
            expected = [reference_faces(raw) for raw in detections[name]["reference"]]
            got = [facepipe_faces(found) for found in detections[name]["facepipe"]]
            entry["parity"] = parity(names, expected, got)
        entry["fast"] = {}
        for who, side in zip(fast_names, args.fast_side):
            fast_ips = [len(pixels) / s for s in seconds[name][who]]
            fast = {"max_side": side, "images_downscaled": sum(max(p.shape[:2]) > side for p in pixels),
                    "images_per_s": fast_ips, "images_per_s_median": statistics.median(fast_ips),
                    "ratio_median": statistics.median([f / r for f, r in zip(fast_ips, ref_ips)])}
            if not args.no_parity:
                fast["parity"] = parity(names, [reference_faces(raw) for raw in detections[name]["reference"]],
                                        [facepipe_faces(found) for found in detections[name][who]])
            entry["fast"][who] = fast
        result["sets"][name] = entry
    if args.fixture_check:
        result["fixture_check"] = fixture_check(reference, args.fixture_check, args.batch_size)

    text = markdown(result)
    print("\n" + text)
    write_json_atomic(args.out / "results.json", result)
    write_text_atomic(args.out / "results.md", text + "\n")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
