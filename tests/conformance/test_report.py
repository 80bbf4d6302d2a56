"""Tests of the conformance report's table: what counts as lost, allowlisted, clean."""

from __future__ import annotations

from report import table


def test_a_contract_kept_raw_and_broken_prepared_is_lost() -> None:
    outcomes = {
        ("sd", "dict_tuple", "raw"): "passed",
        ("sd", "dict_tuple", "prepared"): "failed",
        ("sd", "cfg", "raw"): "passed",
        ("sd", "cfg", "prepared"): "passed",
    }
    lines, clean = table(outcomes)
    assert not clean
    assert "| sd | 2 | 2 | 1 | 1 (dict_tuple) | - | - |" in lines


def test_allowlisted_differences_keep_the_table_clean_and_say_why() -> None:
    outcomes = {
        ("wan", "callback_batch", "raw"): "passed",
        ("wan", "callback_batch", "prepared"): "xfailed",
    }
    lines, clean = table(outcomes)
    assert clean
    assert "| wan | 1 | 1 | 0 | 0 | callback_batch | - |" in lines
    assert any(line.startswith("- allowlisted callback_batch (wan): the loop") for line in lines)


def test_a_raw_failure_or_a_stale_allowlist_entry_is_not_clean() -> None:
    broken = {("sd", "cfg", "raw"): "failed", ("sd", "cfg", "prepared"): "failed"}
    lines, clean = table(broken)
    assert not clean
    assert "- raw sd breaks cfg: fix the suite" in lines
    stale = {
        ("sd", "callback_batch", "raw"): "passed",
        ("sd", "callback_batch", "prepared"): "xpassed",
    }
    assert not table(stale)[1]
