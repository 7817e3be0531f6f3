"""Training: the staged trainer, checkpoints, LR schedule and run logs."""
from facepipe.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from facepipe.train.trainer import Trainer, TrainingError, train

__all__ = ["CheckpointError", "Trainer", "TrainingError", "load_checkpoint", "save_checkpoint", "train"]
