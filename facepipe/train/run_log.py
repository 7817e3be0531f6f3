"""Run logging: metrics as JSON lines (one record per line), TensorBoard when installed."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class RunLog:
    """Appends metric records to ``metrics.jsonl``; mirrors scalars to TensorBoard if available.

    Appending one flushed line per record keeps everything logged before a crash.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional (the dev extra installs it)
                log.debug("tensorboard is not installed; metrics go to %s only", self.path)
            else:
                self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, event: str, step: int, **values: Any) -> None:
        record = {"event": event, "step": step, "time": round(time.time(), 3), **values}
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{event}/{key}", value, step)

    def close(self) -> None:
        self._handle.close()
        if self._writer is not None:
            self._writer.close()


class NullRunLog:
    """What ranks other than 0 log to: nothing (rank 0 writes the run's one log)."""

    def write(self, event: str, step: int, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def read_run_log(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl``; a last line cut by a crash is ignored."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
