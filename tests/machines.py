"""Named fake machines, kept as data: every policy test runs over all of them.

Each entry is an :class:`mps_helpers.Environment` as :func:`detect_environment` would report
it on that machine. Figures follow what those machines really report (RAM in GiB as Apple
sells it, the macOS release, the torch release a user of that era would have).
"""

from __future__ import annotations

from packaging.version import Version

from mps_helpers import Environment

GiB = 2**30

_MAC = {
    "system": "Darwin",
    "machine": "arm64",
    "python_machine": "arm64",
    "is_apple_silicon": True,
    "python_version": Version("3.11.7"),
    "diffusers_version": Version("0.42.1"),
    "mps_built": True,
    "mps_available": True,
    "swap_used": 0,
}

MACHINES: dict[str, Environment] = {
    "m1-8gb-macos12.6-torch1.13": Environment(
        **{**_MAC, "diffusers_version": Version("0.14.0")},
        chip="Apple M1",
        macos_version=Version("12.6"),
        torch_version=Version("1.13.1"),
        total_memory=8 * GiB,
        available_memory=3 * GiB,
    ),
    "m2-16gb-macos13-torch2.0": Environment(
        **_MAC,
        chip="Apple M2",
        macos_version=Version("13.4"),
        torch_version=Version("2.0.1"),
        total_memory=16 * GiB,
        available_memory=9 * GiB,
    ),
    "m2-24gb-macos14-torch2.8": Environment(
        **_MAC,
        chip="Apple M2",
        macos_version=Version("14.6"),
        torch_version=Version("2.8.0"),
        total_memory=24 * GiB,
        available_memory=14 * GiB,
    ),
    "m3max-64gb-macos14": Environment(
        **_MAC,
        chip="Apple M3 Max",
        macos_version=Version("14.5"),
        torch_version=Version("2.5.1"),
        total_memory=64 * GiB,
        available_memory=40 * GiB,
    ),
    "m4-128gb-macos15-torch-latest": Environment(
        **_MAC,
        chip="Apple M4 Max",
        macos_version=Version("15.6"),
        torch_version=Version("2.13.0"),
        total_memory=128 * GiB,
        available_memory=100 * GiB,
    ),
    "intel-mac": Environment(
        system="Darwin",
        machine="x86_64",
        python_machine="x86_64",
        chip="Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz",
        macos_version=Version("13.6"),
        python_version=Version("3.11.7"),
        torch_version=Version("2.2.2"),
        diffusers_version=Version("0.42.1"),
        mps_built=True,
        mps_available=False,
        total_memory=32 * GiB,
        available_memory=20 * GiB,
        swap_used=0,
    ),
    "rosetta-m1": Environment(
        system="Darwin",
        machine="arm64",
        python_machine="x86_64",
        is_apple_silicon=True,
        is_rosetta=True,
        chip="Apple M1",
        macos_version=Version("14.2"),
        python_version=Version("3.11.7"),
        torch_version=Version("2.2.2"),
        diffusers_version=Version("0.42.1"),
        mps_built=False,
        mps_available=False,
        total_memory=16 * GiB,
        available_memory=8 * GiB,
        swap_used=0,
    ),
    "linux-cuda": Environment(
        system="Linux",
        machine="x86_64",
        python_machine="x86_64",
        python_version=Version("3.11.7"),
        torch_version=Version("2.11.0+cu130"),
        diffusers_version=Version("0.42.1"),
        cuda_available=True,
        cuda_device_name="NVIDIA H100 80GB HBM3",
        cuda_bf16_supported=True,
        cuda_total_memory=80 * GiB,
        total_memory=256 * GiB,
        available_memory=200 * GiB,
        swap_used=0,
    ),
    "linux-cpu": Environment(
        system="Linux",
        machine="x86_64",
        python_machine="x86_64",
        python_version=Version("3.11.7"),
        torch_version=Version("2.13.0+cpu"),
        diffusers_version=Version("0.42.1"),
        total_memory=24 * GiB,
        available_memory=22 * GiB,
        swap_used=0,
    ),
    "windows": Environment(
        system="Windows",
        machine="AMD64",
        python_machine="AMD64",
        python_version=Version("3.11.7"),
        torch_version=Version("2.13.0+cpu"),
        diffusers_version=Version("0.42.1"),
        total_memory=32 * GiB,
        available_memory=20 * GiB,
        swap_used=0,
    ),
}

# The same Linux box with a CPU that computes bfloat16 natively (AVX512-BF16, as this
# project's 2-core AMD EPYC has).
MACHINES["linux-cpu-bf16"] = MACHINES["linux-cpu"].replace(cpu_bf16_supported=True)

#: Machines on which mps is usable (the library should pick mps there).
MPS_MACHINES = [name for name, env in MACHINES.items() if env.mps_available and not env.is_rosetta]
