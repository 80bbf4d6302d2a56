"""Known mps problems: the data, where each applies, and what doctor reports on each machine."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from machines import MACHINES
from packaging.version import Version

from mps_helpers import KnownProblem, _cli, _environment, check_environment, known_problems
from mps_helpers._checks import problem_findings
from mps_helpers._known_problems import (
    KNOWN_PROBLEMS,
    PROBE_RESPONSES,
    VersionRange,
    get_problem,
)
from mps_helpers._selftest import PROBE_INFO, PROBES

#: The known problems that apply to each fake machine, by id.
EXPECTED: dict[str, set[str]] = {
    "m1-8gb-macos12.6-torch1.13": {"baddbmm-beta0-nan", "non-blocking-copy"},
    "m2-16gb-macos13-torch2.0": {"baddbmm-beta0-nan", "sdpa-large-scores", "non-blocking-copy"},
    "m2-24gb-macos14-torch2.8": {
        "baddbmm-beta0-nan",
        "sdpa-large-scores",
        "bmm-large-output",
        "sdpa-noncontiguous-query",
        "sdpa-permuted-batch",
        "non-blocking-copy",
    },
    "m3max-64gb-macos14": {
        "baddbmm-beta0-nan",
        "sdpa-large-scores",
        "bmm-large-output",
        "conv3d-channels-last",
        "non-blocking-copy",
    },
    "m4-128gb-macos15-torch-latest": {
        "baddbmm-beta0-nan",
        "sdpa-large-scores",
        "bmm-large-output",
        "conv2d-noncontiguous-weight",
        "non-blocking-copy",
    },
    # mps cannot be used on these: no mps problem applies.
    "intel-mac": set(),
    "rosetta-m1": set(),
    "linux-cuda": set(),
    "linux-cpu": set(),
    "linux-cpu-bf16": set(),
    "windows": set(),
}

M4 = MACHINES["m4-128gb-macos15-torch-latest"]


def test_every_machine_has_expectations() -> None:
    assert set(EXPECTED) == set(MACHINES)


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_problems_per_machine(name: str) -> None:
    assert {p.id for p in known_problems(MACHINES[name])} == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_check_environment_reports_them_with_fixes(name: str) -> None:
    findings = {f.code: f for f in check_environment(MACHINES[name])}
    reported = {code.removeprefix("known-") for code in findings if code.startswith("known-")}
    assert reported == EXPECTED[name]
    for problem_id in reported:
        finding = findings[f"known-{problem_id}"]
        problem = get_problem(problem_id)
        assert finding.level == problem.level
        assert finding.fix == problem.fix
        assert problem.title in finding.message
        assert all(source in finding.message for source in problem.sources)


@pytest.fixture
def fake_machine(monkeypatch: pytest.MonkeyPatch) -> Any:
    def use(env: Any) -> None:
        monkeypatch.setattr(_environment, "detect_environment", lambda **kw: env)

    return use


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_doctor_lists_the_problems_of_each_machine(
    name: str, fake_machine: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_machine(MACHINES[name])
    _cli.main(["doctor"])
    out = capsys.readouterr().out
    listed = set(re.findall(r"\] known-([a-z0-9-]+):", out))
    assert listed == EXPECTED[name]
    for problem_id in listed:
        assert f"fix: {get_problem(problem_id).fix}" in out
    _cli.main(["doctor", "--json"])
    data = json.loads(capsys.readouterr().out)
    codes = {f["code"].removeprefix("known-") for f in data["findings"]}
    assert EXPECTED[name] <= codes


# Machines derived from the fake ones, each inside one more range.
DERIVED: dict[str, tuple[Any, str]] = {
    "torch 2.8.0": (M4.replace(torch_version=Version("2.8.0")), "sdpa-noncontiguous-query"),
    "torch 2.10": (M4.replace(torch_version=Version("2.10.1")), "sdpa-permuted-batch"),
    "macOS 26.2": (M4.replace(macos_version=Version("26.2")), "conv3d-ncdhw-macos26"),
    "M3 Ultra": (M4.replace(chip="Apple M3 Ultra"), "black-images-m3ultra-m5"),
    "M5 Pro": (M4.replace(chip="Apple M5 Pro"), "black-images-m3ultra-m5"),
}


@pytest.mark.parametrize("case", list(DERIVED))
def test_derived_machines_get_their_problem(case: str) -> None:
    env, problem_id = DERIVED[case]
    assert problem_id in {p.id for p in known_problems(env)}
    assert problem_id not in EXPECTED["m4-128gb-macos15-torch-latest"]


@pytest.mark.parametrize(
    ("env", "absent"),
    [
        (M4.replace(torch_version=Version("2.14.0")), "baddbmm-beta0-nan"),
        (M4.replace(torch_version=Version("2.12.0")), "sdpa-permuted-batch"),
        (M4.replace(torch_version=Version("2.9.0")), "sdpa-noncontiguous-query"),
        (M4.replace(macos_version=Version("26.3")), "conv3d-ncdhw-macos26"),
        (M4.replace(macos_version=Version("14.6")), "conv2d-noncontiguous-weight"),
        (M4.replace(chip="Apple M15"), "black-images-m3ultra-m5"),
        (M4.replace(chip=None), "black-images-m3ultra-m5"),
        (M4.replace(macos_version=None), "conv2d-noncontiguous-weight"),
        (M4.replace(torch_version=None), "non-blocking-copy"),
    ],
)
def test_outside_a_range_a_problem_does_not_apply(env: Any, absent: str) -> None:
    assert absent not in {p.id for p in known_problems(env)}


@pytest.mark.parametrize(
    ("version", "inside"),
    [
        ("2.8.0", True),
        ("2.11.0+cpu", True),
        ("2.12.0", False),
        ("2.12.0.dev20260401", False),  # a nightly counts as its release
        ("2.7.1", False),
    ],
)
def test_version_range_compares_releases(version: str, inside: bool) -> None:
    window = VersionRange(first=Version("2.8"), fixed=Version("2.12"))
    assert (Version(version) in window) is inside
    assert "2.8" not in window  # a string is never inside


def test_version_range_text() -> None:
    assert str(VersionRange(first=Version("2.8"), fixed=Version("2.12"))) == (
        "2.8 up to 2.12 (fixed in 2.12)"
    )
    assert str(VersionRange(fixed=Version("2.14"), confirmed=False)) == "before 2.14, unconfirmed"
    assert str(VersionRange(first=Version("2.4"))) == "2.4 and later (no fix released)"
    assert str(VersionRange()) == "every release so far"


def test_the_data_is_well_formed() -> None:
    ids = [p.id for p in KNOWN_PROBLEMS]
    assert len(ids) == len(set(ids))
    for problem in KNOWN_PROBLEMS:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", problem.id), problem.id
        assert problem.sources, problem.id
        for source in problem.sources:
            assert re.fullmatch(r"(pytorch|diffusers|ComfyUI)( PR)? #\d+", source), source
        for text in (problem.symptom, problem.library, problem.fix):
            assert text.endswith("."), (problem.id, text)
        for rng in (problem.torch, problem.macos):
            if rng is not None and not rng.confirmed:
                assert rng.note, f"{problem.id}: an unconfirmed range says why"
        assert set(problem.probes) <= set(PROBES), problem.id
        assert isinstance(problem, KnownProblem)
    for info in PROBE_INFO.values():
        for problem_id in info.problems:
            assert info.name in get_problem(problem_id).probes, (info.name, problem_id)
    assert set(PROBE_RESPONSES) == set(PROBES)


def test_ranges_marked_unconfirmed_where_the_sources_leave_them_open() -> None:
    # The numbers checked against their threads (docs/explanation/known-problems.md).
    confirmed = {p.id for p in KNOWN_PROBLEMS if p.confirmed}
    assert confirmed == {"bmm-large-output"}
    baddbmm = get_problem("baddbmm-beta0-nan")
    assert baddbmm.torch is not None
    assert baddbmm.torch.fixed == Version("2.14")
    assert "2.13.0 still has the bug" in baddbmm.torch.note


def test_get_problem_names_the_valid_ids() -> None:
    with pytest.raises(KeyError, match="known: baddbmm-beta0-nan"):
        get_problem("nope")


def test_to_dict_is_json_ready() -> None:
    data = json.loads(json.dumps([p.to_dict() for p in KNOWN_PROBLEMS]))
    first = data[0]
    assert first["id"] == "baddbmm-beta0-nan"
    assert first["torch"] == {
        "first": None,
        "fixed": "2.14",
        "confirmed": False,
        "note": get_problem("baddbmm-beta0-nan").torch.note,  # type: ignore[union-attr]
    }
    assert first["macos"] is None


def test_findings_for_a_warning_level_problem() -> None:
    env = M4.replace(macos_version=Version("26.2"))
    findings = {f.code: f for f in problem_findings(env)}
    conv3d = findings["known-conv3d-ncdhw-macos26"]
    assert conv3d.level == "warning"
    assert "Update macOS to 26.3" in (conv3d.fix or "")
    assert "macOS 26.2 up to 26.3" in conv3d.message
