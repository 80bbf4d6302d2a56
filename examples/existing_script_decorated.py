"""Run an existing script's ``main`` under ``@auto_prepare``, without editing the script.

    python examples/existing_script_decorated.py
    python examples/existing_script_decorated.py --model stable-diffusion-v1-5/stable-diffusion-v1-5

``auto_prepare`` works as a bare decorator, as a decorator with options and as a context
manager; the scope covers the call only and is gone afterwards. In your own code you would
write ``@auto_prepare`` right above ``def main``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mps_helpers import auto_prepare

# existing_script.py sits next to this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import existing_script  # found through the path set just above


def main(argv: list[str] | None = None) -> int:
    """Run existing_script.main prepared, with one decision forced; return the exit status."""
    # Options are those of prepare_pipeline; everything not given is decided for the machine.
    prepared_main = auto_prepare(vae_slicing=True)(existing_script.main)
    prepared_main(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
