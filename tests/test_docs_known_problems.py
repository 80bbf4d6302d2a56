"""The known-problems page is rendered from the data: page and data must agree."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from mps_helpers._known_problems import KNOWN_PROBLEMS
from mps_helpers._selftest import PROBES

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _renderer() -> Any:
    spec = importlib.util.spec_from_file_location(
        "render_known_problems", DOCS / "render_known_problems.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_page_matches_the_data() -> None:
    renderer = _renderer()
    page = renderer.PAGE.read_text(encoding="utf-8")
    assert renderer.render(page) == page, "run: python docs/render_known_problems.py"


def test_page_shows_every_problem_and_probe() -> None:
    page = (DOCS / "explanation" / "known-problems.md").read_text(encoding="utf-8")
    for problem in KNOWN_PROBLEMS:
        assert f"### {problem.id}\n" in page
        for source in problem.sources:
            assert source in page
    for name in PROBES:
        assert f"| `{name}` |" in page
    assert "doctor --probe --json" in page


def test_render_notices_a_changed_table() -> None:
    renderer = _renderer()
    page = renderer.PAGE.read_text(encoding="utf-8")
    stale = page.replace("| [baddbmm-beta0-nan]", "| [baddbmm-old]", 1)
    assert stale != page
    assert renderer.render(stale) == page
    with pytest.raises(ValueError, match="no generated section 'details'"):
        renderer.render(page.replace("<!-- generated: details -->", ""))
