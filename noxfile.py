"""Developer sessions: ``nox`` runs tests, lint and docs; ``nox -s bench`` the benchmarks.

Extras come from pyproject.toml; on Linux torch is pinned to the CPU build listed in
requirements/torch-cpu.txt (an unpinned torch resolves to a multi-GB CUDA build).
"""

from __future__ import annotations

import sys

import nox

nox.options.sessions = ["tests", "lint", "docs"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def _install(session: nox.Session, extras: str) -> None:
    if sys.platform.startswith("linux"):
        session.install("-r", "requirements/torch-cpu.txt")
    session.install("-e", f".[{extras}]")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite (pytest exits 5 when it collects nothing: that fails too)."""
    _install(session, "test")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (lint and format) over everything, mypy --strict over the package."""
    _install(session, "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation with warnings as errors, then run its doctests."""
    _install(session, "docs")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")
    session.run(
        "sphinx-build", "-W", "--keep-going", "-b", "doctest", "docs", "docs/_build/doctest"
    )


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Run the benchmarks on this machine (mps on a Mac, else CUDA or CPU) and plot them."""
    _install(session, "bench")
    session.run("python", "tests/benchmarks/run_all.py", *session.posargs)
