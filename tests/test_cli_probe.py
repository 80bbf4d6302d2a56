"""``doctor --probe``: the self-tests in the report, as findings, in JSON, and in the cache."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from _emulations import emulate
from _threads import one_thread_env

from mps_helpers import _cli, detect_environment
from mps_helpers._selftest import CACHE_ENV, PROBES, cached_reports

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    return tmp_path


def test_doctor_probe_prints_the_self_tests(
    cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli.main(["doctor", "--probe", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Self-tests on cpu" in out
    assert "10 passed, 0 wrong, 0 raised" in out
    for name in PROBES:
        assert f"[ pass] {name}: error" in out
    (report,) = cached_reports(detect_environment())
    assert report.device == "cpu"
    assert report.passed


def test_doctor_probe_json_is_a_bug_report(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with emulate("softmax-half"):
        status = _cli.main(["doctor", "--probe", "cpu", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"environment", "findings", "probes"}
    assert [r["name"] for r in data["probes"]["results"]] == list(PROBES)
    softmax = next(r for r in data["probes"]["results"] if r["name"] == "softmax_half")
    assert softmax["status"] == "wrong"
    assert softmax["error"] == "inf"
    finding = next(f for f in data["findings"] if f["code"] == "probe-softmax_half")
    assert finding["level"] == "warning"  # the plan works around it: float32
    assert "float32 instead of float16" in finding["message"]
    assert "doctor --probe --json" in finding["fix"]
    assert status == 0


def test_a_probe_without_workaround_is_an_error(
    cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with emulate("conv3d-ncdhw-macos26"):
        assert _cli.main(["doctor", "--probe", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "[ERROR] probe-conv3d: Self-test conv3d on cpu in float32 gave wrong numbers" in out
    assert "Known problems it detects: conv3d-ncdhw-macos26, conv3d-channels-last" in out
    assert "No automatic workaround." in out
    assert "[WRONG] conv3d" in out
    assert "Not ready" in out


def test_doctor_probe_on_a_missing_device(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if detect_environment().mps_available:
        pytest.skip("mps is usable here")
    assert _cli.main(["doctor", "--probe", "mps"]) == 1
    captured = capsys.readouterr()
    assert "mps-helpers doctor: device='mps' cannot be probed" in captured.err
    assert cached_reports(detect_environment()) == ()


def test_doctor_probe_subprocess(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mps_helpers", "doctor", "--probe", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**one_thread_env(), CACHE_ENV: str(tmp_path)},
    )
    assert "Traceback" not in done.stderr
    data = json.loads(done.stdout)
    assert data["probes"]["device"] in {"mps", "cuda", "cpu"}
    assert list((tmp_path / "probes").glob("*.json"))


def test_doctor_probe_rejects_an_unknown_device() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mps_helpers", "doctor", "--probe", "gpu"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=one_thread_env(),
    )
    assert done.returncode == 2
    assert "invalid choice: 'gpu'" in done.stderr
    assert "Traceback" not in done.stderr
