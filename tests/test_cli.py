"""The ``doctor`` command: report, JSON, exit status, usage errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from machines import MACHINES

from mps_helpers import _cli, _environment


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mps_helpers", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def fake_machine(monkeypatch: pytest.MonkeyPatch) -> object:
    def use(name: str) -> None:
        monkeypatch.setattr(_environment, "detect_environment", lambda **kw: MACHINES[name])

    return use


def test_doctor_real_machine_subprocess() -> None:
    done = run_cli("doctor")
    assert done.returncode in {0, 1}
    assert "torch:" in done.stdout
    assert "Traceback" not in done.stderr


def test_doctor_json_subprocess() -> None:
    done = run_cli("doctor", "--json")
    data = json.loads(done.stdout)
    assert set(data) == {"environment", "findings"}
    assert data["environment"]["system"]
    assert all({"level", "code", "message", "fix"} == set(f) for f in data["findings"])
    has_error = any(f["level"] == "error" for f in data["findings"])
    assert done.returncode == (1 if has_error else 0)


@pytest.mark.parametrize("args", [["doctor", "--bogus"], ["nonsense"], []])
def test_usage_errors_exit_2_without_traceback(args: list[str]) -> None:
    done = run_cli(*args)
    assert done.returncode == 2
    assert "usage:" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unknown_option_before_the_command_is_named_with_the_commands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        _cli.main(["--bogus"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mps-helpers ")
    assert "unrecognized arguments: --bogus" in err
    assert "doctor, run, demo or fit" in err


@pytest.mark.parametrize("command", ["doctor", "demo"])
def test_an_unknown_option_of_a_command_shows_that_commands_usage(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        _cli.main([command, "--bogus"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: mps-helpers {command} ")
    assert err.rstrip().endswith(f"mps-helpers {command}: error: unrecognized arguments: --bogus")


def test_console_script_is_declared() -> None:
    from importlib import metadata

    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts.get("mps-helpers") == "mps_helpers._cli:main"


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_doctor_exit_status_follows_errors(
    name: str, fake_machine: object, capsys: pytest.CaptureFixture[str]
) -> None:
    from mps_helpers import check_environment

    fake_machine(name)  # type: ignore[operator]  # the fixture is a function
    status = _cli.main(["doctor"])
    out = capsys.readouterr().out
    findings = check_environment(MACHINES[name])
    assert status == (1 if any(f.level == "error" for f in findings) else 0)
    for f in findings:
        assert f.code in out
        if f.fix:
            assert f.fix in out
    assert ("Not ready" in out) == (status == 1)


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_doctor_verdict_follows_what_was_found(
    name: str, fake_machine: object, capsys: pytest.CaptureFixture[str]
) -> None:
    env = MACHINES[name]
    fake_machine(name)  # type: ignore[operator]
    status = _cli.main(["doctor"])
    verdict = capsys.readouterr().out.rstrip().splitlines()[-1]
    if status:
        assert verdict == "Not ready: fix the errors above."
        return
    assert verdict.startswith("Ready: ")
    # Only the devices that were found usable are named as where pipelines will run.
    assert ("run on mps" in verdict) == env.mps_available
    assert ("run on CUDA" in verdict) == env.cuda_available
    assert ("run on the CPU" in verdict) == (not env.mps_available and not env.cuda_available)
    assert "or the CPU" not in verdict


def test_doctor_json_for_rosetta(fake_machine: object, capsys: pytest.CaptureFixture[str]) -> None:
    fake_machine("rosetta-m1")  # type: ignore[operator]  # as above
    assert _cli.main(["doctor", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["environment"]["is_rosetta"] is True
    assert data["environment"]["macos_version"] == "14.2"
    assert data["findings"][0]["code"] == "rosetta"
    assert data["findings"][0]["level"] == "error"
