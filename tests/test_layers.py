"""The package's layers: a lower layer never imports a higher one, and no layer has a circle.

Data flows one way (machine -> snapshot -> plan -> applied pipeline -> each call), and so do
the imports. Every module of the package must be placed in :data:`LAYERS`: a new module
fails this test until it is given a layer.

What counts as an import: every ``import``/``from ... import`` statement of the package's
modules, at module level or inside a function (those run too, only later). Imports under
``if TYPE_CHECKING:`` do not count: they never run and only name types for annotations
(``_markers`` names the ``Plan`` it stores, ``_errors`` the ``Finding`` it carries), so they
may point anywhere. Dynamic imports by string (``importlib.import_module`` in ``__init__``'s
lazy exports) are not seen.
"""

from __future__ import annotations

import ast
import pathlib
from dataclasses import dataclass

import pytest

import mps_helpers

PACKAGE = pathlib.Path(mps_helpers.__file__).parent

#: Layer number of each module, bottom (0) to top. Modules of the same layer may import each
#: other as long as they form no circle. Entries for modules that do not exist yet are fine.
LAYERS: dict[str, int] = {
    # errors / markers: what every layer shares, importing nothing of the package
    "_errors": 0,
    "_markers": 0,
    "_util": 0,
    "_version": 0,
    # scoped filters for third-party log lines that say nothing
    "_quiet": 0,
    # thin I/O probes and their pure parsers
    "_probes": 1,
    # the environment snapshot
    "_environment": 2,
    # readiness checks, the options schema, pipeline facts, and data modules
    "_checks": 3,
    "_options": 3,
    "_facts": 3,
    "_reasons": 3,
    "_evidence": 3,
    "_known_problems": 3,
    # the memory estimate from a pipeline's configs, the device's budget, named machines
    "_memory": 3,
    "_budget": 3,
    "_machines": 3,
    # family facts read from configs and safetensors headers (mps_helpers._facts calls them)
    "_family_facts": 3,
    # device self-tests: small torch ops on a device and their cached reports (the checks
    # turn failures into findings; the plan reads only the reports handed to it)
    "_selftest": 3,
    # the plan: pure decisions, and the rules that follow known problems and self-tests
    "_plan": 4,
    "_problem_rules": 4,
    # the memory measures the estimate needs (the plan's memory rules)
    "_fit": 4,
    # the family rules (transformer and video denoisers), handed what they need by the plan
    "_families": 4,
    # call-time pieces
    "_attention": 5,
    "_batch": 5,
    "_warmup": 5,
    "_nan_guard": 5,
    "_oom_retry": 5,
    "_memory_watch": 5,
    "_release": 5,
    # per-prompt arguments read from the signature; the library's own progress bars
    "_per_prompt": 5,
    "_progress": 5,
    # what surrounds a prepared call on mps: bounded SDPA, the float64 rescue, video decode
    "_call_scope": 5,
    "_bounded": 5,
    "_dtype_rescue": 5,
    "_video": 5,
    # the prepared call
    "_call": 6,
    # applying a plan, loading with one
    "_apply": 7,
    "_load": 7,
    "_load_safety": 7,
    # faces (the package itself re-exports every layer lazily)
    "__init__": 8,
    "_auto": 8,
    "_distributed": 8,
    "_demo": 8,
    "testing": 8,
    # the command line
    "_cli": 9,
    "__main__": 9,
}


@dataclass(frozen=True)
class Import:
    """One import of a package module: who imports what, where, and whether it runs."""

    importer: str
    imported: str
    line: int
    runtime: bool


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _modules() -> dict[str, pathlib.Path]:
    return {path.stem: path for path in sorted(PACKAGE.glob("*.py"))}


def imports_of(name: str, source: str, known: set[str]) -> list[Import]:
    """Return the package modules that ``source`` (the module ``name``) imports.

    ``from mps_helpers import x`` counts as importing the module ``x`` when ``x`` is one
    (``known``), else as importing the package (``__init__``).
    """
    found: list[Import] = []

    def visit(node: ast.AST, runtime: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, runtime)
            return
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from ._x import y
                base = "mps_helpers" + (f".{base}" if base else "")
            if base == "mps_helpers":
                targets = [
                    f"mps_helpers.{alias.name}" if alias.name in known else "mps_helpers"
                    for alias in node.names
                ]
            else:
                targets = [base]
        line = getattr(node, "lineno", 0)
        for target in targets:
            if target == "mps_helpers":
                found.append(Import(name, "__init__", line, runtime))
            elif target.startswith("mps_helpers."):
                found.append(Import(name, target.split(".")[1], line, runtime))
        for child in ast.iter_child_nodes(node):
            visit(child, runtime)

    visit(ast.parse(source), True)
    return [item for item in found if item.imported != name]


def _all_imports() -> list[Import]:
    modules = _modules()
    known = set(modules)
    out: list[Import] = []
    for name, path in modules.items():
        out += imports_of(name, path.read_text(encoding="utf-8"), known)
    return out


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(set(_modules()) - set(LAYERS))
    assert unplaced == [], f"place these modules in tests/test_layers.py's LAYERS: {unplaced}"


def test_no_module_imports_a_higher_layer() -> None:
    upward = [
        f"{i.importer} (layer {LAYERS[i.importer]}) imports {i.imported} "
        f"(layer {LAYERS[i.imported]}) at line {i.line}"
        for i in _all_imports()
        if i.runtime
        and i.importer in LAYERS
        and i.imported in LAYERS
        and LAYERS[i.imported] > LAYERS[i.importer]
    ]
    assert upward == []


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Return one circle through each strongly connected group of more than one module."""
    found: list[list[str]] = []
    done: set[str] = set()
    for start in sorted(edges):
        if start in done:
            continue
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(edges.get(node, ())):
                if nxt == start:
                    found.append([*path, start])
                    done.update(path)
                    stack.clear()
                    break
                if nxt not in path:
                    stack.append((nxt, [*path, nxt]))
    return found


def test_no_import_circle_within_a_layer() -> None:
    # Across layers a circle needs an upward import, which the test above refuses.
    edges: dict[str, set[str]] = {}
    for i in _all_imports():
        if i.runtime and LAYERS.get(i.importer) == LAYERS.get(i.imported) is not None:
            edges.setdefault(i.importer, set()).add(i.imported)
    assert _cycles(edges) == []


def test_the_bottom_layer_imports_nothing_of_the_package() -> None:
    bottom = {name for name, layer in LAYERS.items() if layer == 0}
    imports = [f"{i.importer} -> {i.imported}" for i in _all_imports() if i.runtime]
    assert [line for line in imports if line.split(" -> ")[0] in bottom] == []


# ---------------------------------------------------------------------------------------
# The checker itself


KNOWN = {"_apply", "_plan", "_util", "__init__"}


def test_the_reader_sees_function_level_and_relative_imports() -> None:
    source = """
from typing import TYPE_CHECKING
from mps_helpers import _util, plan_of
import mps_helpers._plan
if TYPE_CHECKING:
    from mps_helpers._apply import apply_plan
else:
    from . import _util
def f():
    from mps_helpers._apply import apply_plan
"""
    found = {(i.imported, i.runtime) for i in imports_of("_x", source, KNOWN)}
    assert found == {
        ("_util", True),
        ("__init__", True),  # plan_of is a name of the package, not a module
        ("_plan", True),
        ("_apply", False),  # under TYPE_CHECKING
        ("_apply", True),  # inside f
    }


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}}, []),
        ({"a": {"b"}, "b": {"a"}}, [["a", "b", "a"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c", "a"]]),
    ],
)
def test_the_circle_finder(edges: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert _cycles(edges) == expected


def test_every_module_says_what_it_holds_and_exports() -> None:
    # A docstring (what the module holds) and an __all__ (what it exports), for every module.
    missing = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {
            target.id
            for node in tree.body
            if isinstance(node, (ast.Assign, ast.AnnAssign))
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(target, ast.Name)
        }
        if ast.get_docstring(tree) is None:
            missing.append(f"{name}: docstring")
        if "__all__" not in names:
            missing.append(f"{name}: __all__")
    assert missing == []


def test_every_all_name_exists() -> None:
    import importlib

    for name in sorted(set(_modules()) - {"__main__"}):
        module = importlib.import_module(
            "mps_helpers" if name == "__init__" else f"mps_helpers.{name}"
        )
        absent = [item for item in module.__all__ if not hasattr(module, item)]
        assert absent == [], f"{name}.__all__ names what it lacks: {absent}"


def test_only_markers_spells_the_marker_attributes() -> None:
    # Every other module reads and writes the prepared-pipeline marks through _markers.
    spelled = []
    for name, path in _modules().items():
        if name == "_markers":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value.startswith("_mps_helpers_")
            ):
                spelled.append(f"{name}:{node.lineno} {node.value!r}")
    assert spelled == []
