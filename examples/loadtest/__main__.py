"""``python -m examples.loadtest``: see the package's docstring for what it does."""

from __future__ import annotations

import sys

from examples.loadtest.procs import main

if __name__ == "__main__":  # not in a spawned generator process, which imports this as well
    sys.exit(main())
