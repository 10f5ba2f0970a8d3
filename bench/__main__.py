"""``python -m bench [names...] [--out bench/results] [--repeat N] [--list]``."""

import sys

from bench.common import main

if __name__ == "__main__":
    sys.exit(main())
