"""Readiness findings over every fake machine, and the rules one by one."""

from __future__ import annotations

import pytest
from machines import MACHINES
from packaging.version import Version

from mps_helpers import Finding, check_environment
from mps_helpers._checks import LEVELS, macos_required_by_torch

GiB = 2**30

# The findings each named machine must produce (codes; other codes may appear only as ok/info).
EXPECTED: dict[str, dict[str, str]] = {
    "m1-8gb-macos12.6-torch1.13": {
        "torch-old": "warning",
        "macos-old": "warning",
        "low-memory": "info",
        "mps-ready": "ok",
    },
    "m2-16gb-macos13-torch2.0": {"low-memory": "info", "mps-ready": "ok"},
    "m2-24gb-macos14-torch2.8": {"low-memory": "info", "mps-ready": "ok"},
    "m3max-64gb-macos14": {"mps-ready": "ok"},
    "m4-128gb-macos15-torch-latest": {"mps-ready": "ok"},
    "intel-mac": {"not-apple-silicon": "info"},
    "rosetta-m1": {"rosetta": "error", "low-memory": "info"},
    "linux-cuda": {"not-apple-silicon": "info"},
    "linux-cpu": {"not-apple-silicon": "info"},
    "linux-cpu-bf16": {"not-apple-silicon": "info"},
    "windows": {"not-apple-silicon": "info"},
}


def test_every_machine_has_expectations() -> None:
    assert set(EXPECTED) == set(MACHINES)


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_findings_per_machine(name: str) -> None:
    findings = check_environment(MACHINES[name])
    by_code = {f.code: f.level for f in findings}
    for code, level in EXPECTED[name].items():
        assert by_code.get(code) == level, f"{name}: {code} should be {level}, got {by_code}"
    serious = {c for c, lv in by_code.items() if lv in {"warning", "error"}}
    expected_serious = {c for c, lv in EXPECTED[name].items() if lv in {"warning", "error"}}
    assert serious == expected_serious


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_findings_are_well_formed_and_sorted(name: str) -> None:
    findings = check_environment(MACHINES[name])
    assert findings, "every machine gets at least one finding"
    ranks = [LEVELS.index(f.level) for f in findings]
    assert ranks == sorted(ranks, reverse=True), "most serious first"
    for f in findings:
        assert isinstance(f, Finding)
        assert f.message.endswith(".")
        if f.level in {"warning", "error"}:
            assert f.fix, f"{f.code} needs a fix"


def test_healthy_big_mac_has_only_ok_and_info() -> None:
    findings = check_environment(MACHINES["m4-128gb-macos15-torch-latest"])
    assert {f.level for f in findings} <= {"ok", "info"}


def test_rosetta_fix_says_how_to_get_arm64_python() -> None:
    (rosetta,) = [f for f in check_environment(MACHINES["rosetta-m1"]) if f.code == "rosetta"]
    assert rosetta.fix is not None
    assert "arm64" in rosetta.fix
    assert "mps-ready" not in {f.code for f in check_environment(MACHINES["rosetta-m1"])}


@pytest.mark.parametrize(
    ("torch_version", "needed"),
    [
        ("1.13.1", "12.3"),
        ("2.0.1", "12.3"),
        ("2.4.1", "12.3"),
        ("2.5.0", "13.0"),
        ("2.8.0", "13.0"),
        ("2.9.0", "14.0"),
        ("2.11.0", "14.0"),
        ("2.13.0", "14.0"),
        ("2.9.0.dev20250701", "14.0"),
    ],
)
def test_macos_required_by_torch(torch_version: str, needed: str) -> None:
    assert macos_required_by_torch(Version(torch_version)) == Version(needed)


@pytest.mark.parametrize(
    ("macos", "torch_version", "code", "mentions"),
    [
        ("12.5", "2.0.1", "macos-too-old", "12.6"),  # the guide's minimum
        ("12.6", "2.5.1", "macos-too-old", "13.0"),  # torch 2.5 needs 13.0
        ("13.6", "2.9.0", "macos-too-old", "14.0"),  # torch 2.9 needs 14.0
        ("12.6", "2.0.1", "macos-old", "13.0"),  # supported but below the recommendation
    ],
)
def test_macos_rules(macos: str, torch_version: str, code: str, mentions: str) -> None:
    env = MACHINES["m2-16gb-macos13-torch2.0"].replace(
        macos_version=Version(macos), torch_version=Version(torch_version)
    )
    found = {f.code: f for f in check_environment(env)}
    assert code in found
    assert mentions in found[code].message
    assert found[code].level == ("error" if code == "macos-too-old" else "warning")


def test_torch_too_old_and_missing() -> None:
    base = MACHINES["m2-16gb-macos13-torch2.0"]
    old = {
        f.code: f.level for f in check_environment(base.replace(torch_version=Version("1.12.1")))
    }
    assert old["torch-too-old"] == "error"
    missing = {f.code: f.level for f in check_environment(base.replace(torch_version=None))}
    assert missing["torch-missing"] == "error"
    assert "mps-ready" not in missing


def test_torch_old_mentions_warmup() -> None:
    (f,) = [
        f
        for f in check_environment(MACHINES["m1-8gb-macos12.6-torch1.13"])
        if f.code == "torch-old"
    ]
    assert "warmup" in f.message


def test_mps_not_built_and_unavailable_have_distinct_fixes() -> None:
    base = MACHINES["m3max-64gb-macos14"]
    not_built = {f.code: f for f in check_environment(base.replace(mps_built=False))}
    unavailable = {f.code: f for f in check_environment(base.replace(mps_available=False))}
    assert not_built["mps-not-built"].level == "error"
    assert unavailable["mps-unavailable"].level == "error"
    assert "mps-unavailable" not in not_built
    assert not_built["mps-not-built"].fix != unavailable["mps-unavailable"].fix


def test_low_memory_threshold_is_64_gb() -> None:
    base = MACHINES["m3max-64gb-macos14"]
    just_under = {f.code for f in check_environment(base.replace(total_memory=64 * GiB - 1))}
    at = {f.code for f in check_environment(base.replace(total_memory=64 * GiB))}
    assert "low-memory" in just_under
    assert "low-memory" not in at


def test_swap_in_use_warns() -> None:
    env = MACHINES["m3max-64gb-macos14"].replace(swap_used=3 * GiB)
    (f,) = [f for f in check_environment(env) if f.code == "swap-in-use"]
    assert f.level == "warning"
    assert "3.0 GiB" in f.message
    assert f.fix


def test_fallback_variable_hint_only_when_unset() -> None:
    base = MACHINES["m4-128gb-macos15-torch-latest"]
    assert "mps-fallback-off" in {f.code for f in check_environment(base)}
    set_ = base.replace(mps_fallback_env="1")
    assert "mps-fallback-off" not in {f.code for f in check_environment(set_)}


def test_not_apple_silicon_names_the_fallback_device() -> None:
    (cuda,) = check_environment(MACHINES["linux-cuda"])
    assert "CUDA" in cuda.message
    (cpu,) = check_environment(MACHINES["linux-cpu"])
    assert "CPU" in cpu.message


def test_detects_when_env_is_none() -> None:
    findings = check_environment()
    assert all(isinstance(f, Finding) for f in findings)
