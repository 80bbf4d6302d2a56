"""Probes of the machine: pure parsers of captured output, and thin functions that run them.

Each ``parse_*`` function takes the text a command printed and returns a value, so tests can
feed it strings captured on real machines. The thin runners never raise: a probe that cannot
run returns None.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from packaging.version import Version

from mps_helpers._util import parse_version

if TYPE_CHECKING:
    from collections.abc import Callable

__all__: list[str] = []  # internal module

_T = TypeVar("_T")

#: The value macOS reports to Python built against an SDK older than 11 (and under Rosetta).
COMPAT_MACOS = Version("10.16")


def safe(func: Callable[[], _T], default: _T) -> _T:
    """Call ``func()`` and return its value, or ``default`` if it raises anything."""
    try:
        return func()
    except Exception:
        return default


def getenv(name: str) -> str | None:
    """Read an environment variable (a seam for tests)."""
    return os.environ.get(name)


# ---------------------------------------------------------------------------------------
# Pure parsers
# ---------------------------------------------------------------------------------------


def parse_sw_vers(output: str) -> Version | None:
    """Return the ``ProductVersion`` from ``sw_vers`` output, or None.

    >>> parse_sw_vers("ProductName:\\tmacOS\\nProductVersion:\\t14.5\\nBuildVersion:\\t23F79\\n")
    <Version('14.5')>
    """
    for line in output.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "ProductVersion":
            return parse_version(value.strip())
    # ``sw_vers -productVersion`` prints the bare version.
    stripped = output.strip()
    if stripped and "\n" not in stripped and ":" not in stripped:
        return parse_version(stripped)
    return None


def parse_mac_ver(release: str) -> Version | None:
    """Return the version in ``platform.mac_ver()[0]``, or None when empty or invalid.

    The compatibility value "10.16" is returned as is; callers re-query with
    ``SYSTEM_VERSION_COMPAT=0`` when they see it (:func:`is_compat_version`).
    """
    return parse_version(release.strip()) if release else None


def is_compat_version(version: Version | None) -> bool:
    """True for the "10.16" value macOS reports to old-SDK or translated Pythons."""
    return version == COMPAT_MACOS


def parse_sysctl_int(output: str) -> int | None:
    """Return the integer ``sysctl -n NAME`` printed, or None (unknown name prints nothing).

    >>> parse_sysctl_int("1\\n")
    1
    >>> parse_sysctl_int("sysctl: unknown oid 'sysctl.proc_translated'") is None
    True
    """
    text = output.strip()
    if ":" in text:  # "name: value" form of ``sysctl NAME`` without -n
        text = text.rsplit(":", 1)[1].strip()
    try:
        return int(text)
    except ValueError:
        return None


def parse_sysctl_str(output: str) -> str | None:
    """Return the text ``sysctl -n NAME`` printed, stripped, or None when empty."""
    text = output.strip()
    return text or None


def hardware_machine(python_machine: str, *, arm64_hw: int | None, translated: int | None) -> str:
    """Return the hardware architecture from the interpreter's and the kernel's answers.

    An x86_64 Python under Rosetta reports "x86_64"; the hardware is arm64 when the kernel
    says the process is translated or that the CPU supports arm64.

    >>> hardware_machine("x86_64", arm64_hw=1, translated=1)
    'arm64'
    >>> hardware_machine("x86_64", arm64_hw=None, translated=None)
    'x86_64'
    """
    if translated == 1 or arm64_hw == 1:
        return "arm64"
    if python_machine.lower() in {"aarch64", "arm64"} and arm64_hw is not None:
        return "arm64"
    return python_machine


# ---------------------------------------------------------------------------------------
# Thin runners (never raise)
# ---------------------------------------------------------------------------------------


def run(args: list[str], *, env: dict[str, str] | None = None) -> str | None:
    """Run a command and return its stdout, or None if it could not run or failed."""
    try:
        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
            env=env,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout


def sysctl_int(name: str) -> int | None:
    """Return ``sysctl -n NAME`` as an int, or None."""
    out = run(["/usr/sbin/sysctl", "-n", name])
    return None if out is None else parse_sysctl_int(out)


def sysctl_str(name: str) -> str | None:
    """Return ``sysctl -n NAME`` as text, or None."""
    out = run(["/usr/sbin/sysctl", "-n", name])
    return None if out is None else parse_sysctl_str(out)


def macos_version() -> Version | None:
    """Return the real macOS version, looking past the 10.16 compatibility value."""
    version = parse_mac_ver(safe(lambda: platform.mac_ver()[0], ""))
    if version is None or is_compat_version(version):
        env = {**os.environ, "SYSTEM_VERSION_COMPAT": "0"}
        out = run(["/usr/bin/sw_vers"], env=env)
        real = parse_sw_vers(out) if out else None
        if real is not None:
            return real
    return version


def package_version(name: str) -> str | None:
    """Return an installed distribution's version from its metadata, without importing it."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except Exception:
        return None


@dataclass(frozen=True)
class TorchInfo:
    """What torch says about its devices."""

    mps_built: bool = False
    mps_available: bool = False
    cuda_available: bool = False
    cuda_device_name: str | None = None
    cuda_bf16_supported: bool = False
    cuda_total_memory: int | None = None
    cpu_bf16_supported: bool = False


def torch_info() -> TorchInfo:
    """Ask torch about mps and CUDA; all False when torch is missing or broken."""
    if package_version("torch") is None:
        return TorchInfo()
    try:
        import torch
    except Exception:
        return TorchInfo()

    def _mps(attr: str) -> bool:
        backend = getattr(getattr(torch, "backends", None), "mps", None)
        func = getattr(backend, attr, None)
        return bool(safe(func, False)) if callable(func) else False

    cuda = bool(safe(torch.cuda.is_available, False))
    name = bf16 = mem = None
    if cuda:
        name = safe(lambda: str(torch.cuda.get_device_name(0)), None)
        bf16 = safe(lambda: bool(torch.cuda.is_bf16_supported()), False)
        mem = safe(lambda: int(torch.cuda.get_device_properties(0).total_memory), None)
    return TorchInfo(
        mps_built=_mps("is_built"),
        mps_available=_mps("is_available"),
        cuda_available=cuda,
        cuda_device_name=name,
        cuda_bf16_supported=bool(bf16),
        cuda_total_memory=mem,
        cpu_bf16_supported=cpu_bf16_supported(torch.cpu),
    )


#: torch.cpu's checks for the x86 instructions that compute bfloat16 natively: AVX512-BF16
#: (AMD Zen 4 and newer, Intel Cooper Lake and newer) and AMX (Intel Sapphire Rapids and
#: newer). They are private helpers (torch 2.1+), so each is looked up and may be missing.
CPU_BF16_CHECKS: tuple[str, ...] = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def cpu_bf16_supported(torch_cpu: object) -> bool:
    """Whether torch's CPU backend has native bfloat16 instructions to dispatch to.

    Asks the checks of :data:`CPU_BF16_CHECKS` on ``torch.cpu`` (passed in, so that tests
    can hand in a fake); a missing or failing check counts as False. Other CPUs (arm64
    included: not measured) emulate bfloat16 through float32.
    """
    for name in CPU_BF16_CHECKS:
        check = getattr(torch_cpu, name, None)
        if callable(check) and bool(safe(check, False)):
            return True
    return False


@dataclass(frozen=True)
class MemoryInfo:
    """RAM and swap figures in bytes (None when unknown)."""

    total: int | None = None
    available: int | None = None
    swap_used: int | None = None


def memory_info() -> MemoryInfo:
    """Read RAM and swap through psutil; None fields when psutil is missing or fails."""
    try:
        import psutil
    except Exception:
        return MemoryInfo()
    vm = safe(psutil.virtual_memory, None)
    sw = safe(psutil.swap_memory, None)
    return MemoryInfo(
        total=int(vm.total) if vm is not None else None,
        available=int(vm.available) if vm is not None else None,
        swap_used=int(sw.used) if sw is not None else None,
    )
