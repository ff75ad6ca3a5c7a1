"""``python -m forksafe``: the same command line as the ``forksafe`` script."""

from __future__ import annotations

import sys

from forksafe._cli import main

if __name__ == "__main__":
    sys.exit(main())
