"""``python -m pickmap``: the command line lives in ``_cli``."""

from __future__ import annotations

import sys

from ._cli import main

# The guard keeps a spawned worker, which imports the parent's __main__ module, from running the CLI.
if __name__ == "__main__":
    sys.exit(main())
