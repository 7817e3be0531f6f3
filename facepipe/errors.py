"""Exceptions that describe a problem with the user's input rather than a bug in facepipe.

The CLI prints these as one line (exit status 2) instead of a traceback.
"""
from facepipe.align.networks import MissingWeightsError
from facepipe.config import ConfigError
from facepipe.data.dataset import DatasetError, UnreadableImageError
from facepipe.train.checkpoint import CheckpointError
from facepipe.train.trainer import TrainingError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    MissingWeightsError,
    DatasetError,
    UnreadableImageError,
    CheckpointError,
    TrainingError,
    FileNotFoundError,
    ValueError,
)
