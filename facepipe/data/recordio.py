"""insightface / MXNet RecordIO face datasets (``train.rec`` + ``train.idx`` + ``property``), without MXNet.

The public insightface training sets (CASIA-WebFace, MS1M-ArcFace, Glint360K, ...) ship as MXNet
RecordIO files. This module reads and writes that format with the standard library and numpy.

The format (insightface / MXNet RecordIO)
-----------------------------------------
``train.rec`` is a sequence of records; each one is::

    uint32 LE   magic 0xCED7230A
    uint32 LE   lrec: cflag = lrec >> 29 (upper 3 bits), length = lrec & (2**29 - 1)
    length      payload bytes
    0..3        zero bytes, padding the record to a multiple of 4 bytes

``cflag`` 0 is a whole record. MXNet's writer keeps the magic number out of every 4-byte aligned
position of the stream, so that a reader can find record boundaries by scanning for it: where
the payload holds the magic number at an aligned position, the payload is cut there, the
magic bytes are dropped, and the pieces are written as consecutive parts with cflag 1 (first),
2 (middle) and 3 (last). A reader joins the parts with the magic bytes put back between them.

The payload of an image record is an ``IRHeader``, struct ``'<IfQQ'`` (24 bytes)::

    flag  uint32    0, or the number of float32 labels that follow the header
    label float32   the label when flag == 0 (unused otherwise)
    id    uint64    record id
    id2   uint64    second id (unused by insightface)

then, when ``flag > 0``, ``flag`` float32 labels (the label is that array), then the encoded
image (JPEG or PNG).

``train.idx`` is text, one line ``key<TAB>offset`` per record, ``offset`` being the byte position
of the record's (first) magic number in ``train.rec``.

insightface layout: key 0 is a header record (flag 2, labels ``[a, b]``, no image): keys
``1 .. a-1`` are the images and keys ``a .. b-1`` one identity record per identity (flag 2,
labels ``[first image key, end image key)`` of that identity's contiguous images). Some sets
have no header record (record 0 is an image): then every key is an image. An image's identity
is its scalar label (flag 0) or ``labels[0]`` (flag > 0).

``property`` is one line ``num_classes,height,width`` (e.g. ``10572,112,112``).
"""
from __future__ import annotations

import logging
import mmap
import numbers
import os
import random
import struct
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from facepipe.data.dataset import (
    DatasetError,
    IdentityFolderDataset,
    TrainingEvalView,
    UnreadableImageError,
    decode_encoded_image,
    decode_image,
    scan_identity_folders,
)
from facepipe.runtime.io import OutputError, atomic_write

log = logging.getLogger(__name__)

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_BITS = 29
LENGTH_MASK = (1 << LENGTH_BITS) - 1
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24
_FRAME = struct.Struct("<II")  # magic, lrec
_FRAME_SIZE = _FRAME.size

# cflag values of the parts of one record.
WHOLE, FIRST, MIDDLE, LAST = 0, 1, 2, 3

_JPEG_SIGNATURE = b"\xff\xd8\xff"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# One record of the header-only label scan: the 8-byte frame, the IRHeader and the first float32
# after it (labels[0] when flag > 0). Packed (no alignment) like the file.
_SCAN_DTYPE = np.dtype([("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"),
                        ("id", "<u8"), ("id2", "<u8"), ("label0", "<f4")])
_SCAN_CHUNK = 1 << 16


class RecordIOError(DatasetError):
    """A RecordIO file (or its index) that cannot be read; the message names the file and byte offset."""


class UndecodableRecordError(RecordIOError, UnreadableImageError):
    """A record whose image cannot be decoded: a :class:`RecordIOError` naming the file and
    offset, and the :class:`UnreadableImageError` (same ``status``) that every stage raises for
    the same bytes."""

    # ValueError's own __init__ comes first in the MRO and would skip the status fields.
    __init__ = UnreadableImageError.__init__
    __reduce__ = UnreadableImageError.__reduce__


# ----------------------------------------------------------------------------- records
def _pad4(length: int) -> int:
    return (length + 3) & ~3


def frame_record(payload: bytes) -> bytes:
    """The bytes of one record holding ``payload``, exactly as MXNet's RecordIO writer lays them out.

    Usually one part (cflag 0). Where the magic number occurs at a 4-byte aligned position of the
    payload it is cut out and the payload written as parts with cflag 1, 2, ..., 2, 3 (see the
    module docstring), so that the magic number only ever marks record boundaries in the file.
    """
    payload = bytes(payload)
    size = len(payload)
    if size > LENGTH_MASK:
        raise ValueError(f"a RecordIO record holds at most {LENGTH_MASK} bytes, got {size}")
    aligned = size // 4
    words = np.frombuffer(payload, dtype="<u4", count=aligned) if aligned else np.empty(0, "<u4")
    cuts = (np.flatnonzero(words == MAGIC) * 4).tolist()
    out = bytearray()
    start = 0
    for number, cut in enumerate(cuts):
        # Parts before a cut start and end on aligned positions: their lengths need no padding.
        out += _FRAME.pack(MAGIC, ((FIRST if number == 0 else MIDDLE) << LENGTH_BITS) | (cut - start))
        out += payload[start:cut]
        start = cut + 4
    out += _FRAME.pack(MAGIC, ((LAST if cuts else WHOLE) << LENGTH_BITS) | (size - start))
    out += payload[start:]
    out += bytes(_pad4(len(out)) - len(out))
    return bytes(out)


def _read_record(read_at: Callable[[int, int], bytes], offset: int, file_size: int, name: str) -> bytes:
    """Read the record at ``offset``, joining split parts; ``read_at(position, n)`` reads bytes."""
    parts: list[bytes] = []
    position = offset
    while True:
        if position + _FRAME_SIZE > file_size:
            raise RecordIOError(f"truncated record at offset {offset} in {name} (needs {position + _FRAME_SIZE} "
                                f"bytes, file has {file_size})")
        magic, lrec = _FRAME.unpack(read_at(position, _FRAME_SIZE))
        if magic != MAGIC:
            what = "record" if position == offset else f"part of the record at offset {offset}"
            raise RecordIOError(f"bad magic at offset {position} in {name}: {what} starts with 0x{magic:08X}, "
                                f"expected 0x{MAGIC:08X} (corrupt file, or an index that does not belong to it)")
        cflag, length = lrec >> LENGTH_BITS, lrec & LENGTH_MASK
        allowed = (WHOLE, FIRST) if not parts else (MIDDLE, LAST)
        if cflag not in allowed:
            raise RecordIOError(f"bad continuation flag {cflag} at offset {position} in {name} (record at offset "
                                f"{offset}; expected one of {allowed})")
        end = position + _FRAME_SIZE + length
        if end > file_size:
            raise RecordIOError(f"truncated record at offset {offset} in {name} (needs {end} bytes, "
                                f"file has {file_size})")
        parts.append(read_at(position + _FRAME_SIZE, length))
        position += _FRAME_SIZE + _pad4(length)
        if cflag in (WHOLE, LAST):
            # The writer removed the magic number where it cut the payload: put it back.
            return MAGIC_BYTES.join(parts)


def read_record(handle: IO[bytes], offset: int) -> bytes:
    """The payload of the record at byte ``offset`` of an open binary file (split parts joined)."""
    name = str(getattr(handle, "name", "<stream>"))
    here = handle.tell()
    file_size = handle.seek(0, os.SEEK_END)
    handle.seek(here)

    def read_at(position: int, count: int) -> bytes:
        handle.seek(position)
        return handle.read(count)

    return _read_record(read_at, offset, file_size, name)


def pack_record(label: float | Sequence[float] | np.ndarray, image_bytes: bytes = b"", id: int = 0,
                id2: int = 0) -> bytes:
    """The payload of an image (or header / identity) record: IRHeader, labels, image bytes.

    A scalar ``label`` is stored in the header with flag 0; a sequence of labels is stored after
    the header as float32 with flag = its length (what MXNet's ``recordio.pack`` does). Frame the
    result with :func:`frame_record` (or write it with :class:`RecordWriter`).
    """
    if isinstance(label, numbers.Real):
        header = struct.pack(IR_FORMAT, 0, float(label), int(id), int(id2))
        return header + bytes(image_bytes)
    labels = np.asarray(label, dtype="<f4").ravel()
    if labels.size == 0:
        raise ValueError("pack_record needs a scalar label or at least one label")
    return struct.pack(IR_FORMAT, labels.size, 0.0, int(id), int(id2)) + labels.tobytes() + bytes(image_bytes)


def unpack_header(payload: bytes, where: str = "") -> tuple[int, float | np.ndarray, int, int, bytes]:
    """Split a record payload into ``(flag, label, id, id2, image_bytes)``.

    ``label`` is a float when ``flag`` is 0, else the float32 array of ``flag`` labels. ``where``
    (e.g. ``" in train.rec at offset 1234"``) is appended to error messages.
    """
    if len(payload) < IR_SIZE:
        raise RecordIOError(f"bad header{where}: the payload has {len(payload)} bytes, fewer than the "
                            f"{IR_SIZE}-byte IRHeader")
    flag, label, id_, id2 = struct.unpack_from(IR_FORMAT, payload)
    if flag == 0:
        return 0, float(label), id_, id2, bytes(payload[IR_SIZE:])
    end = IR_SIZE + 4 * flag
    if end > len(payload):
        raise RecordIOError(f"bad header{where}: flag {flag} announces {flag} float32 labels but only "
                            f"{len(payload) - IR_SIZE} bytes follow the IRHeader")
    labels = np.frombuffer(payload, dtype="<f4", count=flag, offset=IR_SIZE).astype(np.float32)
    return flag, labels, id_, id2, bytes(payload[end:])


def decode_image_bytes(data: bytes, where: str = "") -> np.ndarray:
    """Decode encoded image bytes to HxWx3 uint8 RGB with the reader of every stage
    (:mod:`facepipe.data.image_io`); raises :class:`UndecodableRecordError`."""
    try:
        return decode_encoded_image(data, "record")
    except UnreadableImageError as exc:
        raise UndecodableRecordError(f"undecodable image{where}: {exc}", exc.status, f"record{where}",
                                     exc.detail) from None


# ----------------------------------------------------------------------------- index
def read_index(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, offsets)`` (int64 arrays in file order) of a ``.idx`` file of ``key<TAB>offset`` lines."""
    path = Path(path)
    text = path.read_text(encoding="ascii", errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    fields = text.split()
    if len(fields) == 2 * len(lines):
        try:
            # One vectorised parse; a bad line falls through to the line-by-line pass for its number.
            pairs = np.array(fields, dtype=np.int64).reshape(-1, 2)
        except (ValueError, OverflowError):
            pairs = None
    else:
        pairs = None
    if pairs is None:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                rows.append((int(parts[0]), int(parts[1])))
            except ValueError:
                raise RecordIOError(f"bad index line {number} in {path}: {line.strip()[:60]!r} "
                                    "(expected 'key<TAB>offset')") from None
        pairs = np.array(rows, dtype=np.int64).reshape(-1, 2)
    keys, offsets = pairs[:, 0].copy(), pairs[:, 1].copy()
    if len(keys) and (keys.min() < 0 or offsets.min() < 0):
        raise RecordIOError(f"negative key or offset in index {path}")
    unique, counts = np.unique(keys, return_counts=True)
    if len(unique) != len(keys):
        raise RecordIOError(f"index {path} lists key {int(unique[counts > 1][0])} more than once")
    return keys, offsets


def scan_offsets(path: str | Path) -> np.ndarray:
    """Byte offsets of every record of a ``.rec`` file, found by walking the record frames (for a
    file without ``.idx``; the payloads are skipped, not read)."""
    path = Path(path)
    offsets: list[int] = []
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        position, in_record = 0, False
        while position < file_size:
            handle.seek(position)
            frame = handle.read(_FRAME_SIZE)
            if len(frame) < _FRAME_SIZE:
                raise RecordIOError(f"truncated record at offset {position} in {path} (needs "
                                    f"{position + _FRAME_SIZE} bytes, file has {file_size})")
            magic, lrec = _FRAME.unpack(frame)
            if magic != MAGIC:
                raise RecordIOError(f"bad magic at offset {position} in {path}: 0x{magic:08X}")
            cflag = lrec >> LENGTH_BITS
            if not in_record:
                offsets.append(position)
            in_record = cflag in (FIRST, MIDDLE)
            position += _FRAME_SIZE + _pad4(lrec & LENGTH_MASK)
    return np.array(offsets, dtype=np.int64)


class RecordWriter:
    """Append framed records to an open ``.rec`` handle and ``key<TAB>offset`` lines to an ``.idx``
    handle (what MXNet's ``MXIndexedRecordIO`` writes)."""

    def __init__(self, rec_handle: IO[bytes], idx_handle: IO[str]) -> None:
        self.rec = rec_handle
        self.idx = idx_handle
        self.position = rec_handle.tell()
        self.keys: set[int] = set()

    def write(self, key: int, payload: bytes) -> int:
        """Write one record; returns its offset."""
        key = int(key)
        if key < 0 or key in self.keys:
            raise ValueError(f"record key {key} is negative or already written")
        self.keys.add(key)
        data = frame_record(payload)
        offset = self.position
        self.rec.write(data)
        self.idx.write(f"{key}\t{offset}\n")
        self.position += len(data)
        return offset


def write_record_file(rec_path: str | Path, records: Iterable[tuple[int, bytes]],
                      idx_path: str | Path | None = None) -> int:
    """Write ``(key, payload)`` pairs as ``rec_path`` + its ``.idx``, both atomically; returns the count."""
    rec_path = Path(rec_path)
    idx_path = Path(idx_path) if idx_path is not None else rec_path.with_suffix(".idx")
    with atomic_write(idx_path, "w", encoding="ascii") as idx, atomic_write(rec_path, "wb") as rec:
        writer = RecordWriter(rec, idx)
        for key, payload in records:
            writer.write(key, payload)
    return len(writer.keys)


def read_property(path: str | Path) -> tuple[int, int, int]:
    """``(num_classes, height, width)`` from an insightface ``property`` file."""
    path = Path(path)
    try:
        line = path.read_text(encoding="utf-8").strip().splitlines()[:1]
    except UnicodeDecodeError:
        line = [repr(path.read_bytes()[:60])]
    try:
        num_classes, height, width = (int(part) for part in line[0].split(","))
    except (IndexError, ValueError):
        raise RecordIOError(f"bad property file {path}: expected one line 'num_classes,height,width', "
                            f"found {line[0][:60] if line else 'nothing'!r}") from None
    return num_classes, height, width


# ----------------------------------------------------------------------------- random access
class RecordFile:
    """Random access to the records of a ``.rec`` file by key, through its ``.idx``.

    The file is opened lazily, once per process: a DataLoader worker (forked or spawned) opens
    its own descriptor on first use, and pickling drops the descriptor. Reads use ``os.pread``
    (no shared seek position), so threads may share one instance.

    A corrupt record raises :class:`RecordIOError` (naming the file and offset) when it is read;
    every other record stays readable. Without an ``.idx`` the offsets are found by walking the
    file and the keys are 0, 1, ... in file order.
    """

    def __init__(self, path: str | Path, idx_path: str | Path | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise RecordIOError(f"record file {self.path} does not exist")
        self.idx_path = Path(idx_path) if idx_path is not None else self.path.with_suffix(".idx")
        if self.idx_path.is_file():
            keys, offsets = read_index(self.idx_path)
        else:
            log.warning("%s has no index %s: walking the file for record offsets (keys 0, 1, ... in file order)",
                        self.path, self.idx_path.name)
            offsets = scan_offsets(self.path)
            keys = np.arange(len(offsets), dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._offsets = offsets[order]
        # Dense key -> offset table when keys are (nearly) 0..n-1, the usual case; else binary search.
        top = int(self._keys[-1]) + 1 if len(self._keys) else 0
        self._dense: np.ndarray | None = None
        if top <= 4 * len(self._keys) + 1024:
            self._dense = np.full(top, -1, dtype=np.int64)
            self._dense[self._keys] = self._offsets
        self._size = self.path.stat().st_size
        self._fd: int | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    # -- pickling: a worker process reopens the file itself
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fd"] = None
        state["_pid"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _fileno(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            with self._lock:
                if self._fd is None or self._pid != pid:
                    if self._fd is not None:
                        # Inherited through fork: close this process's copy, never the parent's file.
                        try:
                            os.close(self._fd)
                        except OSError:
                            pass
                    self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                    self._pid = pid
                    self._size = os.fstat(self._fd).st_size
        return self._fd

    def _read_at(self, position: int, count: int) -> bytes:
        fd = self._fileno()
        if hasattr(os, "pread"):
            chunks, got = [], 0
            while got < count:
                chunk = os.pread(fd, count - got, position + got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks)
        with self._lock:  # no pread (Windows): seek + read must not interleave between threads
            os.lseek(fd, position, os.SEEK_SET)
            return os.read(fd, count)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
        self._pid = None

    def __enter__(self) -> "RecordFile":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # -- keys
    @property
    def keys(self) -> np.ndarray:
        """The record keys, ascending (int64)."""
        return self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        try:
            self.offset(int(key))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def offsets_of(self, keys: Sequence[int] | np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.int64)
        if self._dense is not None:
            inside = (keys >= 0) & (keys < len(self._dense))
            found = np.full(len(keys), -1, dtype=np.int64)
            found[inside] = self._dense[keys[inside]]
        else:
            slots = np.clip(np.searchsorted(self._keys, keys), 0, max(len(self._keys) - 1, 0))
            found = np.where(self._keys[slots] == keys, self._offsets[slots], -1) if len(self._keys) else \
                np.full(len(keys), -1, dtype=np.int64)
        if (found < 0).any():
            missing = keys[found < 0]
            raise KeyError(f"{len(missing)} key(s) are not in {self.idx_path}, e.g. {missing[:5].tolist()}")
        return found

    def offset(self, key: int) -> int:
        """Byte offset of record ``key`` (KeyError when the index lacks it)."""
        return int(self.offsets_of([key])[0])

    # -- reading
    def where(self, key: int, offset: int | None = None) -> str:
        """`` in FILE at offset N (key K)``: the context of error messages about record ``key``."""
        return f" in {self.path} at offset {self.offset(key) if offset is None else offset} (key {key})"

    def _payload(self, key: int) -> tuple[bytes, int]:
        offset = self.offset(key)
        self._fileno()  # opens the file (and learns its size) in this process
        return _read_record(self._read_at, offset, self._size, str(self.path)), offset

    def read(self, key: int) -> bytes:
        """The payload of record ``key`` (split parts joined)."""
        return self._payload(key)[0]

    __getitem__ = read

    def unpack(self, key: int) -> tuple[int, float | np.ndarray, int, int, bytes]:
        """``(flag, label, id, id2, image_bytes)`` of record ``key``."""
        payload, offset = self._payload(key)
        return unpack_header(payload, self.where(key, offset))

    def read_image(self, key: int) -> np.ndarray:
        """The decoded image of record ``key`` as HxWx3 uint8 RGB."""
        payload, offset = self._payload(key)
        where = self.where(key, offset)
        return decode_image_bytes(unpack_header(payload, where)[4], where)

    def read_labels(self, keys: Sequence[int] | np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
        """The identity label of each record (its scalar label, or labels[0] when flag > 0) from
        the record headers alone: no image is read or decoded.

        Returns ``(labels, errors)``: float64 labels (NaN where unreadable) and ``{key: message}``
        for records whose header cannot be read. Whole records (cflag 0) are parsed in one
        vectorised pass over a memory map (36 bytes each); split or odd ones are read in full.
        """
        keys = np.asarray(keys, dtype=np.int64)
        offsets = self.offsets_of(keys)
        labels = np.full(len(keys), np.nan, dtype=np.float64)
        slow = np.ones(len(keys), dtype=bool)
        fd = self._fileno()
        size = self._size
        width = _SCAN_DTYPE.itemsize
        if size >= width and len(keys):
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            try:
                buffer = np.frombuffer(mapped, dtype=np.uint8)
                columns = np.arange(width, dtype=np.int64)
                for start in range(0, len(keys), _SCAN_CHUNK):
                    offs = offsets[start:start + _SCAN_CHUNK]
                    inside = offs + width <= size
                    rows = buffer[np.where(inside, offs, 0)[:, None] + columns]  # a copy: mapped stays closable
                    fields = rows.view(_SCAN_DTYPE).ravel()
                    flag = fields["flag"].astype(np.int64)
                    length = (fields["lrec"] & LENGTH_MASK).astype(np.int64)
                    good = (inside & (fields["magic"] == MAGIC) & ((fields["lrec"] >> LENGTH_BITS) == WHOLE)
                            & (length >= IR_SIZE + 4 * flag) & (offs + _FRAME_SIZE + length <= size))
                    value = np.where(flag > 0, fields["label0"], fields["label"]).astype(np.float64)
                    labels[start:start + len(offs)][good] = value[good]
                    slow[start:start + len(offs)] = ~good
                del buffer
            finally:
                mapped.close()
        errors: dict[int, str] = {}
        for position in np.flatnonzero(slow):
            key = int(keys[position])
            try:
                flag, label, _, _, _ = self.unpack(key)
            except RecordIOError as exc:
                errors[key] = str(exc)
                continue
            labels[position] = float(label[0]) if flag > 0 else float(label)
        return labels, errors

    def __repr__(self) -> str:
        return f"RecordFile({str(self.path)!r}, {len(self)} records)"


# ----------------------------------------------------------------------------- datasets
def record_path(root: str | Path) -> Path | None:
    """The ``.rec`` file that ``root`` names (a ``.rec`` file, or a folder holding ``train.rec``), else None."""
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".rec":
        return root
    if root.is_dir() and (root / "train.rec").is_file():
        return root / "train.rec"
    return None


def _label_name(value: float) -> str:
    # Labels are stored as float32: 3.0 -> "3", a non-integral one keeps its decimals.
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


class RecordDataset(Dataset):
    """A training set in insightface's RecordIO layout, with the interface of ``IdentityFolderDataset``.

    ``path`` is a ``.rec`` file or a folder holding ``train.rec`` (+ ``train.idx``, ``property``).
    Items are ``(image_tensor, label, index)``; ``item`` may be ``(index, seed)`` to seed the
    transform per sample. ``labels`` (int64, one per image) number the distinct stored labels
    0..C-1 in increasing value; ``identities`` are those stored values as strings ("0", "1", ...),
    or the order given by ``identities`` (from a checkpoint).

    The labels come from the record headers alone (no image decoded) and are kept in memory.
    Records whose header cannot be read are left out with a warning, unless they are more than
    ``max_corrupt_fraction`` of the images (then the index probably belongs to another file and
    it is an error). An image that cannot be read during training is logged once and replaced
    by another image of the same identity, as ``IdentityFolderDataset`` does.
    """

    def __init__(self, path: str | Path, transform: Callable[..., torch.Tensor] | None = None,
                 identities: Sequence[str] | None = None, idx_path: str | Path | None = None,
                 max_corrupt_fraction: float = 0.01) -> None:
        rec = record_path(path)
        if rec is None:
            raise DatasetError(f"{path} is neither a .rec file nor a folder holding train.rec")
        self.root = rec
        started = time.perf_counter()
        self.records = RecordFile(rec, idx_path)
        keys = self._image_keys()
        stored, errors = self.records.read_labels(keys)
        if errors:
            first = next(iter(errors.values()))
            if len(errors) > max_corrupt_fraction * len(keys):
                raise RecordIOError(f"{len(errors)} of {len(keys)} records of {rec} have unreadable headers "
                                    f"(first: {first}); is {self.records.idx_path.name} the index of this file?")
            log.warning("leaving out %d of %d records of %s with unreadable headers (first: %s)",
                        len(errors), len(keys), rec, first)
            keep = ~np.isin(keys, np.fromiter(errors, dtype=np.int64, count=len(errors)))
            keys, stored = keys[keep], stored[keep]
        if len(keys) == 0:
            raise DatasetError(f"{rec} holds no images")
        # np.unique would make NaN (or each infinity) one more identity, trained as a class of
        # its own: a damaged label is an error, not an identity.
        broken = np.flatnonzero(~np.isfinite(stored))
        if len(broken):
            raise DatasetError(f"{len(broken)} of {len(keys)} records of {rec} have a NaN or infinite identity label "
                               f"(first: record {int(keys[broken[0]])}, label {stored[broken[0]]}); repack the set "
                               "or remove those records")
        values, codes = np.unique(stored, return_inverse=True)
        names = [_label_name(v) for v in values]
        if identities is not None:
            position = {name: label for label, name in enumerate(identities)}
            missing = [name for name in names if name not in position]
            if missing:
                raise DatasetError(f"{len(missing)} label(s) of {rec} are not in the given identity list, "
                                   f"e.g. {missing[:5]}")
            remap = np.array([position[name] for name in names], dtype=np.int64)
            self.labels = remap[codes.ravel()]
            self.identities = list(identities)
        else:
            self.labels = codes.ravel().astype(np.int64)
            self.identities = names
        self.keys = keys
        self.transform = transform
        self._by_label: dict[int, list[int]] = {}
        for index, label in enumerate(self.labels.tolist()):
            self._by_label.setdefault(label, []).append(index)
        self.bad_keys: set[int] = set()
        self.property: tuple[int, int, int] | None = None
        property_path = rec.parent / "property"
        if property_path.is_file():
            self.property = read_property(property_path)
            if self.property[0] != len(names):
                log.warning("%s says %d classes, the images of %s carry %d distinct labels",
                            property_path, self.property[0], rec, len(names))
        log.info("%s: %d images of %d identities (labels read in %.2fs)", rec, len(keys), len(names),
                 time.perf_counter() - started)

    def _image_keys(self) -> np.ndarray:
        """Keys of the image records: 1..a-1 under an insightface header record, else every key."""
        keys = self.records.keys
        if 0 not in self.records:
            return keys.copy()
        try:
            flag, label, _, _, image = self.records.unpack(0)
        except RecordIOError as exc:
            raise RecordIOError(f"cannot read record 0 (the header record of insightface sets): {exc}") from None
        # A header record has labels [a, b] and no image; a header-less set starts with an image.
        if flag < 2 or len(image) > 0:
            return keys.copy()
        first_identity_key = int(label[0])
        if first_identity_key < 1 or float(label[0]) != first_identity_key:
            raise RecordIOError(f"bad header{self.records.where(0)}: labels {label.tolist()} do not give an "
                                "image range 1..a-1")
        wanted = np.arange(1, first_identity_key, dtype=np.int64)
        present = np.isin(wanted, keys)
        if not present.all():
            raise RecordIOError(f"{self.records.idx_path} lacks {int((~present).sum())} of the image keys "
                                f"1..{first_identity_key - 1} that the header record of {self.records.path} "
                                f"announces, e.g. {wanted[~present][:5].tolist()}")
        return wanted

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    def _decode(self, key: int) -> np.ndarray:
        return self.records.read_image(key)

    def _load(self, index: int) -> np.ndarray:
        key = int(self.keys[index])
        label = int(self.labels[index])
        try:
            return self._decode(key)
        except (RecordIOError, OSError) as exc:
            if key not in self.bad_keys:
                self.bad_keys.add(key)
                log.warning("skipping unreadable record (%s); using another image of '%s'", exc,
                            self.identities[label])
        candidates = [i for i in self._by_label[label] if int(self.keys[i]) not in self.bad_keys]
        rng = random.Random(index)
        rng.shuffle(candidates)
        for candidate in candidates:
            try:
                return self._decode(int(self.keys[candidate]))
            except (RecordIOError, OSError):
                self.bad_keys.add(int(self.keys[candidate]))
        raise DatasetError(f"identity '{self.identities[label]}' has no readable image left in {self.root}")

    def __getitem__(self, item: int | tuple[int, int]):
        index, seed = (item if isinstance(item, tuple) else (item, None))
        image = self._load(index)
        tensor = self.transform(image, seed=seed) if self.transform is not None else torch.from_numpy(image)
        return tensor, int(self.labels[index]), index

    def eval_view(self, indices: Sequence[int], image_size: tuple[int, int]) -> TrainingEvalView:
        """The images ``indices`` without augmentation, as ``(image, position)`` items (feature
        extraction during training; an unreadable record is substituted as in training)."""
        return TrainingEvalView(self, indices, image_size)


def open_training_dataset(root: str | Path, transform: Callable[..., torch.Tensor] | None = None,
                          identities: Sequence[str] | None = None) -> RecordDataset | IdentityFolderDataset:
    """The training dataset at ``root``: a :class:`RecordDataset` for a ``.rec`` file or a folder
    holding ``train.rec`` (insightface layout), else an ``IdentityFolderDataset``."""
    if record_path(root) is not None:
        return RecordDataset(root, transform, identities=identities)
    return IdentityFolderDataset(root, transform, identities=identities)


# ----------------------------------------------------------------------------- packing
def _stored_bytes(path: str, quality: int | None) -> tuple[bytes, bool]:
    """The bytes to store for one image file and whether they were re-encoded."""
    data = Path(path).read_bytes()
    if data.startswith(_JPEG_SIGNATURE) or data.startswith(_PNG_SIGNATURE):
        return data, False  # what every RecordIO reader decodes: keep the file as is (lossless, fast)
    try:
        rgb = decode_image(path)
    except UnreadableImageError as exc:
        # Kept as is, like an unreadable file in an identity folder: training substitutes it.
        log.warning("storing unreadable image %s as is (%s)", path, exc)
        return data, False
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if quality is None:
        ok, buffer = cv2.imencode(".png", bgr)
    else:
        ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"cv2.imencode failed on {path}")
    return buffer.tobytes(), True


def pack_identity_folder(root: str | Path, out_dir: str | Path, prefix: str = "train", quality: int | None = 95,
                         progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Write an identity-folder tree (``root/<identity>/<image>``) as insightface RecordIO:
    ``OUT_DIR/<prefix>.rec``, ``<prefix>.idx`` and ``property``.

    Layout: record 0 is the header (labels ``[a, b]``), records 1..a-1 the images grouped by
    identity with the identity's label (its position in sorted folder order) as the scalar
    label, records a..b-1 one identity record each (labels ``[first key, end key)``). JPEG and
    PNG files are stored byte for byte (lossless, no decoding); other formats are re-encoded as
    JPEG at ``quality`` (PNG when ``quality`` is None). ``property`` gets the size of the first
    readable image. Each file is written to a temporary name and renamed when all are complete.
    A set already at ``OUT_DIR/<prefix>.rec`` or ``.idx`` is refused before any work (packing a
    large set takes hours) unless ``overwrite``.

    Returns the paths, ``num_images``, ``num_classes``, ``image_size``, ``identities`` (folder
    name of each label), ``reencoded`` and ``bytes`` (size of the .rec).
    """
    from tqdm import tqdm

    root, out_dir = Path(root), Path(out_dir)
    identities, samples = scan_identity_folders(root)
    resolved_root, resolved_out = root.resolve(), out_dir.resolve()
    if resolved_out == resolved_root or resolved_root in resolved_out.parents:
        raise DatasetError(f"write the packed set outside the identity folders: {out_dir} is inside {root}")
    num_images, num_classes = len(samples), len(identities)
    first_identity_key = num_images + 1
    end_key = first_identity_key + num_classes
    # scan_identity_folders lists samples grouped by label in label order: image keys are contiguous.
    starts = np.searchsorted([s.label for s in samples], np.arange(num_classes + 1)) + 1
    paths = {"rec": out_dir / f"{prefix}.rec", "idx": out_dir / f"{prefix}.idx", "property": out_dir / "property"}
    existing = [str(paths[kind]) for kind in ("rec", "idx") if paths[kind].exists()]
    if existing and not overwrite:
        raise OutputError(f"{' and '.join(existing)} already exist(s); give --overwrite to replace the packed set, "
                          "or choose another OUT_DIR or --prefix")
    image_size: tuple[int, int] | None = None
    reencoded = 0
    out_dir.mkdir(parents=True, exist_ok=True)
    # Nested atomic writes: on any error all three temporaries are removed; on success the .rec is
    # renamed first and property last.
    with atomic_write(paths["property"], "w", encoding="ascii") as property_file, \
            atomic_write(paths["idx"], "w", encoding="ascii") as idx_file, \
            atomic_write(paths["rec"], "wb") as rec_file:
        writer = RecordWriter(rec_file, idx_file)
        writer.write(0, pack_record([first_identity_key, end_key]))
        for number, sample in enumerate(tqdm(samples, desc=f"pack {root.name}", unit="img", disable=not progress,
                                             dynamic_ncols=True)):
            data, changed = _stored_bytes(sample.path, quality)
            reencoded += changed
            if image_size is None:
                try:
                    image_size = decode_image_bytes(data).shape[:2]
                except RecordIOError:
                    pass
            writer.write(number + 1, pack_record(float(sample.label), data, id=number + 1))
        for label in range(num_classes):
            key = first_identity_key + label
            writer.write(key, pack_record([int(starts[label]), int(starts[label + 1])], id=key))
        if image_size is None:
            raise DatasetError(f"none of the {num_images} images under {root} can be decoded")
        property_file.write(f"{num_classes},{image_size[0]},{image_size[1]}\n")
        size = writer.position
    return {
        **{name: str(path) for name, path in paths.items()},
        "num_images": num_images,
        "num_classes": num_classes,
        "image_size": tuple(int(v) for v in image_size),
        "identities": identities,
        "reencoded": reencoded,
        "bytes": size,
    }
