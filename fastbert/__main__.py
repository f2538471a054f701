"""``python -m fastbert``: the ``fastbert`` command line (fastbert.cli)."""
import sys

from .cli import main

sys.exit(main())
