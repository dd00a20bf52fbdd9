"""``python -m nps_pruning.cli``: the ``nps`` command."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
