"""The summary of a training run (what :meth:`facepipe.train.trainer.Trainer.fit` returns under
``"run"``) and the lines ``facepipe train`` prints from it."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from facepipe.config import Config
from facepipe.runtime.checkpoint import BEST, LATEST


def run_summary(config: Config, run_dir: Path, epoch: int, steps: int, last_metrics: dict[str, Any],
                validation_metric: str | None, best_metric: float, best_epoch: int | None,
                session_start: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The whole run as it stands after a fit: stages and epochs trained (``epoch`` of them),
    steps, final loss, best.pt (epoch and metric; None without validation), and this session
    (the fit call): where it started (``session_start``), whether it resumed the run, its wall
    time (``seconds``)."""
    stages = config.train.stages
    stages_trained = config.train.stage_at(epoch - 1)[0] + 1 if epoch else 0
    has_best = validation_metric is not None and math.isfinite(best_metric)
    return {
        "run_dir": str(run_dir),
        "stages": len(stages),
        "stages_trained": stages_trained,
        "stage_epochs": [{"name": stage.name or stage.head.type, "epochs": stage.epochs} for stage in stages],
        "epochs": epoch,
        "total_epochs": config.train.total_epochs,
        "steps": steps,
        "final_loss": last_metrics.get("loss"),
        "final_accuracy": last_metrics.get("accuracy"),
        "validation_metric": validation_metric,
        "best": has_best,
        "best_epoch": best_epoch if has_best else None,  # None also from checkpoints before issue 26
        "best_metric": best_metric if has_best else None,
        "checkpoints": [LATEST, BEST] if has_best else [LATEST],
        "resumed": bool(session_start["resumed"]),
        "session_start_epoch": int(session_start["epoch"]),
        "session_epochs": epoch - int(session_start["epoch"]),
        "session_steps": steps - int(session_start["step"]),
        "session_seconds": seconds,
    }


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def format_run_summary(run: dict[str, Any]) -> list[str]:
    """The lines ``facepipe train`` prints at the end (``run``: a :func:`run_summary`)."""
    schedule = ", ".join(f"{s['name']} {_count(s['epochs'], 'epoch')}" for s in run["stage_epochs"])
    stages = (_count(run["stages"], "stage") if run["stages_trained"] == run["stages"]
              else f"{run['stages_trained']} of {run['stages']} stages")
    lines = [f"trained {stages} ({schedule}): {run['epochs']}/{run['total_epochs']} epochs, "
             f"{_count(run['steps'], 'step')}"]
    if run["resumed"]:
        lines.append(f"resumed at epoch {run['session_start_epoch']}: this session trained "
                     f"{_count(run['session_epochs'], 'epoch')} ({_count(run['session_steps'], 'step')}) "
                     f"in {_duration(run['session_seconds'])}")
    else:
        lines.append(f"wall time {_duration(run['session_seconds'])}")
    if run["final_loss"] is not None:
        accuracy = "" if run["final_accuracy"] is None else f", training accuracy {run['final_accuracy']:.4f}"
        lines.append(f"final loss {run['final_loss']:.4f} (epoch {run['epochs']}{accuracy})")
    if run["validation_metric"] is None:
        lines.append("no validation set: only latest.pt written")
    elif not run["best"]:
        lines.append(f"no epoch has a finite {run['validation_metric']}: no best.pt written")
    else:
        epoch = "" if run["best_epoch"] is None else f"epoch {run['best_epoch']}, "
        lines.append(f"best.pt: {epoch}{run['validation_metric']} {run['best_metric']:.4f} "
                     f"(the highest of the validated epochs)")
    lines.append(f"checkpoints in {run['run_dir']}: {', '.join(run['checkpoints'])}")
    return lines
