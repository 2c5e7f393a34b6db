"""``python -m flows.cli ...``: the ``prostate-cohort`` command."""

import sys

from flows.cli import main

if __name__ == "__main__":
    sys.exit(main())
