"""Table-driven tests of the probe parsers, fed output captured on real machines."""

from __future__ import annotations

import pytest
from packaging.version import Version

from mps_helpers import _probes

SW_VERS = [
    # macOS 14 on an M3 (two tabs after each key since macOS 14)
    ("ProductName:\t\tmacOS\nProductVersion:\t\t14.5\nBuildVersion:\t\t23F79\n", "14.5"),
    # macOS 13 on an M2
    ("ProductName:\tmacOS\nProductVersion:\t13.4.1\nBuildVersion:\t22F82\n", "13.4.1"),
    # macOS 12 on an M1
    ("ProductName:\tmacOS\nProductVersion:\t12.6\nBuildVersion:\t21G115\n", "12.6"),
    # Catalina on an Intel Mac
    ("ProductName:\tMac OS X\nProductVersion:\t10.15.7\nBuildVersion:\t19H2\n", "10.15.7"),
    # Big Sur seen from an old-SDK Python without SYSTEM_VERSION_COMPAT=0
    ("ProductName:\tMac OS X\nProductVersion:\t10.16\nBuildVersion:\t20G95\n", "10.16"),
    # macOS 15 with a rapid security response suffix in ProductVersionExtra (ignored)
    (
        "ProductName:\t\tmacOS\nProductVersion:\t\t15.6\nProductVersionExtra:\t(a)\n"
        "BuildVersion:\t\t24G84\n",
        "15.6",
    ),
    # ``sw_vers -productVersion``
    ("26.1\n", "26.1"),
    ("", None),
    ("garbage without a version", None),
]


@pytest.mark.parametrize(("output", "expected"), SW_VERS)
def test_parse_sw_vers(output: str, expected: str | None) -> None:
    got = _probes.parse_sw_vers(output)
    assert got == (Version(expected) if expected else None)


@pytest.mark.parametrize(
    ("release", "expected", "compat"),
    [
        ("14.5", "14.5", False),  # platform.mac_ver() on an arm64 Python
        ("10.16", "10.16", True),  # x86_64 Python under Rosetta, or an old-SDK build
        ("12.6.3", "12.6.3", False),
        ("", None, False),  # platform.mac_ver() on Linux
    ],
)
def test_parse_mac_ver(release: str, expected: str | None, compat: bool) -> None:
    got = _probes.parse_mac_ver(release)
    assert got == (Version(expected) if expected else None)
    assert _probes.is_compat_version(got) is compat


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("1\n", 1),  # sysctl -n sysctl.proc_translated under Rosetta
        ("0\n", 0),  # native arm64 process
        ("hw.optional.arm64: 1\n", 1),  # without -n
        ("sysctl: unknown oid 'sysctl.proc_translated'\n", None),  # Intel Macs
        ("", None),
    ],
)
def test_parse_sysctl_int(output: str, expected: int | None) -> None:
    assert _probes.parse_sysctl_int(output) == expected


@pytest.mark.parametrize(
    ("output", "expected"),
    [("Apple M1 Pro\n", "Apple M1 Pro"), ("  \n", None), ("", None)],
)
def test_parse_sysctl_str(output: str, expected: str | None) -> None:
    assert _probes.parse_sysctl_str(output) == expected


@pytest.mark.parametrize(
    ("python_machine", "arm64_hw", "translated", "expected"),
    [
        ("arm64", 1, 0, "arm64"),  # native Python on Apple Silicon
        ("x86_64", 1, 1, "arm64"),  # Rosetta: the hardware is still arm64
        ("x86_64", None, None, "x86_64"),  # Intel Mac: both sysctls unknown
        ("x86_64", 0, 0, "x86_64"),
        ("aarch64", None, None, "aarch64"),  # Linux on ARM: no sysctl answers
    ],
)
def test_hardware_machine(
    python_machine: str, arm64_hw: int | None, translated: int | None, expected: str
) -> None:
    assert (
        _probes.hardware_machine(python_machine, arm64_hw=arm64_hw, translated=translated)
        == expected
    )


def test_run_returns_none_for_missing_command() -> None:
    assert _probes.run(["/nonexistent/sw_vers"]) is None


def test_run_returns_none_on_failure() -> None:
    assert _probes.run(["false"]) is None


def test_run_returns_stdout() -> None:
    assert _probes.run(["echo", "14.5"]) == "14.5\n"


def test_macos_version_requeries_past_compat_value(monkeypatch: pytest.MonkeyPatch) -> None:
    seen_env: list[dict[str, str] | None] = []

    def fake_run(args: list[str], *, env: dict[str, str] | None = None) -> str:
        seen_env.append(env)
        return "ProductName:\tmacOS\nProductVersion:\t14.2.1\nBuildVersion:\t23C71\n"

    monkeypatch.setattr(_probes.platform, "mac_ver", lambda: ("10.16", ("", "", ""), "x86_64"))
    monkeypatch.setattr(_probes, "run", fake_run)
    assert _probes.macos_version() == Version("14.2.1")
    assert seen_env
    assert seen_env[0] is not None
    assert seen_env[0]["SYSTEM_VERSION_COMPAT"] == "0"


def test_macos_version_trusts_a_real_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_probes.platform, "mac_ver", lambda: ("15.1", ("", "", ""), "arm64"))

    def no_run(*args: object, **kwargs: object) -> str:
        raise AssertionError("sw_vers must not run when mac_ver is trustworthy")

    monkeypatch.setattr(_probes, "run", no_run)
    assert _probes.macos_version() == Version("15.1")


def test_safe_swallows_errors() -> None:
    def boom() -> int:
        raise OSError("no such device")

    assert _probes.safe(boom, 7) == 7


def test_package_version_of_missing_package() -> None:
    assert _probes.package_version("surely-not-an-installed-package-xyz") is None


def test_memory_info_without_psutil(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "psutil", None)
    assert _probes.memory_info() == _probes.MemoryInfo()


def test_torch_info_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_probes, "package_version", lambda name: None)
    assert _probes.torch_info() == _probes.TorchInfo()


class _FakeTorchCpu:
    """A stand-in for ``torch.cpu`` with the given checks (True, False or raising)."""

    def __init__(self, **checks: bool | Exception) -> None:
        for name, value in checks.items():
            setattr(self, name, self._check(value))

    @staticmethod
    def _check(value: bool | Exception) -> object:
        def check() -> bool:
            if isinstance(value, Exception):
                raise value
            return value

        return check


@pytest.mark.real_cpu_dtype
@pytest.mark.parametrize(
    ("checks", "expected"),
    [
        ({"_is_avx512_bf16_supported": True, "_is_amx_tile_supported": False}, True),
        ({"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": True}, True),
        ({"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": False}, False),
        ({}, False),  # a torch older than the checks
        ({"_is_avx512_bf16_supported": RuntimeError("cpuinfo failed")}, False),
        ({"_is_avx512_bf16_supported": RuntimeError("x"), "_is_amx_tile_supported": True}, True),
    ],
)
def test_cpu_bf16_supported(checks: dict[str, bool | Exception], expected: bool) -> None:
    assert _probes.cpu_bf16_supported(_FakeTorchCpu(**checks)) is expected


@pytest.mark.real_cpu_dtype
def test_torch_info_reports_the_cpus_own_bfloat16_support() -> None:
    import torch

    own = any(getattr(torch.cpu, name)() for name in _probes.CPU_BF16_CHECKS)
    assert _probes.torch_info().cpu_bf16_supported is own


def test_other_tests_see_a_cpu_without_native_bfloat16() -> None:
    # conftest's autouse fixture: plans made on the test machine don't depend on its CPU.
    assert _probes.torch_info().cpu_bf16_supported is False
