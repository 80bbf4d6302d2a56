"""Importing the package is free: no torch, no diffusers, little start-up time."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import mps_helpers

HEAVY = ("torch", "diffusers", "transformers", "numpy", "PIL", "accelerate")


def _python(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout


def test_import_loads_no_heavy_library() -> None:
    out = _python(
        "import sys, json, mps_helpers; "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert json.loads(out) == []


def test_environment_and_checks_load_no_heavy_library_either() -> None:
    out = _python(
        "import sys, json; from mps_helpers import Environment, check_environment, Finding; "
        "from mps_helpers import plan_for, prepare_pipeline, auto_prepare; "
        "check_environment(Environment()); "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert json.loads(out) == []


def test_import_time_is_tens_of_milliseconds() -> None:
    code = "import time; t = time.perf_counter(); import {mod}; print(time.perf_counter() - t)"
    bare = [float(_python(code.format(mod="json"))) for _ in range(3)]
    ours = [float(_python(code.format(mod="mps_helpers"))) for _ in range(3)]
    added = statistics.median(ours) - statistics.median(bare)
    assert added < 0.08, f"import mps_helpers added {added * 1000:.0f} ms"


def test_public_names_resolve() -> None:
    for name in mps_helpers.__all__:
        if name in {"__version__"}:
            continue
        assert getattr(mps_helpers, name) is not None, name
    assert set(mps_helpers.__all__) <= set(dir(mps_helpers))


def test_unknown_attribute_raises_attribute_error() -> None:
    import pytest

    with pytest.raises(AttributeError, match="no_such_name"):
        mps_helpers.no_such_name  # noqa: B018


def test_version_matches_metadata() -> None:
    from importlib import metadata

    assert mps_helpers.__version__ == metadata.version("mps_helpers")


def test_all_lists_exactly_the_lazy_exports() -> None:
    assert sorted(mps_helpers.__all__) == sorted(["__version__", *mps_helpers._EXPORTS])
