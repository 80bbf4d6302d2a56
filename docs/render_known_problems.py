"""Render the generated parts of ``docs/explanation/known-problems.md`` from the library's data.

The page's tables (the probes, the plan's responses, the known problems) come from
``mps_helpers._selftest.PROBE_INFO``, ``mps_helpers._known_problems.PROBE_RESPONSES`` and
``mps_helpers._known_problems.KNOWN_PROBLEMS``; each sits between ``<!-- generated: NAME -->``
and ``<!-- end generated: NAME -->``. ``tests/test_docs_known_problems.py`` fails when the page
and the data disagree.

    python docs/render_known_problems.py          # rewrite the page
    python docs/render_known_problems.py --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "explanation" / "known-problems.md"
sys.path.insert(0, str(ROOT))

from mps_helpers._known_problems import (  # noqa: E402  (needs the path above)
    KNOWN_PROBLEMS,
    PROBE_RESPONSES,
    KnownProblem,
    VersionRange,
)
from mps_helpers._selftest import PROBE_INFO  # noqa: E402


def _md(text: str) -> str:
    """Return ``text`` safe in Markdown: ``2**32`` must not start bold."""
    return text.replace("*", "\\*")


def _cell(text: str) -> str:
    return _md(text).replace("|", "\\|").replace("\n", " ")


def render_probes() -> str:
    """Return the table of probes: what each checks, its dtype, what it looks for."""
    lines = [
        "| probe | checks | dtype | known problems | scaled down |",
        "|---|---|---|---|---|",
    ]
    for info in PROBE_INFO.values():
        dtype = "the plan's" if info.dtype == "compute" else info.dtype
        problems = ", ".join(f"[{p}](#{p})" for p in info.problems) or "-"
        lines.append(
            f"| `{info.name}` | {_cell(info.checks)} | {dtype} | {problems} | "
            f"{_cell(info.scaled) or '-'} |"
        )
    return "\n".join(lines)


def render_responses() -> str:
    """Return the table of the plan's responses to each failed probe."""
    lines = ["| failed probe | the plan | doctor |", "|---|---|---|"]
    for name, response in PROBE_RESPONSES.items():
        lines.append(
            f"| `{name}` | {_cell(response) if response else 'no automatic workaround'} | "
            f"{'WARN' if response else 'ERROR'} |"
        )
    return "\n".join(lines)


def _range(label: str, rng: VersionRange | None) -> str:
    if rng is None:
        return f"any {label}"
    return f"{label} {rng}"


def render_summary() -> str:
    """Return the summary table of the known problems."""
    lines = [
        "| problem | torch | macOS / chips | confirmed | probes | doctor |",
        "|---|---|---|---|---|---|",
    ]
    for p in KNOWN_PROBLEMS:
        where = _range("macOS", p.macos) if p.macos is not None else "any macOS"
        if p.chips:
            where += "; " + ", ".join(p.chips)
        probes = ", ".join(f"`{name}`" for name in p.probes) or "-"
        lines.append(
            f"| [{p.id}](#{p.id}) | {_cell(str(p.torch) if p.torch else 'any')} | "
            f"{_cell(where)} | {'yes' if p.confirmed else 'no'} | {probes} | {p.level} |"
        )
    return "\n".join(lines)


def _details(p: KnownProblem) -> str:
    parts = [
        f"### {p.id}",
        "",
        f"**{_md(p.title)}.** {_md(p.symptom)}",
        "",
        f"- Where: {_md(p.where())}.",
    ]
    for label, rng in (("torch", p.torch), ("macOS", p.macos)):
        if rng is not None and rng.note:
            parts.append(f"- The {label} range: {_md(rng.note)}")
    parts += [
        f"- Sources: {', '.join(p.sources)}.",
        f"- What mps_helpers does: {_md(p.library)}",
        f"- What you can do: {_md(p.fix)}",
    ]
    if p.probes:
        parts.append(f"- Detected by: {', '.join(f'`{name}`' for name in p.probes)}.")
    return "\n".join(parts)


def render_details() -> str:
    """Return one section per known problem."""
    return "\n\n".join(_details(p) for p in KNOWN_PROBLEMS)


SECTIONS = {
    "probes": render_probes,
    "responses": render_responses,
    "summary": render_summary,
    "details": render_details,
}


def render(page: str) -> str:
    """Return ``page`` with every generated section rendered from the data."""
    for name, make in SECTIONS.items():
        pattern = re.compile(
            rf"(<!-- generated: {name} -->\n)(?:.*?\n)?(<!-- end generated: {name} -->)", re.S
        )
        if not pattern.search(page):
            raise ValueError(f"the page has no generated section {name!r}")
        page = pattern.sub(lambda m, make=make: m.group(1) + make() + "\n" + m.group(2), page)
    return page


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    args = parser.parse_args()
    current = PAGE.read_text(encoding="utf-8")
    fresh = render(current)
    if args.check:
        if fresh != current:
            print(f"{PAGE} is out of date: run python docs/render_known_problems.py")
            return 1
        return 0
    PAGE.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
