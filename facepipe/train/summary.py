"""The end-of-run summary that ``facepipe train`` prints."""
from __future__ import annotations

from typing import Any


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
    """The lines ``facepipe train`` prints at the end (``run``: the summary of
    :meth:`facepipe.train.trainer.Trainer.run_summary`)."""
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
