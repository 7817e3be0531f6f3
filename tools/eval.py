#!/usr/bin/env python
"""Thin wrapper: `python tools/eval.py PROTOCOL ARGS` is `facepipe eval PROTOCOL ARGS`."""
import sys

from facepipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
