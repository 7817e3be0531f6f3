#!/usr/bin/env python
"""Thin wrapper: `python tools/align.py SRC DST ARGS` is `facepipe align SRC DST ARGS`."""
import sys

from facepipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["align", *sys.argv[1:]]))
