"""The environment snapshot: what machine, OS, Python and libraries this process runs on.

Detection happens once per process (:func:`detect_environment` caches it). Every policy in
the library takes an :class:`Environment` so that tests and users can pass a fake machine
instead of patching :mod:`platform`.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import sys
from dataclasses import dataclass
from typing import Any

from packaging.version import Version

from mps_helpers import _probes
from mps_helpers._util import Device, GiB, format_bytes, parse_version

__all__ = ["Environment", "auto_device", "detect_environment"]


@dataclass(frozen=True)
class Environment:
    """A frozen snapshot of the machine and the installed libraries.

    Build one by hand (every field has a neutral default) to ask what the library would
    decide on another machine::

        >>> from packaging.version import Version
        >>> m1 = Environment(system="Darwin", machine="arm64", python_machine="arm64",
        ...                  is_apple_silicon=True, macos_version=Version("14.5"),
        ...                  torch_version=Version("2.5.1"), mps_built=True,
        ...                  mps_available=True, total_memory=16 * 2**30)
        >>> m1.total_memory_gb
        16.0
    """

    #: ``platform.system()``: "Darwin", "Linux", "Windows".
    system: str = ""
    #: Hardware architecture: "arm64" on an Apple Silicon Mac even when Python is translated.
    machine: str = ""
    #: The interpreter's own architecture (``platform.machine()``): "x86_64" under Rosetta.
    python_machine: str = ""
    #: True on a Mac with an Apple (arm64) chip, whatever Python's architecture.
    is_apple_silicon: bool = False
    #: True when this Python runs translated by Rosetta 2 (``sysctl.proc_translated`` is 1).
    is_rosetta: bool = False
    #: The real macOS version (never the 10.16 compatibility value), or None off macOS.
    macos_version: Version | None = None
    #: The chip's name as the OS reports it ("Apple M1 Pro"), or None.
    chip: str | None = None
    #: The running Python's version.
    python_version: Version | None = None
    #: Installed torch version, read from package metadata (local suffix kept).
    torch_version: Version | None = None
    #: Installed diffusers version, read from package metadata.
    diffusers_version: Version | None = None
    #: torch was compiled with mps support.
    mps_built: bool = False
    #: mps is usable in this process now.
    mps_available: bool = False
    #: A CUDA device is usable (False where torch is not installed).
    cuda_available: bool = False
    #: Name of CUDA device 0, or None.
    cuda_device_name: str | None = None
    #: CUDA device 0 computes in bfloat16 natively (Ampere or newer).
    cuda_bf16_supported: bool = False
    #: Memory of CUDA device 0 in bytes, or None.
    cuda_total_memory: int | None = None
    #: The CPU has instructions that compute bfloat16 natively (x86 AVX512-BF16 or AMX), as
    #: torch's CPU backend reports them.
    cpu_bf16_supported: bool = False
    #: Physical RAM in bytes (unified memory on Apple Silicon), or None.
    total_memory: int | None = None
    #: RAM available without swapping, in bytes, or None.
    available_memory: int | None = None
    #: Swap in use, in bytes, or None.
    swap_used: int | None = None
    #: ``PYTORCH_ENABLE_MPS_FALLBACK`` as set in this process's environment, or None.
    mps_fallback_env: str | None = None

    @property
    def total_memory_gb(self) -> float | None:
        """Total RAM in GiB (the unit Apple sells memory in), or None when unknown."""
        if self.total_memory is None:
            return None
        return self.total_memory / GiB

    @property
    def is_macos(self) -> bool:
        """True on macOS."""
        return self.system == "Darwin"

    def replace(self, **changes: Any) -> Environment:
        """Return a copy with some fields changed (a fake machine derived from this one)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict: versions as strings, memory in bytes."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = str(value) if isinstance(value, Version) else value
        return out

    def summary(self) -> str:
        """Return a few human-readable lines describing the machine."""
        gib = format_bytes(self.total_memory, digits=1)
        avail = format_bytes(self.available_memory, digits=1)
        swap = format_bytes(self.swap_used)
        osname = f"macOS {self.macos_version}" if self.macos_version else self.system or "unknown"
        arch = self.machine or "unknown"
        if self.python_machine and self.python_machine != self.machine:
            arch += f" (Python is {self.python_machine})"
        lines = [
            f"System:     {osname} on {arch}" + (f", {self.chip}" if self.chip else ""),
            f"Python:     {self.python_version or 'unknown'}"
            + (" (translated by Rosetta)" if self.is_rosetta else ""),
            f"torch:      {self.torch_version or 'not installed'}"
            f"  (mps built: {_yn(self.mps_built)}, mps usable: {_yn(self.mps_available)},"
            f" cuda usable: {_yn(self.cuda_available)})",
            f"diffusers:  {self.diffusers_version or 'not installed'}",
            f"Memory:     {gib} total, {avail} available, {swap} swap used",
        ]
        if self.cuda_device_name:
            lines.append(f"CUDA:       {self.cuda_device_name}")
        return "\n".join(lines)


def auto_device(env: Environment) -> Device:
    """Return the device ``device="auto"`` picks on ``env``: mps when it is usable and Python
    runs natively, else CUDA when usable, else the CPU (the plan's rule ``device.*`` says
    why; the memory estimate assumes the same device)."""
    if env.mps_available and not env.is_rosetta:
        return "mps"
    return "cuda" if env.cuda_available else "cpu"


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


@functools.cache
def _detect() -> Environment:
    system = _probes.safe(platform.system, "") or ""
    python_machine = _probes.safe(platform.machine, "") or ""
    is_darwin = system == "Darwin"

    translated = _probes.sysctl_int("sysctl.proc_translated") if is_darwin else None
    is_rosetta = translated == 1
    arm64_hw = _probes.sysctl_int("hw.optional.arm64") if is_darwin else None
    machine = _probes.hardware_machine(python_machine, arm64_hw=arm64_hw, translated=translated)
    macos = _probes.macos_version() if is_darwin else None
    chip = _probes.sysctl_str("machdep.cpu.brand_string") if is_darwin else None

    torch_info = _probes.torch_info()
    memory = _probes.memory_info()

    return Environment(
        system=system,
        machine=machine,
        python_machine=python_machine,
        is_apple_silicon=is_darwin and machine == "arm64",
        is_rosetta=is_rosetta,
        macos_version=macos,
        chip=chip,
        python_version=parse_version(".".join(str(p) for p in sys.version_info[:3])),
        torch_version=parse_version(_probes.package_version("torch")),
        diffusers_version=parse_version(_probes.package_version("diffusers")),
        mps_built=torch_info.mps_built,
        mps_available=torch_info.mps_available,
        cuda_available=torch_info.cuda_available,
        cuda_device_name=torch_info.cuda_device_name,
        cuda_bf16_supported=torch_info.cuda_bf16_supported,
        cuda_total_memory=torch_info.cuda_total_memory,
        cpu_bf16_supported=torch_info.cpu_bf16_supported,
        total_memory=memory.total,
        available_memory=memory.available,
        swap_used=memory.swap_used,
        mps_fallback_env=_probes.getenv("PYTORCH_ENABLE_MPS_FALLBACK"),
    )


def detect_environment(*, refresh: bool = False) -> Environment:
    """Return the snapshot of this machine, detected once per process and cached.

    Every probe fails soft: one that cannot run leaves its field None or False.
    Detection imports torch (to ask whether mps and CUDA are usable) but never diffusers.

    Args:
        refresh: detect again (for example after freeing memory) instead of returning the
            cached snapshot.
    """
    if refresh:
        _detect.cache_clear()
    return _detect()
