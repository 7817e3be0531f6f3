"""Shared fixtures: small synthetic identity datasets rendered once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from facepipe.config import Config, config_from_dict
from facepipe.data.synth import generate_dataset

# Tests use tiny models, which run fastest on one intra-op thread; it also keeps DataLoader
# workers and pytest from oversubscribing a 2-core machine.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """12 long-tailed identities of 32x32 images (3..12 images each)."""
    root = tmp_path_factory.mktemp("tiny") / "train"
    generate_dataset(root, num_identities=12, seed=1, max_images=12, min_images=3, size=(32, 32), progress=False)
    return root


def tiny_config(root: Path, out: Path, **sections) -> Config:
    """A config that trains in seconds on ``tiny_dataset``; ``sections`` override top-level keys."""
    data = {
        "seed": 0,
        "output_dir": str(out),
        "data": {"root": str(root), "image_size": [32, 32], "batch_size": 8, "num_workers": 0},
        "model": {"depth": 18, "width": 0.125, "embedding_size": 32, "dropout": 0.0},
        "optim": {"lr": 0.05},
        "scheduler": {"name": "cosine", "warmup_epochs": 0.5},
        "train": {
            "stages": [
                {"epochs": 1, "head": {"type": "softmax"}},
                {"epochs": 1, "head": {"type": "cosface", "s": 16.0, "m": 0.2}},
            ],
            "log_every_steps": 2,
        },
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return config_from_dict(data)
