"""The examples in the package's docstrings run, module by module, in the tests session.

The docs build runs the doctests of the pages and of the public names it documents; the
private modules' examples (the probes' parsers, the checks) are run only here. Each module
is imported inside its test, not at collection: a module that needs an optional extra
(``mps_helpers.testing`` needs transformers) is skipped where the extra is missing instead
of breaking the collection of every other test.
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil

import pytest

import mps_helpers

# __main__ runs the command line when imported as __main__ only, but holds no examples.
MODULES = sorted(
    info.name
    for info in pkgutil.iter_modules(mps_helpers.__path__, "mps_helpers.")
    if info.name != "mps_helpers.__main__"
)


def run_doctests(name: str) -> doctest.TestResults:
    """Run every docstring example of module ``name``; fail with doctest's report."""
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        pytest.skip(f"{name} needs {error.name}, which is not installed")
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS, verbose=False)
    report = io.StringIO()
    for test in finder.find(module, name):
        runner.run(test, out=report.write)
    assert runner.failures == 0, report.getvalue()
    return doctest.TestResults(runner.failures, runner.tries)


@pytest.mark.parametrize("name", ["mps_helpers", *MODULES])
def test_docstring_examples_pass(name: str) -> None:
    run_doctests(name)


def test_the_probes_examples_are_among_those_run() -> None:
    # The parsers' examples are the probes' documentation: they must not stop being run.
    assert run_doctests("mps_helpers._probes").attempted >= 5


def test_a_wrong_example_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from mps_helpers import _probes

    doc = _probes.parse_sysctl_int.__doc__ or ""
    right = '>>> parse_sysctl_int("1\\n")\n    1\n'
    assert right in doc
    wrong = doc.replace(right, right.replace("    1", "    2"))
    monkeypatch.setattr(_probes.parse_sysctl_int, "__doc__", wrong)
    with pytest.raises(AssertionError, match=r"Expected:\s+2\s+Got:\s+1"):
        run_doctests("mps_helpers._probes")
