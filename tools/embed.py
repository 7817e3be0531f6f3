#!/usr/bin/env python
"""Thin wrapper: `python tools/embed.py ARGS` is `facepipe embed ARGS`."""
import sys

from facepipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
