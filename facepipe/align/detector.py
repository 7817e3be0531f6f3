"""MTCNN face and landmark detection: P-Net on an image pyramid, then R-Net and O-Net.

The cascade reproduces facenet-pytorch 2.5.3 ``detect_face`` step for step (the same box
arithmetic, the same NMS thresholds and overlap definitions, the same area resampling), so its
detections match that reference (tested on every image of ``fixtures/mtcnn_reference.json``).
What differs is how the work is batched:

- images of the same size go through P-Net together, one forward per pyramid scale;
- every R-Net / O-Net candidate of a batch is cropped and resized at once from an integral
  image (summed-area table), which gives exactly the box average that ``interpolate(mode="area")``
  computes on each crop, without a Python loop over boxes; all crops then go through one forward.
"""
from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from facepipe.config import DetectorConfig
from facepipe.runtime.device import resolve_device

from facepipe.align.networks import load_networks

log = logging.getLogger(__name__)

PNET_STRIDE = 2
PNET_CELL = 12
RNET_SIZE = 24
ONET_SIZE = 48
# Crops per resampling chunk; bounds the memory of the gathered summed-area corners.
CROP_CHUNK = 512
# Crops per R-Net / O-Net forward on CPU: small enough that the first layers' activations stay
# in cache (the nets are memory-bound on large batches: about 1.8x faster, measured on 2 cores).
CPU_FORWARD_CHUNK = {"rnet": 64, "onet": 16}


@dataclass
class FaceDetections:
    """Faces found in one image, in the image's pixel coordinates, highest score first."""

    boxes: np.ndarray  # [n, 4] float32 x1, y1, x2, y2
    scores: np.ndarray  # [n] float32 face probability
    landmarks: np.ndarray  # [n, 5, 2] float32 (x, y): left eye, right eye, nose, left mouth, right mouth

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> "FaceDetections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))

    def scaled(self, factor: float) -> "FaceDetections":
        """Coordinates multiplied by ``factor`` (detections on a resized image mapped back)."""
        return FaceDetections(self.boxes * factor, self.scores.copy(), self.landmarks * factor)


# ----------------------------------------------------------------------------- box arithmetic
def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; indices of kept boxes, highest score first.

    ``union``: intersection over union with continuous box areas, as torchvision's ``nms`` (used by
    the reference for the P-Net and R-Net stages). ``min``: intersection over the smaller area with
    the inclusive pixel convention (w = x2 - x1 + 1), as the reference's O-Net stage. A box is
    suppressed when its overlap with a kept box exceeds ``threshold``; ties in score keep input order.
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    boxes = boxes.astype(np.float64)
    if mode == "union":
        # OpenCV's C++ greedy NMS computes exactly this overlap (Rect2d areas) with a stable sort.
        # It drops scores <= its score threshold (>= 0), so scores are shifted to be positive.
        rects = np.concatenate([boxes[:, :2], boxes[:, 2:4] - boxes[:, :2]], axis=1)
        positive = scores.astype(np.float64) - float(scores.min()) + 1.0
        return np.asarray(cv2.dnn.NMSBoxes(rects, positive, 0.0, threshold), dtype=np.int64).reshape(-1)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        order = rest[w * h / np.minimum(areas[best], areas[rest]) <= threshold]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float,
                mode: str = "union") -> np.ndarray:
    """NMS run independently within each group (image, or image and scale): boxes of different
    groups are shifted apart so that they never overlap, then one NMS runs over all of them."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    shift = (groups.astype(np.float64) * (float(boxes.max()) + 1.0))[:, None]
    return nms(boxes.astype(np.float64) + shift, scores, threshold, mode)


def square_boxes(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square of side max(w, h) about the same centre (reference ``rerec``)."""
    boxes = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    boxes[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    boxes[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    boxes[:, 2] = boxes[:, 0] + side
    boxes[:, 3] = boxes[:, 1] + side
    return boxes


def regress_boxes(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Apply the R-Net / O-Net box regression (offsets relative to the inclusive box size)."""
    boxes = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    boxes[:, 0] += offsets[:, 0] * w
    boxes[:, 1] += offsets[:, 1] * h
    boxes[:, 2] += offsets[:, 2] * w
    boxes[:, 3] += offsets[:, 3] * h
    return boxes


def crop_windows(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Integer crop windows [row0, row1, col0, col1) of float boxes, clipped to the image.

    As the reference's ``pad``: truncate toward zero, clip the 1-based corners to the image, and
    crop rows y-1 .. ey-1 (the reference does not zero-pad boxes that leave the image).
    """
    corners = np.trunc(boxes[:, :4]).astype(np.int64)
    x = np.maximum(corners[:, 0], 1)
    y = np.maximum(corners[:, 1], 1)
    ex = np.minimum(corners[:, 2], width)
    ey = np.minimum(corners[:, 3], height)
    return np.stack([y - 1, ey, x - 1, ex], axis=1)


def summed_area_table(images: torch.Tensor) -> torch.Tensor:
    """[B, H+1, W+1, 3] table T with T[b, i, j] = sum of images[b, :i, :j], in exact integers.

    int32 while 255 * H * W fits (images up to 8.4 megapixels; half the memory traffic of the
    lookups), float64 (exact to 2^53) beyond. OpenCV's ``integral`` on CPU is several times
    faster than two ``cumsum`` passes.
    """
    height, width = images.shape[1:3]
    exact_int32 = 255 * height * width < 2 ** 31
    if images.device.type == "cpu":
        depth = cv2.CV_32S if exact_int32 else cv2.CV_64F
        return torch.from_numpy(np.stack([cv2.integral(image, sdepth=depth) for image in images.numpy()]))
    table = images.to(torch.int32 if exact_int32 else torch.float64).cumsum(1).cumsum(2)
    return F.pad(table, (0, 0, 1, 0, 1, 0))


def resample_crops(table: torch.Tensor, image_index: torch.Tensor, windows: torch.Tensor, size: int) -> torch.Tensor:
    """Area-resample every crop window to ``size`` x ``size``: [K, 3, size, size] float32 (channels last).

    Output cell i of a crop of n rows averages rows floor(i n / size) .. ceil((i + 1) n / size),
    the bins of ``adaptive_avg_pool2d`` (what ``interpolate(mode="area")`` runs), read as four
    corner lookups in the summed-area table.
    """
    _, rows_plus_one, cols_plus_one, channels = table.shape
    flat_table = table.reshape(-1, channels)
    cells = torch.arange(size, device=table.device)
    out = []
    for start in range(0, len(windows), CROP_CHUNK):
        win = windows[start:start + CROP_CHUNK]
        base = image_index[start:start + CROP_CHUNK][:, None, None] * rows_plus_one
        rows, cols = win[:, 1] - win[:, 0], win[:, 3] - win[:, 2]
        r0 = win[:, :1] + torch.div(cells[None] * rows[:, None], size, rounding_mode="floor")
        r1 = win[:, :1] + torch.div((cells[None] + 1) * rows[:, None] + size - 1, size, rounding_mode="floor")
        c0 = win[:, 2:3] + torch.div(cells[None] * cols[:, None], size, rounding_mode="floor")
        c1 = win[:, 2:3] + torch.div((cells[None] + 1) * cols[:, None] + size - 1, size, rounding_mode="floor")
        r0, r1, c0, c1 = r0[:, :, None], r1[:, :, None], c0[:, None, :], c1[:, None, :]

        # One index_select on the flattened table for all four corners: far faster than 3-D
        # advanced indexing.
        corners = torch.stack([(base + r1) * cols_plus_one + c1, (base + r0) * cols_plus_one + c1,
                               (base + r1) * cols_plus_one + c0, (base + r0) * cols_plus_one + c0])
        values = flat_table.index_select(0, corners.reshape(-1)).view(4, len(win), size, size, channels)
        sums = (values[0] - values[1] - values[2] + values[3]).to(torch.float64)
        area = ((r1 - r0) * (c1 - c0)).to(torch.float64)[..., None]
        out.append((sums / area).to(torch.float32).permute(0, 3, 1, 2))
    return torch.cat(out) if out else torch.zeros(0, 3, size, size, device=table.device)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """MTCNN input scaling (x - 127.5) / 128."""
    return (pixels - 127.5) * 0.0078125


# ----------------------------------------------------------------------------- detector
def frozen_for_cpu(network: torch.nn.Module, size: int, batch: int) -> torch.nn.Module:
    """The network traced and frozen for oneDNN inference (weights pre-packed, conv and
    activation kernels chosen once): R-Net 1.4x and O-Net 1.15x faster per crop on 2 CPU cores.
    Falls back to the eager module where tracing is unavailable."""
    example = torch.zeros(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    try:
        # torch.jit is deprecated but still the CPU path that pre-packs oneDNN weights without a
        # compiler toolchain; when it goes, the eager fallback below keeps results identical.
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(network, example, check_trace=False)
            return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
    except Exception as exc:  # an exotic build without the JIT: correctness does not depend on it
        log.debug("running %s eagerly: tracing failed (%s)", type(network).__name__, exc)
        return network


class MTCNN:
    """Batched MTCNN cascade with the reference defaults (see ``DetectorConfig``).

    ``detect`` takes RGB uint8 images (HxWx3) of any sizes; images of equal size share forwards.
    Runs on CUDA when present (``device="auto"``). With ``config.backend == "onnx"`` the three
    networks run in ONNX Runtime (:mod:`facepipe.align.onnx_networks`); the cascade is the same.
    """

    def __init__(self, config: DetectorConfig | None = None, device: str | torch.device = "auto",
                 weights_dir: str | None = None) -> None:
        self.config = config or DetectorConfig()
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        if self.config.backend == "onnx":
            from facepipe.align.onnx_networks import load_onnx_networks, resolve_onnx_dir

            folder = resolve_onnx_dir(self.config.onnx_dir, weights_dir)
            self.pnet, self.rnet, self.onet = load_onnx_networks(folder, self.device)
            return
        self.pnet, self.rnet, self.onet = (net.to(self.device) for net in load_networks(weights_dir))
        if self.device.type == "cpu":
            self.rnet = frozen_for_cpu(self.rnet, RNET_SIZE, CPU_FORWARD_CHUNK["rnet"])
            self.onet = frozen_for_cpu(self.onet, ONET_SIZE, CPU_FORWARD_CHUNK["onet"])

    def pyramid_scales(self, height: int, width: int) -> list[float]:
        """Scales from 12 / min_face_size down by ``factor`` while the short side is >= 12 px."""
        scale = PNET_CELL / self.config.min_face_size
        short_side = min(height, width) * scale
        scales = []
        while short_side >= PNET_CELL:
            scales.append(scale)
            scale *= self.config.factor
            short_side *= self.config.factor
        return scales

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray]) -> list[FaceDetections]:
        results: list[FaceDetections | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, image in enumerate(images):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"image {index}: expected HxWx3 uint8 RGB, got {image.dtype} {image.shape}")
            by_size[image.shape[:2]].append(index)
        step = self.config.batch_size
        for indices in by_size.values():
            for start in range(0, len(indices), step):
                chunk = indices[start:start + step]
                batch = np.stack([images[i] for i in chunk]) if len(chunk) > 1 else images[chunk[0]][None]
                for index, found in zip(chunk, self._detect_batch(batch)):
                    results[index] = found
        return results  # type: ignore[return-value]

    def detect_one(self, image: np.ndarray) -> FaceDetections:
        return self.detect([image])[0]

    # The stages mirror the reference's detect_face.
    def _detect_batch(self, batch: np.ndarray) -> list[FaceDetections]:
        num_images, height, width = batch.shape[:3]
        if not batch.flags.writeable or not batch.flags.c_contiguous:
            batch = np.array(batch)  # torch.from_numpy needs a writable, contiguous buffer
        pixels_hwc = torch.from_numpy(batch).to(self.device)
        # Area resampling runs faster on planar (NCHW) memory; the nets prefer channels-last.
        pixels = pixels_hwc.permute(0, 3, 1, 2).float().contiguous()

        boxes, image_index = self._proposals(pixels)
        table = None
        if len(boxes):
            table = summed_area_table(pixels_hwc)
            boxes, image_index = self._refine(table, boxes, image_index, width, height)
        points = np.zeros((0, 5, 2), np.float32)
        if len(boxes):
            boxes, image_index, points = self._output(table, boxes, image_index, width, height)

        found = []
        for b in range(num_images):
            mine = image_index == b
            order = np.argsort(-boxes[mine, 4], kind="stable")
            found.append(FaceDetections(boxes[mine, :4][order].astype(np.float32),
                                        boxes[mine, 4][order].astype(np.float32),
                                        points[mine][order].astype(np.float32)))
        return found

    def _proposals(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """P-Net on each pyramid scale; NMS within scale, then across scales; regress; square."""
        cfg = self.config
        height, width = pixels.shape[2:]
        per_scale, per_scale_index = [], []
        for scale in self.pyramid_scales(height, width):
            resized = F.interpolate(pixels, size=(int(height * scale + 1), int(width * scale + 1)), mode="area")
            regression, probability = self.pnet(normalise(resized).contiguous(memory_format=torch.channels_last))
            face = probability[:, 1]
            hits = (face >= cfg.thresholds[0]).nonzero()
            if not len(hits):
                continue
            b, row, col = hits[:, 0], hits[:, 1], hits[:, 2]
            score = face[b, row, col]
            offsets = regression[b, :, row, col]
            corner = torch.stack([col, row], dim=1).to(regression.dtype)
            top_left = ((PNET_STRIDE * corner + 1) / scale).floor()
            bottom_right = ((PNET_STRIDE * corner + PNET_CELL) / scale).floor()
            candidates = torch.cat([top_left, bottom_right, score[:, None], offsets], dim=1).cpu().numpy()
            index = b.cpu().numpy()
            keep = batched_nms(candidates[:, :4], candidates[:, 4], index, cfg.nms_within_scale)
            per_scale.append(candidates[keep])
            per_scale_index.append(index[keep])
        if not per_scale:
            return np.zeros((0, 5), np.float32), np.zeros(0, np.int64)
        boxes = np.concatenate(per_scale)
        image_index = np.concatenate(per_scale_index)
        keep = batched_nms(boxes[:, :4], boxes[:, 4], image_index, cfg.nms_across_scales)
        boxes, image_index = boxes[keep], image_index[keep]
        w = boxes[:, 2] - boxes[:, 0]
        h = boxes[:, 3] - boxes[:, 1]
        regressed = np.stack([boxes[:, 0] + boxes[:, 5] * w, boxes[:, 1] + boxes[:, 6] * h,
                              boxes[:, 2] + boxes[:, 7] * w, boxes[:, 3] + boxes[:, 8] * h, boxes[:, 4]], axis=1)
        return square_boxes(regressed), image_index

    def _crops(self, table: torch.Tensor, boxes: np.ndarray, image_index: np.ndarray, width: int, height: int,
               size: int) -> tuple[torch.Tensor, np.ndarray]:
        """Normalised crops of every box with a non-empty window, and the mask of those boxes."""
        windows = crop_windows(boxes, width, height)
        valid = (windows[:, 1] > windows[:, 0]) & (windows[:, 3] > windows[:, 2])
        crops = resample_crops(table, torch.from_numpy(image_index[valid]).to(self.device),
                               torch.from_numpy(windows[valid]).to(self.device), size)
        return normalise(crops), valid

    def _forward(self, network: torch.nn.Module, name: str, crops: torch.Tensor) -> list[np.ndarray]:
        """Network outputs as numpy arrays, the crops fed in chunks (one forward on GPU)."""
        chunk = CPU_FORWARD_CHUNK[name] if self.device.type == "cpu" else max(len(crops), 1)
        outputs = [network(crops[start:start + chunk]) for start in range(0, len(crops), chunk)]
        if not outputs:
            outputs = [network(crops)]
        return [torch.cat(parts).float().cpu().numpy() for parts in zip(*outputs)]

    def _refine(self, table: torch.Tensor, boxes: np.ndarray, image_index: np.ndarray, width: int,
                height: int) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        crops, valid = self._crops(table, boxes, image_index, width, height, RNET_SIZE)
        boxes, image_index = boxes[valid], image_index[valid]
        regression, probability = self._forward(self.rnet, "rnet", crops)
        score = probability[:, 1]
        passed = score > cfg.thresholds[1]
        boxes = np.concatenate([boxes[passed, :4], score[passed, None]], axis=1)
        image_index, regression = image_index[passed], regression[passed]
        keep = batched_nms(boxes[:, :4], boxes[:, 4], image_index, cfg.nms_refine)
        boxes = regress_boxes(boxes[keep], regression[keep])
        return square_boxes(boxes), image_index[keep]

    def _output(self, table: torch.Tensor, boxes: np.ndarray, image_index: np.ndarray, width: int,
                height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cfg = self.config
        crops, valid = self._crops(table, boxes, image_index, width, height, ONET_SIZE)
        boxes, image_index = boxes[valid], image_index[valid]
        regression, landmarks, probability = self._forward(self.onet, "onet", crops)
        score = probability[:, 1]
        passed = score > cfg.thresholds[2]
        boxes = np.concatenate([boxes[passed, :4], score[passed, None]], axis=1)
        image_index, regression, landmarks = image_index[passed], regression[passed], landmarks[passed]
        # Landmarks are relative to the squared box before O-Net's own regression.
        w = boxes[:, 2:3] - boxes[:, 0:1] + 1
        h = boxes[:, 3:4] - boxes[:, 1:2] + 1
        points = np.stack([w * landmarks[:, :5] + boxes[:, 0:1] - 1, h * landmarks[:, 5:] + boxes[:, 1:2] - 1], axis=2)
        boxes = regress_boxes(boxes, regression)
        keep = batched_nms(boxes[:, :4], boxes[:, 4], image_index, cfg.nms_output, mode="min")
        return boxes[keep], image_index[keep], points[keep]
