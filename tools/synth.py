#!/usr/bin/env python
"""Thin wrapper: `python tools/synth.py ARGS` is `facepipe synth ARGS`."""
import sys

from facepipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["synth", *sys.argv[1:]]))
