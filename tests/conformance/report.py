"""Run the conformance suite and print its per-family table.

    python tests/conformance/report.py            # every family
    python tests/conformance/report.py -k flux    # extra arguments go to pytest

For each family: how many contracts apply, how many the raw pipeline keeps, how many the
prepared pipeline keeps, how many it loses (kept raw, broken prepared, not allowlisted), the
allowlisted differences and the exempt contracts, with their reasons, and the run time. Exits
1 when a contract is lost or a raw pipeline breaks one (a problem of the suite itself).
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent


class _Collector:
    """Records each conformance test's outcome by (family, contract, variant)."""

    def __init__(self) -> None:
        self.outcomes: dict[tuple[str, str, str], str] = {}

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
            return
        params = getattr(report, "_conformance", None)
        if params is None:
            return
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.outcome == "skipped" else "xpassed"
        self.outcomes[params] = outcome

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: Any, call: Any) -> Any:
        outcome = yield
        report = outcome.get_result()
        spec = getattr(item, "callspec", None)
        if spec is not None and "family" in spec.params:
            params = spec.params
            report._conformance = (
                params["family"].name,
                params["contract"].name,
                params["variant"],
            )


def table(outcomes: dict[tuple[str, str, str], str]) -> tuple[list[str], bool]:
    """Return the table's lines and whether every contract kept raw is kept prepared."""
    sys.path.insert(0, str(HERE))
    from _allowlist import ALLOWLIST
    from _families import FAMILIES

    rows: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for (family, contract, variant), outcome in outcomes.items():
        rows[family][f"{variant}:{outcome}"].append(contract)
    lines = [
        "| family | contracts | raw passed | prepared passed | lost | allowlisted | exempt |",
        "|---|---|---|---|---|---|---|",
    ]
    clean = True
    notes: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    broken: list[str] = []
    for family in FAMILIES:
        if family.name not in rows:
            continue
        row = rows[family.name]
        raw = {c for key, cs in row.items() if key.startswith("raw:") for c in cs}
        raw_passed = set(row["raw:passed"])
        prepared_passed = set(row["prepared:passed"])
        allowed = set(row["prepared:xfailed"])
        lost = sorted(raw_passed - prepared_passed - allowed)
        if lost or raw != raw_passed or row["prepared:xpassed"]:
            clean = False
        lines.append(
            f"| {family.name} | {len(raw)} | {len(raw_passed)} | {len(prepared_passed)} "
            f"| {len(lost)}{' (' + ', '.join(lost) + ')' if lost else ''} "
            f"| {', '.join(sorted(allowed)) or '-'} | {', '.join(sorted(family.exempt)) or '-'} |"
        )
        for contract in sorted(allowed):
            reason = ALLOWLIST[(family.name, contract)]
            notes["allowlisted", contract, reason].append(family.name)
        for contract, reason in sorted(family.exempt.items()):
            notes["exempt", contract, reason].append(family.name)
        broken_raw = sorted(raw - raw_passed)
        if broken_raw:
            broken.append(f"- raw {family.name} breaks {', '.join(broken_raw)}: fix the suite")
    explained = [
        f"- {kind} {contract} ({', '.join(families)}): {reason}"
        for (kind, contract, reason), families in notes.items()
    ]
    return [*lines, "", *explained, *broken], clean


def main(argv: list[str]) -> int:
    import mps_helpers

    collector = _Collector()
    start = time.perf_counter()
    status = pytest.main(
        [str(HERE / "test_conformance.py"), "-q", "-p", "no:cacheprovider", *argv],
        plugins=[collector],
    )
    elapsed = time.perf_counter() - start
    lines, clean = table(collector.outcomes)
    print()
    print("\n".join(lines))
    print()
    print(f"mps_helpers from {Path(mps_helpers.__file__).parent}; ran in {elapsed:.0f} s")
    return 0 if clean and status in (0, 5) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
