"""The environment snapshot: detection, caching, failing soft, serialisation."""

from __future__ import annotations

import dataclasses
import json

import pytest
from machines import MACHINES
from packaging.version import Version

from mps_helpers import Environment, _environment, _probes, detect_environment


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    _environment._detect.cache_clear()
    yield
    _environment._detect.cache_clear()


def test_detects_this_machine() -> None:
    env = detect_environment()
    assert env.system in {"Linux", "Darwin", "Windows"}
    assert env.python_machine
    assert env.torch_version is not None  # the test environment has torch
    assert env.diffusers_version is not None
    assert env.total_memory is not None
    assert env.total_memory > 0
    assert env.available_memory is not None
    assert env.swap_used is not None


def test_detection_is_cached_and_refreshable(monkeypatch: pytest.MonkeyPatch) -> None:
    first = detect_environment()
    assert detect_environment() is first
    monkeypatch.setattr(_probes, "memory_info", lambda: _probes.MemoryInfo(1, 2, 3))
    assert detect_environment() is first  # cached: the probe is not asked again
    fresh = detect_environment(refresh=True)
    assert fresh is not first
    assert (fresh.total_memory, fresh.available_memory, fresh.swap_used) == (1, 2, 3)


def test_snapshot_is_frozen() -> None:
    env = detect_environment()
    with pytest.raises(dataclasses.FrozenInstanceError):
        env.system = "Darwin"  # type: ignore[misc]  # frozen on purpose


def test_mac_probes_not_run_off_macos(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(_environment.platform, "system", lambda: "Linux")
    monkeypatch.setattr(_probes, "macos_version", lambda: calls.append("sw_vers"))
    monkeypatch.setattr(_probes, "sysctl_int", calls.append)
    monkeypatch.setattr(_probes, "sysctl_str", calls.append)
    env = detect_environment()
    assert calls == []
    assert env.macos_version is None
    assert not env.is_apple_silicon
    assert not env.is_rosetta


def test_rosetta_python_is_detected_as_apple_silicon(monkeypatch: pytest.MonkeyPatch) -> None:
    sysctls = {"sysctl.proc_translated": 1, "hw.optional.arm64": 1}
    monkeypatch.setattr(_environment.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(_environment.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(_probes, "sysctl_int", sysctls.get)
    monkeypatch.setattr(_probes, "sysctl_str", lambda name: "Apple M1")
    monkeypatch.setattr(_probes, "macos_version", lambda: Version("14.2.1"))
    env = detect_environment()
    assert env.machine == "arm64"
    assert env.python_machine == "x86_64"
    assert env.is_apple_silicon
    assert env.is_rosetta
    assert env.macos_version == Version("14.2.1")
    assert env.chip == "Apple M1"


def test_every_probe_failing_still_gives_a_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> str:
        raise OSError("probe broke")

    monkeypatch.setattr(_environment.platform, "system", boom)
    monkeypatch.setattr(_environment.platform, "machine", boom)
    monkeypatch.setattr(_probes, "package_version", lambda name: None)
    monkeypatch.setitem(__import__("sys").modules, "psutil", None)
    env = detect_environment()
    assert env.system == ""
    assert env.torch_version is None
    assert env.diffusers_version is None
    assert env.cuda_available is False
    assert env.mps_available is False
    assert env.total_memory is None


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_to_dict_is_json_ready(name: str) -> None:
    env = MACHINES[name]
    data = json.loads(json.dumps(env.to_dict()))
    assert data["system"] == env.system
    assert data["torch_version"] == str(env.torch_version)
    assert data["total_memory"] == env.total_memory


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_summary_names_the_machine(name: str) -> None:
    env = MACHINES[name]
    text = env.summary()
    assert str(env.torch_version) in text
    if env.macos_version:
        assert f"macOS {env.macos_version}" in text
    if env.is_rosetta:
        assert "Rosetta" in text


def test_replace_makes_a_new_machine() -> None:
    env = MACHINES["m2-16gb-macos13-torch2.0"]
    other = env.replace(total_memory=8 * 2**30)
    assert other.total_memory_gb == 8.0
    assert env.total_memory_gb == 16.0


def test_neutral_defaults() -> None:
    env = Environment()
    assert env.total_memory_gb is None
    assert not env.is_macos
