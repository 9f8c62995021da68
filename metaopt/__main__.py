"""``python -m metaopt <command> ...``: the ``metaopt`` command (see :mod:`metaopt.cli.main`)."""
import sys

from metaopt.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
