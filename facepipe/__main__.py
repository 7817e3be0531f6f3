"""``python -m facepipe`` is the ``facepipe`` command (also what torchrun launches)."""
import sys

from facepipe.cli import main

sys.exit(main())
