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


def test_dir_lists_only_the_public_names() -> None:
    # Not the module's own machinery (importlib, TYPE_CHECKING, _EXPORTS, annotations).
    assert dir(mps_helpers) == sorted(mps_helpers.__all__)


def test_the_type_auto_prepare_returns_is_public() -> None:
    scope = mps_helpers.auto_prepare(device="cpu")
    assert type(scope) is mps_helpers.AutoPrepare
    assert "AutoPrepare" in mps_helpers.__all__


def test_every_public_name_is_in_the_api_reference() -> None:
    import pathlib
    import re

    api = (pathlib.Path(__file__).parents[1] / "docs" / "reference" / "api.md").read_text()
    documented = set(re.findall(r"^\.\. auto\w+:: (\w+)", api, flags=re.MULTILINE))
    assert set(mps_helpers.__all__) - {"__version__"} <= documented


def test_the_testing_module_documents_its_public_names() -> None:
    import pathlib

    from mps_helpers import testing

    api = (pathlib.Path(__file__).parents[1] / "docs" / "reference" / "api.md").read_text()
    members = api.split(".. automodule:: mps_helpers.testing", 1)[1].split("\n")[1]
    assert sorted(testing.__all__) == sorted(
        members.split(":members:")[1].replace(",", " ").split()
    )
