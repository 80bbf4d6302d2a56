"""Sphinx configuration of the mps_helpers documentation (``nox -s docs``).

The build is offline (no intersphinx) and runs with warnings as errors. Autodoc imports the
package, so torch and diffusers must be installed where the docs are built.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
# Build from the working tree even when the package is not installed.
sys.path.insert(0, str(ROOT))

from mps_helpers import __version__  # noqa: E402  (needs the path above)

if TYPE_CHECKING:
    from docutils import nodes

project = "mps_helpers"
author = "mps_helpers developers"
copyright = "mps_helpers developers"
release = __version__
version = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"

# MyST: ```{directive} fences, ::: fences, and anchors for headings to link to.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# Autodoc: signatures without the types, the types in the descriptions; members in source order.
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Doctests run in a fresh namespace per document; this set-up is shared by all of them.
doctest_global_setup = """
import mps_helpers
"""

html_theme = "furo"
html_title = f"mps_helpers {release}"


# ---------------------------------------------------------------------------------------
# ``{cli-help} COMMAND``: the command line's own --help text, so the reference cannot drift.


def _cli_help_directive() -> type:
    from docutils import nodes
    from sphinx.util.docutils import SphinxDirective

    class CliHelp(SphinxDirective):
        """Insert ``mps-helpers [COMMAND] --help`` as a literal block."""

        optional_arguments = 1

        def run(self) -> list[nodes.Node]:
            import os

            from mps_helpers._cli import _build

            # argparse wraps to the terminal width: make the page the same everywhere.
            os.environ["COLUMNS"] = "90"
            parser, commands = _build()
            target = commands[self.arguments[0]] if self.arguments else parser
            text = target.format_help()
            block = nodes.literal_block(text, text)
            block["language"] = "text"
            return [block]

    return CliHelp


# ---------------------------------------------------------------------------------------
# Tables generated from the package's own data, so that the pages cannot drift from it:
# ``{plan-options}`` (the options schema), ``{plan-rules}`` and ``{plan-evidence}`` (the
# rules and the evidence behind the plan's reasons).


def _cell(text: object) -> str:
    # Markdown table cells: no pipes, no "2**28 ... 2**31" read as emphasis, and a rule's
    # "<field>" is text, not an HTML tag.
    out = str(text)
    for char in "|*<":
        out = out.replace(char, "\\" + char)
    return out


def options_table() -> str:
    """Return the plan options as a Markdown table (the ``{plan-options}`` directive)."""
    from mps_helpers._options import OPTIONS

    lines = [
        "| option | default | valid values | command line | what it controls |",
        "|---|---|---|---|---|",
    ]
    for option in OPTIONS:
        flag = f"`{option.flag} {' / '.join(option.cli_choices or ['VALUE'])}`"
        lines.append(
            f"| `{option.name}` | `{option.default!r}` | {_cell(option.valid)} | "
            f"{flag if option.flag else ''} | {_cell(option.help)} |"
        )
    return "\n".join(lines)


def rules_table() -> str:
    """Return every rule of the plan as a Markdown table (the ``{plan-rules}`` directive)."""
    from mps_helpers._plan import DECISIONS
    from mps_helpers._reasons import RULES, cited_evidence, template_text

    lines = [
        "| decision | rule id | reason (`<field>`: what the rule saw) | evidence |",
        "|---|---|---|---|",
    ]
    order = {name: index for index, name in enumerate(("", *DECISIONS))}
    for rule_id, rule in sorted(RULES.items(), key=lambda item: order[item[1].decision]):
        text = template_text(rule_id)
        if rule.warning is not None:
            text += f" Warns: {template_text(rule_id, warning=True)}"
        cited = ", ".join(f"`{e}`" for e in cited_evidence(rule_id))
        lines.append(f"| {rule.decision or 'any'} | `{rule_id}` | {_cell(text)} | {cited} |")
    return "\n".join(lines)


def evidence_table() -> str:
    """Return the evidence registry as a Markdown table (the ``{plan-evidence}`` directive)."""
    from mps_helpers._reasons import EVIDENCE

    lines = ["| id | claim | figures | source |", "|---|---|---|---|"]
    for key, item in EVIDENCE.items():
        lines.append(
            f"| `{key}` | {_cell(item.claim)} | {_cell(item.figure)} | {_cell(item.source)} |"
        )
    return "\n".join(lines)


def _table_directive(render: Any) -> type:
    from sphinx.util.docutils import SphinxDirective

    class Table(SphinxDirective):
        """Insert a Markdown table generated from the package."""

        def run(self) -> list[nodes.Node]:
            return self.parse_text_to_nodes(render())

    return Table


# ---------------------------------------------------------------------------------------
# Top-level pages other than the tutorial (a benchmarks page, ...) join the "Start here"
# toctree when they exist: a glob that matches nothing would be a warning, and a page in no
# toctree is one too.


def _add_top_level_pages(app: Any, docname: str, source: list[str]) -> None:
    if docname != root_doc:
        return
    pages = sorted(
        path.stem
        for path in Path(app.srcdir).glob("*.md")
        if path.stem not in {root_doc, "tutorial"}
    )
    anchor = ":caption: Start here\n\ntutorial\n"
    source[0] = source[0].replace(anchor, anchor + "".join(f"{page}\n" for page in pages))


# ---------------------------------------------------------------------------------------
# Every public name is in the API reference: a name exported but not documented is a warning
# (an error under -W).


def _check_api_reference(app: Any) -> None:
    from sphinx.util import logging

    import mps_helpers

    page = Path(app.srcdir) / "reference" / "api.md"
    text = page.read_text(encoding="utf-8")
    for name in mps_helpers.__all__:
        if name != "__version__" and f":: {name}\n" not in text:
            logging.getLogger(__name__).warning(
                "mps_helpers.%s is public but not in the API reference",
                name,
                location="reference/api",
            )


def setup(app: Any) -> None:
    """Register the project's directive and hooks."""
    app.add_directive("cli-help", _cli_help_directive())
    app.add_directive("plan-options", _table_directive(options_table))
    app.add_directive("plan-rules", _table_directive(rules_table))
    app.add_directive("plan-evidence", _table_directive(evidence_table))
    app.connect("source-read", _add_top_level_pages)
    app.connect("builder-inited", _check_api_reference)
