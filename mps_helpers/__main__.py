"""``python -m mps_helpers``: the command line."""

from __future__ import annotations

import sys

from mps_helpers._cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
