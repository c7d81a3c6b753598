"""``python -m bnkit.bench``: see :mod:`bnkit.bench.cli`."""

import sys

from bnkit.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
