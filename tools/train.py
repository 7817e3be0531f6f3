#!/usr/bin/env python
"""Thin wrapper: `python tools/train.py ARGS` is `facepipe train ARGS`."""
import sys

from facepipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
