#!/usr/bin/env python
"""Thin wrapper: `python tools/demo.py ARGS` is `facepipe demo ARGS`."""
import sys

from facepipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
