"""``python -m ms_prune``: the ``ms-prune`` command (ms_prune.cli)."""
import sys

from ms_prune.cli import main

if __name__ == "__main__":
    sys.exit(main())
