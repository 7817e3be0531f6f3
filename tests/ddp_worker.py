"""Run by tests/test_distributed.py under torchrun: train the config in argv[1] (a JSON file), up
to epoch argv[2] when given."""
import json
import sys

import torch

from facepipe.config import config_from_dict
from facepipe.train.trainer import Trainer

if __name__ == "__main__":
    torch.set_num_threads(1)
    config = config_from_dict(json.loads(open(sys.argv[1]).read()))
    max_epochs = int(sys.argv[2]) if len(sys.argv) > 2 else None
    Trainer(config, progress=False).fit(max_epochs=max_epochs)
