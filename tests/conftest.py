"""Shared test set-up: skip hardware-bound tests where the hardware is absent."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# ``tests/machines.py`` is imported as ``machines`` by the test modules.
sys.path.insert(0, str(Path(__file__).parent))


def _mps_usable() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.backends.mps.is_available())


def _cuda_usable() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs = {
        "mac": (_mps_usable, "needs a real Apple Silicon Mac with a usable mps device"),
        "cuda": (_cuda_usable, "needs a CUDA GPU"),
    }
    for marker, (probe, why) in needs.items():
        marked = [item for item in items if item.get_closest_marker(marker)]
        if marked and not probe():
            for item in marked:
                item.add_marker(pytest.mark.skip(reason=why))
