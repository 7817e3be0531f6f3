"""The alignment manifest: one JSON line per input image, read without importing torch."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from facepipe.errors import FacepipeUserError

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
# Statuses whose images have a crop (a fallback crop is a flagged centre crop).
USABLE_STATUSES = ("aligned", "fallback")


class AlignError(ValueError, FacepipeUserError):
    """The alignment job cannot start (bad source, shard, or a DST made with another config)."""


def manifest_path(destination: Path, shard: tuple[int, int]) -> Path:
    index, count = shard
    return destination / ("manifest.jsonl" if count == 1 else f"manifest.shard-{index}-of-{count}.jsonl")


def read_manifest(path: Path) -> list[dict]:
    """Rows of a manifest; a torn last line (a crash mid-append) is dropped, other bad lines are errors."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                log.warning("%s: dropping an incomplete last line (interrupted run)", path)
                continue
            raise AlignError(f"{path}:{number}: not a JSON line; the manifest is damaged") from None
    return rows


def latest_rows(rows: list[dict]) -> list[dict]:
    """One row per path, the last one written (the newest outcome), in first-seen order. Two runs
    appending to one manifest (before align locked it) listed every image twice."""
    latest: dict[str, dict] = {}
    for row in rows:
        latest[row["path"]] = row
    return list(latest.values())


def has_alignment_manifest(folder: str | Path) -> bool:
    """Whether ``folder`` is (the root of) a ``facepipe align`` output: it holds a manifest
    (``manifest.jsonl``, or the ``manifest.shard-*.jsonl`` of a sharded run)."""
    return any(path.is_file() for path in Path(folder).glob("manifest*.jsonl"))


def alignment_statuses(folder: str | Path) -> dict[str, str]:
    """Relative input path -> status (aligned, fallback, no_face, too_small, unreadable, ...) from
    every manifest of an alignment output ``folder``; empty when it holds none (it was not made
    by ``facepipe align``)."""
    statuses = {}
    for manifest in sorted(Path(folder).glob("manifest*.jsonl")):
        statuses.update({row["path"]: row.get("status", "unknown") for row in read_manifest(manifest)})
    return statuses
